"""The daemon's syncer (``ztfd sync``): a pass now, then every ``s3.interval`` seconds until SIGTERM.

A failed pass is retried sooner (``lifecycle.Backoff``: ``RETRY_AFTER_FAILURE``, doubling up to
``s3.interval``). The heartbeat runs in a thread of its own, so that a long upload or a wait for the pass lock
never looks like a hang to the supervisor.
"""

from __future__ import annotations

import logging
import sqlite3
import threading

from ztfd.config import Config
from ztfd.daemon import lifecycle
from ztfd.daemon.heartbeat import Heartbeat
from ztfd.store.states import Role
from ztfd.sync.passes import locked_pass

log = logging.getLogger(__name__)

RETRY_AFTER_FAILURE = 60.0  # the daemon retries a failed pass after this, doubling up to s3.interval


def run_daemon(conn: sqlite3.Connection, cfg: Config, stop: threading.Event, name: str, full: bool) -> int:
    """Pass after pass until ``stop``; ``full`` applies to the first pass only. Exits 0."""
    beating = threading.Event()
    heartbeat = Heartbeat(name, Role.SYNCER)
    beat = threading.Thread(target=heartbeat.keep_beating, args=(cfg.db_path, beating), name="heartbeat",
                            daemon=True)
    beat.start()
    log.info("syncer %s started: bucket %s, every %.0f s", name, cfg.s3.bucket, cfg.s3.interval)
    failed_in_a_row = 0
    after_failure = lifecycle.Backoff(RETRY_AFTER_FAILURE, cfg.s3.interval)
    try:
        while not stop.is_set():
            result = locked_pass(conn, cfg, stop, full=full, wait=None)
            full = False
            failed_in_a_row = 0 if result.ok or result.interrupted else failed_in_a_row + 1
            delay = cfg.s3.interval
            if failed_in_a_row:
                delay = after_failure.delay(failed_in_a_row)
                log.info("sync: next pass in %.0f s after a failed pass", delay)
            stop.wait(delay)
    finally:
        beating.set()
        beat.join(heartbeat.interval + 1)
    log.info("syncer %s stopped", name)
    return 0

