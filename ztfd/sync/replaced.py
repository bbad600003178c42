"""Delete from S3 the objects of files a writer replaced by files of other names (``ztfd.store.deletions``).

Run after a pass's uploads, so the file that replaced them is in the bucket first. One ``DeleteObject`` per key
(IAM ``s3:DeleteObject`` on ``<prefix>archive/*``; a batch ``DeleteObjects`` is checked differently by some
S3-compatible stores); S3 answers a key it has no more as deleted (a pass killed after the request, before the
store knew, asks again).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from typing import Any

from ztfd.config import Config
from ztfd.store import deletions
from ztfd.store.db import transaction
from ztfd.sync.s3 import FatalError, FileError, OutageError, classified_errors, s3_key

log = logging.getLogger(__name__)

BATCH = 1000  # paths read from the store at a time


def delete_replaced(conn: sqlite3.Connection, cfg: Config, client: Any,
                    stop: threading.Event) -> tuple[int, str | None]:
    """Delete every object due; the number deleted, and why one could not be (it and the rest stay on the list for
    the next pass). Nothing is lost either way, only seen twice in the bucket: the pass stays ok, with a warning."""
    total, warning = 0, None
    while not stop.is_set() and warning is None:
        paths = deletions.due(conn, BATCH)
        if not paths:
            break
        done = []
        for path in paths:
            if stop.is_set():
                break
            try:
                with classified_errors(cfg.s3.bucket, cfg.s3.endpoint_url):
                    client.delete_object(Bucket=cfg.s3.bucket, Key=s3_key(cfg, path))
            except (FatalError, OutageError, FileError) as exc:
                warning = (f"replaced archive files not deleted from S3 (read twice there until they are; "
                           f"ztfd needs s3:DeleteObject on {cfg.s3.prefix}archive/*): {path}: {exc}")
                log.warning("sync: %s", warning)
                break
            done.append(path)
        with transaction(conn):
            deletions.deleted(conn, done)
        total += len(done)
    if total:
        log.info("sync: %d objects deleted from S3, replaced by files of other names", total)
    return total, warning
