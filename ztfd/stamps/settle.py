"""Writing a stamp job's outcome: done, not yet available (the slow schedule), given back (local trouble: not an
attempt, and the fetcher pauses claiming), a failed attempt retried with backoff, or failed for good; each failure
with its class (``FailureClass``), the one its error carried. A write that fails is tried again until the store
takes it: a job left leased would never come back while its fetcher lives.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ztfd.config import StampsConfig
from ztfd.daemon import lifecycle
from ztfd.daemon.localtrouble import Condition, describe, is_local
from ztfd.stamps.jobrun import JobRun
from ztfd.stamps.providers import FetchError, NotYetAvailableError
from ztfd.store import jobs
from ztfd.store.states import FailureClass, Waiting

log = logging.getLogger(__name__)

SETTLE_BACKOFF = lifecycle.Backoff(base=0.5, cap=30.0, jitter=0.5)  # writing a job's outcome again

T = TypeVar("T")
Db = Callable[..., Awaitable[Any]]  # the fetcher's ``_db``: fn(conn, *args) on its store thread


class Settler:
    """The outcomes of one fetcher's jobs (``owner``: its leases), counted in ``stats``; ``paused_until`` is the
    time.monotonic() before which the fetcher claims nothing (local trouble)."""

    def __init__(self, db: Db, owner: str, name: str, settings: StampsConfig, trouble: Condition) -> None:
        self.db = db
        self.owner = owner
        self.name = name
        self.settings = settings
        self.trouble = trouble
        self.paused_until = 0.0
        self.stats = {"done": 0, "retried": 0, "unavailable": 0, "failed": 0, "given back": 0}

    async def pause(self, reason: str) -> float:
        """Local trouble: claim nothing for the condition's backoff (it grows while the trouble lasts)."""
        self.paused_until = time.monotonic() + await self.db(self.trouble.failed, reason)
        return self.paused_until - time.monotonic()

    async def bad_payload(self, job: jobs.StampJob, reason: str) -> None:
        """A job that can never succeed as written: failed at once."""
        log.error("job %d failed: %s", job.id, reason)
        self.stats["failed"] += 1
        await self.write(f"job {job.id}", jobs.fail, job.id, self.owner, reason, FailureClass.BAD_JOB)

    async def settle(self, run: JobRun, problem: BaseException | None) -> None:
        """Write the job's outcome: done, not yet available, given back (local trouble), retried or failed."""
        if problem is None:
            self.stats["done"] += 1
            log.debug("%s done: detection %s, fetched %s", run.label, run.detection, run.written or "nothing")
            if not await self.write(run.label, jobs.complete, run.job.id, self.owner, run.result(self.name)):
                log.warning("%s finished after its lease was lost; another fetcher has it", run.label)
        elif is_local(problem):
            await self._give_back(run, describe(problem))
        elif isinstance(problem, NotYetAvailableError):
            await self._not_yet(run, str(problem))
        elif isinstance(problem, FetchError):
            await self._failed_attempt(run, str(problem), problem.kind)
        else:
            log.error("%s: unexpected error", run.label, exc_info=problem)
            await self._failed_attempt(run, f"{problem.__class__.__name__}: {problem}", FailureClass.OTHER)

    async def write(self, label: str, write: Callable[..., T], *args: Any) -> T:
        """Write a job's outcome, trying until the store takes it: a job left leased by a failed write would never
        come back while this fetcher lives (its task renews the lease meanwhile, so nobody else takes it)."""
        for attempt in itertools.count(1):
            try:
                return await self.db(write, *args)
            except sqlite3.Error as exc:
                delay = SETTLE_BACKOFF.delay(attempt)
                log.warning("%s: could not write its outcome (%s); trying again in %.1fs", label, exc, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _give_back(self, run: JobRun, reason: str) -> None:
        """Local trouble is not the job's fault: hand it back without counting an attempt, and pause claiming
        (the jobs in flight that hit the same trouble meanwhile share the pause; the next one after it doubles)."""
        if self.paused_until <= time.monotonic():
            await self.pause(reason)
        pause = max(self.paused_until - time.monotonic(), 0.0)
        self.stats["given back"] += 1
        await self.write(run.label, jobs.release, self.owner, [run.job.id], pause)

    async def _failed_attempt(self, run: JobRun, reason: str, failure: FailureClass) -> None:
        job = run.job
        if job.attempts >= self.settings.max_attempts:
            log.error("%s failed after %d attempts: %s", run.label, job.attempts, reason)
            self.stats["failed"] += 1
            await self.write(run.label, jobs.fail, job.id, self.owner, reason, failure)
            return
        delay = failure_delay(self.settings, job.attempts)
        log.warning("%s attempt %d/%d: %s; retrying in %.1fs", run.label, job.attempts, self.settings.max_attempts,
                    reason, delay)
        self.stats["retried"] += 1
        await self.write(run.label, jobs.retry, job.id, self.owner, delay, reason, failure)

    async def _not_yet(self, run: JobRun, reason: str) -> None:
        job = run.job
        waited = time.time() - job.unavailable_since if job.unavailable_since is not None else 0.0
        if waited >= self.settings.unavailable_give_up:
            reason = f"not available at {run.provider.service} after {waited:.0f}s: {reason}"
            log.error("%s failed: %s", run.label, reason)
            self.stats["failed"] += 1
            await self.write(run.label, jobs.fail, job.id, self.owner, reason, FailureClass.UNAVAILABLE)
            return
        delay = unavailable_delay(self.settings, waited)
        log.info("%s not yet available (%s); looking again in %.0fs", run.label, reason, delay)
        self.stats["unavailable"] += 1
        await self.write(run.label, jobs.retry, job.id, self.owner, delay, reason, FailureClass.UNAVAILABLE,
                           Waiting.UNAVAILABLE)


def failure_delay(cfg: StampsConfig, attempts: int) -> float:
    """Exponential backoff with jitter: base·2^(n-1) capped at retry_max, then scaled by 0.5–1.0."""
    return lifecycle.Backoff(cfg.retry_base, cfg.retry_max, jitter=0.5).delay(attempts)


def unavailable_delay(cfg: StampsConfig, waited: float) -> float:
    """Wait about as long again as already waited (doubling), between the unavailable base and max."""
    delay = lifecycle.Backoff(cfg.unavailable_retry_base, cfg.unavailable_retry_max, jitter=0.1).delay_after(waited)
    return min(delay, max(cfg.unavailable_give_up - waited, 0.0))  # look once more right at the give-up time
