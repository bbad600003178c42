"""Avro schemas served by a schema registry (``confluent-avro`` topics), kept in the store.

A Confluent schema id never changes meaning, so each is fetched once and then read from here, by every consumer
and after every restart: a registry that is down later does not stop topics whose schemas are known.
"""

from __future__ import annotations

import os
import sqlite3
import time


def cached_schema(conn: sqlite3.Connection, registry: str, schema_id: int) -> str | None:
    row = conn.execute("SELECT schema FROM avro_schemas WHERE registry = ? AND schema_id = ?",
                       (registry, schema_id)).fetchone()
    return None if row is None else row[0]


def schemas_of(conn: sqlite3.Connection, registry: str) -> dict[int, str]:
    """Every schema kept for ``registry``, by id (a few: one per schema version of its topics)."""
    return {row[0]: row[1] for row in conn.execute(
        "SELECT schema_id, schema FROM avro_schemas WHERE registry = ?", (registry,))}


def save_schema(conn: sqlite3.Connection, registry: str, schema_id: int, text: str, now: float | None = None) -> None:
    """Keep a fetched schema (autocommit: one statement, outside any batch's transaction)."""
    conn.execute("INSERT OR IGNORE INTO avro_schemas (registry, schema_id, schema, fetched_at) VALUES (?, ?, ?, ?)",
                 (registry, schema_id, text, time.time() if now is None else now))


class StoredSchemas:
    """The cache a ``confluent-avro`` source uses, on its consumer's connection. Not in a forked child (the crash-loop
    breaker decodes there): a SQLite connection must not cross a fork, so the child keeps what it fetches in memory."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.owner = os.getpid()

    def get(self, registry: str, schema_id: int) -> str | None:
        if os.getpid() != self.owner:
            return None
        return cached_schema(self.conn, registry, schema_id)

    def put(self, registry: str, schema_id: int, text: str) -> None:
        if os.getpid() == self.owner:
            save_schema(self.conn, registry, schema_id, text)
