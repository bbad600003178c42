"""The stamp job queue across real processes: no double hand-out, leases that expire, retries, failures."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from tests.conftest import wait_until
from ztfd import store
from ztfd.store import jobs as jobqueue
from ztfd.store.alerts import NewAlert, insert_alerts


def add_alerts(conn: sqlite3.Connection, count: int, object_ids: list[str] | None = None) -> list[int]:
    """``count`` stored alerts (inside the caller's transaction), as stamp jobs refer to them."""
    start = conn.total_changes  # distinct offsets per call
    names = object_ids or [f"ZTF21aaaa{n:03d}" for n in range(count)]
    rows = [NewAlert(0, 0, start * 100_000 + n, names[n], "2021-09-01", 59458.0 + n, f"data/x/{n}.json")
            for n in range(count)]
    return [alert_id for alert_id in insert_alerts(conn, "t", rows, 0.0) if alert_id is not None]


def enqueue(conn: sqlite3.Connection, count: int, batch: str | None = None, now: float | None = None) -> list[int]:
    """Store ``count`` alerts and queue one stamp job each; returns the alert ids."""
    with store.transaction(conn):
        ids = add_alerts(conn, count)
        jobqueue.enqueue(conn, [jobqueue.NewStampJob(alert_id) for alert_id in ids], batch=batch, now=now)
    return ids


def fill(db: Path, count: int) -> list[int]:
    conn = store.connect(db)
    ids = enqueue(conn, count)
    conn.close()
    return ids


def drain(db: str, results: mp.Queue) -> None:  # runs in a child process
    conn = store.connect(Path(db))
    owner = jobqueue.new_owner()
    taken = []
    while True:
        jobs = jobqueue.claim(conn, owner, lease_seconds=60, limit=3)
        if not jobs:
            break
        time.sleep(0.002)  # hold the leases a moment, as real work does, so that workers' leases overlap
        for job in jobs:
            taken.append(job.id)
            assert jobqueue.complete(conn, job.id, owner)
    results.put((os.getpid(), taken))


def test_no_job_is_handed_to_two_workers(tmp_path: Path) -> None:
    db = tmp_path / "ztfd.sqlite3"
    fill(db, 3000)
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    workers = [ctx.Process(target=drain, args=(str(db), results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    taken = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    all_ids = [job_id for _, ids in taken for job_id in ids]
    assert len(all_ids) == 3000
    assert len(set(all_ids)) == 3000, "a job was handed out twice"
    assert sum(1 for _, ids in taken if ids) >= 2, "the workers did not actually share the queue"
    conn = store.connect(db)
    assert jobqueue.counts(conn).done == 3000


def claim_and_hang(db: str, lease: float, claimed: mp.Event) -> None:  # runs in a child process
    conn = store.connect(Path(db))
    jobs = jobqueue.claim(conn, jobqueue.new_owner(), lease_seconds=lease, limit=1)
    assert len(jobs) == 1
    claimed.set()
    time.sleep(3600)  # the parent kills us with -9 here


def test_a_job_of_a_worker_killed_with_minus_9_comes_back_after_its_lease(tmp_path: Path) -> None:
    db = tmp_path / "ztfd.sqlite3"
    [alert_id] = fill(db, 1)
    ctx = mp.get_context("spawn")
    claimed = ctx.Event()
    worker = ctx.Process(target=claim_and_hang, args=(str(db), 1.5, claimed))
    worker.start()
    assert claimed.wait(60)
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)
    conn = store.connect(db)
    owner = jobqueue.new_owner()
    # While the dead worker's lease runs, nobody else may take the job.
    assert jobqueue.claim(conn, owner, 60) == []
    assert jobqueue.counts(conn).leased == 1
    jobs: list[jobqueue.StampJob] = wait_until(lambda: jobqueue.claim(conn, owner, 60), 30,
                                               "the job back after the dead worker's lease", interval=0.1)
    assert [job.alert.id for job in jobs] == [alert_id]
    assert jobs[0].attempts == 2  # the dead worker's claim counts: a job that kills workers ends failed


def test_retry_not_before_fail_and_release(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "ztfd.sqlite3")
    enqueue(conn, 3, batch="b1", now=1000.0)
    owner = jobqueue.new_owner()
    first, second, third = jobqueue.claim(conn, owner, 60, limit=3, now=1000.0)
    assert jobqueue.retry(conn, first.id, owner, delay=50, reason="HTTP 503",
                          failure=jobqueue.FailureClass.HTTP, now=1000.0)
    assert jobqueue.retry(conn, second.id, owner, delay=300, reason="not at ALeRCE yet",
                          failure=jobqueue.FailureClass.UNAVAILABLE,
                          waiting=jobqueue.Waiting.UNAVAILABLE, now=1000.0)
    assert jobqueue.release(conn, owner, [third.id]) == 1
    counts = jobqueue.counts(conn, now=1001.0).as_dict()
    assert counts == {"ready": 1, "leased": 0, "retry_waiting": 1, "unavailable": 1, "failed": 0, "done": 0}
    # Only the released job is due; the others wait for their not_before.
    due = jobqueue.claim(conn, owner, 60, limit=5, now=1001.0)
    assert [job.id for job in due] == [third.id] and due[0].attempts == 1  # a release does not count
    assert jobqueue.complete(conn, third.id, owner)
    later = jobqueue.claim(conn, owner, 60, limit=5, now=1400.0)
    assert {job.id for job in later} == {first.id, second.id}
    by_id = {job.id: job for job in later}
    assert by_id[second.id].unavailable_since == 1000.0
    assert by_id[second.id].attempts == 1  # "not yet available" is not a failed attempt
    assert jobqueue.fail(conn, first.id, owner, "HTTP 503 after 8 attempts", jobqueue.FailureClass.HTTP)
    stranger = jobqueue.new_owner()
    assert not jobqueue.complete(conn, second.id, stranger), "completion must be fenced by the lease owner"
    assert jobqueue.complete(conn, second.id, owner)
    row = next(job for job in jobqueue.list_jobs(conn) if job.id == first.id)
    assert (row.state, row.last_error) == ("failed", "HTTP 503 after 8 attempts")
    batch = jobqueue.counts(conn, now=1400.0, batch="b1")
    assert (batch.unfinished, batch.done, batch.failed) == (0, 2, 1)


@pytest.mark.parametrize("lease", [0.0])
def test_expired_leases_are_requeued_before_claiming(tmp_path: Path, lease: float) -> None:
    conn = store.connect(tmp_path / "ztfd.sqlite3")
    enqueue(conn, 1, now=0.0)
    dead, alive = jobqueue.new_owner(), jobqueue.new_owner()
    [job] = jobqueue.claim(conn, dead, lease, now=10.0)
    [again] = jobqueue.claim(conn, alive, 60, now=11.0)
    assert again.id == job.id
    assert not jobqueue.complete(conn, job.id, dead)
    assert jobqueue.complete(conn, job.id, alive)


def test_a_job_that_kills_its_worker_every_time_ends_failed(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "ztfd.sqlite3")
    enqueue(conn, 1, now=0.0)
    for attempt in range(1, 4):  # three workers claim it and die (their leases simply run out)
        [job] = jobqueue.claim(conn, jobqueue.new_owner(), 10, now=attempt * 100.0, max_attempts=3)
        assert job.attempts == attempt
    assert jobqueue.claim(conn, jobqueue.new_owner(), 10, now=1000.0, max_attempts=3) == []
    [row] = jobqueue.list_jobs(conn)
    state, reason = row.state, row.last_error
    assert state == "failed"
    assert "died or hung 3 times" in reason


def test_a_duplicate_of_a_waiting_job_is_not_queued(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "ztfd.sqlite3")

    def queue(*object_ids: str) -> int:  # one alert per object id, all of the same observation time
        ids = add_alerts(conn, len(object_ids), list(object_ids))
        keys = [jobqueue.detection_key(object_id, 59458.0, "2021-09-01") for object_id in object_ids]
        return jobqueue.enqueue(conn, [jobqueue.NewStampJob(a, dedupe_key=k) for a, k in zip(ids, keys, strict=True)])

    with store.transaction(conn):
        assert queue("A", "B", "A") == 2
    owner = jobqueue.new_owner()
    first = jobqueue.claim(conn, owner, 60)[0]
    with store.transaction(conn):  # still running: a resend of A is not queued again
        assert queue("A") == 0
    assert jobqueue.complete(conn, first.id, owner)
    with store.transaction(conn):  # finished: a later retrigger is looked at again
        assert queue("A") == 1
