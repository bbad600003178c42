"""``sync --full``: reconcile the manifest with the tree (files added, changed or removed by hand, a restore).

The expensive path: it reads and hashes every file under ``data/`` and ``images/``, except files the manifest does
not list that are no newer than the horizon of the rows ``ztfd prune`` forgot (``manifest.forgotten_before``: they
are among those, uploaded, and are left be unread). Any other file not in the manifest is recorded; one whose size
or MD5 differs is recorded again (so uploaded again), a row whose file is gone is dropped (its S3 copy is kept: ztfd
never deletes from S3), and an archived file back on disk unchanged is done.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ztfd import files, store
from ztfd.config import Config
from ztfd.ingest import journal
from ztfd.store import manifest
from ztfd.store.manifest import FileState

log = logging.getLogger(__name__)

SYNCED_DIRS = ("data", "images", "archive")  # everything else under home (state, logs) is never uploaded
APPLY_CHUNK = 500  # the plan is applied in transactions of this many rows: the write lock is held briefly


@dataclass
class Plan:
    """What ``--full`` found: files to record (new or changed), rows to drop (removed), archived files back."""

    added: list[tuple[str, int, str]] = field(default_factory=list)
    changed: list[tuple[str, int, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    forgotten: int = 0  # files on disk the manifest forgot once they were uploaded: left be

    def counts(self) -> dict[str, int]:
        return {"added": len(self.added), "changed": len(self.changed), "removed": len(self.removed),
                "restored": len(self.restored), "forgotten": self.forgotten}


def walk_synced(home: Path) -> Iterator[Path]:
    """Regular files under ``data/`` and ``images/``, skipping temporaries and hidden files and folders."""
    for top in SYNCED_DIRS:
        for folder, dirnames, filenames in os.walk(home / top):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if files.is_temporary(name):
                    continue
                path = Path(folder) / name
                if path.is_file() and not path.is_symlink():
                    yield path


def reconcile(conn: sqlite3.Connection, cfg: Config) -> Plan:
    """Compare the tree with the manifest; changes nothing."""
    plan = Plan()
    for path in walk_synced(cfg.home):
        relpath = files.relative_to_home(cfg.home, path)
        row = manifest.recorded_file(conn, relpath)
        try:
            stat = path.stat()
            # Read at each unlisted file, not once: a prune during a long walk forgets rows behind it.
            if row is None and stat.st_mtime <= manifest.forgotten_before(conn):
                plan.forgotten += 1
                continue
            size, md5 = stat.st_size, files.md5_file(path)
        except FileNotFoundError:
            continue  # removed while we walked
        if row is None:
            if _a_consumers(conn, cfg, relpath, path, stat):
                continue
            plan.added.append((relpath, size, md5))
        elif row.size != size or row.md5 != md5:
            plan.changed.append((relpath, size, md5))
        elif row.state == FileState.ARCHIVED:
            plan.restored.append(relpath)
    plan.removed.extend(path for path in manifest.iter_local_paths(conn) if not (cfg.home / path).is_file())
    return plan


def _a_consumers(conn: sqlite3.Connection, cfg: Config, relpath: str, path: Path, before: os.stat_result) -> bool:
    """True when an unrecorded file is a consumer's, judged after it was read: listed in a file writer's journal
    now (a batch being written, or one cut short by a kill -9: a torn file), recorded now, or changed or gone since
    (swept, or written again). A consumer lists a file before creating it and keeps it listed until the store has
    it or the file is swept, so a file that passes is nobody's batch."""
    if relpath in journal.listed_paths(cfg.state_dir) or manifest.recorded_file(conn, relpath) is not None:
        return True
    try:
        after = path.stat()
    except FileNotFoundError:
        return True
    return (after.st_ino, after.st_size, after.st_mtime_ns) != (before.st_ino, before.st_size, before.st_mtime_ns)


def apply_plan(conn: sqlite3.Connection, plan: Plan) -> None:
    """Apply in transactions of ``APPLY_CHUNK`` rows: on a large tree one transaction would hold the write lock
    long enough for consumers and workers to time out. Each change stands alone, so a kill between chunks
    leaves a manifest that the next ``--full`` completes."""
    # A changed file whose row was archived or done with the same MD5 stays as record_files leaves it; a
    # different MD5 made it pending. An archived file back on disk with the uploaded content is done again.
    for apply, rows in ((store.record_files, plan.added + plan.changed), (manifest.restore_archived, plan.restored),
                        (manifest.drop_files, plan.removed)):
        for start in range(0, len(rows), APPLY_CHUNK):
            with store.transaction(conn):
                apply(conn, rows[start:start + APPLY_CHUNK])
    for path in plan.removed:
        log.info("sync --full: %s is gone from disk: dropped from the manifest (its S3 copy is kept)", path)


def run_full(conn: sqlite3.Connection, cfg: Config) -> dict[str, int]:
    """Reconcile and apply; returns what changed, by kind."""
    plan = reconcile(conn, cfg)
    apply_plan(conn, plan)
    counts = plan.counts()
    log.info("sync --full: %s", ", ".join(f"{n} {what}" for what, n in counts.items()))
    return counts
