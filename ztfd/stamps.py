"""The stamp worker (``ztfd fetch``): drains the stamp queue, fetching each alert's three ZTF cutouts from ALeRCE.

One worker process runs an asyncio loop with ``stamps.concurrency`` alerts in flight (three stamp requests each),
which is what lets a handful of processes saturate a slow service without hundreds of threads. Around it:

- jobs are claimed with a lease (``ztfd.jobqueue``) that a background task keeps extending while the worker is
  alive; a worker killed with -9 stops extending, and its jobs go back to the queue when the lease runs out.
- the candid is chosen from ALeRCE's detections list (Lasair messages carry none): the detection with stamps
  whose MJD is closest to the alert's newest observation time, within ``stamps.match_tolerance`` seconds; the
  newest detection with stamps when the alert has no time. An object ALeRCE does not know yet, or nothing near
  the alert's time, or a 404 for a listed candid, means *not yet available*: retried after a delay that grows
  from ``unavailable_retry_base`` to ``unavailable_retry_max``, failed after ``unavailable_give_up``.
- each stamp is checked (HTTP 200, gzip, opens as FITS with a 2-D image) and exactly the served bytes are written
  atomically to ``images/<date>/<objectId>/<candid>_<type>.fits.gz``; a valid file already there is never fetched
  again (stamps never change) unless the job says ``force``.
- failures (5xx, timeouts, connection errors, garbage, truncated bodies) back off exponentially with jitter from
  ``retry_base`` to ``retry_max``; after ``max_attempts`` the job fails with the last reason.
- every request first takes a slot of the pool-wide politeness limit (``ztfd.ratelimit``, ``stamps.rate_limit``).
- every file is recorded in the sync manifest as soon as it is on disk, whatever becomes of the job (a triplet
  whose third stamp keeps failing still gets its two good files synced).
- an idle worker does not poll the queue with write transactions: it reads when the next job is due (or a lease
  runs out) and sleeps until then, at most ``IDLE_MAX_SLEEP`` so new jobs start at once.

CPU work (FITS checks, file writes, previews) runs on one side thread so the loop keeps requests flowing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sqlite3
import time
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ztfd import jobqueue, lifecycle, ratelimit, store
from ztfd.alerts import PLAIN_ID
from ztfd.config import Config, StampsConfig
from ztfd.files import atomic_write, md5_hex, relative_to_home, remove_stale_temporaries
from ztfd.sources import STAMP_TYPES

log = logging.getLogger(__name__)
FETCHER_NICENESS = 5

RATE_LIMIT_NAME = "alerce"
GZIP_MAGIC = b"\x1f\x8b"
MAX_BODY_BYTES = 16 * 1024 * 1024  # a ZTF cutout is ~15 kB; anything near this is not a stamp
IDLE_MAX_SLEEP = 1.0  # an idle worker looks (with a read) at least this often for new jobs
IDLE_CLAIM_EVERY = 5.0  # and claims (a write, which also requeues expired leases) at least this often
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
DETECTIONS_PATH = "/ztf/v1/objects/{oid}/detections"
STAMP_PATH = "/get_stamp"

T = TypeVar("T")


class NotYetAvailableError(Exception):
    """ALeRCE does not have this alert (yet): retry later, it is not a failure."""


class FetchError(Exception):
    """A failed attempt (server error, timeout, connection, bad body): back off and retry."""


class BadPayloadError(Exception):
    """A job that can never succeed as written (e.g. an objectId that could leave its folder)."""


@dataclass(frozen=True)
class Detection:
    candid: int
    mjd: float
    has_stamp: bool


@dataclass
class Outcome:
    """What one job did, kept as the job's result (``ztfd replay`` reuses the candid)."""

    candid: int
    mjd: float | None
    fetched: list[str] = field(default_factory=list)
    preview: bool = False


# --- pure helpers -----------------------------------------------------------------------------------------------


def stamp_path(images_dir: Path, date: str, object_id: str, candid: int, kind: str) -> Path:
    return images_dir / date / object_id / f"{candid}_{kind}.fits.gz"


