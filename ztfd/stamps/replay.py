"""``ztfd replay --date``: refetch the stamps of every stored alert of one date.

The alerts table is the list of what should be there. For each alert, the stamp triplet (and preview) is checked
on disk with the candid a previous job chose; alerts whose files are missing or invalid, or all with ``--force``,
get a stamp job in a new *batch*. Then either the daemon does the work (some fetcher heartbeats and its process
is alive: the jobs join its queue and replay waits for its batch) or replay runs its own worker processes on the
batch, the same worker code as ``ztfd fetch``. Jobs that ALeRCE cannot serve yet are left queued, to be looked at
again by the daemon on the not-yet-available schedule; they are reported, not failed.

While it waits, replay shows the newest error of each cause among its batch's jobs (the stamp service failing and
retried, not yet available, failed), so an operator sees why nothing settles. At the end it says what the done jobs
did: fetched stamps, only drew a preview, or found everything on disk already (no request): a job is no proof of
a fetch.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import multiprocessing
import os
import sqlite3
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import click

from ztfd import store
from ztfd.config import Config
from ztfd.daemon import lifecycle
from ztfd.sources import STAMP_TYPES
from ztfd.stamps import providers
from ztfd.stamps.fetcher import preview_path, read_valid, run_fetcher, stamp_path
from ztfd.stamps.providers import StampProvider, service_url
from ztfd.stamps.providers.packet import PacketStamps
from ztfd.store import jobs
from ztfd.store.alerts import alerts_on
from ztfd.store.processes import processes
from ztfd.store.stamps import stamp_records_on
from ztfd.store.states import JobKind, Role

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
POLL_SECONDS = 0.2
FETCHER_CHECK_SECONDS = 1.0  # how often a replay waiting on the daemon checks that some fetcher is alive
DAEMON_GRACE_MAX = 10.0  # at most this long without a live fetcher (a supervisor restarts one in seconds)
REPORT_EVERY = 5.0  # seconds between progress lines when stdout is not a terminal
WORKER_STOP_TIMEOUT = 30.0  # seconds a foreground worker may take to hand its jobs back before SIGKILL


@dataclass
class Progress:
    done: int = 0
    failed: int = 0
    unavailable: int = 0  # waiting for ALeRCE, left queued

    @property
    def settled(self) -> int:
        return self.done + self.failed + self.unavailable


def parse_date(text: str) -> str | None:
    try:
        return dt.date.fromisoformat(text).isoformat() if len(text) == 10 else None
    except ValueError:
        return None


def run(cfg: Config, date: str, topic: str | None = None, force: bool = False, workers: int | None = None) -> int:
    if parse_date(date) is None:
        click.echo(f"ztfd: replay: --date must be a date as YYYY-MM-DD, not {date!r}", err=True)
        return EXIT_USAGE
    if topic is not None and topic not in cfg.kafka.topics:
        log.warning("replay: topic %s is not in kafka.topics; replaying what is stored for it anyway", topic)
    conn = store.connect(cfg.db_path)
    try:
        return _replay(conn, cfg, date, topic, force, workers or cfg.stamps.workers)
    finally:
        conn.close()


def plan(conn: sqlite3.Connection, cfg: Config, date: str, topic: str | None, force: bool
         ) -> tuple[int, list[jobs.NewStampJob]]:
    """How many alerts the date has, and the stamp jobs to queue: one per alert whose files are not all valid on
    disk under the detection an earlier run chose (every alert with ``force``). Two indexed reads (the date's
    alerts, their stamp records), then the files.

    An alert whose packet carried its stamps (an Avro alert names its detection) whose three stamps are still
    valid on disk under the packet's names only needs its preview: a ``preview`` job, no request. When they are
    gone, its survey's provider fetches them like any other."""
    alerts = alerts_on(conn, date, topic)
    known = stamp_records_on(conn, date, topic)
    stamp_providers = providers.providers_for(cfg.stamps)
    packet_stamps: dict[str, PacketStamps] = {}
    payloads = []
    for alert in alerts:
        if alert.detection_id is not None:
            packet = packet_stamps.setdefault(alert.survey, PacketStamps(cfg.stamps, alert.survey))
            if stamps_valid(cfg, alert.date, alert.object_id, alert.detection_id, packet):
                if cfg.stamps.previews and (force or not preview_there(cfg, alert.date, alert.object_id,
                                                                        alert.detection_id)):
                    payloads.append(jobs.NewStampJob(alert.id, force=force, kind=JobKind.PREVIEW))
                continue
        previous = known.get(alert.id)
        provider = stamp_providers.get(alert.survey)
        if provider is None:
            continue  # no stamps for this survey (stamps.<survey>_provider = "none")
        if (not force and previous is not None
                and triplet_complete(cfg, alert.date, alert.object_id, previous.detection_id, provider)):
            continue
        payloads.append(jobs.NewStampJob(alert.id, force=force))  # the worker reuses the detection of ``known``
    return len(alerts), payloads


