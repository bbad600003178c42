"""``ztfd start`` / ``ztfd stop``: one process that keeps every other ztfd process alive.

The supervisor forks one consumer per topic, ``stamps.workers`` fetchers and one syncer (when ``s3.bucket`` is
set), each with ``ZTFD_PROCESS_NAME`` so that its heartbeats land under a stable name in the ``processes`` table.
Why not supervisord alone (``etc/supervisord.conf`` still works)? It gives up on a program after a few quick
failures (FATAL, never retried) and cannot tell a hung process from a busy one; here:

- a child that exits (or cannot even be started) is restarted forever, with capped exponential backoff
  (``lifecycle.Backoff``) that grows with every quick failure and starts again only once a child stayed up;
- a child whose heartbeat is older than ``supervisor.heartbeat_timeout`` is killed (SIGTERM, then SIGKILL) and
  restarted: a hung consumer would otherwise hold its partitions and stamp leases indefinitely;
- children are tied to the supervisor's life with ``PR_SET_PDEATHSIG``: if the supervisor is killed with -9 they
  get SIGTERM and exit cleanly; the next ``ztfd start`` also finds any leftover of a crashed supervisor (pids in
  the ``processes`` table, a marker in their environment) and terminates it before forking new ones;
- the daemon's children write their stdout and stderr into a pipe that the supervisor copies to
  ``logs/supervisor.out``, so that file is rotated by size while they run (a child's own descriptor on the file
  would keep writing to the rotated copy).

Stopping follows ``ztfd.daemon.lifecycle``: the first SIGTERM/SIGINT forwards SIGTERM to every child and waits up to
``supervisor.stop_timeout``; a second one exits at once (143/130), and the children, tied to the supervisor's
life, get the SIGTERM that is their second.

Exclusivity: the running supervisor holds an ``flock`` on ``<pidfile>.lock`` for its whole life and writes its pid
to the pidfile atomically; a pidfile whose lock is free or whose pid is dead is stale and replaced
(``ztfd.daemon.pidfile``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import signal
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from ztfd import config, logs, store
from ztfd.daemon import housekeeping, lifecycle, pidfile
from ztfd.daemon.pidfile import SUPERVISOR_NAME, AlreadyRunningError, read_pid, running_pid
from ztfd.daemon.procs import die_with_parent, pid_alive
from ztfd.ingest import topics
from ztfd.store.processes import processes, record_child, reset_processes, set_process_state

log = logging.getLogger(__name__)

# A child that stayed up this long is healthy again: its next restart starts from the smallest delay.
STABLE_AFTER = 10.0
FIRST_BACKOFF = 1.0
# SIGTERM grace for a child killed for a stale heartbeat, before SIGKILL.
HUNG_GRACE = 5.0
# How often the supervisor heartbeats and checks its children's heartbeats.
CHECK_INTERVAL = 1.0
# How often the loop looks for children that exited (it catches no SIGCHLD: signals only ever ask it to stop).
REAP_INTERVAL = 0.2
# Marks a child in its environment (value: the pidfile) so a later start can find leftovers of a crashed run.
MARKER_ENV = "ZTFD_PROCESS_SUPERVISOR"

EXIT_ALREADY_RUNNING = 1
IDLE = "idle"  # the state of a pattern topic's consumer that exited with topics.EXIT_IDLE


# --- children ------------------------------------------------------------------------------------------------


@dataclass
class Child:
    """One supervised process slot: the same name across restarts, a new pid each time."""

    name: str
    role: str
    topic: str | None
    args: list[str]
    pid: int | None = None
    started_at: float = 0.0
    restarts: int = 0
    quick_failures: int = 0  # exits (or failed starts) in a row, each before the child had stayed up STABLE_AFTER
    backoff: float = 0.0
    next_start: float = 0.0
    beat_value: float | None = None  # the last heartbeat_at seen in the store for this pid
    beat_seen: float = 0.0  # monotonic time it was first seen
    state: str = "starting"
    last_exit: str | None = None


def child_specs(cfg: config.Config) -> list[Child]:
    """The processes the configuration asks for."""
    children = [consumer_child(cfg, t) for t in topics.explicit(cfg.kafka.topics)]  # patterns: TopicScanner
    base = [sys.executable, "-m", "ztfd", "--config", str(cfg.path)]
    if cfg.stamps.enabled:
        children += [Child(f"fetcher:{n}", "fetcher", None, [*base, "fetch"]) for n in range(1, cfg.stamps.workers + 1)]
    if cfg.s3.bucket:
        children.append(Child("syncer", "syncer", None, [*base, "sync"]))
    if cfg.metrics.listen:
        children.append(Child("metrics", "metrics", None, [*base, "metrics"]))
    if cfg.archive.enabled:
        children.append(Child("archiver", "archiver", None, [*base, "archive"]))
    if cfg.report.after_quiet > 0:
        children.append(Child("reporter", "reporter", None, [*base, "report", "--watch"]))
    return children


def describe_exit(code: int | None) -> str:
    """A return code (negative: the signal that killed it) as a person reads it: ``exit 1``, ``killed by SIGKILL``."""
    if code is None:
        return "ended"
    return f"killed by {lifecycle.signal_name(-code)}" if code < 0 else f"exit {code}"


def consumer_child(cfg: config.Config, topic: str) -> Child:
    base = [sys.executable, "-m", "ztfd", "--config", str(cfg.path)]
    return Child(f"consumer:{topic}", "consumer", topic, [*base, "consume", "--topic", topic])


def went_idle(child: Child, code: int | None) -> bool:
    """A consumer that exited because its (pattern's) topic is drained and quiet: not restarted."""
    return child.role == "consumer" and code == topics.EXIT_IDLE


def _set_pdeathsig(parent: int) -> None:
    """In the forked child, before exec: SIGTERM when the supervisor dies (even by kill -9). The supervisor
    forks only from its main thread (see ``die_with_parent``)."""
    if not die_with_parent(parent, signal.SIGTERM):
        os._exit(125)


def proc_environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, _, v in pairs}


