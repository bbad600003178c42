"""The stamp worker (``ztfd fetch``): drains the stamp queue, writing each alert's three stamps and a preview.

What a stamp *is* and where it comes from is the business of the alert survey's stamp provider
(``ztfd.stamps.providers``, chosen by ``stamps.<survey>_provider``; ALeRCE's ZTF ``get_stamp`` by default): how to find
the detection, the requests, what a valid body is, the file names. The worker does the rest, the same for every
provider:

- one asyncio loop with ``stamps.concurrency`` jobs in flight (each fetching its missing stamps at once), which
  lets a handful of processes saturate a slow service without hundreds of threads;
- jobs are claimed with a lease (``ztfd.store.jobs``) that a background task renews for the jobs of live tasks
  only; a worker killed with -9 renews nothing, and its jobs go back when the lease runs out;
- every request first takes a slot of the pool-wide politeness limit (``ztfd.stamps.ratelimit``, ``stamps.rate_limit``)
  and has the ``timeout``; a body over ``MAX_BODY_BYTES`` is cut off;
- exactly the served bytes are written atomically; a valid file already there is never fetched again (stamps
  never change) unless the job says ``force``; every file is recorded in the sync manifest as soon as it is on
  disk, whatever becomes of the job;
- a job ends in one of: done; *not yet available* (the service does not have it yet: retried on a slow schedule,
  not an attempt, failed after ``unavailable_give_up``); a failed attempt (retried with backoff, failed after
  ``max_attempts``); *local trouble* (ztfd's own write failed: disk full, I/O error…; given back without counting
  an attempt while the worker backs off, see ``ztfd.daemon.localtrouble``). Writing that outcome to the store is retried
  until it succeeds: a job left leased by a failed write would never come back while the worker lives;
- an idle worker does not poll the queue with write transactions: it reads when the next job is due (or a lease
  runs out) and sleeps until then, at most ``IDLE_MAX_SLEEP`` so new jobs start at once.

CPU and file work (FITS checks, writes, previews) runs on a side thread so the loop keeps requests flowing; a step
that hangs there for ``stamps.step_timeout`` is abandoned with its thread (a new one takes over) and the job is a
failed attempt.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ztfd import store
from ztfd.config import Config, StampsConfig
from ztfd.daemon import lifecycle
from ztfd.daemon.localtrouble import Condition, describe, is_local
from ztfd.files import atomic_write, md5_hex, relative_to_home, remove_stale_temporaries
from ztfd.sources import PLAIN_ID, STAMP_TYPES
from ztfd.stamps import ratelimit
from ztfd.stamps.providers import (
    Detection,
    FetchError,
    HttpGet,
    NotYetAvailableError,
    StampProvider,
    StampRequest,
    providers_for,
)
from ztfd.stamps.providers.alerce_ztf import AlerceZtf
from ztfd.stamps.providers.packet import PREVIEW_JOB, PacketStamps
from ztfd.store import jobs
from ztfd.store.detection_lists import fresh_detections, keep_detections
from ztfd.store.report import save_detections

log = logging.getLogger(__name__)
FETCHER_NICENESS = 5

MAX_BODY_BYTES = 16 * 1024 * 1024  # a ZTF cutout is ~15 kB; anything near this is not a stamp
MAX_REDIRECTS = 3  # followed only on the same host and port (see same_origin_redirect)
REDIRECTS = (301, 302, 303, 307, 308)
IDLE_MAX_SLEEP = 1.0  # an idle worker looks (with a read) at least this often for new jobs
IDLE_CLAIM_EVERY = 5.0  # and claims (a write, which also requeues expired leases) at least this often
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}\Z")
SETTLE_BACKOFF = lifecycle.Backoff(base=0.5, cap=30.0, jitter=0.5)  # writing a job's outcome again

T = TypeVar("T")
ManifestRow = tuple[str, int, str]  # path under home, size, MD5


class BadPayloadError(Exception):
    """A job that can never succeed as written (e.g. an objectId that could leave its folder)."""


class StepTimeoutError(FetchError):
    """A side step (FITS check, write, preview) hung: the job is a failed attempt, its thread is abandoned."""


@dataclass(frozen=True)
class Stamp:
    """A stamp's bytes and the image they hold (for the preview)."""

    data: bytes
    image: Any


