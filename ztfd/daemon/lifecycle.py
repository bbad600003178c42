"""One lifecycle for every long-running ztfd role: how it is asked to stop, how it stops others, how it waits.

- **Stopping.** ``stop_on_signals()`` makes SIGTERM and SIGINT set a ``Stop``, an event the role's loop watches
  (``is_set``/``wait`` from any thread, ``call_in(loop, callback)`` from asyncio, ``fileno()`` for ``select``).
  The role then finishes or hands back what it holds and exits 0. A second SIGTERM/SIGINT is a *cold stop*: the
  process logs one line and exits at once with 128 + the signal's number (143, 130), as a kill would, which the
  store's transactions and leases are built to survive. The handler touches no lock: it records the signal and
  writes one byte to a pipe (a ``threading.Event`` set from a handler can deadlock on its own lock when the
  signal lands while the main thread holds it). "Received SIGTERM" is logged by the first thread that sees the
  stop, not by the handler (a handler that writes to a stream the main thread is writing to raises).
- **Stopping another process.** ``terminate(processes, timeout)``: SIGTERM (and SIGCONT, so a stopped process can
  act on it) to each process or process group, wait up to ``timeout``, SIGKILL what is left, reap.
- **Trying again.** ``Backoff(base, cap, jitter).delay(attempt)``: one exponential policy for stamp retries, the
  syncer's failed passes and the supervisor's restarts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any, Union

from ztfd.daemon.procs import pid_alive

if TYPE_CHECKING:  # not imported at run time: the file writer child starts with this module and must start fast
    import asyncio
    import multiprocessing.process

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
POLL_SECONDS = 0.05  # how often terminate() looks whether its processes are gone
KILL_WAIT_SECONDS = 5.0  # how long terminate() waits for SIGKILLed processes to be reaped


def cold_exit_code(signum: int) -> int:
    """The shell's convention for "ended by this signal": what a cold stop exits with."""
    return 128 + signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Stop(threading.Event):
    """A stop request: an event that a signal handler may set (no lock taken), readable as a pipe.

    A ``threading.Event`` in every other respect, so code written against an event accepts it. Once set it stays
    set (``clear`` is refused: a role asked to stop does not un-ask).
    """

    def __init__(self) -> None:
        super().__init__()
        self._read_fd, self._write_fd = os.pipe()  # not inherited by children (O_CLOEXEC)
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._requested = False
        self.signum: int | None = None  # the signal that asked for the stop, if one did
        self._announced = False
        self._announcing = threading.Lock()  # never taken by the handler: only by threads that saw the stop
        self.on_cold_stop: Callable[[], None] | None = None
        self._previous: dict[int, Any] = {}

    # --- the event -----------------------------------------------------------------------------------------

    def set(self) -> None:
        """Ask for the stop (from code: another thread, a fatal condition). Lock-free, so signal-safe."""
        self._requested = True
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._write_fd, b"\0")

    def is_set(self) -> bool:
        if self._requested:
            self._announce()
        return self._requested

    def clear(self) -> None:
        raise RuntimeError("a stop cannot be taken back")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the stop is asked for or ``timeout`` seconds pass; True if it was asked for."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._requested:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            with contextlib.suppress(InterruptedError):
                select.select([self._read_fd], [], [], remaining)
        return self.is_set()

    def fileno(self) -> int:
        """A descriptor that becomes readable (and stays so) once the stop is asked for."""
        return self._read_fd

    def call_in(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], Any]) -> None:
        """Run ``callback`` in the asyncio ``loop`` once the stop is asked for (e.g. an ``asyncio.Event``'s set)."""

        def ready() -> None:
            loop.remove_reader(self._read_fd)
            self._announce()
            callback()

        loop.add_reader(self._read_fd, ready)

    def _announce(self) -> None:
        with self._announcing:
            if self._announced:
                return
            self._announced = True
        if self.signum is not None:
            log.info("received %s: stopping (a second SIGTERM or SIGINT stops at once)", signal_name(self.signum))

    # --- signals -------------------------------------------------------------------------------------------

    def install(self, on_cold_stop: Callable[[], None] | None = None,
                signals: Sequence[int] = STOP_SIGNALS) -> Stop:
        """Let ``signals`` set this stop, the second of them stop the process at once. Main thread only.

        ``on_cold_stop`` (also settable later) runs just before a cold exit: it may signal children, never wait.
        """
        self.on_cold_stop = on_cold_stop
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        """Put back the handlers ``install`` replaced."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is not None:
            self._cold_stop(signum)
        self.signum = signum
        self.set()

    def _cold_stop(self, signum: int) -> None:
        code = cold_exit_code(signum)
        try:
            log.warning("received a second %s: stopping at once (exit %d)", signal_name(signum), code)
            if self.on_cold_stop is not None:
                self.on_cold_stop()
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
        except BaseException:  # nothing may keep a cold stop from exiting
            pass
        os._exit(code)

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


@contextlib.contextmanager
def stop_on_signals(on_cold_stop: Callable[[], None] | None = None) -> Iterator[Stop]:
    """The stop of a role: SIGTERM/SIGINT set it while the block runs; the handlers before are put back after."""
    stop = Stop().install(on_cold_stop)
    try:
        yield stop
    finally:
        stop.uninstall()
        stop.close()


def ignore(signals: Iterable[int] = STOP_SIGNALS) -> None:
    """Ignore ``signals`` for good: for a child that must outlive its parent's stop (the file writer, which ends
    at the end of its input) and a daemon's SIGHUP. Ignored signals stay ignored across exec."""
    for signum in signals:
        signal.signal(signum, signal.SIG_IGN)


