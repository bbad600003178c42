"""The stamps dataset: ``<home>/archive/stamps/night=<date>/stamps.parquet``, one row per file under
``images/<date>/`` (``columns.STAMP_COLUMNS``).

A night's file is a function of the files on disk: each pass looks at the nights whose folders changed since it
last looked (the newest modification time of the night's folder and its object folders) and writes the night's
file again when its rows differ. A file's MD5 is read again only when its size or modification time changed
(otherwise the previous row's is kept).
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ztfd import files
from ztfd.archive import columns
from ztfd.archive.alerts import write_parquet
from ztfd.archive.layout import Layout
from ztfd.sources import STAMP_TYPES

NIGHT = re.compile(r"^\d{4}-\d{2}-\d{2}$")
SCHEMA = columns.fixed_schema(columns.STAMP_COLUMNS)


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


class StampsWriter:
    def __init__(self, home: Path) -> None:
        self.layout = Layout(home)
        self.images = home / "images"
        self.looked: dict[str, float] = {}  # night -> newest folder mtime when last written

    def write_pass(self) -> list[tuple[str, int, str]]:
        """Write the stamps file of every night whose folders changed; the manifest rows of the files written."""
        written = []
        try:
            nights = sorted(entry.name for entry in os.scandir(self.images) if NIGHT.match(entry.name))
        except FileNotFoundError:
            return []
        for night in nights:
            changed = _newest_folder_mtime(self.images / night)
            if self.looked.get(night) == changed:
                continue
            row = self.write_night(night)
            if row is not None:
                written.append(row)
            self.looked[night] = changed
        return written

    def write_night(self, night: str) -> tuple[str, int, str] | None:
        path = self.layout.stamps_file(night)
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
        if not rows and not path.exists():
            return None
        table = pa.table({name: pa.array([r[name] for r in rows], pa.int64() if name == "written_at" else fld.type)
                          for name, fld in zip(SCHEMA.names, SCHEMA, strict=True)})
        table = pa.Table.from_arrays([table[n].cast(f.type) for n, f in zip(SCHEMA.names, SCHEMA, strict=True)],
                                     schema=SCHEMA)
        if path.exists() and pq.read_table(path).equals(table):
            return None
        return write_parquet(self.layout.home, path, table)


def _newest_folder_mtime(folder: Path) -> float:
    newest = folder.stat().st_mtime
    for entry in os.scandir(folder):
        if entry.is_dir():
            newest = max(newest, entry.stat().st_mtime)
    return newest


def _previous_rows(path: Path) -> dict[str, dict[str, Any]]:
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        return {}
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return {row["path"]: {**row, "written_at": (row["written_at"] - epoch) // dt.timedelta(microseconds=1)}
            for row in table.to_pylist()}
