"""Liveness of every ztfd process (``processes`` table): heartbeats written by the processes themselves, the
supervisor's view of its children, read by the supervisor, ``ztfd status`` and ``ztfd replay``."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass

from ztfd.store.db import transaction
from ztfd.store.states import ProcessState, Role, literal

ROLE_ORDER = tuple(Role)  # the order ``ztfd status`` lists them in
_RUNNING = literal(ProcessState.RUNNING)


@dataclass(frozen=True)
class ProcessRow:
    name: str
    role: str
    topic: str | None
    pid: int | None
    started_at: float | None
    heartbeat_at: float | None
    restarts: int
    state: str
    last_exit: str | None


def heartbeat(conn: sqlite3.Connection, name: str, role: Role, topic: str | None = None) -> None:
    """Say "I am alive" for process ``name``; the supervisor kills a child whose heartbeat goes stale."""
    now = time.time()
    conn.execute(
        "INSERT INTO processes (name, role, topic, pid, started_at, heartbeat_at, state) "
        f"VALUES (?, ?, ?, ?, ?, ?, {_RUNNING}) ON CONFLICT (name) DO UPDATE SET pid = excluded.pid, "
        f"role = excluded.role, topic = excluded.topic, heartbeat_at = excluded.heartbeat_at, state = {_RUNNING}, "
        "started_at = CASE WHEN processes.pid IS excluded.pid THEN processes.started_at ELSE excluded.started_at END",
        (name, role, topic, os.getpid(), now, now),
    )


def processes(conn: sqlite3.Connection, roles: Iterable[str] | None = None) -> list[ProcessRow]:
    """Recorded processes (of some roles), by role (supervisor, consumers, fetchers, syncer) then name."""
    rows = [ProcessRow(*row) for row in conn.execute(
        "SELECT name, role, topic, pid, started_at, heartbeat_at, restarts, state, last_exit FROM processes")]
    wanted = None if roles is None else set(roles)
    rank = {role: index for index, role in enumerate(ROLE_ORDER)}
    return sorted((r for r in rows if wanted is None or r.role in wanted),
                  key=lambda r: (rank.get(r.role, len(rank)), r.name))


def process(conn: sqlite3.Connection, name: str) -> ProcessRow | None:
    row = conn.execute(
        "SELECT name, role, topic, pid, started_at, heartbeat_at, restarts, state, last_exit FROM processes "
        "WHERE name = ?", (name,)).fetchone()
    return None if row is None else ProcessRow(*row)


def reset_processes(conn: sqlite3.Connection, supervisor_name: str) -> None:
    """A supervisor starts: forget the processes of earlier runs and record itself."""
    now = time.time()
    with transaction(conn):
        conn.execute("DELETE FROM processes")
        conn.execute(
            "INSERT INTO processes (name, role, pid, started_at, heartbeat_at, state) VALUES (?, ?, ?, ?, ?, ?)",
            (supervisor_name, Role.SUPERVISOR, os.getpid(), now, now, ProcessState.RUNNING),
        )


def forget_processes(conn: sqlite3.Connection, names: Iterable[str]) -> int:
    """Drop the rows of processes that are gone (``ztfd.daemon.housekeeping`` decides which)."""
    return conn.executemany("DELETE FROM processes WHERE name = ?", [(name,) for name in names]).rowcount


def set_process_state(conn: sqlite3.Connection, name: str, state: ProcessState) -> None:
    conn.execute("UPDATE processes SET state = ? WHERE name = ?", (state, name))


def record_child(
    conn: sqlite3.Connection,
    name: str,
    role: Role,
    topic: str | None,
    pid: int | None,
    restarts: int,
    state: ProcessState,
    last_exit: str | None,
    started: bool,
) -> None:
    """The supervisor's view of one child; ``started`` (a new process) resets its start time and heartbeat."""
    conn.execute(
        "INSERT INTO processes (name, role, topic, pid, started_at, restarts, state, last_exit) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET role = excluded.role, "
        "topic = excluded.topic, pid = excluded.pid, restarts = excluded.restarts, state = excluded.state, "
        "last_exit = excluded.last_exit, "
        "started_at = CASE WHEN ? THEN excluded.started_at ELSE processes.started_at END, "
        "heartbeat_at = CASE WHEN ? THEN NULL ELSE processes.heartbeat_at END",
        (name, role, topic, pid, time.time(), restarts, state, last_exit, started, started),
    )
