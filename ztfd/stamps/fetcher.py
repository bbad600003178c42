"""The stamp fetcher (``ztfd fetch``): drains the stamp queue, writing each alert's three stamps and a preview.

What a stamp *is* and where it comes from is the business of the alert survey's stamp provider
(``ztfd.stamps.providers``, chosen by ``stamps.<survey>_provider``; ALeRCE's ZTF ``get_stamp`` by default): how to find
the detection, the requests, what a valid body is, the file names. The fetcher does the rest, the same for every
provider:

- one asyncio loop with ``stamps.concurrency`` jobs in flight (each fetching its missing stamps at once), which
  lets a handful of processes saturate a slow service without hundreds of threads;
- jobs are claimed with a lease (``ztfd.store.jobs``) that a background task renews for the jobs of live tasks
  only; a fetcher killed with -9 renews nothing, and its jobs go back when the lease runs out;
- every request first takes a slot of the pool-wide politeness limit (``ztfd.stamps.ratelimit``, ``stamps.rate_limit``)
  and has the ``timeout``; a body over ``MAX_BODY_BYTES`` is cut off (``ztfd.stamps.http``);
- exactly the served bytes are written atomically; a valid file already there is never fetched again (stamps
  never change) unless the job says ``force``; every file is recorded in the sync manifest as soon as it is on
  disk, whatever becomes of the job;
- a job ends in one of: done; *not yet available* (the service does not have it yet: retried on a slow schedule,
  not an attempt, failed after ``unavailable_give_up``); a failed attempt (retried with backoff, failed after
  ``max_attempts``); *local trouble* (ztfd's own write failed: disk full, I/O error…; given back without counting
  an attempt while the fetcher backs off, see ``ztfd.daemon.localtrouble``). Writing that outcome to the store is
  retried until it succeeds: a job left leased by a failed write would never come back while the fetcher lives;
- an idle fetcher does not poll the queue with write transactions: it reads when the next job is due (or a lease
  runs out) and sleeps until then, at most ``IDLE_MAX_SLEEP`` so new jobs start at once.

CPU and file work (FITS checks, writes, previews) runs on a side thread so the loop keeps requests flowing; a step
that hangs there for ``stamps.step_timeout`` is abandoned with its thread (a new one takes over) and the job is a
failed attempt.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ztfd import store
from ztfd.config import Config, StampsConfig
from ztfd.daemon import lifecycle
from ztfd.daemon.heartbeat import HEARTBEAT_INTERVAL, Heartbeat
from ztfd.daemon.localtrouble import Condition, describe, is_local
from ztfd.sources import PLAIN_ID, STAMP_TYPES
from ztfd.stamps import ratelimit
from ztfd.stamps.http import capped_get
from ztfd.stamps.jobrun import (
    BadPayloadError,
    JobRun,
    ManifestRow,
    StampFiles,
    existing,
    new_run,
    valid_file,
    write,
)
from ztfd.stamps.providers import (
    FetchError,
    HttpGet,
    NotYetAvailableError,
    StampProvider,
    providers_for,
)
from ztfd.stamps.providers.alerce_ztf import AlerceZtf
from ztfd.stamps.providers.packet import PacketStamps
from ztfd.stamps.settle import Settler
from ztfd.store import jobs
from ztfd.store.detection_lists import fresh_detections, keep_detections
from ztfd.store.report import save_detections
from ztfd.store.states import FailureClass, JobKind, Role

log = logging.getLogger(__name__)
FETCHER_NICENESS = 5

IDLE_MAX_SLEEP = 1.0  # an idle fetcher looks (with a read) at least this often for new jobs
IDLE_CLAIM_EVERY = 5.0  # and claims (a write, which also requeues expired leases) at least this often
UNCOUNTED_PAUSE = 0.5  # fleet mode: seconds between looks at this host's count while it has none (no share yet)

T = TypeVar("T")


class StepTimeoutError(FetchError):
    """A side step (FITS check, write, preview) hung: the job is a failed attempt, its thread is abandoned."""

    def __init__(self, message: str) -> None:
        super().__init__(message, FailureClass.TIMEOUT)


class SideThread:
    """One daemon thread running steps off the event loop (FITS checks, writes, previews).

    Daemon and replaceable: a step that hangs (a write to a dead network disk, a stuck library) is abandoned with
    its thread, so it can block neither the fetcher's other jobs nor the process's exit. The fetcher hands it one
    step at a time, so a step's timeout counts from its start, not from its place in a queue.
    """

    def __init__(self) -> None:
        self._steps: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]]
                                       | None] = queue.SimpleQueue()
        self.finished: concurrent.futures.Future[None] = concurrent.futures.Future()
        threading.Thread(target=self._serve, name="side", daemon=True).start()

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._steps.put((future, fn, args))
        return future

    def close(self) -> concurrent.futures.Future[None]:
        """End the thread after the steps submitted so far; the future is done once it has."""
        self._steps.put(None)
        return self.finished

    def _serve(self) -> None:
        while (step := self._steps.get()) is not None:
            future, fn, args = step
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)
        self.finished.set_result(None)


def _record(conn: sqlite3.Connection, rows: list[ManifestRow]) -> None:
    if rows:
        with store.transaction(conn):
            store.record_files(conn, rows)


def _warm_up(settings: StampsConfig) -> None:
    """Import the heavy modules before the first job, so that no request times out waiting for an import."""
    import astropy.io.fits  # noqa: F401

    if settings.previews:
        from ztfd.stamps import preview

        preview.warm_up(settings.preview_renderer)


# --- the files of a detection, for ``ztfd replay`` and tests (ALeRCE's ZTF names unless a provider is given) --------


def _default_provider() -> StampProvider:
    return AlerceZtf(StampsConfig())


def stamp_path(images_dir: Path, date: str, object_id: str, detection_id: int | str, kind: str,
               provider: StampProvider | None = None) -> Path:
    return StampFiles(images_dir / date / object_id, provider or _default_provider(), str(detection_id)).stamp(kind)


def preview_path(images_dir: Path, date: str, object_id: str, detection_id: int | str) -> Path:
    return images_dir / date / object_id / f"{detection_id}.png"


def read_valid(path: Path, provider: StampProvider | None = None) -> tuple[bytes, Any] | None:
    """The bytes and image of a stamp file already on disk, or None when missing or invalid."""
    found = valid_file(path, provider or _default_provider())
    return None if found is None else (found.data, found.image)


# --- the fetcher -------------------------------------------------------------------------------------------------


class SharedDetections:
    """The pool's detections lists (``ztfd.store.detection_lists``) on the fetcher's store connection, each serving
    the other jobs of its object for ``stamps.detections_fresh`` seconds (a catch-up queues several alerts of an
    object; a kept list that lacks an alert's detection is fetched again, so this only bounds the staleness). A
    store that cannot be read or written only means asking ALeRCE again."""

    def __init__(self, fetcher: Fetcher, fresh: float) -> None:
        self.fetcher = fetcher
        self.fresh = fresh

    async def get(self, object_id: str) -> bytes | None:
        try:
            return await self.fetcher._db(fresh_detections, object_id, self.fresh)
        except sqlite3.Error as exc:
            log.debug("kept detections of %s not readable: %s", object_id, exc)
            return None

    async def put(self, object_id: str, body: bytes) -> None:
        try:
            await self.fetcher._db(keep_detections, object_id, body, self.fresh)
        except sqlite3.Error as exc:
            log.debug("detections of %s not kept: %s", object_id, exc)


class Fetcher:
    """One ``ztfd fetch`` process. ``batch`` limits it to one replay batch, and ``exit_when_idle`` ends it when
    that batch has nothing left to do now (jobs waiting for the service to catch up are left for the daemon)."""

    def __init__(
        self, cfg: Config, name: str, batch: str | None = None, exit_when_idle: bool = False, heartbeat: bool = True
    ) -> None:
        self.cfg = cfg
        # replay's own fetchers do not heartbeat: they are not the daemon's fetchers
        self.heartbeat = Heartbeat(name, Role.FETCHER) if heartbeat else None
        self.settings = cfg.stamps
        self.name = name
        self.batch = batch
        self.exit_when_idle = exit_when_idle
        self.owner = jobs.new_owner()
        self.providers = providers_for(cfg.stamps)  # survey -> its stamp provider
        self.packet_stamps: dict[str, PacketStamps] = {}  # survey -> the stamps its packets carried (preview jobs)
        for provider in self.providers.values():
            if hasattr(provider, "cache") and cfg.stamps.detections_fresh > 0:  # share detections via the store
                provider.cache = SharedDetections(self, cfg.stamps.detections_fresh)  # type: ignore[attr-defined]
        self.conn: sqlite3.Connection | None = None
        self.db = ThreadPoolExecutor(1, thread_name_prefix="db")  # one connection, used from one thread
        self.side = SideThread()  # FITS checks, writes, previews
        self.side_turn = asyncio.Lock()  # one step at a time on it
        self.stopping: asyncio.Event | None = None
        self.signals: lifecycle.Stop | None = None  # set by run_fetcher: SIGTERM/SIGINT set ``stopping``
        self.session: Any = None
        self.tasks: dict[asyncio.Task[None], jobs.StampJob] = {}  # the jobs in flight
        self.more = True  # the last claim got all it asked for: claim again as soon as there is room
        self.last_claim = 0.0
        self.uncounted = False  # fleet mode: the requests are waiting for this host's count (said in the log once)
        self.trouble = Condition(name)
        self.settler = Settler(self._db, self.owner, name, self.settings, self.trouble)  # also: paused, counted

    # --- the loop ----------------------------------------------------------------------------------------

    async def run(self) -> int:
        await self._start()
        async with self._http_session() as self.session:
            keep_alive = asyncio.create_task(self._keep_alive())
            try:
                while not self.stopping.is_set():  # type: ignore[union-attr]
                    wait = await self._fill()
                    if wait is not None and not self.tasks and self.exit_when_idle and not await self._batch_busy():
                        break
                    await self._wait_for_any(wait)
            finally:
                await self._shut_down(keep_alive)
        counts = ", ".join(f"{k} {v}" for k, v in self.settler.stats.items())
        log.info("stamp fetcher %s stopped: %s", self.name, counts)
        return 0

    async def _fill(self) -> float | None:
        """Claim jobs while there is room; return how long to wait before looking again (None: until a job ends).

        Idle (or nearly), it sleeps until the next job is due, looking again (a read) at least every
        IDLE_MAX_SLEEP for new jobs; after local trouble it claims nothing until the backoff has passed."""
        room = self.settings.concurrency - len(self.tasks)
        paused = self.settler.paused_until - time.monotonic()
        if room <= 0:
            return None
        if paused > 0:
            return paused
        try:
            due = await self._claim(room)
        except sqlite3.Error as exc:
            if not is_local(exc):
                raise
            return await self.settler.pause(describe(exc))
        if self.more:
            return None
        return max(IDLE_MAX_SLEEP if due is None else min(IDLE_MAX_SLEEP, due - time.time()), 0.02)

    async def _claim(self, room: int) -> float | None:
        """Claim up to ``room`` jobs if any can be due (a write); return when the next one is due (a read)."""
        now = time.time()
        due = None if self.more else await self._db(jobs.next_due, self.batch)
        if self.more or (due is not None and due <= now) or now - self.last_claim >= IDLE_CLAIM_EVERY:
            claimed = await self._db(jobs.claim, self.owner, self.settings.lease_seconds, room, batch=self.batch,
                                     max_attempts=self.settings.max_attempts)
            self.last_claim = now
            self.more = len(claimed) == room
            for job in claimed:
                self.tasks[asyncio.create_task(self.run_job(job))] = job
            if not self.more:
                due = await self._db(jobs.next_due, self.batch)
        return due

    async def _wait_for_any(self, wait: float | None) -> None:
        """Until a job ends, a stop is asked for, or ``wait`` seconds pass."""
        assert self.stopping is not None
        stop_wait = asyncio.ensure_future(self.stopping.wait())
        done, _ = await asyncio.wait({*self.tasks, stop_wait}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        for task in done:
            if self.tasks.pop(task, None) is not None and not task.cancelled() and task.exception() is not None:
                # Its job is no longer renewed: its lease runs out and it goes back to the queue.
                log.error("stamp task crashed", exc_info=task.exception())

    async def _keep_alive(self) -> None:
        """Heartbeat, and renew the leases of the jobs whose tasks are alive, more often than they could expire."""
        assert self.stopping is not None
        period = max(0.2, min(HEARTBEAT_INTERVAL, self.settings.lease_seconds / 3))
        while not self.stopping.is_set():
            try:
                if self.heartbeat is not None:
                    await self._db(self.heartbeat.beat)
                live = [job.id for task, job in self.tasks.items() if not task.done()]
                await self._db(jobs.extend, self.owner, self.settings.lease_seconds, job_ids=live)
            except sqlite3.Error as exc:
                log.warning("heartbeat failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), period)

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        if self.signals is not None:
            self.signals.call_in(loop, self.stopping.set)
        if self.heartbeat is not None:
            await self._db(self.heartbeat.beat)
        await asyncio.wrap_future(self.side.submit(_warm_up, self.settings))
        log.info("stamp fetcher %s started (concurrency %d, rate limit %s/s for the pool%s; providers %s)", self.name,
                 self.settings.concurrency, self.settings.rate_limit or "no",
                 f", batch {self.batch}" if self.batch else "",
                 ", ".join(f"{survey}: {p.name}" for survey, p in self.providers.items()) or "none")

    def _http_session(self) -> Any:
        import aiohttp

        return aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout),
            connector=aiohttp.TCPConnector(limit=self.settings.concurrency * len(STAMP_TYPES) + 2),
            auto_decompress=False, raise_for_status=False)

    async def _shut_down(self, keep_alive: asyncio.Task[None]) -> None:
        """Cancel what is in flight and hand its jobs back at once (files already written stay: they are valid)."""
        assert self.stopping is not None
        self.stopping.set()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, keep_alive, return_exceptions=True)
        # A write in progress finishes (atomically) before the lease is released, unless it hangs.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self.side.close())), self.settings.step_timeout)
        try:
            released = await self._db(jobs.release, self.owner)
        except sqlite3.Error as exc:
            log.warning("could not hand back the jobs in flight (%s): their leases will run out", exc)
            return
        if released:
            log.info("released %d stamp jobs", released)

    async def _batch_busy(self) -> bool:
        return await self._db(self._batch_has_work)

    def _batch_has_work(self, conn: sqlite3.Connection) -> bool:
        """True while the batch has jobs leased or to be tried again soon (not the ones waiting for ALeRCE)."""
        return jobs.counts(conn, batch=self.batch).busy > 0

    # --- one job -----------------------------------------------------------------------------------------

    async def run_job(self, job: jobs.StampJob) -> None:
        """Process one job and settle it."""
        try:
            run = new_run(job, self._provider, self.cfg.images_dir)
        except BadPayloadError as exc:
            await self.settler.bad_payload(job, str(exc))
            return
        try:
            await self.process(run)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self.settle(run, exc)
        else:
            await self.settle(run, None)

    def _provider(self, job: jobs.StampJob) -> StampProvider:
        """The survey's provider; for a preview job (the stamps came in the packet) the packet's stamps on disk."""
        survey = job.alert.survey
        if job.kind == JobKind.PREVIEW:
            if survey not in self.packet_stamps:
                self.packet_stamps[survey] = PacketStamps(self.settings, survey)
            return self.packet_stamps[survey]
        provider = self.providers.get(survey)
        if provider is None:
            raise BadPayloadError(f"no stamp provider for survey {survey!r} (stamps.{survey}_provider)")
        return provider

    async def process(self, run: JobRun) -> None:
        """Find the detection, fetch what is missing, write and record it; raise what settles the job, if any."""
        if run.detection is None:  # its slot is taken when it asks (a provider may answer from what it knows)
            run.detection = await run.provider.find_detection(self._http(run.provider), run.request)
            if not PLAIN_ID.match(run.detection.detection_id):
                raise FetchError(f"{run.provider.name} named detection {run.detection.detection_id[:80]!r}",
                                 FailureClass.BAD_BODY)
            if run.detection.light_curve:  # what the lookup said of the object's history, for night reports
                await self._db(save_detections, run.request.survey, run.request.object_id,
                               run.detection.light_curve, run.detection.light_curve_unit)
        if not run.force or run.job.kind == JobKind.PREVIEW:  # a forced preview job redraws, the stamps stay
            await self._side(existing, run)
        if run.missing:
            await self._fetch(run, run.missing)
        await self._side(write, run, self.settings, self.cfg.home)
        # Record what is on disk now, whatever the outcome: a job that is retried, fails or gives up still
        # leaves valid files, and every file under images/ must reach the manifest.
        await self._db(_record, run.files)
        if self.trouble.active:
            await self._db(self.trouble.recovered)
        verdict = run.verdict()
        if verdict is not None:
            raise verdict

    async def _fetch(self, run: JobRun, missing: list[str]) -> None:
        """Fetch the missing stamps: with one request for all when the provider can (``fetch_together``), else
        one request each, at once."""
        together = getattr(run.provider, "fetch_together", None)
        if together is None:
            slots = await self._slots(run.provider, len(missing))
            run.take(missing, await asyncio.gather(
                *(run.provider.fetch(self._http(run.provider, slot), run.request, run.detection, kind)
                  for kind, slot in zip(missing, slots, strict=True)),
                return_exceptions=True,
            ))
            return
        try:
            bundle = await together(self._http(run.provider), run.request, run.detection, missing)
        except (NotYetAvailableError, FetchError) as exc:
            run.problems.append(exc)
            return
        run.fetched.update({kind: data for kind, data in bundle.stamps.items() if kind in missing})
        run.extras.update(bundle.extras)
        run.problems.extend(FetchError(f"{kind} stamp: not in the served bundle", FailureClass.BAD_BODY)
                            for kind in missing if kind not in bundle.stamps)

    async def settle(self, run: JobRun, problem: BaseException | None) -> None:
        """Write the job's outcome (``ztfd.stamps.settle``)."""
        await self.settler.settle(run, problem)

    # --- plumbing ----------------------------------------------------------------------------------------

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        def call() -> T:
            if self.conn is None:
                self.conn = store.connect(self.cfg.db_path)
            return fn(self.conn, *args, **kwargs)

        return await asyncio.get_running_loop().run_in_executor(self.db, call)

    async def _side(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the side thread, one step at a time; if it hangs past ``stamps.step_timeout``, leave the
        thread behind (a new one takes the next steps) and raise ``StepTimeoutError``."""
        timeout = self.settings.step_timeout
        async with self.side_turn:
            future = self.side.submit(fn, *args)
            try:
                return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout)
            except TimeoutError:
                log.error("a side step (%s) hung for %gs: leaving its thread behind", fn.__name__, timeout)
                self.side.close()
                self.side = SideThread()
        raise StepTimeoutError(f"{fn.__name__} did not finish within {timeout:g}s (stamps.step_timeout)")

    def _http(self, provider: StampProvider, slot: float | None = None) -> HttpGet:
        """The GET a provider makes its requests with: the first at ``slot`` (taken in advance), any further one
        (or the first, without ``slot``) at a new slot taken when it is made."""
        slots = [] if slot is None else [slot]

        async def get(url: str, params: dict[str, str] | None) -> tuple[int, bytes]:
            at = slots.pop() if slots else (await self._slots(provider, 1))[0]
            return await capped_get(self.session, url, params, at, self.settings.timeout)

        return get

    async def _slots(self, provider: StampProvider, count: int) -> list[float]:
        """``count`` slots of the provider's pool-wide politeness limit (``stamps.rate_limit``; in fleet mode this
        host's share of it)."""
        rate = self.settings.rate_limit
        if rate <= 0:
            return [0.0] * count
        if not self.cfg.kafka.group_mode:
            return await self._db(ratelimit.reserve, provider.name, rate, count)
        while (slots := await self._db(ratelimit.reserve_share, provider.name, rate, count)) is None:
            if not self.uncounted:  # said once a spell
                log.info("stamp requests wait until this host is counted in the fleet (stamps.rate_limit is shared "
                         "by the live members; its consumers count them)")
            self.uncounted = True
            await asyncio.sleep(UNCOUNTED_PAUSE)
        self.uncounted = False
        return slots




def run_fetcher(cfg: Config, name: str, batch: str | None = None) -> int:
    """``ztfd fetch``: run one stamp fetcher until SIGTERM; with ``batch`` (``ztfd replay`` without the daemon),
    only that batch's jobs, until none is left to do now, and without heartbeats (it is not a daemon fetcher)."""
    if not cfg.stamps.enabled and batch is None:
        log.warning("stamps.enabled is false; running the stamp fetcher anyway because it was asked for")
    # Stamps can wait a moment; storing alerts should not. On a small box the consumers win the CPU.
    os.nice(FETCHER_NICENESS)
    fetcher = Fetcher(cfg, name, batch=batch, exit_when_idle=batch is not None, heartbeat=batch is None)
    try:
        with lifecycle.stop_on_signals() as signals:
            fetcher.signals = signals
            return asyncio.run(fetcher.run())
    finally:
        fetcher.db.shutdown(wait=True)
        if fetcher.conn is not None:
            fetcher.conn.close()
