"""Objects to delete from S3: files a writer replaced by files of other names (``s3_deletions``, schema 11).

The archive (``ztfd.archive.alerts``) folds its part files into one file named by the offsets it holds, and a
rebuild may name a night's files differently: the old files go from disk, and their objects must go from the bucket
too, or a reader of S3 counts their rows twice. The writer asks for it here in the transaction that drops their
manifest rows and records the file that replaces them (``after``); sync deletes an object once that file is
uploaded (its manifest row is not pending), so that a reader of S3 never misses a row, only sees it twice for the
moment between the upload and the deletion. A path recorded again (the same name written anew) is taken off the
list first (``keep``), so a file is never deleted from S3 after its new content was uploaded.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable


def request(conn: sqlite3.Connection, paths: Iterable[str], after: str | None) -> None:
    """Delete ``paths`` from S3 once ``after`` is uploaded (inside the caller's transaction, which removed the files
    from disk or is about to): their manifest rows go, and so does any earlier wait for one of them, which now
    waits for ``after``."""
    paths = sorted(set(paths))
    if not paths:
        return
    now = time.time()
    conn.executemany("DELETE FROM manifest WHERE path = ?", [(path,) for path in paths])
    if after is not None:
        conn.executemany("UPDATE s3_deletions SET after = ? WHERE after = ?", [(after, path) for path in paths])
    conn.executemany(
        "INSERT INTO s3_deletions (path, after, requested_at) VALUES (?, ?, ?) "
        "ON CONFLICT (path) DO UPDATE SET after = excluded.after, requested_at = excluded.requested_at",
        [(path, after, now) for path in paths])


def keep(conn: sqlite3.Connection, paths: Iterable[str]) -> None:
    """The files at ``paths`` are being recorded again: none of them is to be deleted from S3 any more."""
    conn.executemany("DELETE FROM s3_deletions WHERE path = ?", [(path,) for path in paths])


def awaited(conn: sqlite3.Connection, paths: Iterable[str]) -> set[str]:
    """Those of ``paths`` that some object waits for before it is deleted (files that replaced others)."""
    return {path for path in paths
            if conn.execute("SELECT 1 FROM s3_deletions WHERE after = ? LIMIT 1", (path,)).fetchone()}


def cancel_waiting_for(conn: sqlite3.Connection, paths: Iterable[str]) -> None:
    """The files at ``paths`` will never be uploaded (inside the caller's transaction): the objects waiting for
    them stay in the bucket, as they hold rows no other file of this host will."""
    conn.executemany("DELETE FROM s3_deletions WHERE after = ?", [(path,) for path in paths])


def due(conn: sqlite3.Connection, limit: int) -> list[str]:
    """Paths whose objects may be deleted now: the file that replaced them is not pending upload, and they are
    not in the manifest again."""
    rows = conn.execute(
        "SELECT d.path FROM s3_deletions d WHERE NOT EXISTS (SELECT 1 FROM manifest m WHERE m.path = d.path) "
        "AND (d.after IS NULL OR NOT EXISTS (SELECT 1 FROM manifest m WHERE m.path = d.after AND m.state = 'pending')) "
        "ORDER BY d.path LIMIT ?", (limit,))
    return [row[0] for row in rows]


def requested_under(conn: sqlite3.Connection, prefix: str) -> set[str]:
    """The paths under ``prefix`` whose objects are still to be deleted from S3 (this host's, replaced)."""
    rows = conn.execute("SELECT path FROM s3_deletions WHERE path >= ? AND path < ?", (prefix, prefix + "\uffff"))
    return {row[0] for row in rows}


def deleted(conn: sqlite3.Connection, paths: Iterable[str]) -> None:
    conn.executemany("DELETE FROM s3_deletions WHERE path = ?", [(path,) for path in paths])


def count(conn: sqlite3.Connection) -> int:
    """Objects waiting to be deleted from S3 (a small table: it empties at every sync pass)."""
    return int(conn.execute("SELECT count(*) FROM s3_deletions").fetchone()[0])