def _replay(conn: sqlite3.Connection, cfg: Config, date: str, topic: str | None, force: bool, workers: int) -> int:
    scope = f"{date}" + (f" topic {topic}" if topic else "")
    count, payloads = plan(conn, cfg, date, topic, force)
    if not count:
        click.echo(f"replay {scope}: no stored alerts")
        return EXIT_OK
    complete = count - len(payloads)
    if force:
        click.echo(f"replay {scope}: {count} alerts, all {len(payloads)} to fetch again (--force)")
    else:
        click.echo(f"replay {scope}: {count} alerts, {complete} complete on disk, {len(payloads)} to fetch")
    if not payloads:
        return EXIT_OK
    batch = f"replay:{date}:{uuid.uuid4().hex[:12]}"
    with store.transaction(conn):
        jobs.enqueue(conn, payloads, batch=batch)
    log.info("replay %s: queued %d stamp jobs as batch %s (force=%s)", scope, len(payloads), batch, force)
    stop = lifecycle.Stop().install()  # Ctrl-C: stop waiting, the rest stays queued; a second one exits at once
    fetchers = running_fetchers(conn, cfg)
    if fetchers:
        click.echo(f"the daemon is running ({len(fetchers)} fetchers): queued as batch {batch}, waiting for it")
        progress = _wait(conn, batch, len(payloads), stop, processes=None, cfg=cfg)
        if progress is None:  # the daemon's fetchers died: do the rest here rather than wait forever
            click.echo(f"no daemon fetcher alive for {_daemon_grace(cfg):.0f} s: fetching the rest with {workers} "
                       f"worker process{'es' if workers > 1 else ''}")
            progress = _fetch_in_foreground(conn, cfg, batch, len(payloads), workers, stop)
    else:
        click.echo(f"the daemon is not running: fetching with {workers} worker process{'es' if workers > 1 else ''}")
        progress = _fetch_in_foreground(conn, cfg, batch, len(payloads), workers, stop)
    return _summarise(conn, scope, batch, progress, len(payloads))


def triplet_complete(cfg: Config, date: str, object_id: str, candid: int | str,
                     provider: StampProvider | None = None) -> bool:
    """All three stamps valid on disk, as the alert's provider names and checks them (and the preview present
    when previews are on)."""
    return (stamps_valid(cfg, date, object_id, candid, provider)
            and (not cfg.stamps.previews or preview_there(cfg, date, object_id, candid)))


def stamps_valid(cfg: Config, date: str, object_id: str, candid: int | str,
                 provider: StampProvider | None = None) -> bool:
    """All three stamps valid on disk, as ``provider`` names and checks them."""
    return all(read_valid(stamp_path(cfg.images_dir, date, object_id, candid, kind, provider), provider) is not None
               for kind in STAMP_TYPES)


def preview_there(cfg: Config, date: str, object_id: str, candid: int | str) -> bool:
    return preview_path(cfg.images_dir, date, object_id, candid).exists()


def running_fetchers(conn: sqlite3.Connection, cfg: Config) -> list[str]:
    """Names of daemon fetchers alive now: a fresh heartbeat and a live process behind it."""
    import psutil

    fresh_since = time.time() - cfg.supervisor.heartbeat_timeout
    alive = []
    for row in processes(conn, [Role.FETCHER]):
        if row.pid is None or row.heartbeat_at is None or row.heartbeat_at < fresh_since:
            continue
        with contextlib.suppress(psutil.Error):
            if psutil.Process(row.pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(row.name)
    return alive


def batch_progress(conn: sqlite3.Connection, batch: str, total: int) -> Progress:
    """What became of a batch of ``total`` jobs: done ones may be forgotten meanwhile (``jobs.forget_done``), so
    done is what is neither open nor failed."""
    counts = jobs.counts(conn, batch=batch)
    return Progress(done=total - counts.unfinished - counts.failed, failed=counts.failed,
                    unavailable=counts.unavailable)


def _replay_worker(cfg: Config, name: str, batch: str) -> None:
    """Entry point of one foreground worker process (spawned: a clean interpreter, its own store connection)."""
    from ztfd import logs

    os.setpgid(0, 0)  # a terminal's Ctrl-C reaches replay only, which stops its workers with one SIGTERM
    logs.setup(cfg.logs_dir, cfg.logging.level, cfg.logging.max_bytes, cfg.logging.backup_count, console=False)
    sys.exit(run_fetcher(cfg, name, batch=batch))


def _fetch_in_foreground(conn: sqlite3.Connection, cfg: Config, batch: str, total: int, workers: int,
                         stop: lifecycle.Stop) -> Progress:
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_replay_worker, args=(cfg, f"replay:{index}", batch), name=f"replay-{index}")
        for index in range(workers)
    ]
    for process in processes:
        process.start()
    stop.on_cold_stop = lambda: lifecycle.kill_now(processes)  # their leases expire: the jobs come back
    try:
        return _wait(conn, batch, total, stop, processes, cfg)
    finally:
        lifecycle.terminate(processes, WORKER_STOP_TIMEOUT)  # SIGTERM: a worker releases its leases and exits 0


