"""What a night report reads from the store, the detections kept for its light curves, and which nights are due.

A night is one partition date. Its report needs the night's alerts (``store.alerts.alerts_on``), the outcome of their
stamp jobs, the image files recorded under ``images/<date>/`` (a range of the manifest's primary key), the
rejected count (``counter_rejected``) and, per object, the detections its stamp job fetched. When a night was last
busy comes from the counters the triggers keep (``counter_alerts``, ``counter_images``), so finding the nights due
for a new report reads a few rows per night.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ztfd.reporting.lightcurve import MAG, Point, decode, encode

# The tag every row of the whole night's report carries in ``reports.topic`` (a topic's own report: its name).
WHOLE_NIGHT = ""


@dataclass(frozen=True)
class StampOutcome:
    """The latest stamp job of an object that night: its state, why it waits or failed, the candid it found."""

    state: str  # ready | leased | done | failed
    waiting: str | None  # retry | unavailable (ready jobs)
    reason: str | None
    candid: str | None
    updated_at: float


def save_detections(conn: sqlite3.Connection, survey: str, object_id: str, points: Sequence[Point],
                    unit: str = MAG) -> None:
    """Keep the detections a provider fetched for an object (its light curve), replacing older ones.

    The stamp fetcher calls it once per detections request, which it makes anyway to choose the candid; nothing
    is kept for an answer without points.
    """
    if not points:
        return
    conn.execute(
        "INSERT INTO detections (survey, object_id, unit, points, fetched_at) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (survey, object_id) DO UPDATE SET unit = excluded.unit, points = excluded.points, "
        "fetched_at = excluded.fetched_at",
        (survey, object_id, unit, encode(points), time.time()),
    )


def load_detections(
    conn: sqlite3.Connection, survey: str, object_ids: Iterable[str]
) -> dict[str, tuple[str, list[Point]]]:
    """object_id -> (unit, points) for the objects that have detections kept."""
    found: dict[str, tuple[str, list[Point]]] = {}
    wanted = sorted(set(object_ids))
    for start in range(0, len(wanted), 500):
        chunk = wanted[start:start + 500]
        rows = conn.execute(
            f"SELECT object_id, unit, points FROM detections WHERE survey = ? AND object_id IN "
            f"({', '.join('?' * len(chunk))})", (survey, *chunk))
        found.update({row["object_id"]: (row["unit"], decode(row["points"])) for row in rows})
    return found


def night_rejected(conn: sqlite3.Connection, date: str, topic: str | None = None) -> int:
    """Messages rejected on that UTC day (a rejected message has no partition date of its own)."""
    only, args = ("AND topic = ?", (topic,)) if topic else ("", ())
    row = conn.execute(f"SELECT coalesce(sum(rejected), 0) FROM counter_rejected WHERE date = ? {only}",
                       (date, *args)).fetchone()
    return int(row[0])


def jobs_on(conn: sqlite3.Connection, date: str) -> dict[int, StampOutcome]:
    """alert_id -> its latest job that is still open or failed since the night's first alert arrived.

    What finished well is in the alerts' stamp records (``store.stamps.stamp_records_on``); this reads only
    the open jobs and the recently failed ones (partial indexes), never the whole queue.
    """
    outcomes: dict[int, StampOutcome] = {}
    first = conn.execute("SELECT min(received_at) FROM alerts WHERE date = ?", (date,)).fetchone()[0]
    if first is None:
        return outcomes
    for state, since in (("ready", None), ("leased", None), ("failed", first)):
        after = "AND j.updated_at >= ?" if since is not None else ""
        rows = conn.execute(
            "SELECT j.alert_id, j.state, j.waiting, j.last_error, j.updated_at FROM jobs j "
            f"JOIN alerts a ON a.id = j.alert_id WHERE j.state = ? {after} AND a.date = ? ORDER BY j.updated_at",
            (state, *((since,) if since is not None else ()), date))
        for row in rows:
            previous = outcomes.get(row["alert_id"])
            if previous is None or previous.updated_at <= row["updated_at"]:
                outcomes[row["alert_id"]] = StampOutcome(row["state"], row["waiting"], row["last_error"], None,
                                                         row["updated_at"])
    return outcomes


def night_images(conn: sqlite3.Connection, date: str) -> list[str]:
    """Paths of every file recorded under ``images/<date>/`` (also the ones archived to S3 only)."""
    low = f"images/{date}/"
    rows = conn.execute("SELECT path FROM manifest WHERE path >= ? AND path < ? ORDER BY path", (low, low + "\uffff"))
    return [row["path"] for row in rows]


def night_changed_at(conn: sqlite3.Connection, date: str) -> float | None:
    """When the night last had a new alert or a new image file."""
    row = conn.execute(
        "SELECT max(t) FROM (SELECT max(last_received_at) AS t FROM counter_alerts WHERE date = ? "
        "UNION ALL SELECT last_recorded_at FROM counter_images WHERE date = ?)", (date, date)).fetchone()
    return row[0]


def reports_due(conn: sqlite3.Connection, quiet_since: float, busy_since: float) -> list[tuple[str, float]]:
    """Nights (date, last change) quiet since ``quiet_since`` but busy after ``busy_since`` whose report is
    missing or older than their last change, oldest first."""
    rows = conn.execute(
        "WITH nights AS (SELECT date, max(last_received_at) AS changed FROM counter_alerts GROUP BY date), "
        "changes AS (SELECT n.date, max(n.changed, coalesce(i.last_recorded_at, 0)) AS changed FROM nights n "
        "LEFT JOIN counter_images i ON i.date = n.date) "
        "SELECT c.date, c.changed FROM changes c LEFT JOIN reports r ON r.date = c.date AND r.topic = ? "
        "WHERE c.changed <= ? AND c.changed > ? AND (r.changed_at IS NULL OR r.changed_at < c.changed) "
        "ORDER BY c.date",
        (WHOLE_NIGHT, quiet_since, busy_since))
    return [(row["date"], row["changed"]) for row in rows]


def mark_report(conn: sqlite3.Connection, date: str, topic: str | None, changed_at: float, pages: int) -> None:
    """Remember that the report of (date, topic) was written from the night as it was at ``changed_at``."""
    conn.execute(
        "INSERT INTO reports (date, topic, generated_at, changed_at, pages) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (date, topic) DO UPDATE SET generated_at = excluded.generated_at, "
        "changed_at = excluded.changed_at, pages = excluded.pages",
        (date, topic or WHOLE_NIGHT, time.time(), changed_at, pages))


def busiest_night(conn: sqlite3.Connection) -> str | None:
    """The date with the most alerts stored (``ztfd demo`` points at its report)."""
    row = conn.execute("SELECT date FROM counter_alerts GROUP BY date ORDER BY sum(alerts) DESC, date LIMIT 1")
    found = row.fetchone()
    return None if found is None else found[0]


def nights_with_alerts(conn: sqlite3.Connection, topic: str | None = None) -> dict[str, int]:
    """date -> alerts stored that night (of ``topic`` only, if given), oldest night first (the counters: a few rows
    a night)."""
    only, args = ("WHERE topic = ?", (topic,)) if topic else ("", ())
    rows = conn.execute(f"SELECT date, sum(alerts) FROM counter_alerts {only} GROUP BY date HAVING sum(alerts) > 0 "
                        "ORDER BY date", args)
    return {row[0]: int(row[1]) for row in rows}


def topics_with_alerts(conn: sqlite3.Connection) -> list[str]:
    """Every topic that has alerts stored on some night."""
    rows = conn.execute("SELECT topic FROM counter_alerts GROUP BY topic HAVING sum(alerts) > 0 ORDER BY topic")
    return [row[0] for row in rows]
