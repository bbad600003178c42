"""The supervisor's children: one slot per process the configuration asks for, and the one way a slot's state
changes (``Child.change_state``, which also writes the ``processes`` row, as supervisord's ``change_state``).

A slot keeps its name across restarts and gets a new pid each time. Its states are ``ProcessState``: starting,
running, backoff (exited or could not start: restarted after a delay that doubles with each quick failure),
idle (a pattern topic's consumer whose topic is drained and quiet) and stopped (the supervisor is stopping).
"""

from __future__ import annotations

import logging
import sqlite3
import sys
import time
from dataclasses import dataclass

from ztfd import config
from ztfd.daemon import lifecycle
from ztfd.ingest import topics
from ztfd.store.processes import record_child
from ztfd.store.states import ProcessState, Role

log = logging.getLogger(__name__)

# A child that stayed up this long is healthy again: its next restart starts from the smallest delay.
STABLE_AFTER = 10.0


@dataclass
class Child:
    """One supervised process slot: the same name across restarts, a new pid each time."""

    name: str
    role: Role
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
    state: ProcessState = ProcessState.STARTING
    last_exit: str | None = None

    def change_state(self, conn: sqlite3.Connection, state: ProcessState, how: str | None = None) -> None:
        """Move to ``state`` (``how``: why the process ended, if it did) and record it: the only place a child's
        state is set. Leaving ``running`` forgets the pid; entering it is a new process (new start, no heartbeat
        yet). A store that cannot be written is logged: the supervisor goes on supervising."""
        self.state = state
        if how is not None:
            self.last_exit = how
        started = state is ProcessState.RUNNING
        if not started:
            self.pid = None
        try:
            record_child(conn, self.name, self.role, self.topic, self.pid, self.restarts, self.state, self.last_exit,
                         started)
        except sqlite3.Error as exc:
            log.warning("cannot record %s: %s", self.name, exc)

    def started(self, conn: sqlite3.Connection, pid: int) -> None:
        """A new process runs in this slot: its heartbeat is watched from now."""
        self.pid, self.started_at = pid, time.monotonic()
        self.beat_value, self.beat_seen = None, 0.0
        self.change_state(conn, ProcessState.RUNNING)

    def schedule_restart(self, conn: sqlite3.Connection, how: str, uptime: float, backoff: lifecycle.Backoff) -> None:
        """Back off before the next start, for a delay that doubles with each quick failure in a row (a failed start
        is one too)."""
        self.quick_failures = 1 if uptime >= STABLE_AFTER else self.quick_failures + 1
        self.backoff = backoff.delay(self.quick_failures)
        self.next_start = time.monotonic() + self.backoff
        self.restarts += 1
        self.change_state(conn, ProcessState.BACKOFF, how)
        log.warning("%s exited after %.1fs (%s): restart #%d in %.1fs", self.name, uptime, how, self.restarts,
                    self.backoff)

    @property
    def waiting_to_start(self) -> bool:
        """No process, and one is to be started (an idle consumer waits for news instead)."""
        return self.pid is None and self.state is not ProcessState.IDLE


def child_specs(cfg: config.Config) -> list[Child]:
    """The processes the configuration asks for."""
    children = [consumer_child(cfg, t) for t in topics.explicit(cfg.kafka.topics)]  # patterns: TopicScanner
    base = _ztfd(cfg)
    if cfg.stamps.enabled:
        children += [Child(f"fetcher:{n}", Role.FETCHER, None, [*base, "fetch"])
                     for n in range(1, cfg.stamps.workers + 1)]
    if cfg.s3.bucket:
        children.append(Child("syncer", Role.SYNCER, None, [*base, "sync"]))
    if cfg.metrics.listen:
        children.append(Child("metrics", Role.METRICS, None, [*base, "metrics"]))
    if cfg.archive.enabled:
        children.append(Child("archiver", Role.ARCHIVER, None, [*base, "archive"]))
    if cfg.report.after_quiet > 0:
        children.append(Child("reporter", Role.REPORTER, None, [*base, "report", "--watch"]))
    return children


def consumer_child(cfg: config.Config, topic: str) -> Child:
    return Child(f"consumer:{topic}", Role.CONSUMER, topic, [*_ztfd(cfg), "consume", "--topic", topic])


def _ztfd(cfg: config.Config) -> list[str]:
    return [sys.executable, "-m", "ztfd", "--config", str(cfg.path)]


def describe_exit(code: int | None) -> str:
    """A return code (negative: the signal that killed it) as a person reads it: ``exit 1``, ``killed by SIGKILL``."""
    if code is None:
        return "ended"
    return f"killed by {lifecycle.signal_name(-code)}" if code < 0 else f"exit {code}"


def went_idle(child: Child, code: int | None) -> bool:
    """A consumer that exited because its (pattern's) topic is drained and quiet: not restarted."""
    return child.role is Role.CONSUMER and code == topics.EXIT_IDLE
