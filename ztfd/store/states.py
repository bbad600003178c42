"""The values the store keeps in its state, kind, role and failure columns: each spelled once, here.

String-valued enums, so a stored value is the enum's value and reads back as itself (``JobState("ready")``). The
SQL that needs one of them (defaults, triggers, ``WHERE state = …``) is written from these members, never from a
literal of its own: renaming a value is one edit, and a typo is a ``NameError``, not a silently empty query.
"""

from __future__ import annotations

import enum


def literal(value: enum.StrEnum) -> str:
    """``value`` as an SQL string literal, for SQL written from these members (inlined where a partial index must
    match it; bound as a parameter everywhere else)."""
    return "'" + str(value).replace("'", "''") + "'"


class JobState(enum.StrEnum):
    """A stamp job's ``jobs.state``."""

    READY = "ready"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"


class Waiting(enum.StrEnum):
    """Why a ready job's ``not_before`` lies in the future (``jobs.waiting``)."""

    RETRY = "retry"  # a failed attempt, backing off
    UNAVAILABLE = "unavailable"  # the service does not have the alert yet: not an attempt


class JobKind(enum.StrEnum):
    """What a stamp job does (``jobs.kind``)."""

    FETCH = "stamps"  # fetch the stamps from the survey's provider, then draw the preview
    PREVIEW = "preview"  # the stamps came in the alert packet (already on disk): only draw the preview


class FailureClass(enum.StrEnum):
    """Why a stamp attempt failed (``jobs.failure``; ``ztfd_stamp_failures_total{reason}``).

    Carried on the error that ended the attempt (``FetchError.kind``) and stored beside its message, so a
    metric counts the class the code chose, never the wording of a message."""

    HTTP = "http"  # the service answered with an error status
    TIMEOUT = "timeout"  # a request (or a side step) took longer than allowed
    CONNECTION = "connection"  # no answer: refused, reset, DNS, TLS
    BAD_BODY = "bad_body"  # an answer that is not what was asked for: not gzip/FITS/JSON, too large, incomplete
    WORKER_LOST = "worker_lost"  # the fetcher holding the job died or hung (its lease ran out)
    UNAVAILABLE = "unavailable"  # given up after waiting ``stamps.unavailable_give_up`` for the service
    BAD_JOB = "bad_job"  # the job can never succeed as written (a bad object id or date, no provider, no alert)
    OTHER = "other"  # anything else: a bug, or a failure nobody classified


class Role(enum.StrEnum):
    """A ztfd process's role (``processes.role``), listed in the order ``ztfd status`` shows them."""

    SUPERVISOR = "supervisor"
    CONSUMER = "consumer"
    FETCHER = "fetcher"
    SYNCER = "syncer"
    METRICS = "metrics"
    REPORTER = "reporter"
    ARCHIVER = "archiver"


class ProcessState(enum.StrEnum):
    """A process's ``processes.state``: a heartbeat says ``running``; the supervisor's children move between all
    of them (``ztfd.daemon.children.change_state``)."""

    STARTING = "starting"  # a child slot not started yet
    RUNNING = "running"
    BACKOFF = "backoff"  # exited (or could not start): restarted after a delay
    IDLE = "idle"  # a pattern topic's consumer whose topic is drained and quiet: started again when it has news
    STOPPED = "stopped"
