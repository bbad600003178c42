"""Every role's "I am alive": one row of the ``processes`` table, rewritten at most every ``HEARTBEAT_INTERVAL``.

The supervisor kills a child whose heartbeat is older than ``supervisor.heartbeat_timeout``, and ``ztfd status``,
``ztfd replay`` and the metrics read the same row; so every role beats the same way, through this one class,
whatever its loop looks like (a poll loop calls ``beat_if_due``, a loop that sleeps the interval calls ``beat``,
a role busy for long stretches runs ``keep_beating`` on a thread of its own).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

from ztfd import store
from ztfd.store.states import Role

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 5.0  # seconds between two heartbeats of a process: far below any sane heartbeat_timeout


class Heartbeat:
    """The heartbeat of the process ``name`` in ``role`` (a consumer also names its topic)."""

    def __init__(self, name: str, role: Role, topic: str | None = None, interval: float = HEARTBEAT_INTERVAL) -> None:
        self.name = name
        self.role = role
        self.topic = topic
        self.interval = interval
        self.last = float("-inf")  # time.monotonic() of the last heartbeat written

    def beat(self, conn: sqlite3.Connection) -> None:
        """Write the heartbeat now (a store error is the caller's to handle: each role reports it its own way)."""
        store.heartbeat(conn, self.name, self.role, self.topic)
        self.last = time.monotonic()

    def beat_if_due(self, conn: sqlite3.Connection) -> bool:
        """Write the heartbeat if the last one is ``interval`` old; True if it wrote."""
        if time.monotonic() - self.last < self.interval:
            return False
        self.beat(conn)
        return True

    def keep_beating(self, db_path: Path, stop: threading.Event) -> None:
        """Beat every ``interval`` on a connection of its own until ``stop`` (a thread's target: the role's own
        work may hold its connection for long), logging what fails."""
        conn = store.connect(db_path)
        try:
            while True:
                try:
                    self.beat(conn)
                except sqlite3.Error as exc:
                    log.warning("%s: heartbeat failed: %s", self.name, exc)
                if stop.wait(self.interval):
                    return
        finally:
            conn.close()
