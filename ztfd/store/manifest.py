"""The sync manifest: every file ztfd writes under data/ and images/, and whether it is in S3."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable


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


