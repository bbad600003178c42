"""Counters for metrics: read from the small tables the store keeps (schema "Observability" block).

Every read here touches a few rows whatever the store's age: one per topic and night, per job bucket, per
failure class, per manifest state. Nothing outside the store writes them: ``store.alerts.insert_alerts`` (once
per batch) and the triggers on rejected, jobs and manifest do, inside the writers' own transactions, so a counter
can never disagree with the rows it counts.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from ztfd.store.states import FailureClass

# ztfd_stamp_jobs{state}: the buckets the job triggers keep (ready jobs split by why they wait).
JOB_STATES = ("ready", "retry_waiting", "unavailable", "leased", "done", "failed")
# ztfd_stamp_failures_total{reason}: the classes of a failed attempt (the jobs.failure column the trigger counts).
FAILURE_REASONS = tuple(FailureClass)


@dataclass(frozen=True)
class TopicTotals:
    stored: int
    rejected: int
    last_alert_at: float | None


@dataclass(frozen=True)
class FileTotals:
    files: int
    bytes: int


def topic_totals(conn: sqlite3.Connection) -> dict[str, TopicTotals]:
    """Alerts stored, messages rejected and the last receive time, per topic (summed over its nights)."""
    stored = {
        row["topic"]: (row["n"], row["last"])
        for row in conn.execute(
            "SELECT topic, sum(alerts) AS n, max(last_received_at) AS last FROM counter_alerts GROUP BY topic"
        )
    }
    rejected = {
        row["topic"]: row["n"]
        for row in conn.execute("SELECT topic, sum(rejected) AS n FROM counter_rejected GROUP BY topic")
    }
    return {
        topic: TopicTotals(stored.get(topic, (0, None))[0], rejected.get(topic, 0), stored.get(topic, (0, None))[1])
        for topic in sorted(set(stored) | set(rejected))
    }


def job_states(conn: sqlite3.Connection) -> dict[str, int]:
    counts = dict.fromkeys(JOB_STATES, 0)
    counts.update({row["state"]: row["jobs"] for row in conn.execute("SELECT state, jobs FROM counter_jobs")})
    return counts


def stamp_failures(conn: sqlite3.Connection) -> dict[str, int]:
    counts = dict.fromkeys(FAILURE_REASONS, 0)
    counts.update(
        {row["reason"]: row["failures"] for row in conn.execute("SELECT reason, failures FROM counter_stamp_failures")}
    )
    return counts


def files_by_state(conn: sqlite3.Connection) -> dict[str, FileTotals]:
    """Manifest files and bytes per state (pending, done, archived)."""
    return {
        row["state"]: FileTotals(row["files"], row["bytes"])
        for row in conn.execute("SELECT state, files, bytes FROM counter_files")
    }


def uploaded(conn: sqlite3.Connection) -> FileTotals:
    """Files and bytes the syncer uploaded and verified, in all (a re-upload counts again)."""
    row = conn.execute("SELECT files, bytes FROM counter_uploads WHERE id = 1").fetchone()
    return FileTotals(0, 0) if row is None else FileTotals(row["files"], row["bytes"])


def gap_alerts(conn: sqlite3.Connection) -> dict[str, int]:
    """Alerts lost upstream per topic: the ``missing`` offsets of the recorded gaps (few rows: gaps are rare)."""
    return {row["topic"]: row["n"] for row in conn.execute("SELECT topic, sum(missing) AS n FROM gaps GROUP BY topic")}