@dataclass(frozen=True)
class StampFiles:
    """Where one detection's files live: ``images/<date>/<object_id>/``, named by the provider."""

    folder: Path
    provider: StampProvider
    detection_id: str

    def stamp(self, kind: str) -> Path:
        return self.folder / self.provider.file_name(self.detection_id, kind)

    @property
    def preview(self) -> Path:
        return self.folder / f"{self.detection_id}.png"

    def valid(self, kind: str) -> Stamp | None:
        """The stamp on disk if it is there and valid (an invalid one is logged and will be replaced)."""
        return valid_file(self.stamp(kind), self.provider)


@dataclass
class JobRun:
    """One job's way through the worker: what it asks, the detection, what was on disk, fetched, written, and
    what went wrong. The steps of ``Worker.process`` fill it in turn; ``Worker.settle`` reads it."""

    job: jobs.StampJob
    request: StampRequest
    provider: StampProvider
    folder: Path
    force: bool = False
    detection: Detection | None = None
    have: dict[str, Stamp] = field(default_factory=dict)  # valid on disk before this run
    fetched: dict[str, bytes] = field(default_factory=dict)  # served bodies, not yet checked
    extras: dict[str, bytes] = field(default_factory=dict)  # files served beside the stamps (get_avro's packet)
    problems: list[BaseException] = field(default_factory=list)
    written: list[str] = field(default_factory=list)  # kinds written by this run
    preview: bool = False  # drawn by this run
    files: list[ManifestRow] = field(default_factory=list)  # every file of the job on disk now

    @property
    def label(self) -> str:
        return f"job {self.job.id} {self.request.object_id}"

    @property
    def paths(self) -> StampFiles:
        assert self.detection is not None
        return StampFiles(self.folder, self.provider, self.detection.detection_id)

    @property
    def missing(self) -> list[str]:
        return [kind for kind in STAMP_TYPES if kind not in self.have]

    def take(self, kinds: list[str], results: list[Any]) -> None:
        """Sort the answers of the fetches of ``kinds`` into bodies and problems."""
        for kind, result in zip(kinds, results, strict=True):
            if isinstance(result, BaseException):
                self.problems.append(result)
            else:
                self.fetched[kind] = result

    def verdict(self) -> BaseException | None:
        """The problem the job is settled by: a programming error first, then a failure (retried on the failure
        schedule), else "not yet" (the slower one); None when there was none."""
        for problem in self.problems:
            if not isinstance(problem, NotYetAvailableError | FetchError):
                return problem
        failures = [p for p in self.problems if isinstance(p, FetchError)]
        return failures[0] if failures else (self.problems[0] if self.problems else None)

    def result(self, worker: str) -> jobs.StampResult:
        """What the job learned, kept with its alert (``ztfd replay`` reuses the detection)."""
        assert self.detection is not None
        return jobs.StampResult(self.detection.detection_id, self.detection.mjd, tuple(self.written), self.preview,
                                worker)


class SideThread:
    """One daemon thread running steps off the event loop (FITS checks, writes, previews).

    Daemon and replaceable: a step that hangs (a write to a dead network disk, a stuck library) is abandoned with
    its thread, so it can block neither the worker's other jobs nor the process's exit. The worker hands it one
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


async def _read_capped(response: Any) -> bytes:
    """The body, read to at most ``MAX_BODY_BYTES`` (+1 to tell "too large"): a chunked answer has no
    Content-Length to check first, and an endless one must not fill the worker's memory."""
    chunks: list[bytes] = []
    size = 0
    while size <= MAX_BODY_BYTES:
        chunk = await response.content.read(MAX_BODY_BYTES + 1 - size)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
    raise FetchError(f"HTTP {response.status}: body larger than {MAX_BODY_BYTES} bytes")


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


