"""A job queue in the store that is safe across processes: atomic claims with leases that expire.

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
  every ``claim`` calls it first. Completion is fenced by the owner, so a worker whose lease expired cannot
  overwrite the outcome of the worker that took the job over.
- attempts count claims, so a job that kills its worker each time ends failed after ``max_attempts`` claims
  (``requeue_expired``); ``not_before`` delays retries, and ``failed`` keeps the last reason.
- ``dedupe_key`` keeps one waiting or running job per key (one stamp fetch per object and observation time).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ztfd.store import transaction

STAMPS = "stamps"
STATES = ("ready", "leased", "done", "failed")


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    payload: dict[str, Any]
    attempts: int
    unavailable_since: float | None
    batch: str | None


def new_owner() -> str:
    """A lease owner name unique to this process (and this incarnation of its pid)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def enqueue(
    conn: sqlite3.Connection,
    kind: str,
    payloads: Iterable[dict[str, Any]],
    batch: str | None = None,
    now: float | None = None,
    dedupe_key: Callable[[dict[str, Any]], str] | None = None,
) -> int:
    """Add ready jobs; returns how many were added. Call inside the caller's transaction.

    With ``dedupe_key``, a job whose key equals that of a job still waiting or running is not added: Lasair sends
    the same object again whenever any selected column changes, and its stamps need fetching once, not once per
    message. Finished and failed jobs do not count, so a later retrigger is looked at again.
    """
    now = time.time() if now is None else now
    rows = [
        (kind, json.dumps(p, separators=(",", ":")), now, batch, dedupe_key(p) if dedupe_key else None, now, now)
        for p in payloads
    ]
    before = conn.total_changes
    conn.executemany(
        "INSERT INTO jobs (kind, payload, not_before, batch, dedupe_key, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        rows,
    )
    return conn.total_changes - before


def requeue_expired(conn: sqlite3.Connection, max_attempts: int | None = None, now: float | None = None) -> int:
    """Put jobs whose lease ran out (their worker died or hung) back to ready, or fail them.

    Every claim counts as an attempt, so a job that kills its worker each time (a poison job) ends ``failed``
    after ``max_attempts`` claims instead of taking workers down forever.
    """
    now = time.time() if now is None else now
    exhausted = 0
    if max_attempts is not None:
        exhausted = conn.execute(
            "UPDATE jobs SET state = 'failed', owner = NULL, lease_until = NULL, waiting = NULL, updated_at = ?, "
            "last_error = 'its worker died or hung ' || attempts || ' times (lease expired); last error: ' || "
            "coalesce(last_error, 'none') WHERE state = 'leased' AND lease_until < ? AND attempts >= ?",
            (now, now, max_attempts),
        ).rowcount
    cur = conn.execute(
        "UPDATE jobs SET state = 'ready', owner = NULL, lease_until = NULL, updated_at = ?, "
        "last_error = coalesce(last_error, 'lease expired') "
        "WHERE state = 'leased' AND lease_until < ?",
        (now, now),
    )
    return cur.rowcount + exhausted


def claim(
    conn: sqlite3.Connection,
    kind: str,
    owner: str,
    lease_seconds: float,
    limit: int = 1,
    now: float | None = None,
    batch: str | None = None,
    max_attempts: int | None = None,
) -> list[Job]:
    """Atomically lease up to ``limit`` due jobs of ``kind`` to ``owner``, oldest due first.

    ``batch`` restricts the claim to one batch (``ztfd replay`` fetching its own jobs in the foreground);
    ``max_attempts`` fails expired jobs that have used up their attempts (see ``requeue_expired``).
    """
    now = time.time() if now is None else now
    only_batch = "AND batch = ? " if batch is not None else ""
    with transaction(conn):
        requeue_expired(conn, max_attempts, now)
        rows = conn.execute(
            "UPDATE jobs SET state = 'leased', owner = ?, lease_until = ?, attempts = attempts + 1, "
            "updated_at = ? WHERE id IN (SELECT id FROM jobs WHERE state = 'ready' AND kind = ? "
            "AND not_before <= ? " + only_batch + "ORDER BY not_before, id LIMIT ?) "
            "RETURNING id, kind, payload, attempts, unavailable_since, batch",
            (owner, now + lease_seconds, now, kind, now, *((batch,) if batch is not None else ()), limit),
        ).fetchall()
    jobs = [
        Job(r["id"], r["kind"], json.loads(r["payload"]), r["attempts"], r["unavailable_since"], r["batch"])
        for r in rows
    ]
    return sorted(jobs, key=lambda job: job.id)


