"""The stamp job queue across real processes: no double hand-out, leases that expire, retries, failures."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from ztfd import jobqueue, store

KIND = jobqueue.STAMPS


def fill(db: Path, count: int) -> None:
    conn = store.connect(db)
    with store.transaction(conn):
        jobqueue.enqueue(conn, KIND, ({"n": n} for n in range(count)))
    conn.close()


def drain(db: str, results: mp.Queue) -> None:  # runs in a child process
    conn = store.connect(Path(db))
    owner = jobqueue.new_owner()
    taken = []
    while True:
        jobs = jobqueue.claim(conn, KIND, owner, lease_seconds=60, limit=3)
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
    assert jobqueue.counts(conn)["done"] == 3000


def claim_and_hang(db: str, lease: float, claimed: mp.Event) -> None:  # runs in a child process
    conn = store.connect(Path(db))
    jobs = jobqueue.claim(conn, KIND, jobqueue.new_owner(), lease_seconds=lease, limit=1)
    assert len(jobs) == 1
    claimed.set()
    time.sleep(3600)  # the parent kills us with -9 here


def test_a_job_of_a_worker_killed_with_minus_9_comes_back_after_its_lease(tmp_path: Path) -> None:
    db = tmp_path / "ztfd.sqlite3"
    fill(db, 1)
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
    assert jobqueue.claim(conn, KIND, owner, 60) == []
    assert jobqueue.counts(conn)["leased"] == 1
    deadline = time.monotonic() + 30
    jobs: list[jobqueue.Job] = []
    while not jobs and time.monotonic() < deadline:
        jobs = jobqueue.claim(conn, KIND, owner, 60)
        if not jobs:
            time.sleep(0.1)
    assert [job.payload for job in jobs] == [{"n": 0}]
    assert jobs[0].attempts == 2  # the dead worker's claim counts: a job that kills workers ends failed


def test_retry_not_before_fail_and_release(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "ztfd.sqlite3")
    with store.transaction(conn):
        jobqueue.enqueue(conn, KIND, [{"n": 1}, {"n": 2}, {"n": 3}], batch="b1", now=1000.0)
    owner = jobqueue.new_owner()
    first, second, third = jobqueue.claim(conn, KIND, owner, 60, limit=3, now=1000.0)
    assert jobqueue.retry(conn, first.id, owner, delay=50, reason="HTTP 503", now=1000.0)
    assert jobqueue.retry(conn, second.id, owner, delay=300, reason="not at ALeRCE yet", waiting="unavailable",
                          now=1000.0)
    assert jobqueue.release(conn, owner, [third.id]) == 1
    counts = jobqueue.counts(conn, now=1001.0)
    assert counts == {"ready": 1, "leased": 0, "retry_waiting": 1, "unavailable": 1, "failed": 0, "done": 0}
    # Only the released job is due; the others wait for their not_before.
    due = jobqueue.claim(conn, KIND, owner, 60, limit=5, now=1001.0)
    assert [job.id for job in due] == [third.id] and due[0].attempts == 1  # a release does not count
    assert jobqueue.complete(conn, third.id, owner)
    later = jobqueue.claim(conn, KIND, owner, 60, limit=5, now=1400.0)
    assert {job.id for job in later} == {first.id, second.id}
    by_id = {job.id: job for job in later}
    assert by_id[second.id].unavailable_since == 1000.0
    assert by_id[second.id].attempts == 1  # "not yet available" is not a failed attempt
    assert jobqueue.fail(conn, first.id, owner, "HTTP 503 after 8 attempts")
    stranger = jobqueue.new_owner()
    assert not jobqueue.complete(conn, second.id, stranger), "completion must be fenced by the lease owner"
    assert jobqueue.complete(conn, second.id, owner)
    row = conn.execute("SELECT state, last_error FROM jobs WHERE id = ?", (first.id,)).fetchone()
    assert tuple(row) == ("failed", "HTTP 503 after 8 attempts")
    assert jobqueue.batch_counts(conn, "b1") == {"ready": 0, "leased": 0, "done": 2, "failed": 1}


@pytest.mark.parametrize("lease", [0.0])
def test_expired_leases_are_requeued_before_claiming(tmp_path: Path, lease: float) -> None:
    conn = store.connect(tmp_path / "ztfd.sqlite3")
    with store.transaction(conn):
        jobqueue.enqueue(conn, KIND, [{"n": 1}], now=0.0)
    dead, alive = jobqueue.new_owner(), jobqueue.new_owner()
    [job] = jobqueue.claim(conn, KIND, dead, lease, now=10.0)
    [again] = jobqueue.claim(conn, KIND, alive, 60, now=11.0)
    assert again.id == job.id
    assert not jobqueue.complete(conn, job.id, dead)
    assert jobqueue.complete(conn, job.id, alive)


def test_a_job_that_kills_its_worker_every_time_ends_failed(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "ztfd.sqlite3")
    with store.transaction(conn):
        jobqueue.enqueue(conn, KIND, [{"n": "poison"}], now=0.0)
    for attempt in range(1, 4):  # three workers claim it and die (their leases simply run out)
        [job] = jobqueue.claim(conn, KIND, jobqueue.new_owner(), 10, now=attempt * 100.0, max_attempts=3)
        assert job.attempts == attempt
    assert jobqueue.claim(conn, KIND, jobqueue.new_owner(), 10, now=1000.0, max_attempts=3) == []
    state, reason = conn.execute("SELECT state, last_error FROM jobs").fetchone()
    assert state == "failed"
    assert "died or hung 3 times" in reason


def test_a_duplicate_of_a_waiting_job_is_not_queued(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "ztfd.sqlite3")
    key = lambda payload: payload["object"]  # noqa: E731
    with store.transaction(conn):
        assert jobqueue.enqueue(conn, KIND, [{"object": "A"}, {"object": "B"}, {"object": "A"}], dedupe_key=key) == 2
    owner = jobqueue.new_owner()
    first = jobqueue.claim(conn, KIND, owner, 60)[0]
    with store.transaction(conn):  # still running: a resend of A is not queued again
        assert jobqueue.enqueue(conn, KIND, [{"object": "A"}], dedupe_key=key) == 0
    assert jobqueue.complete(conn, first.id, owner)
    with store.transaction(conn):  # finished: a later retrigger is looked at again
        assert jobqueue.enqueue(conn, KIND, [{"object": "A"}], dedupe_key=key) == 1


def open_store(db: str, results: mp.Queue) -> None:  # runs in a child process
    try:
        store.connect(Path(db)).close()
        results.put("ok")
    except Exception as exc:  # reported to the parent, which fails the test
        results.put(repr(exc))


def test_several_processes_can_create_the_store_at_once(tmp_path: Path) -> None:
    """The supervisor starts every child at the same moment; each opens (and maybe creates) the store."""
    ctx = mp.get_context("fork")
    outcomes = []
    for round_ in range(25):
        results: mp.Queue = ctx.Queue()
        openers = [ctx.Process(target=open_store, args=(str(tmp_path / f"r{round_}.sqlite3"), results))
                   for _ in range(4)]
        for opener in openers:
            opener.start()
        outcomes += [results.get(timeout=60) for _ in openers]
        for opener in openers:
            opener.join(30)
    assert set(outcomes) == {"ok"}
