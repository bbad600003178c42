"""Liveness of every ztfd process and small named facts (``status`` table)."""

from __future__ import annotations

import os
import sqlite3
import time


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
