"""Keys every host of a fleet writes (``kafka.assignment = "group"``, docs/fleet.md): the alerts dataset's schema
file, ``archive/alerts/_common_metadata``, the same bytes on every host once they have read the fleet's agreed schema.

Why a check: a host's upload of an older schema (written before it read a column another host added) can land after
the newer one, and that host may then be gone for good, while the others never upload theirs again (their schema did
not change). So each sync pass of a fleet host asks S3 (one HEAD per key) whether it holds the bytes this host
uploaded last, and queues this host's copy for upload again when it holds other bytes or none; the same pass uploads
it. Two live hosts do not take turns for long: once both have read the fleet's schema they write the same bytes.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

from ztfd.archive.layout import Layout
from ztfd.config import Config
from ztfd.store import manifest
from ztfd.sync.retention import head_object, upload_difference
from ztfd.sync.s3 import FileError, classified_errors, s3_key

log = logging.getLogger(__name__)

SHARED_PATHS = (Layout(Path()).alerts_schema_path.as_posix(),)


def reassert_shared(conn: sqlite3.Connection, cfg: Config, client: Any) -> int:
    """In a fleet, queue for upload again each shared file whose S3 copy is not this host's last upload; how many
    (nothing asked outside a fleet, nor for a file this host has not uploaded). Raises ``FatalError`` and
    ``OutageError`` as an upload would."""
    if not cfg.kafka.group_mode:
        return 0
    requeued = 0
    for path in SHARED_PATHS:
        upload = manifest.upload_of(conn, path)
        if upload is None:  # not written here, or queued already
            continue
        try:
            with classified_errors(cfg.s3.bucket, cfg.s3.endpoint_url):
                head = head_object(client, cfg.s3.bucket, s3_key(cfg, path))
        except FileError as exc:
            log.warning("sync: cannot check %s in the bucket: %s", path, exc)
            continue
        difference = upload_difference(upload, head)
        if difference is not None:
            log.warning("sync: %s: %s (another host's upload came last); uploading this host's again", path,
                        difference)
            manifest.requeue(conn, path, f"another host's copy in S3: {difference}")
            requeued += 1
    return requeued