def preview_path(images_dir: Path, date: str, object_id: str, candid: int) -> Path:
    return images_dir / date / object_id / f"{candid}.png"


def parse_detections(body: bytes) -> list[Detection]:
    """ALeRCE's detections JSON as ``Detection``s; rows without a usable candid or mjd are skipped."""
    try:
        rows = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FetchError(f"detections: not JSON ({exc.__class__.__name__})") from None
    if isinstance(rows, dict) and isinstance(rows.get("items"), list):  # a paginated shape, should ALeRCE use one
        rows = rows["items"]
    if not isinstance(rows, list):
        raise FetchError("detections: not a JSON list")
    found = []
    for row in rows:
        if not isinstance(row, dict):
            continue
        try:
            found.append(Detection(int(row["candid"]), float(row["mjd"]), bool(row.get("has_stamp"))))
        except (KeyError, TypeError, ValueError):
            continue
    return found


def choose_candid(detections: Iterable[Detection], obs_mjd: float | None, tolerance_seconds: float) -> Detection:
    """The detection whose stamps belong to the alert, or ``NotYetAvailableError``.

    ALeRCE's own client takes the *oldest* detection with stamps, which is the wrong one for a new alert.
    """
    stamped = [d for d in detections if d.has_stamp]
    if not stamped:
        raise NotYetAvailableError("ALeRCE lists no detection with stamps for this object")
    if obs_mjd is None:
        return max(stamped, key=lambda d: (d.mjd, d.candid))
    nearest = min(stamped, key=lambda d: (abs(d.mjd - obs_mjd), -d.candid))
    if abs(nearest.mjd - obs_mjd) * 86400.0 <= tolerance_seconds:
        return nearest
    raise NotYetAvailableError(
        f"no detection with stamps within {tolerance_seconds:g}s of MJD {obs_mjd:.5f} "
        f"(nearest MJD {nearest.mjd:.5f})"
    )


def check_stamp(data: bytes) -> Any:
    """The image of a gzipped FITS cutout, or ``ValueError`` saying why the bytes are not one."""
    from ztfd.preview import stamp_array

    if not data.startswith(GZIP_MAGIC):
        raise ValueError(f"not gzip (starts with {data[:8]!r})")
    try:
        return stamp_array(data)
    except (EOFError, OSError, zlib.error) as exc:  # truncated or corrupt gzip
        raise ValueError(f"bad gzip: {exc}") from None
    except Exception as exc:  # astropy raises many kinds for a non-FITS payload
        raise ValueError(f"not FITS: {exc.__class__.__name__}: {exc}") from None


