"""The sync manifest: every file ztfd writes under data/ and images/, and whether it is in S3.

Writers (consumer, stamp fetchers, replay) call ``record_files``; everything else here is the syncer's. A row's
state (``FileState``) is ``pending`` (to upload), ``done`` (verified on S3) or ``archived`` (verified on S3 and
deleted locally by retention). With retention off a row is not kept forever: ``ztfd prune`` forgets done rows a day
after their upload, and raises the horizon ``forgotten_before`` past the files it forgot, so that a file on disk
that the manifest no longer lists and that is no newer is known to be in S3 (``sync --full`` leaves it be). Five
rows an alert kept for good were four fifths of the store. The reads a pass makes go through partial indexes and
keyset pages (``manifest_pending``, oldest first, for uploads, ``manifest_uploaded`` for retention), so none of
them reads the whole table. ``retention_checks`` holds, for the few files whose S3 copy retention could not
verify, how many passes failed.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum

from ztfd.store.counters import files_by_state
from ztfd.store.db import transaction
from ztfd.store.status_facts import get_status, set_status

PAGE_ROWS = 2000  # rows read per keyset page
ERROR_CHARS = 500  # what a row keeps of an error message


class FileState(StrEnum):
    PENDING = "pending"
    DONE = "done"
    ARCHIVED = "archived"


@dataclass(frozen=True)
class FileRecord:
    """A file as the manifest has it: what its writer recorded, and where it stands."""

    path: str
    size: int
    md5: str
    state: FileState = FileState.PENDING


@dataclass(frozen=True)
class UploadedFile:
    """What was really uploaded: the bytes read at upload time, which are what the manifest then records."""

    path: str
    recorded_md5: str
    size: int
    md5: str
    etag: str


@dataclass(frozen=True)
class FailedUpload:
    """A pending row whose upload failed; new content recorded for the path meanwhile starts with a clean slate."""

    file: FileRecord
    error: str


@dataclass(frozen=True)
class OldUpload:
    """A done row that retention may archive: what was uploaded, when, and the ETag S3 answered."""

    path: str
    size: int
    md5: str
    etag: str | None
    uploaded_at: float


@dataclass(frozen=True)
class Totals:
    files: int
    bytes: int


def record_files(conn: sqlite3.Connection, files: Iterable[tuple[str, int, str]]) -> None:
    """Add written files (path relative to home, size, md5) to the sync manifest as pending.

    A file recorded again with the same MD5 as an uploaded one stays done (stamps and alert files are
    deterministic, so a refetch of identical bytes costs no upload); new content makes it pending again. Once
    ``forget_uploaded`` has forgotten the row, the same bytes recorded again are a new pending file: uploaded again,
    under the same key.
    """
    now = time.time()
    # In path order: neighbouring paths share B-tree pages, which a batch of random paths visits one by one
    # (a quarter less of SQLite's time for a consumer's batch).
    conn.executemany(
        "INSERT INTO manifest (path, size, md5, state, recorded_at) VALUES (?, ?, ?, 'pending', ?) "
        "ON CONFLICT (path) DO UPDATE SET size = excluded.size, md5 = excluded.md5, "
        "recorded_at = excluded.recorded_at, "
        "state = CASE WHEN manifest.md5 = excluded.md5 THEN manifest.state ELSE 'pending' END, "
        "attempts = CASE WHEN manifest.md5 = excluded.md5 THEN manifest.attempts ELSE 0 END",
        sorted((path, size, md5, now) for path, size, md5 in files),
    )


# --- uploads -------------------------------------------------------------------------------------------------


def pending_totals(conn: sqlite3.Connection) -> Totals:
    row = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM manifest WHERE state = 'pending'").fetchone()
    return Totals(row[0], row[1])


def count_pending(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM manifest WHERE state = 'pending'").fetchone()[0])


def iter_pending(conn: sqlite3.Connection, page: int = PAGE_ROWS) -> Iterator[FileRecord]:
    """Pending rows oldest first (by record time, then path), a page at a time: keyset pagination on the partial
    index, never the table.

    Only rows recorded before the walk began: under load new rows keep arriving behind the cursor, and a walk that
    took them would never end (nor would the pass, its retention and ``sync --once``); and a row recorded again
    during the walk (new bytes while its old ones are being uploaded) would be uploaded twice at once, the older
    PUT possibly landing last. Those wait for the next walk."""
    until = time.time()
    after: tuple[float, str] = (float("-inf"), "")
    while True:
        rows = conn.execute(
            "SELECT path, size, md5, recorded_at FROM manifest WHERE state = 'pending' "
            "AND (recorded_at, path) > (?, ?) AND recorded_at <= ? ORDER BY recorded_at, path LIMIT ?",
            (*after, until, page)).fetchall()
        if not rows:
            return
        for row in rows:
            yield FileRecord(row["path"], row["size"], row["md5"])
        after = (rows[-1]["recorded_at"], rows[-1]["path"])


def mark_uploaded(conn: sqlite3.Connection, done: list[UploadedFile], failed: list[FailedUpload]) -> None:
    """Write upload outcomes in one transaction (the syncer calls it for each upload as it is verified).

    A row is marked done only if it still describes what was uploaded: if a writer recorded new content for the
    path meanwhile (another MD5), the row stays pending and the new content goes in the next pass.
    """
    if not done and not failed:
        return
    now = time.time()
    with transaction(conn):
        conn.executemany(
            "UPDATE manifest SET state = 'done', size = ?, md5 = ?, etag = ?, uploaded_at = ?, last_error = NULL "
            "WHERE path = ? AND state = 'pending' AND md5 IN (?, ?)",
            [(u.size, u.md5, u.etag, now, u.path, u.recorded_md5, u.md5) for u in done])
        conn.executemany(
            "UPDATE manifest SET attempts = attempts + 1, last_error = ? WHERE path = ? AND md5 = ?",
            [(f.error[:ERROR_CHARS], f.file.path, f.file.md5) for f in failed])


# --- --full: the manifest against the tree -------------------------------------------------------------------


def recorded_file(conn: sqlite3.Connection, path: str) -> FileRecord | None:
    row = conn.execute("SELECT size, md5, state FROM manifest WHERE path = ?", (path,)).fetchone()
    return None if row is None else FileRecord(path, row["size"], row["md5"], FileState(row["state"]))


def iter_local_paths(conn: sqlite3.Connection, page: int = PAGE_ROWS) -> Iterator[str]:
    """Paths of every row whose file should be on disk (all but archived), in path order, a page at a time."""
    after = ""
    while True:
        rows = conn.execute("SELECT path FROM manifest WHERE state != 'archived' AND path > ? ORDER BY path LIMIT ?",
                            (after, page)).fetchall()
        if not rows:
            return
        yield from (row["path"] for row in rows)
        after = rows[-1]["path"]


def restore_archived(conn: sqlite3.Connection, paths: Iterable[str]) -> None:
    """Archived files back on disk with their uploaded content are done again."""
    conn.executemany("UPDATE manifest SET state = 'done' WHERE path = ? AND state = 'archived'",
                     [(path,) for path in paths])


def drop_files(conn: sqlite3.Connection, paths: Iterable[str]) -> None:
    """Forget files gone from disk (archived rows stay: their file is on S3 only, by design)."""
    conn.executemany("DELETE FROM manifest WHERE path = ? AND state != 'archived'", [(path,) for path in paths])


def states_under(conn: sqlite3.Connection, prefix: str) -> dict[str, FileState]:
    """The state of every row whose path starts with ``prefix`` (a range of the primary key, not the table)."""
    rows = conn.execute("SELECT path, state FROM manifest WHERE path >= ? AND path < ?", (prefix, prefix + "\uffff"))
    return {row[0]: FileState(row[1]) for row in rows}


# --- retention -----------------------------------------------------------------------------------------------

# Keyset pagination on the manifest_uploaded partial index: only old uploaded rows are read, in index order.
OLD_UPLOADS_QUERY = (
    "SELECT path, size, md5, etag, uploaded_at FROM manifest WHERE state = 'done' AND uploaded_at < ? "
    "AND (uploaded_at > ? OR (uploaded_at = ? AND path > ?)) ORDER BY uploaded_at, path LIMIT ?")


def old_uploads(conn: sqlite3.Connection, cutoff: float, after: tuple[float, str], limit: int) -> list[OldUpload]:
    """Done rows uploaded before ``cutoff``, after ``(uploaded_at, path)`` ``after``, oldest first."""
    rows = conn.execute(OLD_UPLOADS_QUERY, (cutoff, after[0], after[0], after[1], limit)).fetchall()
    return [OldUpload(row["path"], row["size"], row["md5"], row["etag"], row["uploaded_at"]) for row in rows]


def requeue_folder(conn: sqlite3.Connection, folder: str, reason: str) -> int:
    """Queue every done file under ``folder`` (a path ending with "/") for upload again; how many."""
    with transaction(conn):
        rows = conn.execute("UPDATE manifest SET state = 'pending', last_error = ? WHERE path >= ? AND path < ? "
                            "AND state = 'done' RETURNING path", (reason[:ERROR_CHARS], folder,
                                                                   folder[:-1] + chr(ord("/") + 1))).fetchall()
        conn.executemany("DELETE FROM retention_checks WHERE path = ?", [(row["path"],) for row in rows])
    return len(rows)


def upload_of(conn: sqlite3.Connection, path: str) -> OldUpload | None:
    """The upload of a done row (None while it is pending, failing or unknown)."""
    row = conn.execute("SELECT path, size, md5, etag, uploaded_at FROM manifest WHERE path = ? AND state = 'done'",
                       (path,)).fetchone()
    return None if row is None else OldUpload(row["path"], row["size"], row["md5"], row["etag"], row["uploaded_at"])


def archive(conn: sqlite3.Connection, path: str, md5: str) -> bool:
    """Mark a done row archived if it still describes ``md5`` (a writer may have recorded new bytes meanwhile)."""
    archived = conn.execute("UPDATE manifest SET state = 'archived' WHERE path = ? AND state = 'done' "
                            "AND md5 = ? RETURNING path", (path, md5)).fetchone() is not None
    if archived:
        conn.execute("DELETE FROM retention_checks WHERE path = ?", (path,))
    return archived


def unarchive(conn: sqlite3.Connection, path: str, md5: str) -> None:
    """Undo ``archive`` for a file that was rewritten before it could be deleted."""
    conn.execute("UPDATE manifest SET state = 'done' WHERE path = ? AND state = 'archived' AND md5 = ?", (path, md5))


def requeue(conn: sqlite3.Connection, path: str, reason: str) -> None:
    """Queue a done file for upload again (S3 lost it, holds other bytes, or would not say for too long)."""
    with transaction(conn):
        conn.execute("UPDATE manifest SET state = 'pending', last_error = ? WHERE path = ? AND state = 'done'",
                     (reason[:ERROR_CHARS], path))
        conn.execute("DELETE FROM retention_checks WHERE path = ?", (path,))


def note_unverified(conn: sqlite3.Connection, upload: OldUpload, error: str) -> int:
    """Count one more retention pass that could not verify this upload's S3 copy; returns the count so far.

    The count belongs to one upload (``uploaded_at``): a file uploaded again starts from one.
    """
    now = time.time()
    row = conn.execute(
        "INSERT INTO retention_checks (path, uploaded_at, passes, first_at, last_at, last_error) "
        "VALUES (?, ?, 1, ?, ?, ?) ON CONFLICT (path) DO UPDATE SET "
        "passes = CASE WHEN retention_checks.uploaded_at = excluded.uploaded_at "
        "THEN retention_checks.passes + 1 ELSE 1 END, "
        "first_at = CASE WHEN retention_checks.uploaded_at = excluded.uploaded_at "
        "THEN retention_checks.first_at ELSE excluded.first_at END, "
        "uploaded_at = excluded.uploaded_at, last_at = excluded.last_at, last_error = excluded.last_error "
        "RETURNING passes", (upload.path, upload.uploaded_at, now, now, error[:ERROR_CHARS])).fetchone()
    return int(row[0])


# --- forgetting (ztfd prune) ------------------------------------------------------------------------------------

FORGOTTEN_BEFORE = "manifest_forgotten_before"  # status key: see forget_uploaded
# On the manifest_uploaded partial index (done rows by upload time), a page at a time.
FORGET_QUERY = (
    "DELETE FROM manifest WHERE path IN (SELECT path FROM manifest WHERE state = 'done' AND uploaded_at < ? "
    "AND path NOT IN (SELECT path FROM retention_checks) ORDER BY uploaded_at LIMIT ?) "
    "RETURNING min(recorded_at, uploaded_at)")


def forget_uploaded(conn: sqlite3.Connection, uploaded_before: float, limit: int) -> int:
    """Forget up to ``limit`` done rows uploaded before ``uploaded_before``, inside the caller's transaction,
    except files retention is still checking; returns how many went. Their counts stay (``counter_files``).

    The horizon (``forgotten_before``) becomes the newest of their ``min(recorded_at, uploaded_at)``: a file is
    on disk before it is recorded and before it is uploaded, so every forgotten file is no newer than that. A row
    recorded again with the same bytes after its upload (a refetch, a report rebuilt unchanged) keeps its old
    ``uploaded_at``: the upload time, always before ``uploaded_before``, bounds the horizon."""
    bounds = [row[0] for row in conn.execute(FORGET_QUERY, (uploaded_before, limit))]
    if bounds and max(bounds) > forgotten_before(conn):
        set_status(conn, FORGOTTEN_BEFORE, repr(max(bounds)))
    return len(bounds)


def forgotten_before(conn: sqlite3.Connection) -> float:
    """The newest record time of a row ``forget_uploaded`` forgot (0.0 when none was): a file under data/ or
    images/ that the manifest does not list and that is no newer than this was uploaded and then forgotten."""
    found = get_status(conn, FORGOTTEN_BEFORE)
    return float(found[0]) if found is not None and found[0] else 0.0


# --- status --------------------------------------------------------------------------------------------------


def state_totals(conn: sqlite3.Connection) -> dict[FileState, Totals]:
    """Files and bytes per state: the counters the manifest's triggers keep (a few rows, never a count of a
    year of files)."""
    totals = {state: Totals(0, 0) for state in FileState}
    for state, found in files_by_state(conn).items():
        totals[FileState(state)] = Totals(found.files, found.bytes)
    return totals


def count_failing(conn: sqlite3.Connection) -> int:
    """Pending files whose last upload attempt failed: the counter the manifest's triggers keep (one row)."""
    row = conn.execute("SELECT files FROM counter_failing WHERE id = 1").fetchone()
    return 0 if row is None else int(row[0])


