"""Keys more than one host of a fleet writes (``kafka.assignment = "group"``, docs/fleet.md), where a late upload
of older bytes by another host can land last, and that host may then be gone for good:

- the alerts dataset's schema file, ``archive/alerts/_common_metadata``: the same bytes on every host once it has
  read the fleet's agreed schema, but a host's upload of an older one (written before it read a column another
  host added) can come last, and the others never upload theirs again (their schema did not change). So each sync
  pass of a fleet host asks S3 (one HEAD) whether it holds the bytes this host uploaded last, and queues this host's
  copy again when it does not (``reassert_shared``); the same pass uploads it;
- the night reports and the nights' stamps indexes (``archive/stamps/night=<date>/stamps.parquet``), written by
  the holder of partition 0: one the previous writer left pending can land after the new writer's. The writer's
  reporter asks S3 for each night's first page and index (``upload_differs``) and queues them again when S3 holds
  other bytes (``reporting.fleet_night.FleetNight.check_uploads``).

Two live hosts do not take turns for long: once both have read the fleet's schema they write the same bytes, and
only the current writer checks its reports.
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


def upload_differs(conn: sqlite3.Connection, cfg: Config, client: Any, path: str) -> str | None:
    """How S3's copy of ``path`` differs from this host's last upload of it (one HEAD), None when it does not, or
    this host has no upload of it that is done (not written here, or queued already). Raises ``FileError``,
    ``OutageError``, ``FatalError`` as an upload would."""
    upload = manifest.upload_of(conn, path)
    if upload is None:
        return None
    with classified_errors(cfg.s3.bucket, cfg.s3.endpoint_url):
        head = head_object(client, cfg.s3.bucket, s3_key(cfg, path))
    return upload_difference(upload, head)


def reassert_shared(conn: sqlite3.Connection, cfg: Config, client: Any) -> int:
    """In a fleet, queue for upload again each shared file whose S3 copy is not this host's last upload; how many
    (nothing asked outside a fleet, nor for a file this host has not uploaded)."""
    if not cfg.kafka.group_mode:
        return 0
    requeued = 0
    for path in SHARED_PATHS:
        try:
            difference = upload_differs(conn, cfg, client, path)
        except FileError as exc:
            log.warning("sync: cannot check %s in the bucket: %s", path, exc)
            continue
        if difference is not None:
            log.warning("sync: %s: %s (another host's upload came last); uploading this host's again", path,
                        difference)
            manifest.requeue(conn, path, f"another host's copy in S3: {difference}")
            requeued += 1
    return requeued
