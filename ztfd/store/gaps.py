"""Alerts lost upstream (gaps in a partition's offsets) and the topic ids that tell a recreated topic apart."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Gap:
    """Offsets ``first_offset``..``last_offset`` of one partition generation that the broker no longer had."""

    topic: str
    partition: int
    generation: int
    first_offset: int
    last_offset: int
    detected_at: float = 0.0

    @property
    def missing(self) -> int:
        return self.last_offset - self.first_offset + 1


def record_gap(conn: sqlite3.Connection, gap: Gap) -> bool:
    """Record a gap once; False when it was already known (found again after a restart)."""
    cur = conn.execute(
        "INSERT INTO gaps (topic, partition, generation, first_offset, last_offset, missing, detected_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        (gap.topic, gap.partition, gap.generation, gap.first_offset, gap.last_offset, gap.missing,
         gap.detected_at or time.time()),
    )
    return cur.rowcount == 1


def recent_gaps(conn: sqlite3.Connection, topic: str | None = None, limit: int = 20) -> list[Gap]:
    """The newest gaps first (``ztfd status``)."""
    where, args = ("WHERE topic = ?", (topic,)) if topic else ("", ())
    rows = conn.execute(
        "SELECT topic, partition, generation, first_offset, last_offset, detected_at FROM gaps "
        + where + " ORDER BY detected_at DESC, id DESC LIMIT ?",
        (*args, limit),
    ).fetchall()
    return [Gap(*tuple(row)) for row in rows]


def missing_by_topic(conn: sqlite3.Connection) -> dict[str, int]:
    """Alerts lost upstream per topic, over all time (a handful of rows: gaps are rare)."""
    rows = conn.execute("SELECT topic, sum(missing) FROM gaps GROUP BY topic").fetchall()
    return {row[0]: int(row[1]) for row in rows}


def topic_id(conn: sqlite3.Connection, topic: str) -> str | None:
    row = conn.execute("SELECT topic_id FROM topic_ids WHERE topic = ?", (topic,)).fetchone()
    return None if row is None else row[0]


def save_topic_id(conn: sqlite3.Connection, topic: str, new_id: str) -> None:
    conn.execute(
        "INSERT INTO topic_ids (topic, topic_id, seen_at) VALUES (?, ?, ?) "
        "ON CONFLICT (topic) DO UPDATE SET topic_id = excluded.topic_id, seen_at = excluded.seen_at",
        (topic, new_id, time.time()),
    )


def start_generation(
    conn: sqlite3.Connection, topic: str, new_id: str | None, generations: Iterable[tuple[int, int]]
) -> None:
    """A recreated topic: each (partition, new generation) resumes at offset 0, and the new topic id is kept,
    in the caller's transaction, so that a crash cannot keep the new id with the old offsets (which would make
    the new topic's first messages look like redeliveries)."""
    now = time.time()
    conn.executemany(
        "INSERT INTO offsets (topic, partition, generation, next_offset, updated_at) VALUES (?, ?, ?, 0, ?) "
        "ON CONFLICT (topic, partition) DO UPDATE SET generation = excluded.generation, next_offset = 0, "
        "updated_at = excluded.updated_at WHERE excluded.generation > offsets.generation",
        [(topic, partition, generation, now) for partition, generation in generations],
    )
    if new_id is not None:
        save_topic_id(conn, topic, new_id)
