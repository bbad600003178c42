"""The store's counters (kept by insert_alerts and by triggers) against the rows they count, through the real queue
and manifest code."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from ztfd import store
from ztfd.store import counters, jobs
from ztfd.store.alerts import NewAlert, insert_alerts
from ztfd.store.jobs import NewStampJob, Waiting
from ztfd.store.states import FailureClass


def counted_jobs(conn: sqlite3.Connection) -> dict[str, int]:
    """What counter_jobs should say, counted the slow way."""
    result = dict.fromkeys(counters.JOB_STATES, 0)
    for row in conn.execute(
        "SELECT CASE WHEN state = 'ready' AND waiting = 'unavailable' THEN 'unavailable' "
        "WHEN state = 'ready' AND waiting = 'retry' THEN 'retry_waiting' ELSE state END AS s, count(*) AS n "
        "FROM jobs GROUP BY s"
    ):
        result[row["s"]] = row["n"]
    return result


def add_alerts(conn: sqlite3.Connection, topic: str, date: str, offsets: range, received_at: float) -> None:
    """Alerts as the consumer stores them (``insert_alerts`` keeps the alert counters), offset o received at
    ``received_at + o``."""
    with store.transaction(conn):
        for offset in offsets:
            insert_alerts(conn, topic, [NewAlert(0, 0, offset, "ZTF21abcdefg", date, None,
                                                 f"data/{date}/{topic}/x-{offset}.json")], received_at + offset)


def queue_jobs(conn: sqlite3.Connection, count: int) -> None:
    """``count`` stamp jobs, each for an alert of its own."""
    start = conn.execute("SELECT coalesce(max(kafka_offset) + 1, 0) FROM alerts").fetchone()[0]
    add_alerts(conn, "t", "2021-09-01", range(start, start + count), 1_630_470_000.0)
    ids = [row[0] for row in conn.execute("SELECT id FROM alerts WHERE kafka_offset >= ?", (start,))]
    with store.transaction(conn):
        jobs.enqueue(conn, (NewStampJob(alert_id) for alert_id in ids))


def test_job_counters_follow_every_queue_operation(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "s.sqlite3")
    rng = random.Random(15)
    queue_jobs(conn, 60)
    owner = jobs.new_owner()
    failures_expected = 0
    for round_number in range(6):
        now = 1e12 + round_number  # a retry's not_before moves on, as time.time() does
        for job in jobs.claim(conn, owner, lease_seconds=60, limit=12, now=now):
            action = rng.choice(["complete", "retry", "unavailable", "fail", "release", "keep"])
            if action == "complete":
                assert jobs.complete(conn, job.id, owner, jobs.StampResult("1", None))
            elif action == "retry":
                assert jobs.retry(conn, job.id, owner, 0.0, "HTTP 503 from get_stamp", FailureClass.HTTP, now=now)
                failures_expected += 1
            elif action == "unavailable":
                assert jobs.retry(conn, job.id, owner, 0.0, "not yet", FailureClass.UNAVAILABLE,
                                  waiting=Waiting.UNAVAILABLE, now=now)
            elif action == "fail":
                assert jobs.fail(conn, job.id, owner, "detections: HTTP 500", FailureClass.HTTP)
                failures_expected += 1
            elif action == "release":
                assert jobs.release(conn, owner, [job.id]) == 1
        assert counters.job_states(conn) == counted_jobs(conn)
    # Leases that run out: the jobs come back (or fail) and each counts as a lost worker.
    leased = conn.execute("SELECT count(*) FROM jobs WHERE state = 'leased'").fetchone()[0]
    assert leased > 0
    with store.transaction(conn):
        jobs.requeue_expired(conn, max_attempts=3, now=2e12)
    assert counters.job_states(conn) == counted_jobs(conn)
    failures = counters.stamp_failures(conn)
    assert failures["worker_lost"] == leased
    assert failures["http"] == failures_expected
    assert sum(failures.values()) == failures_expected + leased
    # Forgetting finished jobs keeps what they ended as; forgetting open ones takes them off.
    before = counters.job_states(conn)
    with store.transaction(conn):
        conn.execute("DELETE FROM jobs WHERE state IN ('done', 'failed')")
    assert counters.job_states(conn) == before
    with store.transaction(conn):
        conn.execute("DELETE FROM jobs WHERE state = 'ready'")
    after = counters.job_states(conn)
    assert after["ready"] == after["retry_waiting"] == after["unavailable"] == 0
    assert (after["done"], after["failed"]) == (before["done"], before["failed"])


@pytest.mark.parametrize(("reason", "expected"), [
    ("HTTP 503 from get_stamp", "http"),
    ("detections: HTTP 500", "http"),
    ("science stamp: HTTP 502", "http"),
    ("timed out after 30s", "timeout"),
    ("ClientConnectorError: Cannot connect to host 127.0.0.1:1", "connection"),
    ("ServerDisconnectedError: Server disconnected", "connection"),
    ("science stamp: not gzip (starts with b'<html>')", "bad_body"),
    ("template stamp: bad gzip: Compressed file ended", "bad_body"),
    ("difference stamp: not FITS: OSError: empty", "bad_body"),
    ("detections: not JSON (JSONDecodeError)", "bad_body"),
    ("HTTP 200: body larger than 16777216 bytes", "bad_body"),
    ("not available at ALeRCE after 604800s: no detection", "unavailable"),
    ("its worker died or hung 8 times (lease expired); last error: none", "worker_lost"),
    ("bad object_id '../x'", "bad_job"),
    ("KeyError: 'x'", "other"),
    ("science stamp: HTTP 502", "timeout"),  # the class the code gave is counted, whatever the message says
])
def test_failure_reasons_fall_in_fixed_classes(tmp_path: Path, reason: str, expected: str) -> None:
    """A failure is counted by the class the fetcher gave it (``jobs.failure``), never by its message's words."""
    conn = store.connect(tmp_path / "s.sqlite3")
    queue_jobs(conn, 1)
    owner = jobs.new_owner()
    (job,) = jobs.claim(conn, owner, lease_seconds=60)
    assert jobs.fail(conn, job.id, owner, reason, FailureClass(expected))
    failures = counters.stamp_failures(conn)
    assert expected in counters.FAILURE_REASONS
    assert failures[expected] == 1 and sum(failures.values()) == 1


