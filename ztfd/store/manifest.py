"""The sync manifest: every file ztfd writes under data/ and images/, and whether it is in S3."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass


def record_files(conn: sqlite3.Connection, files: Iterable[tuple[str, int, str]]) -> None:
    """Add written files (path relative to home, size, md5) to the sync manifest as pending.

    A file recorded again with the same MD5 as an uploaded one stays done (stamps and alert files are
    deterministic, so a refetch of identical bytes costs no upload); new content makes it pending again.
    """
    now = time.time()
    conn.executemany(
        "INSERT INTO manifest (path, size, md5, state, recorded_at) VALUES (?, ?, ?, 'pending', ?) "
        "ON CONFLICT (path) DO UPDATE SET size = excluded.size, md5 = excluded.md5, "
        "recorded_at = excluded.recorded_at, "
        "state = CASE WHEN manifest.md5 = excluded.md5 THEN manifest.state ELSE 'pending' END, "
        "attempts = CASE WHEN manifest.md5 = excluded.md5 THEN manifest.attempts ELSE 0 END",
        [(path, size, md5, now) for path, size, md5 in files],
    )


# --- reads for status, the demo and the bench (the store helper's; sync's own queries live with sync) ---------


@dataclass(frozen=True)
class FileCounts:
    total: int
    pending: int
    pending_bytes: int
    done: int


@dataclass(frozen=True)
class ManifestFile:
    path: str
    size: int
    md5: str
    state: str
    recorded_at: float
    uploaded_at: float | None


def file_counts(conn: sqlite3.Connection) -> FileCounts:
    rows = {row[0]: (row[1], row[2]) for row in conn.execute(
        "SELECT state, count(*), coalesce(sum(size), 0) FROM manifest GROUP BY state")}
    pending, pending_bytes = rows.get("pending", (0, 0))
    return FileCounts(sum(n for n, _ in rows.values()), pending, pending_bytes, rows.get("done", (0, 0))[0])


def manifest_files(conn: sqlite3.Connection, prefix: str = "") -> list[ManifestFile]:
    """Manifest rows whose path starts with ``prefix`` (e.g. ``data/``), in path order."""
    rows = conn.execute(
        "SELECT path, size, md5, state, recorded_at, uploaded_at FROM manifest WHERE substr(path, 1, ?) = ? "
        "ORDER BY path", (len(prefix), prefix))
    return [ManifestFile(*row) for row in rows]
