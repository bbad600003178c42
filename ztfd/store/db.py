"""Opening the store and its transactions.

Every process opens its own connection (``connect``); SQLite serialises writers with ``busy_timeout``. Opening
reads the store's schema version: an older store is migrated (one transaction), a newer one refused
(``StoreVersionError``), a current one used as it is, without taking the write lock.

Opening never replaces a damaged store (``StoreDamagedError``): a store file that is empty (0 bytes) while its home
already holds an archive (``data/``, ``images/`` or ``reports/`` not empty), truncated, or not a SQLite database is
refused, with one line saying how to recover, rather than used as a new, empty store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ztfd.store.migrations import STEPS, add_missing_columns
from ztfd.store.schema import SCHEMA, SCHEMA_VERSION

log = logging.getLogger(__name__)


class StoreVersionError(Exception):
    """The store's layout is not the one this ztfd reads (``str()`` is the one line to show)."""


class StoreNotCreatedError(Exception):
    """The store file exists but holds no layout yet: a writer (``ztfd start``) is creating it right now."""


class StoreDamagedError(Exception):
    """The store file cannot be used and must not be replaced (``str()`` is the one line to show, with the way out)."""


SQLITE_MAGIC = b"SQLite format 3\x00"
ARCHIVE_DIRS = ("data", "images", "reports")  # a home with any of these not empty has alerts a store described
DAMAGED_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
WAL_CHECKPOINT_PAGES = 1000  # about 4 MB of WAL between automatic checkpoints
WAL_SIZE_LIMIT = 64 * 1024 * 1024  # bytes of WAL file left after a checkpoint (PRAGMA journal_size_limit)
_OPENED: set[str] = set()  # stores this process has opened: ``check_intact`` no longer reads their header


def connect(db_path: Path, timeout: float = 60.0, create: bool = True) -> sqlite3.Connection:
    """Open the store, creating it on first use (unless ``create`` is off and the home already holds an archive:
    ``StoreDamagedError``). Autocommit mode: callers group writes with ``transaction``."""
    check_intact(db_path, missing_ok=create)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db_path, timeout=timeout, isolation_level=None, check_same_thread=False)
    _OPENED.add(os.path.abspath(db_path))
    try:
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        _enable_wal(conn, timeout)
        # NORMAL in WAL mode is durable across process crashes (what the promise is about); a power cut can lose
        # the last transactions but never corrupts, and Kafka then redelivers what the lost ones had acknowledged.
        conn.execute("PRAGMA synchronous = NORMAL")
        # The WAL is checkpointed every WAL_CHECKPOINT_PAGES pages (SQLite's default, said here); a reader that
        # holds an old snapshot can make it grow past that meanwhile, and journal_size_limit then truncates it
        # back to this size once a checkpoint has caught up, so a burst does not leave a big file behind.
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        _migrate(conn, db_path)
    except sqlite3.DatabaseError as exc:
        conn.close()
        if is_damage(exc):
            raise StoreDamagedError(refusal(db_path, f"unreadable ({exc})")) from None
        raise
    except BaseException:
        conn.close()
        raise
    return conn


