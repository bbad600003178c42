"""Local trouble: ztfd's own writes failing for reasons of this machine (disk full, I/O error, read-only file
system, out of file descriptors, the store locked), as opposed to a bad message or a failing remote service.

Such a failure says nothing about the alert or the stamp being written, so it must never count against them: a
stamp fetcher gives the job back without counting an attempt and backs off; a consumer pauses with its batch in
hand (nothing stored, no offset moved) and tries the same batch again. While it lasts, the process's status fact
``local_trouble:<process name>`` holds the reason (``ztfd status`` shows it); it is cleared on recovery. With the
whole home full, that fact cannot be written either (the store is on the same disk): the log says it then.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import time

from ztfd import store
from ztfd.daemon.lifecycle import Backoff

log = logging.getLogger(__name__)

LOCAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EMFILE, errno.ENFILE}
# SQLite's primary result codes for the same conditions, and for a store locked past the busy timeout.
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN = 5, 6, 8, 10, 13, 14
LOCAL_SQLITE_CODES = {SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN}
STATUS_PREFIX = "local_trouble:"
BACKOFF = Backoff(base=1.0, cap=30.0, jitter=0.5)  # how long to wait before writing again


class LocalTroubleError(Exception):
    """A write of ztfd's own failed for a local reason (see ``is_local``); ``str()`` says which."""


def is_local(exc: BaseException) -> bool:
    """True when ``exc`` is local trouble: an OSError of ``LOCAL_ERRNOS``, or SQLite full, I/O error, read-only,
    cannot open, busy or locked."""
    if isinstance(exc, LocalTroubleError):
        return True
    if isinstance(exc, OSError):
        return exc.errno in LOCAL_ERRNOS
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is None:  # raised without a code (older Pythons): judge by SQLite's message
            text = str(exc)
            return any(words in text for words in ("disk is full", "disk I/O", "readonly", "locked", "unable to open"))
        return code & 0xFF in LOCAL_SQLITE_CODES
    return False


def describe(exc: BaseException) -> str:
    """One line: what failed, e.g. ``No space left on device (images/2024-05-01/ZTF…/x.fits.gz)``."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({exc.filename})" if exc.filename else exc.strerror
    if isinstance(exc, LocalTroubleError):
        return str(exc)
    return f"{exc.__class__.__name__}: {exc}"


class Condition:
    """One process's local trouble: when it began, how often the write failed, and its status fact."""

    def __init__(self, name: str) -> None:
        self.key = STATUS_PREFIX + name
        self.failures = 0
        self.since: float | None = None
        self.reason = ""

    @property
    def active(self) -> bool:
        return self.failures > 0

    def failed(self, conn: sqlite3.Connection | None, reason: str) -> float:
        """Note one more failed write; returns how long to wait before the next try. Logs and records it."""
        self.failures += 1
        self.reason = reason
        delay = BACKOFF.delay(self.failures)
        if self.since is None:
            self.since = time.time()
            log.error("local trouble, not the alert's or the remote's fault: %s; pausing, trying again in %.1fs",
                      reason, delay)
        else:
            log.warning("still local trouble (%d failed tries): %s; trying again in %.1fs", self.failures, reason,
                        delay)
        self._record(conn, reason)
        return delay

    def recovered(self, conn: sqlite3.Connection | None) -> None:
        """The write worked again: clear the condition (and its status fact)."""
        if not self.active:
            return
        log.warning("local trouble over after %.0fs (%d failed tries): writing again", time.time() - (self.since or 0),
                    self.failures)
        self.failures, self.since, self.reason = 0, None, ""
        self._record(conn, None)

    def _record(self, conn: sqlite3.Connection | None, reason: str | None) -> None:
        if conn is None:
            return
        try:
            store.set_status(conn, self.key, reason)
        except sqlite3.Error as exc:  # the store is on the troubled disk too: the log has said it
            log.debug("could not record %s: %s", self.key, exc)