def restore_defaults(signals: Iterable[int] = (*STOP_SIGNALS, signal.SIGHUP)) -> None:
    """In a forked child before exec: the default action for what ztfd catches or ignores."""
    for signum in signals:
        signal.signal(signum, signal.SIG_DFL)


# --- stopping other processes --------------------------------------------------------------------------------

Process = Union[int, "subprocess.Popen[Any]", "multiprocessing.process.BaseProcess"]


class _Target:
    """A process to terminate: a pid (reaped if it is our child), a ``Popen`` or a ``multiprocessing`` process."""

    def __init__(self, process: Process, group: bool) -> None:
        self.process = process
        self.pid: int = process if isinstance(process, int) else process.pid  # type: ignore[assignment]
        self.group = group
        self.code: int | None = None
        self.done = False
        self.ours = True  # a pid: is it our child (so waitpid tells how it ended)?

    def send(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.group:
                os.killpg(self.pid, signum)
            else:
                os.kill(self.pid, signum)

    def poll(self) -> bool:
        """True once the process has ended (and, if ours, been reaped); ``code`` is then its return code."""
        if self.done:
            return True
        process = self.process
        if isinstance(process, subprocess.Popen):
            self.code = process.poll()
            self.done = self.code is not None
        elif not isinstance(process, int):  # a multiprocessing process
            self.code = process.exitcode
            self.done = self.code is not None
        elif self.ours:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.ours = False
                self.done = not pid_alive(self.pid)
            else:
                if pid:
                    self.code, self.done = os.waitstatus_to_exitcode(status), True
        else:
            self.done = not pid_alive(self.pid)
        return self.done


def terminate(
    processes: Iterable[Process],
    timeout: float,
    *,
    group: bool = False,
    wake: bool = True,
    on_exit: Callable[[Process, int | None], None] | None = None,
    before_kill: Callable[[list[Process]], None] | None = None,
    while_waiting: Callable[[], None] | None = None,
) -> list[int | None]:
    """SIGTERM each process, or its process group with ``group`` (and SIGCONT unless ``wake`` is false, so that
    a stopped one can act on it); wait up to ``timeout`` s for all of them; SIGKILL what is left (``before_kill``
    is told first) and wait for those too. Processes that are our children are reaped.

    Returns each one's return code (``-9`` for a SIGKILL, as ``Popen`` does; ``None`` for a process that is not
    our child). ``on_exit`` is called as each one ends, ``while_waiting`` between two looks.
    """
    targets = [_Target(process, group) for process in processes]
    for target in targets:
        if not target.poll():
            target.send(signal.SIGTERM)
            if wake:
                target.send(signal.SIGCONT)
    left = _wait(targets, timeout, on_exit, while_waiting)
    if left:
        if before_kill is not None:
            before_kill([t.process for t in left])
        for target in left:
            log.warning("pid %d did not stop within %gs: SIGKILL", target.pid, timeout)
            target.send(signal.SIGKILL)
        for target in _wait(left, KILL_WAIT_SECONDS, on_exit, while_waiting):
            log.error("pid %d is still there %gs after SIGKILL", target.pid, KILL_WAIT_SECONDS)
    return [t.code for t in targets]


def kill_now(processes: Iterable[Process], *, group: bool = False) -> None:
    """SIGKILL, waiting for nothing: for a cold stop's ``on_cold_stop``, which must not outlive its children."""
    for process in processes:
        _Target(process, group).send(signal.SIGKILL)


def _wait(targets: list[_Target], timeout: float, on_exit: Callable[[Process, int | None], None] | None,
          while_waiting: Callable[[], None] | None) -> list[_Target]:
    """Poll until every target ended or ``timeout`` passed; returns those still running."""
    deadline = time.monotonic() + timeout
    left = list(targets)
    while True:
        for target in [t for t in left if t.poll()]:
            left.remove(target)
            if on_exit is not None:
                on_exit(target.process, target.code)
        if not left or time.monotonic() >= deadline:
            return left
        if while_waiting is not None:
            while_waiting()
        time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))


# --- trying again --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: ``base``·2^(attempt−1) seconds, at most ``cap``, scaled by a random 1−``jitter``…1.

    Jitter spreads out many retries that failed together (a pool of workers after an outage); it only shortens a
    delay, so the cap holds.
    """

    base: float
    cap: float
    jitter: float = 0.0

    def delay(self, attempt: int) -> float:
        """The wait after failed attempt number ``attempt`` (1 for the first failure)."""
        exponent = min(max(attempt - 1, 0), 64)  # 2**64 times any base is past every cap; no float overflow
        return self._jittered(float(min(self.cap, self.base * 2.0**exponent)))

    def delay_after(self, waited: float) -> float:
        """For a condition measured in time rather than attempts: wait about as long again as already waited
        (so the looks double), between ``base`` and ``cap``."""
        return self._jittered(float(min(self.cap, max(self.base, waited))))

    def _jittered(self, delay: float) -> float:
        return delay * random.uniform(1.0 - self.jitter, 1.0) if self.jitter else delay
