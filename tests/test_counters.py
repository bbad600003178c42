"""The store's counters (kept by triggers) against the rows they count, through the real queue and manifest code."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from tests.test_store import load_fixture
from ztfd import store
from ztfd.store import counters
from ztfd.store import jobs as jobqueue
from ztfd.store.alerts import NewAlert, insert_alerts


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


def add_alerts(conn: sqlite3.Connection, topic: str, date: str, offsets: range, received_at: float) -> list[int]:
    """One alert per offset (each received a second after the one before); the ids of those newly stored."""
    ids = []
    with store.transaction(conn):
        for offset in offsets:
            alert = NewAlert(0, 0, offset, "ZTF21abcdefg", date, None, f"data/{date}/{topic}/x-{offset}.json")
            ids += [i for i in insert_alerts(conn, topic, [alert], received_at + offset) if i is not None]
    return ids


def queue(conn: sqlite3.Connection, count: int) -> None:
    """``count`` stamp jobs, each for an alert of its own."""
    ids = add_alerts(conn, "q", "2021-09-01", range(conn.total_changes, conn.total_changes + count), 0.0)
    with store.transaction(conn):
        jobqueue.enqueue(conn, [jobqueue.NewStampJob(alert_id) for alert_id in ids])


def test_job_counters_follow_every_queue_operation(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "s.sqlite3")
    rng = random.Random(15)
    queue(conn, 60)
    owner = jobqueue.new_owner()
    failures_expected = 0
    for round_number in range(6):
        now = 1e12 + round_number  # a retry's not_before moves on, as time.time() does
        jobs = jobqueue.claim(conn, owner, lease_seconds=60, limit=12, now=now)
        for job in jobs:
            action = rng.choice(["complete", "retry", "unavailable", "fail", "release", "keep"])
            if action == "complete":
                assert jobqueue.complete(conn, job.id, owner, jobqueue.StampResult("1", None))
            elif action == "retry":
                assert jobqueue.retry(conn, job.id, owner, 0.0, "HTTP 503 from get_stamp", now=now)
                failures_expected += 1
            elif action == "unavailable":
                assert jobqueue.retry(conn, job.id, owner, 0.0, "not yet", jobqueue.Waiting.UNAVAILABLE, now=now)
            elif action == "fail":
                assert jobqueue.fail(conn, job.id, owner, "detections: HTTP 500")
                failures_expected += 1
            elif action == "release":
                assert jobqueue.release(conn, owner, [job.id]) == 1
        assert counters.job_states(conn) == counted_jobs(conn)
    # Leases that run out: the jobs come back (or fail) and each counts as a lost worker.
    leased = conn.execute("SELECT count(*) FROM jobs WHERE state = 'leased'").fetchone()[0]
    assert leased > 0
    with store.transaction(conn):
        jobqueue.requeue_expired(conn, max_attempts=3, now=2e12)
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
])
def test_failure_reasons_fall_in_fixed_classes(tmp_path: Path, reason: str, expected: str) -> None:
    conn = store.connect(tmp_path / "s.sqlite3")
    queue(conn, 1)
    owner = jobqueue.new_owner()
    (job,) = jobqueue.claim(conn, owner, lease_seconds=60)
    assert jobqueue.fail(conn, job.id, owner, reason)
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
    with store.transaction(conn):
        conn.execute("DELETE FROM manifest WHERE path = ?", (files[9][0],))

    def real(state: str) -> tuple[int, int]:
        row = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM manifest WHERE state = ?", (state,))
        return tuple(row.fetchone())

    by_state = counters.files_by_state(conn)
    for state in ("pending", "done"):
        assert (by_state[state].files, by_state[state].bytes) == real(state)
    assert counters.uploaded(conn) == counters.FileTotals(6, sum(size for _, size, _ in files[4:]))


def test_counters_of_an_older_store_are_seeded_once(tmp_path: Path) -> None:
    """A store from before the counters (the v1 fixture): its migration seeds them from the rows."""
    db = tmp_path / "s.sqlite3"
    load_fixture(db)
    conn = store.connect(db)
    assert counters.topic_totals(conn)["lasair_fixture"].stored == 24
    assert counters.topic_totals(conn)["lasair_fixture"].rejected == 2
    assert counters.job_states(conn) == counted_jobs(conn)
    assert counters.files_by_state(conn)["pending"].files == 24
    conn.close()
    conn = store.connect(db)  # seeded already: not counted twice
    assert counters.topic_totals(conn)["lasair_fixture"].stored == 24