def is_our_child(cfg: config.Config, pid: int) -> bool:
    """True if ``pid`` was forked by a supervisor of this home (its environment carries the marker).

    The marker, not the command line, decides: processes run by supervisord or cron with the same
    configuration are not ours to kill, and a pid reused by an unrelated process never matches.
    """
    if pid == os.getpid() or not pid_alive(pid):
        return False
    return proc_environ(pid).get(MARKER_ENV) == str(cfg.pidfile)


def leftover_children(cfg: config.Config, conn: sqlite3.Connection | None) -> list[int]:
    """Processes left by a supervisor that died without stopping them (pids in the table + a /proc scan)."""
    candidates: set[int] = set()
    if conn is not None:
        candidates.update(row.pid for row in processes(conn) if row.pid is not None and row.name != SUPERVISOR_NAME)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            pid = int(entry.name)
            if proc_environ(pid).get(MARKER_ENV) == str(cfg.pidfile):
                candidates.add(pid)
    return sorted(pid for pid in candidates if is_our_child(cfg, pid))


class ChildOutput:
    """The daemon's children's stdout and stderr: a pipe the supervisor copies into ``logs/supervisor.out``.

    Copied through the log files' own handler (``logs.SharedRotatingFileHandler``), so the file is rotated at
    ``logging.max_bytes`` while children run; the daemon's own descriptors 1 and 2 follow each rotation.
    """

    def __init__(self, path: Path, max_bytes: int, backup_count: int) -> None:
        self.path = path
        self.file = logs.SharedRotatingFileHandler(path, max_bytes, backup_count)
        self.read_fd, self.write_fd = os.pipe()  # neither is inherited: children get write_fd as their 1 and 2
        os.set_blocking(self.read_fd, False)

    def drain(self) -> None:
        """Copy what the children wrote so far (never blocks)."""
        while True:
            try:
                chunk = os.read(self.read_fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                return
            self.file.write_block(chunk)
            self._follow_rotation()

    def _follow_rotation(self) -> None:
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            return
        if os.fstat(2).st_ino != current:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)

    def close(self) -> None:
        self.drain()
        self.file.close()
        for fd in (self.read_fd, self.write_fd):
            os.close(fd)


# --- the supervisor ------------------------------------------------------------------------------------------