def _daemon_grace(cfg: Config) -> float:
    return min(cfg.supervisor.heartbeat_timeout, DAEMON_GRACE_MAX)


def _wait(conn: sqlite3.Connection, batch: str, total: int, stop: lifecycle.Stop, processes: list | None,
          cfg: Config | None = None) -> Progress | None:
    """Poll the batch until every job is settled (or the foreground workers are gone), showing progress.

    Waiting on the daemon (``processes`` None), returns None when no daemon fetcher has been alive for
    ``_daemon_grace``: the caller then fetches in the foreground instead of waiting forever.
    """
    progress = batch_progress(conn, batch, total)
    shown = 0
    errors = ErrorLines(conn, batch, cfg)
    last_report = time.monotonic()
    last_check = last_seen = time.monotonic()
    with _progress_bar(total) as bar:
        while not stop.is_set():
            progress = batch_progress(conn, batch, total)
            if bar is not None:
                bar.update(progress.settled - shown)
                errors.show(new_only=True, before="\n")
            elif time.monotonic() - last_report >= REPORT_EVERY:
                click.echo(f"  {progress.settled}/{total} settled: done {progress.done}, failed "
                           f"{progress.failed}, not yet available {progress.unavailable}")
                errors.show(new_only=False)
                last_report = time.monotonic()
            shown = progress.settled
            if progress.settled >= total:
                break
            if processes is not None and not any(p.is_alive() for p in processes):
                progress = batch_progress(conn, batch, total)
                break
            if processes is None and cfg is not None and time.monotonic() - last_check >= FETCHER_CHECK_SECONDS:
                last_check = time.monotonic()
                if running_fetchers(conn, cfg):
                    last_seen = last_check
                elif last_check - last_seen >= _daemon_grace(cfg):
                    log.warning("replay: no daemon fetcher alive for %.0f s; fetching batch %s here",
                                last_check - last_seen, batch)
                    return None
            stop.wait(POLL_SECONDS)
    if stop.is_set():
        click.echo("\ninterrupted: the batch's remaining jobs stay queued for the daemon", err=True)
    return progress


CAUSES = {"retry": "stamp service failed, retrying", "unavailable": "not yet available",
          "failed": "failed for good"}


class ErrorLines:
    """The newest error per cause among a batch's jobs, as lines under the progress (each cause's line again when
    its error changed, or at every report when stdout is not a terminal)."""

    def __init__(self, conn: sqlite3.Connection, batch: str, cfg: Config | None) -> None:
        self.conn, self.batch, self.cfg = conn, batch, cfg
        self.shown: dict[str, str] = {}

    def show(self, new_only: bool, before: str = "") -> None:
        for cause, error in sorted(jobs.last_errors(self.conn, self.batch).items()):
            where = service_url(self.cfg.stamps, error.survey) if self.cfg is not None else None
            line = f"    {CAUSES.get(cause, cause)}{f' ({where})' if where else ''}: {error.reason}"
            if new_only and self.shown.get(cause) == line:
                continue
            click.echo(before + line)
            before = ""
            self.shown[cause] = line


@contextlib.contextmanager
def _progress_bar(total: int) -> Iterator:
    if not sys.stdout.isatty():
        yield None
        return
    with click.progressbar(length=total, label="stamps") as bar:
        yield bar


def _summarise(conn: sqlite3.Connection, scope: str, batch: str, progress: Progress, total: int) -> int:
    did = jobs.done_outcomes(conn, batch)
    drawn = f", preview drawn {did.preview_only}" if did.preview_only else ""
    click.echo(
        f"replay {scope}: done {progress.done} (fetched {did.fetched}, already complete {did.complete}{drawn}), "
        f"failed {progress.failed}, not yet available {progress.unavailable}, unfinished {total - progress.settled}"
    )
    if progress.unavailable:
        click.echo("  not-yet-available jobs stay queued: the daemon looks again on its schedule")
    for failure in jobs.failures(conn, 10, batch=batch):
        click.echo(f"  failed {failure.object_id}: {failure.reason}")
    return EXIT_FAILED if progress.failed or progress.settled < total else EXIT_OK
