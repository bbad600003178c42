"""The store: one SQLite database (WAL) under ``<home>/state/`` that every ztfd process shares.

It is the source of truth for what has been received (alerts, rejected messages, Kafka offsets), what is to be
done (the stamp job queue, ``ztfd.jobqueue``), what has been written and uploaded (the sync manifest) and who is
running (process heartbeats). Each consumer batch is one transaction over alerts, jobs and offsets, which is what
makes kill -9 at any instant lose and duplicate nothing.

Every process opens its own connection (``connect``); SQLite serialises writers with ``busy_timeout``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- One row per accepted Kafka message, inserted once its file is on disk. (topic, partition, generation, offset)
-- is the message's identity: generation counts how often the partition's offsets restarted (Lasair deletes and
-- recreates a topic when its filter is edited).
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    kafka_offset INTEGER NOT NULL,
    object_id TEXT NOT NULL,
    date TEXT NOT NULL,
    obs_mjd REAL,
    path TEXT NOT NULL,
    received_at REAL NOT NULL,
    UNIQUE (topic, partition, generation, kafka_offset)
);
CREATE INDEX IF NOT EXISTS alerts_date ON alerts (date, topic);
CREATE INDEX IF NOT EXISTS alerts_received ON alerts (topic, received_at);

-- Messages that could not be accepted, kept with their raw bytes and the reason.
CREATE TABLE IF NOT EXISTS rejected (
    id INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    kafka_offset INTEGER NOT NULL,
    received_at REAL NOT NULL,
    reason TEXT NOT NULL,
    raw BLOB,
    UNIQUE (topic, partition, generation, kafka_offset)
);

-- The next offset to read per partition, written in the same transaction as the alerts it follows.
CREATE TABLE IF NOT EXISTS offsets (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    next_offset INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (topic, partition)
);

-- The work queue (see ztfd.jobqueue). state: ready | leased | done | failed. waiting says why a ready job has a
-- not_before in the future: 'retry' after a failure, 'unavailable' while ALeRCE does not have the alert yet.
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'ready',
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    waiting TEXT,
    unavailable_since REAL,
    lease_until REAL,
    owner TEXT,
    last_error TEXT,
    result TEXT,
    batch TEXT,
    dedupe_key TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (kind, not_before, id) WHERE state = 'ready';
CREATE INDEX IF NOT EXISTS jobs_leased ON jobs (lease_until) WHERE state = 'leased';
CREATE INDEX IF NOT EXISTS jobs_batch ON jobs (batch) WHERE batch IS NOT NULL;
-- At most one waiting or running job per dedupe key (see jobqueue.enqueue).
CREATE UNIQUE INDEX IF NOT EXISTS jobs_dedupe ON jobs (kind, dedupe_key)
    WHERE dedupe_key IS NOT NULL AND state IN ('ready', 'leased');

-- The sync manifest: every file ztfd writes under data/ and images/. state: pending | done.
CREATE TABLE IF NOT EXISTS manifest (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    md5 TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    recorded_at REAL NOT NULL,
    uploaded_at REAL,
    etag TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS manifest_pending ON manifest (path) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS manifest_uploaded ON manifest (uploaded_at, path) WHERE state = 'done';

-- Liveness of every ztfd process, written by the processes themselves and read by the supervisor and status.
CREATE TABLE IF NOT EXISTS processes (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    topic TEXT,
    pid INTEGER,
    started_at REAL,
    heartbeat_at REAL,
    restarts INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'starting',
    last_exit TEXT
);

-- Shared politeness limits (ztfd.ratelimit): the time from which the next request may go, per limit name.
CREATE TABLE IF NOT EXISTS rate_limits (
    name TEXT PRIMARY KEY,
    next_at REAL NOT NULL
);

-- Small named facts: last sync pass, last sync error, and similar.
CREATE TABLE IF NOT EXISTS status (
    key TEXT PRIMARY KEY,
    value TEXT,
    updated_at REAL NOT NULL
);
"""


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
    conn.execute("PRAGMA foreign_keys = ON")
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
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


# --- offsets -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredOffset:
    generation: int
    next_offset: int


def stored_offsets(conn: sqlite3.Connection, topic: str) -> dict[int, StoredOffset]:
    rows = conn.execute(
        "SELECT partition, generation, next_offset FROM offsets WHERE topic = ?", (topic,)
    ).fetchall()
    return {row["partition"]: StoredOffset(row["generation"], row["next_offset"]) for row in rows}


def save_offset(conn: sqlite3.Connection, topic: str, partition: int, generation: int, next_offset: int) -> None:
    """Record the next offset to read; call inside the transaction that stores the messages before it."""
    conn.execute(
        "INSERT INTO offsets (topic, partition, generation, next_offset, updated_at) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (topic, partition) DO UPDATE SET generation = excluded.generation, "
        "next_offset = CASE WHEN excluded.generation > offsets.generation THEN excluded.next_offset "
        "ELSE max(offsets.next_offset, excluded.next_offset) END, updated_at = excluded.updated_at",
        (topic, partition, generation, next_offset, time.time()),
    )


# --- manifest ------------------------------------------------------------------------------------------------


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


# --- processes and status ------------------------------------------------------------------------------------


def heartbeat(conn: sqlite3.Connection, name: str, role: str, topic: str | None = None) -> None:
    """Say "I am alive" for process ``name``; the supervisor kills a child whose heartbeat goes stale."""
    now = time.time()
    conn.execute(
        "INSERT INTO processes (name, role, topic, pid, started_at, heartbeat_at, state) "
        "VALUES (?, ?, ?, ?, ?, ?, 'running') ON CONFLICT (name) DO UPDATE SET pid = excluded.pid, "
        "role = excluded.role, topic = excluded.topic, heartbeat_at = excluded.heartbeat_at, state = 'running', "
        "started_at = CASE WHEN processes.pid IS excluded.pid THEN processes.started_at ELSE excluded.started_at END",
        (name, role, topic, os.getpid(), now, now),
    )


def set_status(conn: sqlite3.Connection, key: str, value: str | None) -> None:
    conn.execute(
        "INSERT INTO status (key, value, updated_at) VALUES (?, ?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        (key, value, time.time()),
    )


def get_status(conn: sqlite3.Connection, key: str) -> tuple[str | None, float] | None:
    row = conn.execute("SELECT value, updated_at FROM status WHERE key = ?", (key,)).fetchone()
    return None if row is None else (row["value"], row["updated_at"])