@dataclass
class Supervisor:
    cfg: config.Config
    conn: sqlite3.Connection
    output: ChildOutput | None = None  # the daemon's; None in the foreground: children write where we do
    children: list[Child] = field(default_factory=list)
    stop: lifecycle.Stop = field(default_factory=lifecycle.Stop)

    @property
    def restart_backoff(self) -> lifecycle.Backoff:
        return lifecycle.Backoff(FIRST_BACKOFF, max(self.cfg.supervisor.restart_backoff_max, 0.1))
    last_prune: float = field(default_factory=time.monotonic)  # the first prune an interval after start
    scanner: topics.TopicScanner | None = None  # when kafka.topics has patterns: the broker's topics, looked at
    last_look: topics.BrokerTopics | None = None

    def run(self) -> int:
        self.stop.install()
        lifecycle.ignore([signal.SIGHUP])  # a closed terminal does not stop a foreground supervisor
        self._reset_table()
        self.children = child_specs(self.cfg)
        if any(topics.is_pattern(entry) for entry in self.cfg.kafka.topics):
            kafka = self.cfg.kafka
            self.scanner = topics.TopicScanner(kafka.bootstrap_servers, kafka.options, kafka.topic_scan_seconds)
            self.scanner.start()
        log.info(
            "supervisor started (pid %d): %s", os.getpid(), ", ".join(c.name for c in self.children) or "no children"
        )
        for child in self.children:
            self._spawn(child)
        last_check = 0.0
        while not self.stop.is_set():
            self._wait(CHECK_INTERVAL)
            self._reap()
            if self.stop.is_set():
                break
            self._follow_patterns()
            now = time.monotonic()
            for child in self.children:
                if child.pid is None and child.state != IDLE and now >= child.next_start:
                    self._spawn(child)
            if now - last_check >= CHECK_INTERVAL:
                last_check = now
                self._heartbeat()
                self._check_heartbeats()
            if now - self.last_prune >= housekeeping.PRUNE_EVERY:
                self.last_prune = now
                self._prune()
        if self.scanner is not None:
            self.scanner.stop()
        self._shutdown()
        return 0

    def _follow_patterns(self) -> None:
        """After each look at the broker: a consumer for every topic a pattern matches that has none yet, and the
        idle consumer of a topic that has messages ztfd has not stored started again."""
        look = self.scanner.latest if self.scanner is not None else None
        if look is None or look is self.last_look:
            return
        self.last_look = look
        consumers = {child.topic: child for child in self.children if child.role == "consumer"}
        for topic in topics.wanted(self.cfg.kafka.topics, look.topics):
            child = consumers.get(topic)
            if child is None:
                child = consumer_child(self.cfg, topic)
                self.children.append(child)
                log.info("topic %s matches kafka.topics: starting its consumer", topic)
                self._spawn(child)
            elif child.state == IDLE and child.pid is None:
                stored = {p: o.next_offset for p, o in store.stored_offsets(self.conn, topic).items()}
                if topics.has_news(look.ends.get(topic, {}), stored):
                    log.info("idle topic %s has new messages: starting its consumer again", topic)
                    self._spawn(child)
        assert self.scanner is not None
        self.scanner.ends_of = frozenset(c.topic for c in self.children if c.state == IDLE and c.topic)

    def _wait(self, timeout: float) -> None:
        """Sleep until a stop is asked for, a child's output arrives, or the next restart or reap is due."""
        timeout = min(timeout, REAP_INTERVAL)
        due = [c.next_start for c in self.children if c.pid is None and c.state != IDLE]
        if due:
            timeout = max(0.0, min(timeout, min(due) - time.monotonic()))
        watched = [self.stop.fileno()] + ([self.output.read_fd] if self.output is not None else [])
        with contextlib.suppress(InterruptedError):
            select.select(watched, [], [], timeout)
        self._drain_output()

    def _drain_output(self) -> None:
        if self.output is not None:
            try:
                self.output.drain()
            except OSError as exc:  # a full disk must not stop the supervisor
                log.warning("cannot copy the children's output to %s: %s", self.output.path, exc)

    def _spawn(self, child: Child) -> None:
        env = dict(os.environ)
        env.update({"ZTFD_PROCESS_NAME": child.name, MARKER_ENV: str(self.cfg.pidfile), "ZTFD_LOG_CONSOLE": "0",
                    "PYTHONUNBUFFERED": "1"})
        parent = os.getpid()
        output = self.output.write_fd if self.output is not None else None
        try:
            pid = _fork_exec(child.args, env, parent, output)
        except OSError as exc:
            log.error("%s: cannot start: %s", child.name, exc)
            self._schedule_restart(child, f"cannot start: {exc}", uptime=0.0)  # it never ran: a quick failure
            return
        child.pid, child.started_at, child.state = pid, time.monotonic(), "running"
        child.beat_value = None
        child.beat_seen = 0.0
        self._record(child, started=True)
        log.info("%s started (pid %d)", child.name, pid)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = next((c for c in self.children if c.pid == pid), None)
            if child is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if not self.stop.is_set() and went_idle(child, code):
                child.pid, child.state, child.last_exit, child.backoff = None, IDLE, describe_exit(code), 0.0
                self._record(child)
                log.info("%s: its topic is drained and quiet; not restarted until it has messages again", child.name)
                continue
            self._ended(child, describe_exit(code))

    def _ended(self, child: Child, how: str) -> None:
        """A child was reaped: record it stopped (while stopping) or schedule its restart."""
        uptime = time.monotonic() - child.started_at
        child.pid = None
        if self.stop.is_set():
            child.state, child.last_exit = "stopped", how
            self._record(child)
            log.info("%s stopped (%s)", child.name, how)
        else:
            self._schedule_restart(child, how, uptime)

    def _schedule_restart(self, child: Child, how: str, uptime: float) -> None:
        """Restart after a delay that doubles with each quick failure in a row (a failed start is one too)."""
        child.quick_failures = 1 if uptime >= STABLE_AFTER else child.quick_failures + 1
        child.backoff = self.restart_backoff.delay(child.quick_failures)
        now = time.monotonic()
        child.next_start = now + child.backoff
        child.restarts += 1
        child.state, child.last_exit = "backoff", how
        self._record(child)
        log.warning(
            "%s exited after %.1fs (%s): restart #%d in %.1fs", child.name, uptime, how, child.restarts, child.backoff
        )

    def _check_heartbeats(self) -> None:
        """Terminate (SIGTERM, SIGKILL after a grace) and restart children silent for longer than heartbeat_timeout."""
        timeout = self.cfg.supervisor.heartbeat_timeout
        now = time.monotonic()
        try:
            rows = {r.name: r for r in processes(self.conn)}
        except sqlite3.Error as exc:
            log.warning("cannot read heartbeats: %s", exc)
            return
        for child in self.children:
            if child.pid is None:
                continue
            row = rows.get(child.name)
            if row is not None and row.pid == child.pid and row.heartbeat_at != child.beat_value:
                # A new heartbeat. Its age is measured on our monotonic clock from when we first saw it, so a
                # wall-clock step (NTP) can neither make every child look silent nor hide a hung one.
                child.beat_value, child.beat_seen = row.heartbeat_at, now
            silent = now - max(child.started_at, child.beat_seen)
            if silent > timeout:
                reason = f"no heartbeat for {silent:.0f}s"
                log.error("%s (pid %d): %s: terminating", child.name, child.pid, reason)
                (code,) = lifecycle.terminate([child.pid], min(HUNG_GRACE, self.cfg.supervisor.stop_timeout),
                                              while_waiting=self._drain_output)
                self._ended(child, f"{reason}; {describe_exit(code)}")

    def _shutdown(self) -> None:
        """Forward SIGTERM, wait up to stop_timeout, SIGKILL leftovers, record everyone stopped."""
        live = {c.pid: c for c in self.children if c.pid is not None}
        log.info("stopping %d children", len(live))
        late: set[int] = set()

        def ended(pid: lifecycle.Process, code: int | None) -> None:
            how = describe_exit(code)
            self._ended(live[pid], f"did not stop in time; {how}" if pid in late else how)  # type: ignore[index]

        lifecycle.terminate(list(live), self.cfg.supervisor.stop_timeout, on_exit=ended,
                            before_kill=lambda left: late.update(left),  # type: ignore[arg-type]
                            while_waiting=self._drain_output)
        for child in self.children:
            if child.state != "stopped":
                child.state, child.pid = "stopped", None
                self._record(child)
        self._record_supervisor("stopped")
        self._drain_output()
        log.info("supervisor stopped")

    # --- the processes table ---------------------------------------------------------------------------------

    def _reset_table(self) -> None:
        """Forget the processes of earlier runs and record ourselves."""
        reset_processes(self.conn, SUPERVISOR_NAME)

    def _prune(self) -> None:
        """What ``ztfd prune`` does (ztfd.daemon.housekeeping), in the supervisor's loop: a few short transactions."""
        try:
            housekeeping.prune(self.conn, self.cfg)
        except (sqlite3.Error, OSError) as exc:
            log.warning("pruning the store failed (tried again in %.0fs): %s", housekeeping.PRUNE_EVERY, exc)

    def _heartbeat(self) -> None:
        try:
            store.heartbeat(self.conn, SUPERVISOR_NAME, "supervisor")
        except sqlite3.Error as exc:
            log.warning("cannot write heartbeat: %s", exc)

    def _record_supervisor(self, state: str) -> None:
        with contextlib.suppress(sqlite3.Error):
            set_process_state(self.conn, SUPERVISOR_NAME, state)

    def _record(self, child: Child, started: bool = False) -> None:
        try:
            record_child(self.conn, child.name, child.role, child.topic, child.pid, child.restarts, child.state,
                         child.last_exit, started)
        except sqlite3.Error as exc:
            log.warning("cannot record %s: %s", child.name, exc)


