"""Small named facts (``status`` table): the last sync pass, the last sync error and the like."""

from __future__ import annotations

import sqlite3
import time

FLEET_MEMBERS = "fleet.members"  # fleet mode: the live members, this host among them (its consumers count them)


def set_status(conn: sqlite3.Connection, key: str, value: str | None) -> None:
    conn.execute(
        "INSERT INTO status (key, value, updated_at) VALUES (?, ?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        (key, value, time.time()),
    )


def get_status(conn: sqlite3.Connection, key: str) -> tuple[str | None, float] | None:
    row = conn.execute("SELECT value, updated_at FROM status WHERE key = ?", (key,)).fetchone()
    return None if row is None else (row["value"], row["updated_at"])


def statuses_with_prefix(conn: sqlite3.Connection, prefix: str) -> dict[str, tuple[str, float]]:
    """The facts whose key starts with ``prefix`` and that hold a value: key without the prefix -> (value, when)."""
    rows = conn.execute(
        "SELECT key, value, updated_at FROM status WHERE substr(key, 1, ?) = ? AND value IS NOT NULL ORDER BY key",
        (len(prefix), prefix),
    )
    return {row["key"][len(prefix):]: (row["value"], row["updated_at"]) for row in rows}
