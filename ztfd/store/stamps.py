"""What is known about an alert's stamps: one row per alert whose stamp job finished (table ``stamps``).

The detection chosen is a fact about the alert, not about the job that found it: ``ztfd replay`` reads it here by
alert id (the primary key) to check the files on disk and to refetch without a new lookup.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass

from ztfd.store.db import id_chunks

# The stamp kinds a ``fetched`` bit mask counts, bit i for KINDS[i] (the order previews show them).
KINDS = ("science", "template", "difference")


@dataclass(frozen=True)
class StampRecord:
    alert_id: int
    detection_id: str  # the survey's id of the detection (ZTF candid), exact text
    detection_mjd: float | None
    fetched: tuple[str, ...]  # stamp kinds the last run fetched (the others were valid on disk already)
    preview: bool  # the last run drew the preview
    worker: str | None
    done_at: float


def kinds_mask(kinds: Iterable[str]) -> int:
    return sum(1 << KINDS.index(kind) for kind in set(kinds))


def mask_kinds(mask: int) -> tuple[str, ...]:
    return tuple(kind for index, kind in enumerate(KINDS) if mask & (1 << index))


def _record(row: sqlite3.Row) -> StampRecord:
    return StampRecord(row["alert_id"], row["detection_id"], row["detection_mjd"], mask_kinds(row["fetched"]),
                       bool(row["preview"]), row["worker"], row["done_at"])


def save_stamps(
    conn: sqlite3.Connection,
    alert_id: int,
    detection_id: str,
    detection_mjd: float | None,
    fetched: Iterable[str],
    preview: bool,
    worker: str | None,
    now: float | None = None,
) -> None:
    """Record what a finished stamp job learned about its alert (the latest run wins)."""
    conn.execute(
        "INSERT INTO stamps (alert_id, detection_id, detection_mjd, fetched, preview, worker, done_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (alert_id) DO UPDATE SET detection_id = excluded.detection_id, "
        "detection_mjd = excluded.detection_mjd, fetched = excluded.fetched, preview = excluded.preview, "
        "worker = excluded.worker, done_at = excluded.done_at",
        (alert_id, str(detection_id), detection_mjd, kinds_mask(fetched), int(preview), worker,
         time.time() if now is None else now),
    )


def stamp_records(conn: sqlite3.Connection, alert_ids: Iterable[int]) -> dict[int, StampRecord]:
    """The stamp records of these alerts (those that have one), by alert id."""
    found: dict[int, StampRecord] = {}
    for chunk, marks in id_chunks(alert_ids):
        for row in conn.execute(f"SELECT * FROM stamps WHERE alert_id IN ({marks})", chunk):
            found[row["alert_id"]] = _record(row)
    return found


def stamp_records_on(conn: sqlite3.Connection, date: str, topic: str | None = None) -> dict[int, StampRecord]:
    """The stamp records of one partition date's alerts (of one topic): one indexed join, no job rows read."""
    where, args = ("a.date = ?", (date,)) if topic is None else ("a.date = ? AND a.topic = ?", (date, topic))
    rows = conn.execute(f"SELECT s.* FROM alerts a JOIN stamps s ON s.alert_id = a.id WHERE {where}", args)
    return {row["alert_id"]: _record(row) for row in rows}