def test_alert_rejected_and_file_counters(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "s.sqlite3")
    add_alerts(conn, "a", "2021-09-01", range(0, 40), 1_630_470_000.0)
    add_alerts(conn, "a", "2021-09-02", range(40, 50), 1_630_560_000.0)
    add_alerts(conn, "a", "2021-09-02", range(45, 55), 1_630_560_000.0)  # 5 already stored: not counted again
    add_alerts(conn, "b", "2021-09-01", range(0, 3), 1_630_470_000.0)
    with store.transaction(conn):
        conn.executemany(
            "INSERT OR IGNORE INTO rejected (topic, partition, generation, kafka_offset, received_at, reason, raw) "
            "VALUES (?, 0, 0, ?, ?, 'not JSON', x'00')", [("b", o, 1_630_470_000.0) for o in (7, 8, 8)])
    totals = counters.topic_totals(conn)
    for topic in ("a", "b"):
        row = conn.execute("SELECT count(*), max(received_at) FROM alerts WHERE topic = ?", (topic,)).fetchone()
        assert (totals[topic].stored, totals[topic].last_alert_at) == (row[0], row[1])
    assert totals["b"].rejected == conn.execute("SELECT count(*) FROM rejected").fetchone()[0] == 2
    assert totals["a"].rejected == 0

    files = [(f"images/2021-09-01/ZTF21abcdefg/{n}_science.fits.gz", 100 + n, f"md5-{n}") for n in range(10)]
    with store.transaction(conn):
        store.record_files(conn, files)
        store.record_files(conn, files[:3])  # the same content again: no change
        store.record_files(conn, [(files[0][0], 999, "new-md5")])  # new content for one path
    with store.transaction(conn):  # what the syncer does when an upload is verified
        conn.executemany("UPDATE manifest SET state = 'done', uploaded_at = ? WHERE path = ?",
                         [(5.0, path) for path, _, _ in files[4:]])
    with store.transaction(conn):  # a pending row dropped (its file is gone), a done one forgotten (ztfd prune)
        conn.executemany("DELETE FROM manifest WHERE path = ?", [(files[3][0],), (files[9][0],)])

    def real(state: str) -> tuple[int, int]:
        row = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM manifest WHERE state = ?", (state,))
        return tuple(row.fetchone())

    by_state = counters.files_by_state(conn)
    assert (by_state["pending"].files, by_state["pending"].bytes) == real("pending")
    done_files, done_bytes = real("done")  # a done file keeps its count once its row is forgotten
    assert (by_state["done"].files, by_state["done"].bytes) == (done_files + 1, done_bytes + files[9][1])
    assert counters.uploaded(conn) == counters.FileTotals(6, sum(size for _, size, _ in files[4:]))


