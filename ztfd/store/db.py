"""Opening the store and its transactions.

Every process opens its own connection (``connect``); SQLite serialises writers with ``busy_timeout``.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from ztfd.store.schema import ADDED_COLUMNS, SCHEMA, SCHEMA_VERSION


def connect(db_path: Path, timeout: float = 60.0) -> sqlite3.Connection:
    """Open the store, creating it on first use. Autocommit mode: callers group writes with ``transaction``."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db_path, timeout=timeout, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
    _enable_wal(conn, timeout)
    # NORMAL in WAL mode is durable across process crashes (what the promise is about); a power cut can lose
    # the last transactions but never corrupts, and Kafka then redelivers what the lost ones had acknowledged.
    conn.execute("PRAGMA synchronous = NORMAL")
    _migrate(conn)
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


def _migrate(conn: sqlite3.Connection) -> None:
    with transaction(conn):
        for statement in _statements(SCHEMA):
            conn.execute(statement)
        for table, column, declaration in ADDED_COLUMNS:
            if column not in {row["name"] for row in conn.execute(f"PRAGMA table_info({table})")}:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )


def _statements(script: str) -> Iterator[str]:
    lines = [line for line in script.splitlines() if not line.strip().startswith("--")]
    for statement in "\n".join(lines).split(";"):
        if statement.strip():
            yield statement


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
