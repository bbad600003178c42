"""The stamp job queue in the store that is safe across processes: atomic claims with leases that expire.

Why not persist-queue? Its ``SQLiteAckQueue`` is a fine single-process queue, but across processes it breaks
every rule this daemon depends on: ``get`` is a SELECT followed by an UPDATE guarded only by a thread lock (two
processes can take the same item), a new instance puts *every* unacked item back to ready (including the ones
other live processes are working on), and an item taken by a process killed with -9 stays unacked until someone
opens a new instance. It fits only where one process owns the queue file for its whole life; no ztfd queue is
like that (consumers produce, a pool of fetchers consumes, ``ztfd replay`` waits on it), so the queue is built
here on the shared store instead:

- ``claim`` is one ``UPDATE … WHERE id IN (SELECT … LIMIT n) RETURNING`` inside ``BEGIN IMMEDIATE``: no two
  claimers can take the same job.
- a claim is a lease with an owner and an expiry; ``requeue_expired`` returns the jobs of dead workers, and
  every ``claim`` calls it first. Completion is fenced by the owner, so a fetcher whose lease expired cannot
  overwrite the outcome of the fetcher that took the job over.
- attempts count claims, so a job that kills its fetcher each time ends failed after ``max_attempts`` claims
  (``requeue_expired``); ``not_before`` delays retries, and ``failed`` keeps the last reason.
- ``dedupe_key`` keeps one waiting or running job per key (one stamp fetch per object and observation time).
- a job refers to its alert (``alert_id``); ``claim`` hands out the alert and what an earlier run learned about
  its stamps (``store.stamps``), and ``complete`` writes what this run learned there, with the alert.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from ztfd.store.alerts import StoredAlert, alerts_by_id
from ztfd.store.counters import job_states
from ztfd.store.db import atomic, transaction
from ztfd.store.stamps import StampRecord, save_stamps, stamp_records
from ztfd.store.states import FailureClass, JobKind, JobState, Waiting, literal

OPEN_STATES = (JobState.READY, JobState.LEASED)
FETCH_JOB = JobKind.FETCH  # ``jobs.kind`` of a job that fetches the stamps, then draws the preview

# The states as SQL literals (inlined, not bound: a partial index is used only for a literal equal to its own).
_READY, _LEASED, _DONE, _FAILED = map(literal, (JobState.READY, JobState.LEASED, JobState.DONE, JobState.FAILED))


@dataclass(frozen=True)
class NewStampJob:
    alert_id: int
    dedupe_key: str | None = None  # see ``detection_key``; None: never deduplicated (replay batches)
    force: bool = False  # refetch files already valid on disk
    kind: JobKind = JobKind.FETCH


@dataclass(frozen=True)
class StampJob:
    """A claimed job, with its alert and what an earlier run learned about the alert's stamps."""

    id: int
    alert: StoredAlert
    force: bool
    known: StampRecord | None  # ``known.detection_id`` is reused: no detection lookup needed
    attempts: int
    unavailable_since: float | None
    batch: str | None
    kind: JobKind = JobKind.FETCH


@dataclass(frozen=True)
class StampResult:
    """What a finished job learned: kept with its alert (``store.stamps``)."""

    detection_id: str
    detection_mjd: float | None
    fetched: tuple[str, ...] = ()
    preview: bool = False
    worker: str | None = None


@dataclass(frozen=True)
class JobCounts:
    """Jobs by what they are doing now, as ``ztfd status`` and ``ztfd replay`` show them."""

    ready: int = 0  # due now
    leased: int = 0
    retry_waiting: int = 0  # a failed attempt, backing off
    unavailable: int = 0  # waiting for the service to have the alert
    failed: int = 0
    done: int = 0

    @property
    def unfinished(self) -> int:
        """Neither done nor failed (waiting ones included)."""
        return self.ready + self.leased + self.retry_waiting + self.unavailable

    @property
    def finished(self) -> int:
        return self.done + self.failed

    @property
    def total(self) -> int:
        return self.unfinished + self.finished

    @property
    def busy(self) -> int:
        """Leased, due, or to be retried soon: work a fetcher will do without waiting for the service."""
        return self.ready + self.leased + self.retry_waiting

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class JobRow:
    """One job as stored (for listings and tests)."""

    id: int
    alert_id: int
    state: JobState
    attempts: int
    last_error: str | None
    batch: str | None
    force: bool
    not_before: float
    owner: str | None
    unavailable_since: float | None
    updated_at: float


