"""Rejected messages: what could not be accepted as an alert, kept with its raw bytes and the reason."""

from __future__ import annotations

import datetime as dt
import sqlite3
from dataclasses import dataclass

from ztfd.text import escape_controls


@dataclass(frozen=True)
class NewRejected:
    partition: int
    generation: int
    kafka_offset: int
    reason: str
    raw: bytes | None


@dataclass(frozen=True)
class Rejected:
    id: int
    topic: str
    partition: int
    generation: int
    kafka_offset: int
    received_at: float
    reason: str
    raw: bytes


REJECTED_PREFIX = "rejected-"  # the start of an export's file name


def export_path(topic: str, partition: int, generation: int, first_offset: int, received_at: float) -> str:
    """Where an export of rejected messages goes, relative to home: ``data/<UTC date of receipt>/<topic>/
    rejected-[g<generation>-]p<partition>-o<first offset>.jsonl``, named by the Kafka identity of the first message
    it holds (as an alert file is, ``sources.file_stem``), so that an export written again, on this host or another,
    has the same key."""
    date = dt.datetime.fromtimestamp(received_at, dt.UTC).date().isoformat()
    generation_part = f"g{generation}-" if generation else ""
    return f"data/{date}/{topic}/{REJECTED_PREFIX}{generation_part}p{partition}-o{first_offset}.jsonl"


def add_rejected(conn: sqlite3.Connection, topic: str, rejected: list[NewRejected], received_at: float) -> None:
    """Keep rejected messages (inside the batch's transaction); a redelivered one is kept once. A reason may quote
    the message: its control characters are escaped, so that it is one harmless line wherever it is shown."""
    conn.executemany(
        "INSERT OR IGNORE INTO rejected (topic, partition, generation, kafka_offset, received_at, reason, raw) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(topic, r.partition, r.generation, r.kafka_offset, received_at, escape_controls(r.reason), r.raw)
         for r in rejected],
    )


def latest_rejected(conn: sqlite3.Connection, topic: str | None, limit: int) -> list[Rejected]:
    """Rejected messages, newest first (of one topic)."""
    where, args = ("WHERE topic = ?", (topic,)) if topic else ("", ())
    rows = conn.execute(
        "SELECT id, topic, partition, generation, kafka_offset, received_at, reason, raw FROM rejected "
        f"{where} ORDER BY id DESC LIMIT ?", (*args, limit),
    ).fetchall()
    return [Rejected(*row[:7], bytes(row[7] or b"")) for row in rows]


def received_before(conn: sqlite3.Connection, before: float, limit: int) -> list[Rejected]:
    """The oldest rejected messages received before ``before`` (to export), oldest first."""
    rows = conn.execute(
        "SELECT id, topic, partition, generation, kafka_offset, received_at, reason, raw FROM rejected "
        "WHERE received_at < ? ORDER BY id LIMIT ?", (before, limit),
    ).fetchall()
    return [Rejected(*row[:7], bytes(row[7] or b"")) for row in rows]


def forget_rejected(conn: sqlite3.Connection, ids: list[int]) -> int:
    """Delete rejected messages (once exported; the counters keep how many there were)."""
    return conn.executemany("DELETE FROM rejected WHERE id = ?", [(i,) for i in ids]).rowcount


def rejected_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Rejected messages per topic still kept in the store (``counters.topic_totals``: all there ever were)."""
    return {row[0]: row[1] for row in conn.execute("SELECT topic, count(*) FROM rejected GROUP BY topic")}
