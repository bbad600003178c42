"""The fleet's stamps index of a night (fleet mode, docs/fleet.md "The stamps dataset"):
``archive/stamps/night=<date>/stamps.parquet``, written by the fleet's night report writer
(``reporting.fleet_night.FleetNight``) from a listing of the bucket's ``<s3.prefix>images/<date>/``.

Each host's own file of a night (``stamps.writer_name``) lists the stamps on its disk: a stamp fetched again by the
host that took a lost host's partition over is in both hosts' files, and a host lost with its disk may have uploaded
stamps (durable, so committed) but not its file listing them. What the bucket lists is what is durable: one row per
key, so each stamp is there once and none a lost host made durable is missing.

The rows have the host files' columns (``stamps.SCHEMA``): ``bytes`` is the object's size, ``md5`` its ETag where
that is a plain MD5 (an object uploaded in one PUT: ztfd's below ``s3.multipart_threshold``; null for a multipart
upload's ETag, which has a "-"), ``written_at`` its LastModified (when it reached the bucket).
"""

from __future__ import annotations

import logging
import re
import sqlite3
from pathlib import Path
from typing import Any

from ztfd import files
from ztfd.archive.layout import Layout
from ztfd.archive.stamps import kind_of, write_if_changed
from ztfd.store import manifest
from ztfd.store.db import transaction
from ztfd.sync.s3 import listed
from ztfd.units import unix_micros

log = logging.getLogger(__name__)

PLAIN_MD5 = re.compile(r"^[0-9a-f]{32}$")


def index_path(home: Path, date: str) -> Path:
    """The index of night ``date``: the one-host name of the stamps file (no host in a fleet writes that name)."""
    return Layout(home).stamps_file(date)


def listed_rows(client: Any, bucket: str, prefix: str, date: str) -> list[dict[str, Any]]:
    """One row per object under ``<prefix>images/<date>/<object>/`` (a paginated ``list_objects_v2``, in key
    order); ``path`` relative to the home (``prefix`` taken off)."""
    rows = []
    for item in listed(client, bucket, f"{prefix}images/{date}/"):
        relative = str(item["Key"])[len(prefix):]
        parts = relative.split("/")
        if len(parts) != 4 or not parts[2] or not parts[3] or files.is_temporary(parts[3]):
            continue  # a folder marker, or a key ztfd does not write
        detection, kind = kind_of(parts[3])
        etag = str(item.get("ETag", "")).strip('"').lower()
        rows.append({"object_id": parts[2], "detection_id": detection, "kind": kind, "path": relative,
                     "bytes": int(item["Size"]), "md5": etag if PLAIN_MD5.match(etag) else None,
                     "written_at": unix_micros(item["LastModified"])})
    return rows


def write_index(home: Path, conn: sqlite3.Connection, date: str, rows: list[dict[str, Any]]) -> bool:
    """Write night ``date``'s index from ``rows`` (``listed_rows``) and record it in the manifest for upload, unless
    it holds them already; whether it was written."""
    written = write_if_changed(home, index_path(home, date), rows, conn)
    if written is None:
        return False
    with transaction(conn):
        manifest.record_files(conn, [written])
    log.info("stamps index %s: %d files in the bucket, written to %s", date, len(rows), written[0])
    return True
