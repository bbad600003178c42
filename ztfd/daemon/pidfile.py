"""The supervisor's pidfile and its lock: how a process tells whether ztfd's supervisor runs, and which pid it has.

The running supervisor holds an ``flock`` on ``<pidfile>.lock`` for its whole life and writes its pid there and to
the pidfile (atomically); a pidfile whose lock is free or whose pid is dead is stale and replaced. Its own module so
that ``ztfd status`` reads it without importing the supervisor and everything the supervisor runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path

from ztfd import config
from ztfd.daemon.procs import pid_alive

log = logging.getLogger(__name__)

SUPERVISOR_NAME = "supervisor"  # the supervisor's row in the ``processes`` table


def lock_path(cfg: config.Config) -> Path:
    return cfg.pidfile.with_name(cfg.pidfile.name + ".lock")


def read_pid(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(text) if text.isdigit() else None


def lock_held(path: Path) -> bool:
    """True while some process holds the supervisor's lock on ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def running_pid(cfg: config.Config) -> int | None:
    """The pid of the running supervisor, or None (no pidfile, or a stale one).

    The lock file holds the pid too, so a supervisor is still found if someone deleted its pidfile.
    """
    if not lock_held(lock_path(cfg)):
        return None
    for source in (cfg.pidfile, lock_path(cfg)):
        pid = read_pid(source)
        if pid is not None and pid_alive(pid):
            return pid
    return None


class AlreadyRunningError(Exception):
    def __init__(self, pid: int | None) -> None:
        super().__init__(f"ztfd is already running (pid {pid if pid is not None else 'unknown'})")
        self.pid = pid


def acquire(cfg: config.Config) -> int:
    """Take the lock and write our pid; returns the lock's descriptor (keep it open for life)."""
    from ztfd.files import atomic_write  # here, not at the top: ztfd status reads the pidfile and writes no file

    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(cfg), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunningError(read_pid(cfg.pidfile) or read_pid(lock_path(cfg))) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    old = read_pid(cfg.pidfile)
    if old is not None:
        log.warning("replacing stale pidfile %s (pid %d is not a running supervisor)", cfg.pidfile, old)
    os.set_inheritable(fd, False)
    atomic_write(cfg.pidfile, f"{os.getpid()}\n".encode())
    return fd


def release(cfg: config.Config, fd: int) -> None:
    if read_pid(cfg.pidfile) == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            cfg.pidfile.unlink()
    os.close(fd)