def test_counters_of_an_older_store_are_seeded_by_its_migration(tmp_path: Path) -> None:
    """A store written by older code (tests/fixtures/store-v1.sql) gets its counters from the rows it holds."""
    db = tmp_path / "s.sqlite3"
    old = sqlite3.connect(db)
    old.executescript((Path(__file__).parent / "fixtures" / "store-v1.sql").read_text())
    old.close()
    conn = store.connect(db)  # migrates, creating and seeding the counters
    totals = counters.topic_totals(conn)
    for row in conn.execute("SELECT topic, count(*) AS n, max(received_at) AS last FROM alerts GROUP BY topic"):
        assert (totals[row["topic"]].stored, totals[row["topic"]].last_alert_at) == (row["n"], row["last"])
    for row in conn.execute("SELECT topic, count(*) AS n FROM rejected GROUP BY topic"):
        assert totals[row["topic"]].rejected == row["n"]
    assert counters.job_states(conn) == counted_jobs(conn)
    assert sum(counters.job_states(conn).values()) > 0
    by_state = counters.files_by_state(conn)
    for row in conn.execute("SELECT state, count(*) AS n, sum(size) AS b FROM manifest GROUP BY state"):
        assert by_state[row["state"]] == counters.FileTotals(row["n"], row["b"])
    stored = sum(t.stored for t in totals.values())
    add_alerts(conn, "lasair_fixture", "2021-09-01", range(10_000, 10_003), 1.8e9)  # counted from now on
    conn.close()
    conn = store.connect(db)  # a current store: nothing seeded again
    assert sum(t.stored for t in counters.topic_totals(conn).values()) == stored + 3


def test_nights_are_due_for_a_report_once_quiet_and_changed_since(tmp_path: Path) -> None:
    from ztfd.store import report

    conn = store.connect(tmp_path / "s.sqlite3")
    add_alerts(conn, "a", "2021-09-01", range(0, 5), 1000.0)  # received at 1000..1004
    add_alerts(conn, "a", "2021-09-02", range(5, 8), 2000.0)  # received at 2005..2007
    with store.transaction(conn):
        store.record_files(conn, [("images/2021-09-01/ZTF21abcdefg/1_science.fits.gz", 10, "m")])
    image_at = conn.execute("SELECT recorded_at FROM manifest").fetchone()[0]
    assert report.night_changed_at(conn, "2021-09-01") == image_at  # a stamp file after the alerts
    assert report.night_changed_at(conn, "2021-09-02") == 2007.0
    # Quiet since 3000, busy after 0: only 09-02 (09-01 had a stamp file just now).
    assert report.reports_due(conn, quiet_since=3000.0, busy_since=0.0) == [("2021-09-02", 2007.0)]
    assert report.reports_due(conn, quiet_since=3000.0, busy_since=2010.0) == []  # too long ago
    with store.transaction(conn):
        report.mark_report(conn, "2021-09-02", None, 2007.0, 1)
    assert report.reports_due(conn, quiet_since=3000.0, busy_since=0.0) == []  # written from the night as it is
    add_alerts(conn, "a", "2021-09-02", range(8, 9), 2500.0)  # a late alert: due again once quiet
    assert report.reports_due(conn, quiet_since=3000.0, busy_since=0.0) == [("2021-09-02", 2508.0)]
    assert report.reports_due(conn, quiet_since=image_at + 1, busy_since=0.0)[0][0] == "2021-09-01"
