"""Stored alerts: one row per accepted Kafka message, keyed by its identity (topic, partition, generation, offset)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ztfd.store.db import id_chunks


@dataclass(frozen=True)
class NewAlert:
    """An alert to insert; its file is already on disk at ``path`` (relative to home)."""

    partition: int
    generation: int
    kafka_offset: int
    object_id: str
    date: str
    obs_mjd: float | None
    path: str
    survey: str = "ztf"  # ztfd.sources.ZTF or LSST
    detection_id: str | None = None  # the detection the message names (exact text), if it names one
    band: str | None = None  # that detection's band, when the message says it (LSST)


@dataclass(frozen=True)
class StoredAlert:
    id: int
    topic: str
    partition: int
    generation: int
    kafka_offset: int
    object_id: str
    date: str  # the partition date: the folder under data/ and images/
    obs_mjd: float | None  # the newest observation time of the message, MJD UTC
    path: str
    received_at: float
    survey: str = "ztf"
    detection_id: str | None = None
    band: str | None = None


_COLUMNS = ("id, topic, partition, generation, kafka_offset, object_id, date, obs_mjd, path, received_at, survey, "
            "detection_id, band")


def _stored(row: sqlite3.Row) -> StoredAlert:
    return StoredAlert(*row)


def insert_alerts(conn: sqlite3.Connection, topic: str, alerts: list[NewAlert], received_at: float) -> list[int | None]:
    """Insert the alerts of a batch (inside the caller's transaction); each one's id, None if already stored.

    One ``executemany`` for the whole batch: holding the write lock, SQLite gives the new rows consecutive
    ids, so when every row went in, the ids follow from the last one. Only a conflict (a second consumer of
    the same topic) falls back to a statement per row.
    """
    rows = [(topic, a.partition, a.generation, a.kafka_offset, a.object_id, a.date, a.obs_mjd, a.path, received_at,
             a.survey, a.detection_id, a.band) for a in alerts]
    if not rows:
        return []
    highest_before = conn.execute("SELECT coalesce(max(id), 0) FROM alerts").fetchone()[0]
    inserted = conn.executemany(  # rowcount: rows this statement inserted (the counters' triggers not included)
        "INSERT INTO alerts (topic, partition, generation, kafka_offset, object_id, date, obs_mjd, path, "
        "received_at, survey, detection_id, band) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        rows,
    ).rowcount
    if inserted == len(rows):
        last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
        return list(range(last - len(rows) + 1, last + 1))
    ids: list[int | None] = []
    for row in rows:  # rows inserted by this statement are the ones above the highest id before it
        found = conn.execute(
            "SELECT id FROM alerts WHERE topic = ? AND partition = ? AND generation = ? AND kafka_offset = ?",
            row[:4]).fetchone()
        ids.append(found[0] if found is not None and found[0] > highest_before else None)
    return ids


def stored_offsets_between(
    conn: sqlite3.Connection, topic: str, partition: int, generation: int, low: int, high: int
) -> set[int]:
    """Offsets in ``[low, high]`` of one partition generation that are stored already (one indexed range read)."""
    rows = conn.execute(
        "SELECT kafka_offset FROM alerts WHERE topic = ? AND partition = ? AND generation = ? "
        "AND kafka_offset BETWEEN ? AND ?", (topic, partition, generation, low, high),
    )
    return {row[0] for row in rows}


def dates_received_since(conn: sqlite3.Connection, topic: str, since: float) -> set[str]:
    """Partition dates of the topic's alerts received after ``since`` (where a killed writer may have left
    temporaries)."""
    rows = conn.execute("SELECT DISTINCT date FROM alerts WHERE topic = ? AND received_at > ?", (topic, since))
    return {row[0] for row in rows}


def last_received_at(conn: sqlite3.Connection, topic: str) -> float | None:
    """When the topic's newest stored message (alert or rejected) was received; None if it has none."""
    row = conn.execute(
        "SELECT max(t) FROM (SELECT max(received_at) AS t FROM alerts WHERE topic = ? "
        "UNION ALL SELECT max(received_at) FROM rejected WHERE topic = ?)", (topic, topic)).fetchone()
    return row[0]


def alerts_on(conn: sqlite3.Connection, date: str, topic: str | None = None) -> list[StoredAlert]:
    """Every stored alert of one partition date (of one topic), oldest first."""
    where, args = ("date = ?", (date,)) if topic is None else ("date = ? AND topic = ?", (date, topic))
    return [_stored(row) for row in conn.execute(f"SELECT {_COLUMNS} FROM alerts WHERE {where} ORDER BY id", args)]


def alerts_by_id(conn: sqlite3.Connection, ids: Iterable[int]) -> dict[int, StoredAlert]:
    found: dict[int, StoredAlert] = {}
    for chunk, marks in id_chunks(ids):
        for row in conn.execute(f"SELECT {_COLUMNS} FROM alerts WHERE id IN ({marks})", chunk):
            found[row["id"]] = _stored(row)
    return found


def iter_alerts(conn: sqlite3.Connection) -> Iterator[StoredAlert]:
    """Every stored alert, oldest first."""
    for row in conn.execute(f"SELECT {_COLUMNS} FROM alerts ORDER BY id"):
        yield _stored(row)


def count_alerts(conn: sqlite3.Connection, object_id: str | None = None) -> int:
    if object_id is None:
        return conn.execute("SELECT count(*) FROM alerts").fetchone()[0]
    return conn.execute("SELECT count(*) FROM alerts WHERE object_id = ?", (object_id,)).fetchone()[0]


def count_received_since(conn: sqlite3.Connection, topic: str, since: float) -> int:
    """Alerts of ``topic`` received since ``since`` (``ztfd status``: today): a range of ``alerts_received``, so
    it costs what that day holds, not what the store does (totals: ``counters.topic_totals``)."""
    return conn.execute(
        "SELECT count(*) FROM alerts WHERE topic = ? AND received_at >= ?", (topic, since)
    ).fetchone()[0]