def valid_file(path: Path, provider: StampProvider) -> Stamp | None:
    """The stamp at ``path`` if it is there and ``provider`` finds it valid; an invalid one is logged."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return Stamp(data, provider.check(data))
    except ValueError as exc:
        log.warning("replacing invalid stamp %s: %s", path, exc)
        return None


# --- the worker -------------------------------------------------------------------------------------------------


class SharedDetections:
    """The pool's detections lists (``ztfd.store.detection_lists``) on the worker's store connection, each serving
    the other jobs of its object for ``stamps.detections_fresh`` seconds (a catch-up queues several alerts of an
    object; a kept list that lacks an alert's detection is fetched again, so this only bounds the staleness). A
    store that cannot be read or written only means asking ALeRCE again."""

    def __init__(self, worker: Worker, fresh: float) -> None:
        self.worker = worker
        self.fresh = fresh

    async def get(self, object_id: str) -> bytes | None:
        try:
            return await self.worker._db(fresh_detections, object_id, self.fresh)
        except sqlite3.Error as exc:
            log.debug("kept detections of %s not readable: %s", object_id, exc)
            return None

    async def put(self, object_id: str, body: bytes) -> None:
        try:
            await self.worker._db(keep_detections, object_id, body, self.fresh)
        except sqlite3.Error as exc:
            log.debug("detections of %s not kept: %s", object_id, exc)


class Worker:
    """One ``ztfd fetch`` process. ``batch`` limits it to one replay batch, and ``exit_when_idle`` ends it when
    that batch has nothing left to do now (jobs waiting for the service to catch up are left for the daemon)."""

    def __init__(
        self, cfg: Config, name: str, batch: str | None = None, exit_when_idle: bool = False, heartbeat: bool = True
    ) -> None:
        self.cfg = cfg
        self.heartbeat = heartbeat  # replay's own workers do not heartbeat: they are not the daemon's fetchers
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
        self.signals: lifecycle.Stop | None = None  # set by run_worker: SIGTERM/SIGINT set ``stopping``
        self.session: Any = None
        self.tasks: dict[asyncio.Task[None], jobs.StampJob] = {}  # the jobs in flight
        self.more = True  # the last claim got all it asked for: claim again as soon as there is room
        self.last_claim = 0.0
        self.paused_until = 0.0  # time.monotonic() before which nothing is claimed (local trouble)
        self.trouble = Condition(name)
        self.stats = {"done": 0, "retried": 0, "unavailable": 0, "failed": 0, "given back": 0}

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
        log.info("stamp worker %s stopped: %s", self.name, ", ".join(f"{k} {v}" for k, v in self.stats.items()))
        return 0

    async def _fill(self) -> float | None:
        """Claim jobs while there is room; return how long to wait before looking again (None: until a job ends).

        Idle (or nearly), it sleeps until the next job is due, looking again (a read) at least every
        IDLE_MAX_SLEEP for new jobs; after local trouble it claims nothing until the backoff has passed."""
        room = self.settings.concurrency - len(self.tasks)
        paused = self.paused_until - time.monotonic()
        if room <= 0:
            return None
        if paused > 0:
            return paused
        try:
            due = await self._claim(room)
        except sqlite3.Error as exc:
            if not is_local(exc):
                raise
            self.paused_until = time.monotonic() + await self._db(self.trouble.failed, describe(exc))
            return self.paused_until - time.monotonic()
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
        period = max(0.2, min(5.0, self.settings.lease_seconds / 3))
        while not self.stopping.is_set():
            try:
                if self.heartbeat:
                    await self._db(store.heartbeat, self.name, "fetcher")
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
        if self.heartbeat:
            await self._db(store.heartbeat, self.name, "fetcher")
        await asyncio.wrap_future(self.side.submit(_warm_up, self.settings))
        log.info("stamp worker %s started (concurrency %d, rate limit %s/s for the pool%s; providers %s)", self.name,
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
            run = self._run_of(job)
        except BadPayloadError as exc:
            log.error("job %d failed: %s", job.id, exc)
            self.stats["failed"] += 1
            await self._settle(f"job {job.id}", jobs.fail, job.id, self.owner, str(exc))
            return
        try:
            await self.process(run)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self.settle(run, exc)
        else:
            await self.settle(run, None)

    def _run_of(self, job: jobs.StampJob) -> JobRun:
        """The job's request, checked: what becomes a folder or file name must be plain, the survey must have a
        provider. A detection the message named, or an earlier run chose (replay), is used without a lookup."""
        alert = job.alert
        if not PLAIN_ID.match(alert.object_id):
            raise BadPayloadError(f"bad object_id {alert.object_id!r}")
        if not DATE.match(alert.date):
            raise BadPayloadError(f"bad date {alert.date!r}")
        provider = self._provider(job)
        known, known_mjd = (alert.detection_id, None) if job.known is None else (job.known.detection_id,
                                                                                 job.known.detection_mjd)
        if known is not None and not PLAIN_ID.match(known):
            raise BadPayloadError(f"bad detection id {known!r}")
        if known is None and job.kind == PREVIEW_JOB:
            raise BadPayloadError("a preview job whose alert names no detection")
        request = StampRequest(alert.survey, alert.object_id, alert.date, alert.obs_mjd, known, known_mjd, alert.band)
        run = JobRun(job, request, provider, self.cfg.images_dir / alert.date / alert.object_id, force=job.force)
        if known is not None:
            run.detection = Detection(known, alert.obs_mjd if known_mjd is None else known_mjd)
        return run

    def _provider(self, job: jobs.StampJob) -> StampProvider:
        """The survey's provider; for a preview job (the stamps came in the packet) the packet's stamps on disk."""
        survey = job.alert.survey
        if job.kind == PREVIEW_JOB:
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
                raise FetchError(f"{run.provider.name} named detection {run.detection.detection_id[:80]!r}")
            if run.detection.light_curve:  # what the lookup said of the object's history, for night reports
                await self._db(save_detections, run.request.survey, run.request.object_id,
                               run.detection.light_curve, run.detection.light_curve_unit)
        if not run.force or run.job.kind == PREVIEW_JOB:  # a forced preview job redraws, the stamps stay
            await self._side(self._existing, run)
        if run.missing:
            await self._fetch(run, run.missing)
        await self._side(self._write, run)
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
        run.problems.extend(FetchError(f"{kind} stamp: not in the served bundle")
                            for kind in missing if kind not in bundle.stamps)

    def _existing(self, run: JobRun) -> None:
        for kind in STAMP_TYPES:
            found = run.paths.valid(kind)
            if found is not None:
                run.have[kind] = found

    def _write(self, run: JobRun) -> None:
        """Check and write the fetched stamps, then the preview; list in ``run.files`` every file of the job on
        disk (written now or valid already), even when a stamp failed."""
        paths = run.paths
        if paths.folder.is_dir():  # temporaries of a writer killed with -9 (a live one's are left alone)
            remove_stale_temporaries(paths.folder)
        triplet = dict(run.have)
        for kind, data in run.fetched.items():
            try:
                image = run.provider.check(data)
            except ValueError as exc:
                run.problems.append(FetchError(f"{kind} stamp: {exc}"))
                continue
            atomic_write(paths.stamp(kind), data)
            triplet[kind] = Stamp(data, image)
            run.written.append(kind)
        run.files = [self._manifest_row(paths.stamp(kind), stamp.data) for kind, stamp in sorted(triplet.items())]
        for name, data in run.extras.items():  # served beside the stamps (get_avro's alert packet)
            atomic_write(paths.folder / name, data)
            run.files.append(self._manifest_row(paths.folder / name, data))
        if len(triplet) == len(STAMP_TYPES) and self.settings.previews:
            run.files.append(self._preview(run, triplet))

    def _preview(self, run: JobRun, triplet: dict[str, Stamp]) -> ManifestRow:
        """Draw the preview when something changed (or it is missing); its manifest row either way."""
        png, detection = run.paths.preview, run.detection
        assert detection is not None
        if run.force or run.written or not png.exists():
            from ztfd.stamps import preview

            draw = preview.RENDERERS[self.settings.preview_renderer]
            data = draw(run.request.object_id, detection.detection_id, detection.mjd,
                        {kind: stamp.image for kind, stamp in triplet.items()}, band=run.request.band,
                        label=run.provider.detection_label)
            atomic_write(png, data)
            run.preview = True
        else:
            data = png.read_bytes()
        return self._manifest_row(png, data)

    def _manifest_row(self, path: Path, data: bytes) -> ManifestRow:
        return relative_to_home(self.cfg.home, path), len(data), md5_hex(data)

    # --- settling a job ----------------------------------------------------------------------------------

    async def settle(self, run: JobRun, problem: BaseException | None) -> None:
        """Write the job's outcome: done, not yet available, given back (local trouble), retried or failed."""
        if problem is None:
            self.stats["done"] += 1
            log.debug("%s done: detection %s, fetched %s", run.label, run.detection, run.written or "nothing")
            if not await self._settle(run.label, jobs.complete, run.job.id, self.owner, run.result(self.name)):
                log.warning("%s finished after its lease was lost; another worker has it", run.label)
        elif is_local(problem):
            await self._give_back(run, describe(problem))
        elif isinstance(problem, NotYetAvailableError):
            await self._not_yet(run, str(problem))
        elif isinstance(problem, FetchError):
            await self._failed_attempt(run, str(problem))
        else:
            log.error("%s: unexpected error", run.label, exc_info=problem)
            await self._failed_attempt(run, f"{problem.__class__.__name__}: {problem}")

    async def _settle(self, label: str, write: Callable[..., T], *args: Any) -> T:
        """Write a job's outcome, trying until the store takes it: a job left leased by a failed write would never
        come back while this worker lives (its task renews the lease meanwhile, so nobody else takes it)."""
        for attempt in itertools.count(1):
            try:
                return await self._db(write, *args)
            except sqlite3.Error as exc:
                delay = SETTLE_BACKOFF.delay(attempt)
                log.warning("%s: could not write its outcome (%s); trying again in %.1fs", label, exc, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _give_back(self, run: JobRun, reason: str) -> None:
        """Local trouble is not the job's fault: hand it back without counting an attempt, and pause claiming
        (the jobs in flight that hit the same trouble meanwhile share the pause; the next one after it doubles)."""
        if self.paused_until <= time.monotonic():
            self.paused_until = time.monotonic() + await self._db(self.trouble.failed, reason)
        pause = max(self.paused_until - time.monotonic(), 0.0)
        self.stats["given back"] += 1
        await self._settle(run.label, jobs.release, self.owner, [run.job.id], pause)

    async def _failed_attempt(self, run: JobRun, reason: str) -> None:
        job = run.job
        if job.attempts >= self.settings.max_attempts:
            log.error("%s failed after %d attempts: %s", run.label, job.attempts, reason)
            self.stats["failed"] += 1
            await self._settle(run.label, jobs.fail, job.id, self.owner, reason)
            return
        delay = failure_delay(self.settings, job.attempts)
        log.warning("%s attempt %d/%d: %s; retrying in %.1fs", run.label, job.attempts, self.settings.max_attempts,
                    reason, delay)
        self.stats["retried"] += 1
        await self._settle(run.label, jobs.retry, job.id, self.owner, delay, reason)

    async def _not_yet(self, run: JobRun, reason: str) -> None:
        job = run.job
        waited = time.time() - job.unavailable_since if job.unavailable_since is not None else 0.0
        if waited >= self.settings.unavailable_give_up:
            reason = f"not available at {run.provider.service} after {waited:.0f}s: {reason}"
            log.error("%s failed: %s", run.label, reason)
            self.stats["failed"] += 1
            await self._settle(run.label, jobs.fail, job.id, self.owner, reason)
            return
        delay = unavailable_delay(self.settings, waited)
        log.info("%s not yet available (%s); looking again in %.0fs", run.label, reason, delay)
        self.stats["unavailable"] += 1
        await self._settle(run.label, jobs.retry, job.id, self.owner, delay, reason, jobs.Waiting.UNAVAILABLE)

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
            return await self._get(url, params, at)

        return get

    async def _slots(self, provider: StampProvider, count: int) -> list[float]:
        """``count`` slots of the provider's pool-wide politeness limit (``stamps.rate_limit``)."""
        if self.settings.rate_limit <= 0:
            return [0.0] * count
        return await self._db(ratelimit.reserve, provider.name, self.settings.rate_limit, count)

    async def _get(self, url: str, params: dict[str, str] | None, slot: float) -> tuple[int, bytes]:
        """One GET at its rate-limit slot, with the configured timeout; connection problems are FetchErrors (or
        local trouble: out of file descriptors)."""
        import aiohttp

        delay = slot - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            for _hop in range(MAX_REDIRECTS + 1):
                async with self.session.get(url, params=params, allow_redirects=False) as response:
                    if response.status in REDIRECTS and "Location" in response.headers:
                        url, params = same_origin_redirect(response.url, response.headers["Location"]), None
                        continue
                    length = response.content_length
                    if length is not None and length > MAX_BODY_BYTES:
                        raise FetchError(f"HTTP {response.status}: body of {length} bytes is too large")
                    return response.status, await _read_capped(response)
            raise FetchError(f"more than {MAX_REDIRECTS} redirects")
        except TimeoutError:
            raise FetchError(f"timed out after {self.settings.timeout:g}s") from None
        except aiohttp.ClientError as exc:
            if is_local(exc):
                raise
            raise FetchError(f"{exc.__class__.__name__}: {exc}") from None


def same_origin_redirect(current: Any, location: str) -> str:
    """The URL a redirect leads to, when it stays on the service's host and port (or only moves it from http to
    https); a redirect elsewhere is a ``FetchError``: a stamp service's answer must not send ztfd to any host."""
    from yarl import URL

    target = current.join(URL(location))
    upgrade = (current.scheme, target.scheme) == ("http", "https") and target.is_default_port()
    same = target.scheme == current.scheme and target.port == current.port
    if target.host != current.host or not (same or upgrade):
        raise FetchError(f"redirected to another host ({target.scheme}://{target.host}:{target.port}): not followed")
    return str(target)


def failure_delay(cfg: StampsConfig, attempts: int) -> float:
    """Exponential backoff with jitter: base·2^(n-1) capped at retry_max, then scaled by 0.5–1.0."""
    return lifecycle.Backoff(cfg.retry_base, cfg.retry_max, jitter=0.5).delay(attempts)


def unavailable_delay(cfg: StampsConfig, waited: float) -> float:
    """Wait about as long again as already waited (doubling), between the unavailable base and max."""
    delay = lifecycle.Backoff(cfg.unavailable_retry_base, cfg.unavailable_retry_max, jitter=0.1).delay_after(waited)
    return min(delay, max(cfg.unavailable_give_up - waited, 0.0))  # look once more right at the give-up time


def run_worker(cfg: Config, name: str, batch: str | None = None) -> int:
    """``ztfd fetch``: run one stamp worker until SIGTERM; with ``batch`` (``ztfd replay`` without the daemon),
    only that batch's jobs, until none is left to do now, and without heartbeats (it is not a daemon fetcher)."""
    if not cfg.stamps.enabled and batch is None:
        log.warning("stamps.enabled is false; running the stamp worker anyway because it was asked for")
    # Stamps can wait a moment; storing alerts should not. On a small box the consumers win the CPU.
    os.nice(FETCHER_NICENESS)
    worker = Worker(cfg, name, batch=batch, exit_when_idle=batch is not None, heartbeat=batch is None)
    try:
        with lifecycle.stop_on_signals() as signals:
            worker.signals = signals
            return asyncio.run(worker.run())
    finally:
        worker.db.shutdown(wait=True)
        if worker.conn is not None:
            worker.conn.close()
