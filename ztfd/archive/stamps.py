"""The stamps dataset: ``<home>/archive/stamps/night=<date>/stamps.parquet``, one row per file under
``images/<date>/`` (``columns.STAMP_COLUMNS``). In a fleet each host writes its own file of a night,
``stamps-<host>-<8 hex>.parquet`` (``writer_name``): a host only has the stamps of the alerts it read, and two hosts
must never upload different bytes under one key. The fleet's own ``stamps.parquet`` of a night, from the bucket's
listing, is the night report writer's (``fleet_stamps``).

A night's file is a function of the files on disk. The first pass of a process looks at every night; later
passes at the nights the store says were touched since (alerts received, whose packets carry cutouts; stamp jobs
done: ``archive_marks.nights_touched_since``), so a pass does not walk a year of folders. A night's file is
written again only when its rows differ, and a file's MD5 is read again only when its size or modification time
changed (otherwise the previous row's is kept).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ztfd import files
from ztfd.archive import columns
from ztfd.archive.alerts import write_parquet
from ztfd.archive.layout import Layout
from ztfd.config import Config
from ztfd.sources import STAMP_TYPES
from ztfd.store import archive_marks, manifest
from ztfd.store.db import transaction
from ztfd.store.status_facts import get_status, set_status
from ztfd.units import unix_micros

NIGHT = re.compile(r"^\d{4}-\d{2}-\d{2}$")
SCHEMA = columns.fixed_schema(columns.STAMP_COLUMNS)
CLOCK_MARGIN = 5.0  # seconds looked back beyond the last pass: a row stamped by another process's clock
FULL_LOOK_AFTER = 12 * 3600.0
LOOKED_AT = "archive_stamps_looked_at"


def kind_of(name: str) -> tuple[str, str]:
    """(detection id, kind) from a stamp file's name: ``<det>_<kind>.fits[.gz]``, ``<det>.png`` (preview), else
    ``<det>_<what>.<ext>`` (a packet the stamp service sent whole)."""
    stem = name.split(".", 1)[0]
    if name.endswith(".png"):
        return stem, "preview"
    detection, _, kind = stem.rpartition("_")
    if detection and kind in STAMP_TYPES:
        return detection, kind
    return (detection or stem), "packet"


def writer_name(cfg: Config) -> str:
    """This host's part of its stamps files' names in a fleet (``kafka.assignment = "group"``): its machine, and a
    hash of its home (two homes may share a machine, as the fleet's members may); on one host, none."""
    if not cfg.kafka.group_mode:
        return ""
    host = re.sub(r"[^A-Za-z0-9._-]+", "_", socket.gethostname()) or "host"
    return f"{host}-{hashlib.sha256(str(cfg.home).encode()).hexdigest()[:8]}"


class StampsWriter:
    def __init__(self, home: Path, writer: str = "") -> None:
        self.layout = Layout(home)
        self.images = home / "images"
        self.writer = writer  # ``writer_name``: "" on one host

    def write_pass(self, conn: sqlite3.Connection) -> list[tuple[str, int, str]]:
        """Write the stamps file of every night that may have changed; the manifest rows of the files written.

        When the last pass began is a fact in the store (``archive_stamps_looked_at``), so ``--once`` from cron
        looks only at what changed too. Older than ``FULL_LOOK_AFTER`` (done jobs are forgotten after a day), or
        never: every night is looked at."""
        started = time.time()
        try:
            nights = {entry.name for entry in os.scandir(self.images) if NIGHT.match(entry.name)}
        except FileNotFoundError:
            nights = set()
        last = get_status(conn, LOOKED_AT)
        if last is not None and last[0] is not None and started - float(last[0]) < FULL_LOOK_AFTER:
            nights &= archive_marks.nights_touched_since(conn, float(last[0]) - CLOCK_MARGIN)
        written = [row for night in sorted(nights) if (row := self.write_night(night, conn)) is not None]
        with transaction(conn):
            manifest.record_files(conn, written)
            set_status(conn, LOOKED_AT, repr(started))
        return written

    def write_night(self, night: str, conn: sqlite3.Connection | None = None) -> tuple[str, int, str] | None:
        """Night ``night``'s file, written when its rows changed (``write_if_changed``; with ``conn``, also when the
        manifest lacks it); the manifest row to record, else None."""
        path = self.layout.stamps_file(night, self.writer)
        previous = _previous_rows(path)
        rows = []
        folder = self.images / night
        for object_dir in sorted(os.scandir(folder), key=lambda e: e.name):
            if not object_dir.is_dir():
                continue
            for entry in sorted(os.scandir(object_dir.path), key=lambda e: e.name):
                if not entry.is_file() or files.is_temporary(entry.name):
                    continue
                stat = entry.stat()
                relative = f"images/{night}/{object_dir.name}/{entry.name}"
                written_at = round(stat.st_mtime * 1e6)
                old = previous.get(relative)
                if old is not None and old["bytes"] == stat.st_size and old["written_at"] == written_at:
                    md5 = old["md5"]
                else:
                    md5 = files.md5_file(Path(entry.path))
                detection, kind = kind_of(entry.name)
                rows.append({"object_id": object_dir.name, "detection_id": detection, "kind": kind,
                             "path": relative, "bytes": stat.st_size, "md5": md5, "written_at": written_at})
        return write_if_changed(self.layout.home, path, rows, conn)


def write_if_changed(home: Path, path: Path, rows: list[dict[str, Any]],
                     conn: sqlite3.Connection | None = None) -> tuple[str, int, str] | None:
    """Write ``rows`` (``SCHEMA``'s columns, ``written_at`` in Unix microseconds) as the stamps file ``path`` unless
    it holds them already (nor when there are none and it does not exist); the manifest's row of the file written.

    With ``conn``, a file that holds them already but that the manifest lacks gives its row too: a process killed
    between the write and the transaction recording it would otherwise leave it never uploaded."""
    if not rows and not path.exists():
        return None
    table = pa.table({name: pa.array([r[name] for r in rows], pa.int64() if name == "written_at" else fld.type)
                      for name, fld in zip(SCHEMA.names, SCHEMA, strict=True)})
    table = pa.Table.from_arrays([table[n].cast(f.type) for n, f in zip(SCHEMA.names, SCHEMA, strict=True)],
                                 schema=SCHEMA)
    if path.exists() and pq.read_table(path).equals(table):
        relative = files.relative_to_home(home, path)
        if conn is None or manifest.recorded_file(conn, relative) is not None:
            return None
        data = path.read_bytes()
        return relative, len(data), files.md5_hex(data)
    return write_parquet(home, path, table)


def _previous_rows(path: Path) -> dict[str, dict[str, Any]]:
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        return {}
    return {row["path"]: {**row, "written_at": unix_micros(row["written_at"])} for row in table.to_pylist()}
