"""Stored alerts: one row per accepted Kafka message, keyed by its identity (topic, partition, generation, offset)."""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from ztfd.store.db import id_chunks


class NewAlert(NamedTuple):
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
    the same topic) falls back to a statement per row. The counters of what went in are written here, once per
    (date, topic) of the batch (``_count``).
    """
    rows = [(topic, a.partition, a.generation, a.kafka_offset, a.object_id, a.date, a.obs_mjd, a.path, received_at,
             a.survey, a.detection_id, a.band) for a in alerts]
    if not rows:
        return []
    highest_before = conn.execute("SELECT coalesce(max(id), 0) FROM alerts").fetchone()[0]
    inserted = conn.executemany(
        "INSERT INTO alerts (topic, partition, generation, kafka_offset, object_id, date, obs_mjd, path, "
        "received_at, survey, detection_id, band) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        rows,
    ).rowcount
    ids: list[int | None]
    if inserted == len(rows):
        last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
        ids = list(range(last - len(rows) + 1, last + 1))
    else:
        ids = []
        for row in rows:  # rows inserted by this statement are the ones above the highest id before it
            found = conn.execute(
                "SELECT id FROM alerts WHERE topic = ? AND partition = ? AND generation = ? AND kafka_offset = ?",
                row[:4]).fetchone()
            ids.append(found[0] if found is not None and found[0] > highest_before else None)
    _count(conn, topic, Counter(a.date for a, new_id in zip(alerts, ids, strict=True) if new_id is not None),
           received_at)
    return ids


def _count(conn: sqlite3.Connection, topic: str, per_date: Counter[str], received_at: float) -> None:
    """Add a batch's new alerts to ``counter_alerts`` (per partition date) and ``counter_received`` (per UTC day
    of receipt), in the batch's transaction."""
    if not per_date:
        return
    conn.executemany(
        "INSERT INTO counter_alerts (date, topic, alerts, last_received_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (date, topic) DO UPDATE SET alerts = alerts + excluded.alerts, "
        "last_received_at = max(coalesce(last_received_at, 0), excluded.last_received_at)",
        [(date, topic, n, received_at) for date, n in per_date.items()])
    conn.execute(
        "INSERT INTO counter_received (day, topic, alerts) VALUES (?, ?, ?) "
        "ON CONFLICT (day, topic) DO UPDATE SET alerts = alerts + excluded.alerts",
        (utc_day(received_at), topic, sum(per_date.values())))


def utc_day(ts: float) -> str:
    """The UTC date of a Unix time, as ``counter_received`` keys it (SQLite's ``date(ts, 'unixepoch')``)."""
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


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
    temporaries): the dates whose newest alert came later (``counter_alerts``, a row per date and topic)."""
    rows = conn.execute("SELECT date FROM counter_alerts WHERE topic = ? AND last_received_at > ?", (topic, since))
    return {row[0] for row in rows}


def last_received_at(conn: sqlite3.Connection, topic: str) -> float | None:
    """When the topic's newest stored message (alert or rejected) was received; None if it has none."""
    row = conn.execute(
        "SELECT max(t) FROM (SELECT max(last_received_at) AS t FROM counter_alerts WHERE topic = ? "
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


def count_received_on(conn: sqlite3.Connection, topic: str, day: str) -> int:
    """Alerts of ``topic`` received on the UTC ``day`` (``ztfd status``: today): one ``counter_received`` row."""
    row = conn.execute("SELECT alerts FROM counter_received WHERE day = ? AND topic = ?", (day, topic)).fetchone()
    return 0 if row is None else int(row[0])