def is_damage(exc: BaseException) -> bool:
    """SQLite found the file corrupt or not a database (not: locked, busy, disk full)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.DatabaseError) and code is not None and code & 0xFF in DAMAGED_CODES


def check_intact(db_path: Path, missing_ok: bool = True) -> None:
    """Refuse (``StoreDamagedError``) a store file that is truncated or not SQLite, and one that is empty or, unless
    ``missing_ok``, missing while its home holds an archive. Reads the 100-byte header only: cheap at every open.

    An empty file in an empty home is a store being created (``sqlite3.connect`` makes the file before the first
    writer gives it its header); a file whose WAL is not empty may be smaller than its header says (a checkpoint
    killed midway): SQLite reads the rest from the WAL.

    Once this process has opened the store, its header is not read again: closing a descriptor of the database
    file drops every POSIX lock this process's SQLite connections hold on it, and another process closing its last
    connection would then take the store for unused and delete the WAL from under them (their writes lost).
    """
    if os.path.abspath(db_path) in _OPENED:
        return
    try:
        size = db_path.stat().st_size
    except FileNotFoundError:
        if not missing_ok and holds_archive(db_path.parent.parent):
            raise StoreDamagedError(refusal(db_path, "missing")) from None
        return
    wal = Path(f"{db_path}-wal")
    wal_size = wal.stat().st_size if wal.exists() else 0
    if size == 0:
        if not wal_size and holds_archive(db_path.parent.parent):
            raise StoreDamagedError(refusal(db_path, "empty (0 bytes)"))
        return
    with open(db_path, "rb") as handle:
        header = handle.read(100)
    if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
        raise StoreDamagedError(refusal(db_path, "not a SQLite database"))
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    counted = header[24:28] == header[92:96]  # the page count is valid only when these agree
    if counted and pages and not wal_size and size < pages * page_size:
        raise StoreDamagedError(refusal(db_path, f"truncated ({size} of {pages * page_size} bytes)"))


def holds_archive(home: Path) -> bool:
    """Whether ``home`` already holds what a store described: ``data/``, ``images/`` or ``reports/`` not empty."""
    for name in ARCHIVE_DIRS:
        try:
            with os.scandir(home / name) as entries:
                if next(entries, None) is not None:
                    return True
        except (FileNotFoundError, NotADirectoryError):
            continue
    return False


def refusal(db_path: Path, problem: str) -> str:
    """The one line a refused store gets: what is wrong, and the way back."""
    home = db_path.parent.parent
    if not holds_archive(home):
        return (f"store: {db_path} is {problem}. Restore it from a backup, or move it aside with its -wal and -shm "
                f"files (mv {db_path} {db_path}.damaged): ztfd then creates a new one")
    aside = "" if problem == "missing" else (
        f"move it aside with its -wal and -shm files (mv {db_path} {db_path}.damaged) and ")
    return (f"store: {db_path} is {problem}, and {home} holds an archive: refusing to use a new, empty store in its "
            f"place. Restore the store from a backup, or {aside}run `ztfd sync --once --full`, which records every "
            "file under data/ and images/ in a new store and uploads them again; alerts the broker still holds are "
            "read again, older ones stay on disk and in S3 but out of the new store's status and reports")


def connect_readonly(db_path: Path, timeout: float = 2.0) -> sqlite3.Connection:
    """Open an existing store for reading only (``ztfd status``): never creates, migrates or takes a lock that
    waits for writers, and works for a user who may only read home.

    ``mode=ro`` reads the live store, WAL included, while a writer holds its lock (WAL readers do not wait) and
    even when the -wal and -shm files are not writable. Only when they do not exist (every writer closed, so the
    database file holds everything) and cannot be created by this user is the file opened ``immutable``.
    Raises ``StoreNotCreatedError`` while the first writer is still creating it (the file is there, its tables
    not yet), ``StoreVersionError`` unless the store has this ztfd's layout.
    """
    check_intact(db_path)
    uri = db_path.resolve().as_uri()
    try:
        try:
            conn = _open_uri(f"{uri}?mode=ro", timeout)
            _OPENED.add(os.path.abspath(db_path))
            version = schema_version(conn)
        except sqlite3.OperationalError:
            if Path(f"{db_path}-wal").exists():
                raise
            conn = _open_uri(f"{uri}?immutable=1", timeout)
            version = schema_version(conn)
    except sqlite3.DatabaseError as exc:
        if is_damage(exc):
            raise StoreDamagedError(refusal(db_path, f"unreadable ({exc})")) from None
        raise
    if version != SCHEMA_VERSION:
        conn.close()
        if version == 0:
            raise StoreNotCreatedError(f"store: {db_path} is being created")
        if version > SCHEMA_VERSION:
            raise _too_new(db_path, version)
        raise StoreVersionError(
            f"store: {db_path} has schema version {version}, older than this ztfd's ({SCHEMA_VERSION}); it is "
            "migrated when a ztfd process that writes opens it (start, consume, fetch, sync); this command only reads")
    return conn


def _open_uri(uri: str, timeout: float) -> sqlite3.Connection:
    conn = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    return conn


def _enable_wal(conn: sqlite3.Connection, timeout: float) -> None:
    """Switch to WAL, waiting for other processes: the switch can answer "database is locked" at once, without
    the busy handler, when several processes open a new store together (the supervisor starts all its children
    at the same moment)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def schema_version(conn: sqlite3.Connection) -> int:
    """The layout version the store records; 0 for a new (empty) store."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None:
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return 0 if row is None else int(row[0])


def _too_new(db_path: Path, version: int) -> StoreVersionError:
    return StoreVersionError(
        f"store: {db_path} has schema version {version}, newer than this ztfd reads ({SCHEMA_VERSION}); "
        "run the ztfd that wrote it, or a newer one")


def _migrate(conn: sqlite3.Connection, db_path: Path) -> None:
    """Bring the store to ``SCHEMA_VERSION``: nothing to do (a read) when it is there already; otherwise every
    step from its version on, then ``SCHEMA``, in one write transaction (another process may have migrated it
    while this one waited for the lock: the version is read again inside)."""
    version = schema_version(conn)
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise _too_new(db_path, version)
    with transaction(conn):
        version = schema_version(conn)
        if version > SCHEMA_VERSION:
            raise _too_new(db_path, version)
        if version == SCHEMA_VERSION:
            return
        if version:
            log.warning("migrating the store %s from schema version %d to %d", db_path, version, SCHEMA_VERSION)
            for step in range(version, SCHEMA_VERSION):
                STEPS[step](conn)
        for statement in _statements(SCHEMA):
            conn.execute(statement)
        add_missing_columns(conn)
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(SCHEMA_VERSION),)
        )


def _statements(script: str) -> Iterator[str]:
    """The script's statements, whole: a trigger's body holds semicolons of its own (``sqlite3.complete_statement``
    says where a statement really ends)."""
    lines = [line for line in script.splitlines() if not line.strip().startswith("--")]
    pending = ""
    for piece in "\n".join(lines).split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                yield pending
            pending = ""


@dataclass(frozen=True)
class StoreSize:
    used_bytes: int  # pages holding data
    free_bytes: int  # pages freed by deletions, reused before the file grows
    tables: dict[str, int]  # bytes per table and index (empty when SQLite lacks the dbstat table)


def id_chunks(ids: Iterable[int], size: int = 500) -> Iterator[tuple[list[int], str]]:
    """Distinct ids in chunks small enough for one ``IN (…)`` each: (the chunk, its ``?, ?, …`` placeholders)."""
    wanted = sorted(set(ids))
    for start in range(0, len(wanted), size):
        chunk = wanted[start:start + size]
        yield chunk, ",".join("?" * len(chunk))


def store_size(conn: sqlite3.Connection) -> StoreSize:
    """What the store occupies, after moving the WAL into the database file (``bin/bench store``)."""
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    try:
        tables = {row[0]: row[1] for row in conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name")}
    except sqlite3.OperationalError:
        tables = {}
    return StoreSize((pages - free) * page, free * page, tables)


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, immediate: bool = True) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``: takes the write lock up front so that claims cannot race."""
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # also after a COMMIT that failed (disk full, I/O error): SQLite keeps it open
            conn.execute("ROLLBACK")
        raise


@contextlib.contextmanager
def atomic(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """All or nothing: joins the caller's transaction when there is one, else opens its own."""
    if conn.in_transaction:
        yield conn
        return
    with transaction(conn):
        yield conn
