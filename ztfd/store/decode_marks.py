"""Where each topic's consumer is decoding, and where it died doing so (``ztfd.ingest.breaker``).

A mark is written before a batch is decoded and deleted after: a mark still there when the next batch begins was
left by a consumer that died while decoding, and becomes a death. Each is one small transaction of its own, on
the consumer's connection, outside the batch's.
"""

from __future__ import annotations

import sqlite3
import time
from typing import NamedTuple

from ztfd.store.db import transaction

DEATHS_KEPT_SECONDS = 86400.0  # a death older than this no longer counts


class Death(NamedTuple):
    id: int
    spans: str  # the batch's offsets, as the breaker wrote them


def enter(conn: sqlite3.Connection, topic: str, spans: str, now: float | None = None) -> list[Death]:
    """Mark ``spans`` as being decoded for ``topic``; a mark left behind becomes a death first. The topic's deaths
    of the last day."""
    now = time.time() if now is None else now
    with transaction(conn):
        left = conn.execute("SELECT spans, started_at FROM decode_marks WHERE topic = ?", (topic,)).fetchone()
        if left is not None:
            conn.execute("INSERT INTO decode_deaths (topic, spans, died_at) VALUES (?, ?, ?)",
                         (topic, left["spans"], left["started_at"]))
        conn.execute("DELETE FROM decode_deaths WHERE topic = ? AND died_at < ?", (topic, now - DEATHS_KEPT_SECONDS))
        conn.execute("INSERT INTO decode_marks (topic, spans, started_at) VALUES (?, ?, ?) "
                     "ON CONFLICT (topic) DO UPDATE SET spans = excluded.spans, started_at = excluded.started_at",
                     (topic, spans, now))
        return deaths(conn, topic)


def leave(conn: sqlite3.Connection, topic: str) -> None:
    """The batch is decoded (or its decoding raised): no mark left."""
    conn.execute("DELETE FROM decode_marks WHERE topic = ?", (topic,))


def forget_deaths(conn: sqlite3.Connection, ids: list[int]) -> None:
    """Deaths explained: their culprits were found (and rejected)."""
    conn.executemany("DELETE FROM decode_deaths WHERE id = ?", [(death_id,) for death_id in ids])


def deaths(conn: sqlite3.Connection, topic: str) -> list[Death]:
    rows = conn.execute("SELECT id, spans FROM decode_deaths WHERE topic = ? ORDER BY id", (topic,)).fetchall()
    return [Death(row["id"], row["spans"]) for row in rows]
