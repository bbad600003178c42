"""Bytes received per topic per Lasair quota day: what Lasair-LSST's per-filter byte quota is counted against.

Lasair-LSST stops producing a filter's messages, silently, once the bytes it produced that day pass the filter's
``byte_quota`` (100 MB by default). Its day is its night id ``nid``: days since 2017-01-01 of the server's local
time plus 4 hours; ztfd approximates the server's clock by UTC (``nid_of``). The consumer adds each batch's
bytes in the batch's own transaction, so a redelivered batch is counted once, like its alerts.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass

NID_EPOCH = dt.datetime(2017, 1, 1, tzinfo=dt.UTC)
NID_SHIFT = dt.timedelta(hours=4)  # Lasair's nid rolls over at 20:00 of its server's clock


@dataclass(frozen=True)
class DayBytes:
    """One topic's traffic on one Lasair day."""

    topic: str
    nid: int
    survey: str | None  # of the topic's alerts that day (ztf, lsst), None if all were rejected
    bytes: int
    messages: int
    updated_at: float

    @property
    def day(self) -> str:
        """The Lasair day as a date (what ``nid`` counts from 2017-01-01)."""
        return (NID_EPOCH + dt.timedelta(days=self.nid)).date().isoformat()


def nid_of(moment: dt.datetime) -> int:
    """Lasair's night id of a moment: days since 2017-01-01 of (UTC + 4 h), UTC standing for Lasair's clock."""
    return (moment.astimezone(dt.UTC) + NID_SHIFT - NID_EPOCH).days


def add_bytes(conn: sqlite3.Connection, topic: str, counts: Iterable[tuple[int, str | None, int, int]]
              ) -> list[DayBytes]:
    """Add (nid, survey, bytes, messages) to the topic's days, inside the caller's transaction; the new totals."""
    now = time.time()
    totals = []
    for nid, survey, size, messages in counts:
        row = conn.execute(
            "INSERT INTO topic_bytes (topic, nid, survey, bytes, messages, updated_at) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (topic, nid) DO UPDATE SET bytes = bytes + excluded.bytes, "
            "messages = messages + excluded.messages, survey = coalesce(excluded.survey, survey), "
            "updated_at = excluded.updated_at RETURNING survey, bytes, messages",
            (topic, nid, survey, size, messages, now),
        ).fetchone()
        totals.append(DayBytes(topic, nid, row[0], row[1], row[2], now))
    return totals


def latest_days(conn: sqlite3.Connection) -> dict[str, DayBytes]:
    """Each topic's most recent Lasair day (for ``ztfd status``): one indexed row per topic."""
    rows = conn.execute(
        "SELECT topic, nid, survey, bytes, messages, updated_at FROM topic_bytes AS t "
        "WHERE nid = (SELECT max(nid) FROM topic_bytes WHERE topic = t.topic)"
    ).fetchall()
    return {row[0]: DayBytes(*row) for row in rows}


def surveys(conn: sqlite3.Connection) -> dict[str, str]:
    """The survey each topic's alerts were last seen from."""
    rows = conn.execute(
        "SELECT topic, survey FROM topic_bytes AS t WHERE survey IS NOT NULL AND "
        "nid = (SELECT max(nid) FROM topic_bytes WHERE topic = t.topic AND survey IS NOT NULL)"
    ).fetchall()
    return {row[0]: row[1] for row in rows}
