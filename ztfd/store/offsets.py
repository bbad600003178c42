"""Kafka offsets: the next offset to read per partition, saved with the alerts it follows."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class StoredOffset:
    generation: int
    next_offset: int


def stored_offsets(conn: sqlite3.Connection, topic: str) -> dict[int, StoredOffset]:
    rows = conn.execute(
        "SELECT partition, generation, next_offset FROM offsets WHERE topic = ?", (topic,)
    ).fetchall()
    return {row["partition"]: StoredOffset(row["generation"], row["next_offset"]) for row in rows}


def topics_with_offsets(conn: sqlite3.Connection) -> list[str]:
    """Every topic ztfd has stored messages of (a pattern's topics are known only so)."""
    return [row[0] for row in conn.execute("SELECT DISTINCT topic FROM offsets ORDER BY topic")]


def save_offset(conn: sqlite3.Connection, topic: str, partition: int, generation: int, next_offset: int) -> None:
    """Record the next offset to read; call inside the transaction that stores the messages before it.

    Never moves a partition back to an older generation, nor back within one."""
    conn.execute(
        "INSERT INTO offsets (topic, partition, generation, next_offset, updated_at) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (topic, partition) DO UPDATE SET generation = excluded.generation, "
        "next_offset = CASE WHEN excluded.generation > offsets.generation THEN excluded.next_offset "
        "ELSE max(offsets.next_offset, excluded.next_offset) END, updated_at = excluded.updated_at "
        # A batch of an older generation stored after a recreation was recorded must not take the partition back.
        "WHERE excluded.generation >= offsets.generation",
        (topic, partition, generation, next_offset, time.time()),
    )


