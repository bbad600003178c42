"""Delete from S3 the objects of files a writer replaced by files of other names (``ztfd.store.deletions``).

Run after a pass's uploads, so the file that replaced them is in the bucket first. One ``DeleteObjects`` per
``BATCH`` keys; a key S3 has no more counts as deleted (a pass killed after the request, before the store knew).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from typing import Any

from ztfd.config import Config
from ztfd.store import deletions
from ztfd.store.db import transaction
from ztfd.sync.s3 import classified_errors, s3_key

log = logging.getLogger(__name__)

BATCH = 1000  # keys per DeleteObjects request: S3's limit


def delete_replaced(conn: sqlite3.Connection, cfg: Config, client: Any, stop: threading.Event) -> int:
    """Delete every object due; the number deleted. A key S3 refuses stays on the list for the next pass."""
    total = 0
    while not stop.is_set():
        paths = deletions.due(conn, BATCH)
        if not paths:
            break
        by_key = {s3_key(cfg, path): path for path in paths}
        with classified_errors(cfg.s3.bucket, cfg.s3.endpoint_url):
            answer = client.delete_objects(
                Bucket=cfg.s3.bucket, Delete={"Objects": [{"Key": key} for key in by_key], "Quiet": True})
        refused = {error["Key"]: error for error in answer.get("Errors", [])}
        for key, error in refused.items():
            log.warning("sync: cannot delete %s, replaced by another file: %s %s", key, error.get("Code"),
                        error.get("Message"))
        done = [path for key, path in by_key.items() if key not in refused]
        with transaction(conn):
            deletions.deleted(conn, done)
        total += len(done)
        if refused:
            break  # the rest in the next pass
    if total:
        log.info("sync: %d objects deleted from S3, replaced by files of other names", total)
    return total