@dataclass(frozen=True)
class FailedJob:
    id: int
    object_id: str | None
    date: str | None
    attempts: int
    reason: str | None
    at: float


def new_owner() -> str:
    """A lease owner name unique to this process (and this incarnation of its pid)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def detection_key(object_id: str, obs_mjd: float | None, date: str) -> str:
    """One stamp job per object and observation time: Lasair resends an object whenever a selected column
    changes, and the stamps of the same detection need fetching once."""
    # Rounded to ~0.1 s: the same detection time reaches ztfd as a JD in one filter and an MJD in another.
    when = f"{obs_mjd:.6f}" if obs_mjd is not None else date
    return f"{object_id}@{when}"


def enqueue(
    conn: sqlite3.Connection, jobs: Iterable[NewStampJob], batch: str | None = None, now: float | None = None
) -> int:
    """Add ready jobs; returns how many were added. Call inside the caller's transaction.

    A job whose ``dedupe_key`` equals that of a job still waiting or running is not added: Lasair sends the same
    object again whenever any selected column changes, and its stamps need fetching once, not once per message.
    Finished and failed jobs do not count, so a later retrigger is looked at again.
    """
    now = time.time() if now is None else now
    rows = [(job.alert_id, int(job.force), now, batch, job.dedupe_key, now, now, job.kind) for job in jobs]
    return conn.executemany(  # rowcount: rows inserted by the statement itself, not by triggers
        "INSERT INTO jobs (alert_id, force, not_before, batch, dedupe_key, created_at, updated_at, kind) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        rows,
    ).rowcount


def requeue_expired(conn: sqlite3.Connection, max_attempts: int | None = None, now: float | None = None) -> int:
    """Put jobs whose lease ran out (their worker died or hung) back to ready, or fail them.

    Every claim counts as an attempt, so a job that kills its fetcher each time (a poison job) ends ``failed``
    after ``max_attempts`` claims instead of taking workers down forever.
    """
    now = time.time() if now is None else now
    exhausted = 0
    if max_attempts is not None:
        exhausted = conn.execute(
            f"UPDATE jobs SET state = {_FAILED}, owner = NULL, lease_until = NULL, waiting = NULL, updated_at = ?, "
            "last_error = 'its worker died or hung ' || attempts || ' times (lease expired); last error: ' || "
            f"coalesce(last_error, 'none'), failure = ? WHERE state = {_LEASED} AND lease_until < ? AND attempts >= ?",
            (now, FailureClass.WORKER_LOST, now, max_attempts),
        ).rowcount
    cur = conn.execute(
        f"UPDATE jobs SET state = {_READY}, owner = NULL, lease_until = NULL, updated_at = ?, "
        "last_error = coalesce(last_error, 'lease expired'), failure = ? "
        f"WHERE state = {_LEASED} AND lease_until < ?",
        (now, FailureClass.WORKER_LOST, now),
    )
    return cur.rowcount + exhausted


def claim(
    conn: sqlite3.Connection,
    owner: str,
    lease_seconds: float,
    limit: int = 1,
    now: float | None = None,
    batch: str | None = None,
    max_attempts: int | None = None,
) -> list[StampJob]:
    """Atomically lease up to ``limit`` due jobs to ``owner``, oldest due first.

    ``batch`` restricts the claim to one batch (``ztfd replay`` fetching its own jobs in the foreground);
    ``max_attempts`` fails expired jobs that have used up their attempts (see ``requeue_expired``). A job whose
    alert is not stored (it cannot be fetched) is failed, not handed out.
    """
    now = time.time() if now is None else now
    only_batch = "AND batch = ? " if batch is not None else ""
    with transaction(conn):
        requeue_expired(conn, max_attempts, now)
        rows = conn.execute(
            f"UPDATE jobs SET state = {_LEASED}, owner = ?, lease_until = ?, attempts = attempts + 1, "
            f"updated_at = ? WHERE id IN (SELECT id FROM jobs WHERE state = {_READY} "
            "AND not_before <= ? " + only_batch + "ORDER BY not_before, id LIMIT ?) "
            "RETURNING id, alert_id, force, attempts, unavailable_since, batch, kind",
            (owner, now + lease_seconds, now, now, *((batch,) if batch is not None else ()), limit),
        ).fetchall()
        alerts = alerts_by_id(conn, (row["alert_id"] for row in rows))
        known = stamp_records(conn, alerts)
        orphans = [(now, FailureClass.BAD_JOB, row["id"]) for row in rows if row["alert_id"] not in alerts]
        conn.executemany(
            f"UPDATE jobs SET state = {_FAILED}, owner = NULL, lease_until = NULL, waiting = NULL, updated_at = ?, "
            "last_error = 'its alert is not stored', failure = ? WHERE id = ?", orphans)
    jobs = [
        StampJob(r["id"], alerts[r["alert_id"]], bool(r["force"]), known.get(r["alert_id"]), r["attempts"],
                 r["unavailable_since"], r["batch"], JobKind(r["kind"]))
        for r in rows if r["alert_id"] in alerts
    ]
    return sorted(jobs, key=lambda job: job.id)


def extend(
    conn: sqlite3.Connection, owner: str, lease_seconds: float, now: float | None = None,
    job_ids: Iterable[int] | None = None,
) -> int:
    """Renew the leases ``owner`` holds (a fetcher's heartbeat while it is busy): of ``job_ids`` only, when given
    (the jobs a fetcher is still working on: one whose task died must go back to the queue, not be kept)."""
    now = time.time() if now is None else now
    if job_ids is None:
        return conn.execute(
            f"UPDATE jobs SET lease_until = ?, updated_at = ? WHERE state = {_LEASED} AND owner = ?",
            (now + lease_seconds, now, owner),
        ).rowcount
    return conn.executemany(
        f"UPDATE jobs SET lease_until = ?, updated_at = ? WHERE state = {_LEASED} AND owner = ? AND id = ?",
        [(now + lease_seconds, now, owner, job_id) for job_id in job_ids],
    ).rowcount


def complete(conn: sqlite3.Connection, job_id: int, owner: str, result: StampResult | None = None) -> bool:
    """Mark a leased job done and keep ``result`` with its alert; False when the lease was lost (the job was
    requeued to someone else, whose outcome stands)."""
    now = time.time()
    with atomic(conn):
        row = conn.execute(
            f"UPDATE jobs SET state = {_DONE}, owner = NULL, lease_until = NULL, waiting = NULL, last_error = NULL, "
            f"failure = NULL, updated_at = ? WHERE id = ? AND owner = ? AND state = {_LEASED} RETURNING alert_id",
            (now, job_id, owner),
        ).fetchone()
        if row is not None and result is not None:
            save_stamps(conn, row["alert_id"], result.detection_id, result.detection_mjd, result.fetched,
                        result.preview, result.worker, now)
    return row is not None


def retry(
    conn: sqlite3.Connection,
    job_id: int,
    owner: str,
    delay: float,
    reason: str,
    failure: FailureClass,
    waiting: Waiting = Waiting.RETRY,
    now: float | None = None,
) -> bool:
    """Give a leased job back to be tried again after ``delay`` seconds; ``reason`` and its ``failure`` class are
    kept (the class is what ``ztfd_stamp_failures_total`` counts).

    ``Waiting.UNAVAILABLE`` means the data is not there yet rather than that something failed: it does not
    count as an attempt, and ``unavailable_since`` remembers when it first happened (for giving up at last).
    """
    now = time.time() if now is None else now
    unavailable = waiting == Waiting.UNAVAILABLE
    cur = conn.execute(
        f"UPDATE jobs SET state = {_READY}, owner = NULL, lease_until = NULL, not_before = ?, waiting = ?, "
        "last_error = ?, failure = ?, updated_at = ?, attempts = attempts - ?, "
        "unavailable_since = CASE WHEN ? THEN coalesce(unavailable_since, ?) ELSE unavailable_since END "
        f"WHERE id = ? AND owner = ? AND state = {_LEASED}",
        (now + delay, str(waiting), reason, failure, now, 1 if unavailable else 0, unavailable, now, job_id, owner),
    )
    return cur.rowcount == 1


def fail(conn: sqlite3.Connection, job_id: int, owner: str, reason: str, failure: FailureClass) -> bool:
    """Give up on a leased job, keeping the reason (shown by ``ztfd status``) and its class (counted)."""
    cur = conn.execute(
        f"UPDATE jobs SET state = {_FAILED}, owner = NULL, lease_until = NULL, waiting = NULL, last_error = ?, "
        f"failure = ?, updated_at = ? WHERE id = ? AND owner = ? AND state = {_LEASED}",
        (reason, failure, time.time(), job_id, owner),
    )
    return cur.rowcount == 1


def release(
    conn: sqlite3.Connection, owner: str, job_ids: Iterable[int] | None = None, delay: float = 0.0,
    now: float | None = None,
) -> int:
    """Hand leased jobs back untouched, the claim not counted as an attempt (nor as a failure): ready at once (on
    SIGTERM), or after ``delay`` seconds (local trouble: the fetcher's disk is full, not the job's fault)."""
    only = "" if job_ids is None else " AND id = ?"
    ids = [()] if job_ids is None else [(job_id,) for job_id in job_ids]
    now = time.time() if now is None else now
    total = 0
    for id_args in ids:
        total += conn.execute(
            f"UPDATE jobs SET state = {_READY}, owner = NULL, lease_until = NULL, attempts = max(attempts - 1, 0), "
            "not_before = CASE WHEN ? > 0 THEN max(not_before, ?) ELSE not_before END, updated_at = ? "
            f"WHERE state = {_LEASED} AND owner = ?" + only,
            (delay, now + delay, now, owner, *id_args),
        ).rowcount
    return total


def counts(conn: sqlite3.Connection, now: float | None = None, batch: str | None = None) -> JobCounts:
    """Jobs by what they are doing now (see ``JobCounts``), of the whole queue or of one batch.

    The whole queue's done and failed jobs are the counters the triggers keep (every job that ever ended so,
    also once forgotten: ``forget_done``); only open jobs are counted, a read of the few rows waiting or running.
    A batch's jobs are counted from its rows (``jobs_batch``).
    """
    now = time.time() if now is None else now
    bucket = (f"CASE WHEN state = {_READY} AND not_before > ? THEN "
              f"CASE WHEN waiting = {literal(Waiting.UNAVAILABLE)} THEN 'unavailable' ELSE 'retry_waiting' END "
              "ELSE state END")
    if batch is not None:
        rows = conn.execute(f"SELECT {bucket} AS bucket, count(*) AS n FROM jobs WHERE batch = ? GROUP BY bucket",
                            (now, batch)).fetchall()
    else:  # one partial index each (jobs_ready, jobs_leased): the done jobs of the last day are not read
        rows = conn.execute(
            f"SELECT {bucket} AS bucket, count(*) AS n FROM jobs WHERE state = {_READY} GROUP BY bucket "
            f"UNION ALL SELECT {_LEASED}, count(*) FROM jobs WHERE state = {_LEASED}", (now,)).fetchall()
    found = {row["bucket"]: row["n"] for row in rows}
    if batch is None:
        ended = job_states(conn)
        found.update(done=ended[JobState.DONE], failed=ended[JobState.FAILED])
    return JobCounts(**found)


def forget_done(conn: sqlite3.Connection, before: float) -> int:
    """Delete done jobs that finished before ``before``: their outcome is kept with the alert (``stamps``) and
    in the counters; a replay waiting on its batch counts what is left (``JobCounts.unfinished``)."""
    return conn.execute(f"DELETE FROM jobs WHERE state = {_DONE} AND updated_at < ?", (before,)).rowcount


def next_due(conn: sqlite3.Connection, batch: str | None = None) -> float | None:
    """When the queue next has something for a claim: the earliest ready job's ``not_before`` or leased job's
    ``lease_until`` (an expired lease is requeued by the next claim); None when there is neither.

    Two plain reads on partial indexes: an idle fetcher asks this instead of running a claim (a write
    transaction) several times a second.
    """
    only_batch, args = ("AND batch = ?", (batch,)) if batch is not None else ("", ())
    ready = conn.execute(f"SELECT min(not_before) FROM jobs WHERE state = {_READY} {only_batch}", args).fetchone()[0]
    lease = conn.execute(f"SELECT min(lease_until) FROM jobs WHERE state = {_LEASED} {only_batch}", args).fetchone()[0]
    due = [t for t in (ready, lease) if t is not None]
    return min(due) if due else None


def failures(conn: sqlite3.Connection, limit: int, batch: str | None = None) -> list[FailedJob]:
    """Failed jobs with their alert and reason: of one batch in queue order, else the latest first."""
    where, args, order = (("j.batch = ?", (batch,), "j.id") if batch is not None
                          else ("1", (), "j.updated_at DESC"))
    rows = conn.execute(
        "SELECT j.id, a.object_id, a.date, j.attempts, j.last_error, j.updated_at FROM jobs j "
        f"LEFT JOIN alerts a ON a.id = j.alert_id WHERE j.state = {_FAILED} AND {where} ORDER BY {order} LIMIT ?",
        (*args, limit),
    ).fetchall()
    return [FailedJob(*row) for row in rows]


def list_jobs(conn: sqlite3.Connection, batch: str | None = None) -> list[JobRow]:
    """Every job (of one batch) in queue order."""
    where, args = ("WHERE batch = ?", (batch,)) if batch is not None else ("", ())
    rows = conn.execute(
        "SELECT id, alert_id, state, attempts, last_error, batch, force, not_before, owner, unavailable_since, "
        f"updated_at FROM jobs {where} ORDER BY id", args)
    return [JobRow(r[0], r[1], JobState(r[2]), r[3], r[4], r[5], bool(r[6]), *r[7:]) for r in rows]


@dataclass(frozen=True)
class LastError:
    """The newest reason jobs of one cause gave: what ``status`` and ``replay`` show while work waits."""

    cause: str  # retry (the stamp service failed), unavailable (not there yet), failed (given up)
    survey: str | None
    reason: str
    at: float
    batch: str | None


LAST_ERRORS_SCAN = 200  # waiting jobs read, newest wait first: enough to find each cause, bounded whatever the queue


def last_errors(conn: sqlite3.Connection, batch: str | None = None) -> dict[str, LastError]:
    """cause -> the newest error of the jobs waiting for it (ready with a later try) and of the failed ones.

    Waiting jobs are read through ``jobs_ready`` from the latest ``not_before`` down (a job waiting for a retry
    is due later than the fresh ones), failed ones through ``jobs_failed`` (a replay's ``batch``: through
    ``jobs_batch``); at most ``LAST_ERRORS_SCAN`` rows each, so the cost does not grow with the queue.
    """
    found: dict[str, LastError] = {}
    for state, order, cause in (("ready", "j.not_before", "j.waiting"), ("failed", "j.updated_at", "'failed'")):
        only, args = ("AND j.batch = ?", (batch,)) if batch is not None else ("", ())  # a replay: its own jobs
        rows = conn.execute(
            f"SELECT {cause}, a.survey, j.last_error, j.updated_at, j.batch FROM jobs j "
            f"LEFT JOIN alerts a ON a.id = j.alert_id WHERE j.state = ? {only} ORDER BY {order} DESC LIMIT ?",
            (state, *args, LAST_ERRORS_SCAN))
        for row in rows:
            error = LastError(row[0], row[1], row[2], row[3], row[4])
            if error.cause is None or error.reason is None:
                continue
            if error.cause not in found or found[error.cause].at < error.at:
                found[error.cause] = error
    return found


@dataclass(frozen=True)
class DoneOutcomes:
    """What a batch's done jobs did: fetched stamps, only drew a preview, or found everything on disk."""

    fetched: int = 0
    preview_only: int = 0
    complete: int = 0  # no request, nothing drawn: it was all there already


def done_outcomes(conn: sqlite3.Connection, batch: str) -> DoneOutcomes:
    """The done jobs of ``batch`` by what their run did (their alert's stamp record: kinds fetched, preview)."""
    row = conn.execute(
        "SELECT coalesce(sum(s.fetched != 0), 0), coalesce(sum(s.fetched = 0 AND s.preview != 0), 0), "
        "coalesce(sum(s.fetched = 0 AND s.preview = 0), 0) FROM jobs j JOIN stamps s ON s.alert_id = j.alert_id "
        "WHERE j.batch = ? AND j.state = 'done'", (batch,)).fetchone()
    return DoneOutcomes(int(row[0]), int(row[1]), int(row[2]))
