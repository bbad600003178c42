"""Shared politeness limits (``ztfd.stamps.ratelimit``): per limit name, the first free slot."""

from __future__ import annotations

import sqlite3

from ztfd.store.db import transaction


def take_slots(conn: sqlite3.Connection, name: str, now: float, span: float) -> float:
    """Take the next ``span`` seconds of slots of limit ``name``; returns when they start (one short write)."""
    with transaction(conn):
        conn.execute("INSERT OR IGNORE INTO rate_limits (name, next_at) VALUES (?, ?)", (name, now))
        row = conn.execute(
            "UPDATE rate_limits SET next_at = max(next_at, ?) + ? WHERE name = ? RETURNING next_at",
            (now, span, name),
        ).fetchone()
    return row[0] - span


def next_free(conn: sqlite3.Connection, name: str) -> float | None:
    """The start of the first free slot of ``name`` (None before its first use)."""
    row = conn.execute("SELECT next_at FROM rate_limits WHERE name = ?", (name,)).fetchone()
    return None if row is None else row[0]