def extend(
    conn: sqlite3.Connection, owner: str, lease_seconds: float, now: float | None = None,
    job_ids: Iterable[int] | None = None,
) -> int:
    """Renew the leases ``owner`` holds (a worker's heartbeat while it is busy): of ``job_ids`` only, when given
    (the jobs a worker is still working on: one whose task died must not be kept from the others)."""
    now = time.time() if now is None else now
    if job_ids is None:
        return conn.execute(
            "UPDATE jobs SET lease_until = ?, updated_at = ? WHERE state = 'leased' AND owner = ?",
            (now + lease_seconds, now, owner),
        ).rowcount
    return conn.executemany(
        "UPDATE jobs SET lease_until = ?, updated_at = ? WHERE state = 'leased' AND owner = ? AND id = ?",
        [(now + lease_seconds, now, owner, job_id) for job_id in job_ids],
    ).rowcount


def complete(conn: sqlite3.Connection, job_id: int, owner: str, result: dict[str, Any] | None = None) -> bool:
    """Mark a leased job done; False when the lease was lost (the job was requeued to someone else)."""
    cur = conn.execute(
        "UPDATE jobs SET state = 'done', owner = NULL, lease_until = NULL, waiting = NULL, last_error = NULL, "
        "result = ?, updated_at = ? WHERE id = ? AND owner = ? AND state = 'leased'",
        (None if result is None else json.dumps(result), time.time(), job_id, owner),
    )
    return cur.rowcount == 1


def retry(
    conn: sqlite3.Connection,
    job_id: int,
    owner: str,
    delay: float,
    reason: str,
    waiting: str = "retry",
    now: float | None = None,
) -> bool:
    """Give a leased job back to be tried again after ``delay`` seconds.

    ``waiting='unavailable'`` means the data is not there yet rather than that something failed: it does not
    count as an attempt, and ``unavailable_since`` remembers when it first happened (for giving up at last).
    """
    now = time.time() if now is None else now
    unavailable = waiting == "unavailable"
    cur = conn.execute(
        "UPDATE jobs SET state = 'ready', owner = NULL, lease_until = NULL, not_before = ?, waiting = ?, "
        "last_error = ?, updated_at = ?, attempts = attempts - ?, "
        "unavailable_since = CASE WHEN ? THEN coalesce(unavailable_since, ?) ELSE unavailable_since END "
        "WHERE id = ? AND owner = ? AND state = 'leased'",
        (now + delay, waiting, reason, now, 1 if unavailable else 0, unavailable, now, job_id, owner),
    )
    return cur.rowcount == 1


def fail(conn: sqlite3.Connection, job_id: int, owner: str, reason: str) -> bool:
    """Give up on a leased job, keeping the reason (shown by ``ztfd status``)."""
    cur = conn.execute(
        "UPDATE jobs SET state = 'failed', owner = NULL, lease_until = NULL, waiting = NULL, last_error = ?, "
        "updated_at = ? WHERE id = ? AND owner = ? AND state = 'leased'",
        (reason, time.time(), job_id, owner),
    )
    return cur.rowcount == 1


def release(conn: sqlite3.Connection, owner: str, job_ids: Iterable[int] | None = None) -> int:
    """Hand leased jobs back untouched (on SIGTERM): ready at once, the claim not counted as an attempt."""
    only = "" if job_ids is None else " AND id = ?"
    ids = [()] if job_ids is None else [(job_id,) for job_id in job_ids]
    total = 0
    for id_args in ids:
        total += conn.execute(
            "UPDATE jobs SET state = 'ready', owner = NULL, lease_until = NULL, attempts = max(attempts - 1, 0), "
            "updated_at = ? WHERE state = 'leased' AND owner = ?" + only,
            (time.time(), owner, *id_args),
        ).rowcount
    return total


def counts(conn: sqlite3.Connection, kind: str | None = None, now: float | None = None) -> dict[str, int]:
    """Jobs by state as ``ztfd status`` shows them.

    Keys: ready (due now), leased, retry_waiting (a failure, backing off), unavailable (ALeRCE does not have
    the alert yet), failed, done.
    """
    now = time.time() if now is None else now
    where, args = ("WHERE kind = ?", (kind,)) if kind else ("", ())
    result = dict.fromkeys(("ready", "leased", "retry_waiting", "unavailable", "failed", "done"), 0)
    rows = conn.execute(
        "SELECT CASE WHEN state = 'ready' AND not_before > ? THEN "
        "  CASE WHEN waiting = 'unavailable' THEN 'unavailable' ELSE 'retry_waiting' END "
        "ELSE state END AS bucket, count(*) AS n FROM jobs " + where + " GROUP BY bucket",
        (now, *args),
    ).fetchall()
    for row in rows:
        result[row["bucket"]] = row["n"]
    return result


def batch_counts(conn: sqlite3.Connection, batch: str) -> dict[str, int]:
    """Jobs of one batch (e.g. one ``ztfd replay``) by state, to wait on and report."""
    rows = conn.execute(
        "SELECT state, count(*) AS n FROM jobs WHERE batch = ? GROUP BY state", (batch,)
    ).fetchall()
    result = dict.fromkeys(STATES, 0)
    result.update({row["state"]: row["n"] for row in rows})
    return result
