"""One pass at a time: an exclusive ``flock`` on ``<home>/state/sync.lock``.

``sync --once`` from cron beside the running daemon therefore never uploads a file twice or interleaves
manifest writes; flock dies with its holder, so a pass killed with -9 never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2  # polling a lock held by another process: there is no event to wait on


@contextlib.contextmanager
def pass_lock(path: Path, wait: float | None, stop: threading.Event) -> Iterator[bool]:
    """Yields True once the lock is held, False if ``wait`` seconds ran out (``None``: no limit) or ``stop`` was
    set first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _acquire(fd, path, wait, stop):
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, path: Path, wait: float | None, stop: threading.Event) -> bool:
    deadline = None if wait is None else time.monotonic() + wait
    announced = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if stop.is_set() or (deadline is not None and time.monotonic() >= deadline):
                return False
            if not announced:
                log.info("sync: another pass holds %s; waiting", path)
                announced = True
            stop.wait(POLL_SECONDS)