def read_valid(path: Path) -> tuple[bytes, Any] | None:
    """The bytes and image of a stamp file already on disk, or None when missing or invalid."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return data, check_stamp(data)
    except ValueError as exc:
        log.warning("replacing invalid stamp %s: %s", path, exc)
        return None


def failure_delay(cfg: StampsConfig, attempts: int) -> float:
    """Exponential backoff with jitter: base·2^(n-1) capped at retry_max, then scaled by 0.5–1.0."""
    return lifecycle.Backoff(cfg.retry_base, cfg.retry_max, jitter=0.5).delay(attempts)


def unavailable_delay(cfg: StampsConfig, waited: float) -> float:
    """Wait about as long again as already waited (doubling), between the unavailable base and max."""
    delay = lifecycle.Backoff(cfg.unavailable_retry_base, cfg.unavailable_retry_max, jitter=0.1).delay_after(waited)
    return min(delay, max(cfg.unavailable_give_up - waited, 0.0))  # look once more right at the give-up time


def _remove_stale_temporaries(folder: Path) -> None:
    """Temporaries in an object's folder left by a writer killed with -9; a live writer's (another job fetching
    the same stamp, e.g. a replay beside the daemon) is left alone. One folder scan per job, before its writes."""
    if folder.is_dir():
        remove_stale_temporaries(folder)


def next_due(conn: sqlite3.Connection, kind: str, batch: str | None = None) -> float | None:
    """When the queue next has something for a claim: the earliest ready job's ``not_before`` or leased job's
    ``lease_until`` (an expired lease is requeued by the next claim); None when there is neither.

    Two plain reads on partial indexes: an idle worker asks this instead of running a claim (a write
    transaction) several times a second.
    """
    only_batch, args = ("AND batch = ?", (batch,)) if batch is not None else ("", ())
    ready = conn.execute(
        f"SELECT min(not_before) FROM jobs WHERE state = 'ready' AND kind = ? {only_batch}", (kind, *args)
    ).fetchone()[0]
    lease = conn.execute(
        f"SELECT min(lease_until) FROM jobs WHERE state = 'leased' AND kind = ? {only_batch}", (kind, *args)
    ).fetchone()[0]
    due = [t for t in (ready, lease) if t is not None]
    return min(due) if due else None


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


def _record(conn: sqlite3.Connection, rows: list[tuple[str, int, str]]) -> None:
    if rows:
        with store.transaction(conn):
            store.record_files(conn, rows)


def _warm_up(settings: StampsConfig) -> None:
    """Import the heavy modules before the first job, so that no request times out waiting for an import."""
    import astropy.io.fits  # noqa: F401

    if settings.previews:
        from ztfd import preview

        preview.warm_up(settings.preview_renderer)


# --- the worker -------------------------------------------------------------------------------------------------


class Worker:
    """One ``ztfd fetch`` process. ``batch`` limits it to one replay batch, and ``exit_when_idle`` ends it when
    that batch has nothing left to do now (jobs waiting for ALeRCE to catch up are left for the daemon)."""

    def __init__(
        self, cfg: Config, name: str, batch: str | None = None, exit_when_idle: bool = False, heartbeat: bool = True
    ) -> None:
        self.cfg = cfg
        self.heartbeat = heartbeat  # replay's own workers do not heartbeat: they are not the daemon's fetchers
        self.settings = cfg.stamps
        self.name = name
        self.batch = batch
        self.exit_when_idle = exit_when_idle
        self.owner = jobqueue.new_owner()
        self.conn: sqlite3.Connection | None = None
        self.db = ThreadPoolExecutor(1, thread_name_prefix="db")  # one connection, used from one thread
        self.cpu = ThreadPoolExecutor(1, thread_name_prefix="cpu")  # FITS checks, writes, previews
        self.stopping: asyncio.Event | None = None
        self.signals: lifecycle.Stop | None = None  # set by run_worker: SIGTERM/SIGINT set ``stopping``
        self.session: Any = None
        self.stats = {"done": 0, "retried": 0, "unavailable": 0, "failed": 0}

    # --- plumbing ----------------------------------------------------------------------------------------

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        def call() -> T:
            if self.conn is None:
                self.conn = store.connect(self.cfg.db_path)
            return fn(self.conn, *args, **kwargs)

        return await asyncio.get_running_loop().run_in_executor(self.db, call)

    async def _cpu(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.cpu, fn, *args)

    async def _get(self, url: str, params: dict[str, str] | None, slot: float) -> tuple[int, bytes]:
        """One GET at its rate-limit slot, with the configured timeout; connection problems are FetchErrors."""
        import aiohttp

        delay = slot - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            async with self.session.get(url, params=params) as response:
                length = response.content_length
                if length is not None and length > MAX_BODY_BYTES:
                    raise FetchError(f"HTTP {response.status}: body of {length} bytes is too large")
                return response.status, await _read_capped(response)
        except TimeoutError:
            raise FetchError(f"timed out after {self.settings.timeout:g}s") from None
        except aiohttp.ClientError as exc:
            raise FetchError(f"{exc.__class__.__name__}: {exc}") from None

    async def _slots(self, count: int) -> list[float]:
        if self.settings.rate_limit <= 0:
            return [0.0] * count
        return await self._db(ratelimit.reserve, RATE_LIMIT_NAME, self.settings.rate_limit, count)

    # --- one job -----------------------------------------------------------------------------------------

    async def _detection(self, object_id: str, obs_mjd: float | None) -> Detection:
        (slot,) = await self._slots(1)
        url = self.settings.alerce_api_url.rstrip("/") + DETECTIONS_PATH.format(oid=object_id)
        status, body = await self._get(url, None, slot)
        if status == 404:
            raise NotYetAvailableError("ALeRCE does not know the object yet (detections: 404)")
        if status != 200:
            raise FetchError(f"detections: HTTP {status}")
        return choose_candid(parse_detections(body), obs_mjd, self.settings.match_tolerance)

    async def _fetch_stamp(self, object_id: str, candid: int, kind: str, slot: float) -> bytes:
        url = self.settings.alerce_stamp_url.rstrip("/") + STAMP_PATH
        params = {"oid": object_id, "candid": str(candid), "type": kind, "format": "fits"}
        status, body = await self._get(url, params, slot)
        if status == 404:
            raise NotYetAvailableError(f"{kind} stamp of listed candid {candid}: HTTP 404")
        if status != 200:
            raise FetchError(f"{kind} stamp: HTTP {status}")
        return body

    async def process(self, job: jobqueue.Job) -> Outcome:
        payload = job.payload
        object_id, date = payload.get("object_id"), payload.get("date")
        if not isinstance(object_id, str) or not PLAIN_ID.match(object_id):
            raise BadPayloadError(f"bad object_id {object_id!r}")
        if not isinstance(date, str) or not DATE.match(date):
            raise BadPayloadError(f"bad date {date!r}")
        force = bool(payload.get("force"))
        if payload.get("candid") is not None:  # replay knows it from an earlier run: no detections request
            candid, mjd = int(payload["candid"]), payload.get("candid_mjd")
        else:
            detection = await self._detection(object_id, payload.get("obs_mjd"))
            candid, mjd = detection.candid, detection.mjd
        paths = {kind: stamp_path(self.cfg.images_dir, date, object_id, candid, kind) for kind in STAMP_TYPES}
        have = {} if force else await self._cpu(self._existing, paths)
        missing = [kind for kind in STAMP_TYPES if kind not in have]
        slots = await self._slots(len(missing))
        results = await asyncio.gather(
            *(self._fetch_stamp(object_id, candid, kind, slot) for kind, slot in zip(missing, slots, strict=True)),
            return_exceptions=True,
        )
        fetched = {}
        problems: list[BaseException] = []
        for kind, result in zip(missing, results, strict=True):
            if isinstance(result, BaseException):
                problems.append(result)
            else:
                fetched[kind] = result
        outcome = Outcome(candid, mjd)
        png = preview_path(self.cfg.images_dir, date, object_id, candid)
        written = await self._cpu(
            self._write, object_id, candid, mjd, paths, png, have, fetched, force, problems, outcome
        )
        # Record what is on disk now, whatever the outcome: a job that is retried, fails or gives up still
        # leaves valid files, and every file under images/ must reach the manifest.
        await self._db(_record, written)
        for problem in problems:
            if isinstance(problem, NotYetAvailableError | FetchError):
                continue
            raise problem  # a programming error: let the generic handler log it with its traceback
        if problems:
            # Keep what was written (valid stamps are never refetched) and report the most telling problem:
            # a failure is retried on the failure schedule, "not yet" on the slower one.
            failures = [p for p in problems if isinstance(p, FetchError)]
            raise failures[0] if failures else problems[0]
        await self._db(self._finish, job, outcome)
        return outcome

    def _existing(self, paths: dict[str, Path]) -> dict[str, tuple[bytes, Any]]:
        found = {}
        for kind, path in paths.items():
            valid = read_valid(path)
            if valid is not None:
                found[kind] = valid
        return found

    def _write(
        self,
        object_id: str,
        candid: int,
        mjd: float | None,
        paths: dict[str, Path],
        png: Path,
        have: dict[str, tuple[bytes, Any]],
        fetched: dict[str, bytes],
        force: bool,
        problems: list[BaseException],
        outcome: Outcome,
    ) -> list[tuple[str, int, str]]:
        """Check and write the fetched stamps, then the preview; return manifest rows for every file of the job on
        disk (written now or valid already), even when a stamp failed."""
        triplet = dict(have)
        _remove_stale_temporaries(png.parent)
        for kind, data in fetched.items():
            try:
                image = check_stamp(data)
            except ValueError as exc:
                problems.append(FetchError(f"{kind} stamp: {exc}"))
                continue
            atomic_write(paths[kind], data)
            triplet[kind] = (data, image)
            outcome.fetched.append(kind)
        home = self.cfg.home
        rows = [(relative_to_home(home, paths[k]), len(d), md5_hex(d)) for k, (d, _) in sorted(triplet.items())]
        if len(triplet) == len(STAMP_TYPES) and self.settings.previews:
            if force or outcome.fetched or not png.exists():
                from ztfd import preview

                draw = preview.RENDERERS[self.settings.preview_renderer]
                data = draw(object_id, candid, mjd, {k: image for k, (_, image) in triplet.items()})
                atomic_write(png, data)
                outcome.preview = True
            else:
                data = png.read_bytes()
            rows.append((relative_to_home(home, png), len(data), md5_hex(data)))
        return rows

    def _finish(self, conn: sqlite3.Connection, job: jobqueue.Job, outcome: Outcome) -> None:
        result = {"candid": str(outcome.candid), "mjd": outcome.mjd, "fetched": outcome.fetched,
                  "preview": outcome.preview, "worker": self.name}
        if not jobqueue.complete(conn, job.id, self.owner, result):
            log.warning("job %d finished after its lease was lost; another worker has it", job.id)

    async def run_job(self, job: jobqueue.Job) -> None:
        """Process one job and settle it: done, retry, not yet available, or failed."""
        label = f"job {job.id} {job.payload.get('object_id')}"
        try:
            outcome = await self.process(job)
        except asyncio.CancelledError:
            raise
        except NotYetAvailableError as exc:
            await self._not_yet(job, label, str(exc))
        except BadPayloadError as exc:
            log.error("%s failed: %s", label, exc)
            self.stats["failed"] += 1
            await self._db(jobqueue.fail, job.id, self.owner, str(exc))
        except Exception as exc:
            if not isinstance(exc, FetchError):
                log.exception("%s: unexpected error", label)
            await self._failed_attempt(job, label, f"{exc.__class__.__name__}: {exc}"
                                       if not isinstance(exc, FetchError) else str(exc))
        else:
            self.stats["done"] += 1
            log.debug("%s done: candid %d, fetched %s", label, outcome.candid, outcome.fetched or "nothing")

    async def _failed_attempt(self, job: jobqueue.Job, label: str, reason: str) -> None:
        if job.attempts >= self.settings.max_attempts:
            log.error("%s failed after %d attempts: %s", label, job.attempts, reason)
            self.stats["failed"] += 1
            await self._db(jobqueue.fail, job.id, self.owner, reason)
            return
        delay = failure_delay(self.settings, job.attempts)
        log.warning("%s attempt %d/%d: %s; retrying in %.1fs", label, job.attempts, self.settings.max_attempts,
                    reason, delay)
        self.stats["retried"] += 1
        await self._db(jobqueue.retry, job.id, self.owner, delay, reason)

    async def _not_yet(self, job: jobqueue.Job, label: str, reason: str) -> None:
        now = time.time()
        waited = now - job.unavailable_since if job.unavailable_since is not None else 0.0
        if waited >= self.settings.unavailable_give_up:
            reason = f"not available at ALeRCE after {waited:.0f}s: {reason}"
            log.error("%s failed: %s", label, reason)
            self.stats["failed"] += 1
            await self._db(jobqueue.fail, job.id, self.owner, reason)
            return
        delay = unavailable_delay(self.settings, waited)
        log.info("%s not yet available (%s); looking again in %.0fs", label, reason, delay)
        self.stats["unavailable"] += 1
        await self._db(jobqueue.retry, job.id, self.owner, delay, reason, waiting="unavailable")

    # --- the loop ----------------------------------------------------------------------------------------

    async def _keep_alive(self) -> None:
        """Heartbeat and extend this worker's leases, more often than they could expire."""
        assert self.stopping is not None
        period = max(0.2, min(5.0, self.settings.lease_seconds / 3))
        while not self.stopping.is_set():
            try:
                if self.heartbeat:
                    await self._db(store.heartbeat, self.name, "fetcher")
                await self._db(jobqueue.extend, self.owner, self.settings.lease_seconds)
            except sqlite3.Error as exc:
                log.warning("heartbeat failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), period)

    def _batch_has_work(self, conn: sqlite3.Connection) -> bool:
        """True while the batch has jobs leased or to be tried again soon (not the ones waiting for ALeRCE)."""
        row = conn.execute(
            "SELECT count(*) FROM jobs WHERE batch = ? AND (state = 'leased' OR (state = 'ready' "
            "AND NOT (waiting = 'unavailable' AND not_before > ?)))",
            (self.batch, time.time()),
        ).fetchone()
        return bool(row[0])

    async def run(self) -> int:
        import aiohttp

        loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        if self.signals is not None:
            self.signals.call_in(loop, self.stopping.set)
        if self.heartbeat:
            await self._db(store.heartbeat, self.name, "fetcher")
        await self._cpu(_warm_up, self.settings)
        concurrency = self.settings.concurrency
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout)
        connector = aiohttp.TCPConnector(limit=concurrency * len(STAMP_TYPES) + 2)
        log.info("stamp worker %s started (concurrency %d, rate limit %s/s for the pool%s)", self.name, concurrency,
                 self.settings.rate_limit or "no", f", batch {self.batch}" if self.batch else "")
        tasks: dict[asyncio.Task[None], jobqueue.Job] = {}
        keep_alive = asyncio.create_task(self._keep_alive())
        more = True  # the last claim got all it asked for: claim again as soon as there is room
        last_claim = 0.0
        async with aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False,
                                         raise_for_status=False) as session:
            self.session = session
            try:
                while not self.stopping.is_set():
                    wait: float | None = None
                    if len(tasks) < concurrency:
                        now = time.time()
                        due = None if more else await self._db(next_due, jobqueue.STAMPS, self.batch)
                        if more or (due is not None and due <= now) or now - last_claim >= IDLE_CLAIM_EVERY:
                            want = concurrency - len(tasks)
                            claimed = await self._db(jobqueue.claim, jobqueue.STAMPS, self.owner,
                                                     self.settings.lease_seconds, want, batch=self.batch,
                                                     max_attempts=self.settings.max_attempts)
                            last_claim = now
                            more = len(claimed) == want
                            for job in claimed:
                                tasks[asyncio.create_task(self.run_job(job))] = job
                            if not more:
                                due = await self._db(next_due, jobqueue.STAMPS, self.batch)
                        if not more:
                            if not tasks and self.exit_when_idle and not await self._db(self._batch_has_work):
                                break
                            # Idle (or nearly): sleep until the next job is due, looking again (a read) at
                            # least every IDLE_MAX_SLEEP for new jobs.
                            wait = IDLE_MAX_SLEEP if due is None else min(IDLE_MAX_SLEEP, due - time.time())
                            wait = max(wait, 0.02)
                    waiters: set[asyncio.Future[Any]] = set(tasks)
                    stop_wait = asyncio.ensure_future(self.stopping.wait())
                    waiters.add(stop_wait)
                    done, _ = await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                    stop_wait.cancel()
                    for task in done:
                        if task in tasks:
                            del tasks[task]
                            if not task.cancelled() and task.exception() is not None:
                                log.error("stamp task crashed", exc_info=task.exception())
            finally:
                await self._shut_down(tasks, keep_alive)
        log.info("stamp worker %s stopped: %s", self.name, ", ".join(f"{k} {v}" for k, v in self.stats.items()))
        return 0

    async def _shut_down(self, tasks: dict[asyncio.Task[None], jobqueue.Job], keep_alive: asyncio.Task[None]) -> None:
        """Cancel what is in flight and hand its jobs back at once (files already written stay: they are valid)."""
        assert self.stopping is not None
        self.stopping.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, keep_alive, return_exceptions=True)
        self.cpu.shutdown(wait=True)  # a write in progress finishes (atomically) before the lease is released
        released = await self._db(jobqueue.release, self.owner)
        if released:
            log.info("released %d stamp jobs", released)


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