def count_unverified(conn: sqlite3.Connection) -> int:
    """Done files whose current upload retention could not verify on S3 (kept, checked again next pass)."""
    try:
        row = conn.execute(
            # CROSS JOIN keeps the few retention_checks rows outside: left to itself the planner scanned the
            # manifest's done rows (a year of files) looking for them.
            "SELECT count(*) FROM retention_checks AS c CROSS JOIN manifest AS m ON m.path = c.path "
            "AND m.uploaded_at = c.uploaded_at AND m.state = 'done'").fetchone()
    except sqlite3.OperationalError as exc:  # a store opened read-only before the table existed
        if "no such table" not in str(exc):
            raise
        return 0
    return int(row[0])


# --- benchmarks ----------------------------------------------------------------------------------------------


def mark_all_uploaded(conn: sqlite3.Connection) -> None:
    """Mark every row done as of now (for a bench whose bucket was filled behind ztfd's back)."""
    conn.execute("UPDATE manifest SET state = 'done', uploaded_at = ?, etag = md5", (time.time(),))


def mark_all_pending(conn: sqlite3.Connection) -> None:
    """Make every row pending again with a clean slate (for a bench that uploads the same tree again)."""
    conn.execute("UPDATE manifest SET state = 'pending', uploaded_at = NULL, etag = NULL, attempts = 0, "
                 "last_error = NULL")


# --- reads for tests and the bench -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestFile:
    path: str
    size: int
    md5: str
    state: str
    recorded_at: float
    uploaded_at: float | None


def manifest_files(conn: sqlite3.Connection, prefix: str = "") -> list[ManifestFile]:
    """Manifest rows whose path starts with ``prefix`` (e.g. ``data/``), in path order."""
    rows = conn.execute(
        "SELECT path, size, md5, state, recorded_at, uploaded_at FROM manifest WHERE substr(path, 1, ?) = ? "
        "ORDER BY path", (len(prefix), prefix))
    return [ManifestFile(*row) for row in rows]