def _fork_exec(args: list[str], env: dict[str, str], parent: int, output: int | None = None) -> int:
    """Fork and exec one child in its own process group, with PDEATHSIG set, its stdout and stderr on ``output``
    if given; returns its pid.

    Not ``subprocess.Popen``: the supervisor reaps its children itself with ``waitpid(-1)``, which would race
    Popen's own bookkeeping.
    """
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child until exec
        try:
            os.close(err_r)
            fcntl.fcntl(err_w, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
            os.setpgid(0, 0)
            lifecycle.restore_defaults()
            _set_pdeathsig(parent)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            if output is not None:
                os.dup2(output, 1)
                os.dup2(output, 2)
            os.execve(args[0], args, env)
        except BaseException as exc:  # report to the parent, never return into its code
            with contextlib.suppress(BaseException):
                os.write(err_w, f"{type(exc).__name__}: {exc}".encode())
            os._exit(127)
    os.close(err_w)
    try:
        message = b""
        while chunk := os.read(err_r, 4096):
            message += chunk
    finally:
        os.close(err_r)
    if message:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        raise OSError(errno.ENOEXEC, message.decode(errors="replace"))
    return pid


# --- start / stop --------------------------------------------------------------------------------------------


def start(cfg: config.Config, foreground: bool = False) -> int:
    """``ztfd start``: refuse if one runs; else daemonize (unless ``foreground``) and supervise until SIGTERM."""
    pid = running_pid(cfg)
    if pid is not None:
        click.echo(f"ztfd: already running (pid {pid})", err=True)
        return EXIT_ALREADY_RUNNING
    cfg.logs_dir.mkdir(parents=True, exist_ok=True)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    if foreground:
        return _serve(cfg, console=True, report_fd=None)
    return _daemonize(cfg)


def _daemonize(cfg: config.Config) -> int:
    """Double fork + setsid; the original process waits for the daemon to say it holds the pidfile."""
    report_r, report_w = os.pipe()
    first = os.fork()
    if first > 0:
        os.close(report_w)
        message = b""
        while chunk := os.read(report_r, 4096):
            message += chunk
        os.close(report_r)
        os.waitpid(first, 0)
        text = message.decode(errors="replace").strip()
        if text.startswith("ok "):
            click.echo(f"ztfd: started (pid {text[3:]}), logs in {cfg.logs_dir}")
            return 0
        reason = text or f"the daemon did not start; see {cfg.logs_dir / 'supervisor.out'}"
        click.echo(f"ztfd: {reason}", err=True)
        return EXIT_ALREADY_RUNNING if "already running" in text else 1
    # first child: new session, then fork again so the daemon can never reacquire a terminal
    os.close(report_r)
    try:
        os.setsid()
        if os.fork() > 0:
            os._exit(0)
        os.chdir("/")
        os.umask(0o022)
        out = _open_output(cfg)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(devnull)
        os.close(out)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        code = _serve(cfg, console=False, report_fd=report_w)
    except BaseException:
        logging.getLogger(__name__).exception("supervisor crashed")
        code = 1
    finally:
        logging.shutdown()
    os._exit(code)


def output_path(cfg: config.Config) -> Path:
    """``logs/supervisor.out``: the daemon's and its children's stdout/stderr (tracebacks, nothing routine)."""
    return cfg.logs_dir / "supervisor.out"


def _open_output(cfg: config.Config) -> int:
    return os.open(output_path(cfg), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def _serve(cfg: config.Config, console: bool, report_fd: int | None) -> int:
    def report(text: str) -> None:
        if report_fd is not None:
            with contextlib.suppress(OSError):
                os.write(report_fd, text.encode())
                os.close(report_fd)
        elif not text.startswith("ok "):
            click.echo(f"ztfd: {text}", err=True)

    logs.setup(cfg.logs_dir, cfg.logging.level, cfg.logging.max_bytes, cfg.logging.backup_count, "ztfd.log", console)
    try:
        lock_fd = pidfile.acquire(cfg)
    except AlreadyRunningError as exc:
        report(str(exc))
        return EXIT_ALREADY_RUNNING
    try:
        conn = store.connect(cfg.db_path)
        leftovers = leftover_children(cfg, conn)
        if leftovers:
            log.warning("terminating %d processes left by a supervisor that died: %s", len(leftovers), leftovers)
            lifecycle.terminate(leftovers, cfg.supervisor.stop_timeout)
        output = None if console else ChildOutput(output_path(cfg), cfg.logging.max_bytes, cfg.logging.backup_count)
        supervisor = Supervisor(cfg, conn, output)
        report(f"ok {os.getpid()}")
        try:
            return supervisor.run()
        finally:
            if output is not None:
                output.close()
    except Exception as exc:
        log.exception("supervisor failed")
        report(f"supervisor failed: {exc}")
        return 1
    finally:
        pidfile.release(cfg, lock_fd)


def stop(cfg: config.Config, timeout: float | None = None) -> int:
    """``ztfd stop``: SIGTERM to the supervisor, wait, then SIGKILL it and its children. 0 also if none runs."""
    timeout = cfg.supervisor.stop_timeout if timeout is None else timeout
    pid = running_pid(cfg)
    if pid is None:
        stale = read_pid(cfg.pidfile)
        if stale is not None:
            click.echo(f"ztfd: not running (removing stale pidfile, pid {stale})")
            with contextlib.suppress(FileNotFoundError):
                cfg.pidfile.unlink()
        else:
            click.echo("ztfd: not running")
        _kill_leftovers(cfg, timeout)
        return 0
    def children_first(_hung: list[lifecycle.Process]) -> None:
        click.echo(f"ztfd: supervisor (pid {pid}) did not stop within {timeout:.0f}s: killing its children and it",
                   err=True)
        _kill_leftovers(cfg, 0)  # children first: a supervisor that is stopping restarts nothing

    # No SIGCONT: a supervisor someone stopped is as hung as one that cannot stop.
    lifecycle.terminate([pid], timeout, wake=False, before_kill=children_first)
    if not pid_alive(pid):
        with contextlib.suppress(FileNotFoundError):
            if read_pid(cfg.pidfile) == pid:
                cfg.pidfile.unlink()
    _kill_leftovers(cfg, timeout)
    click.echo(f"ztfd: stopped (pid {pid})")
    return 0


def _kill_leftovers(cfg: config.Config, timeout: float) -> None:
    conn = None
    if cfg.db_path.exists():
        with contextlib.suppress(sqlite3.Error):
            conn = store.connect(cfg.db_path, timeout=5)
    try:
        pids = leftover_children(cfg, conn)
    finally:
        if conn is not None:
            conn.close()
    if pids:
        click.echo(f"ztfd: terminating leftover processes {pids}", err=True)
        lifecycle.terminate(pids, timeout)
