"""The store: one SQLite database (WAL) under ``<home>/state/`` that every ztfd process shares.

It is the source of truth for what has been received (alerts, rejected messages, Kafka offsets), what is to be
done (the stamp job queue), what is known about each alert's stamps, what has been written and uploaded (the sync
manifest) and who is running (process heartbeats). Each consumer batch is one transaction over alerts, jobs and
offsets, which is what makes kill -9 at any instant lose and duplicate nothing.

All SQL lives in this package, one module per table family: ``alerts``, ``stamps``, ``jobs``, ``rejected``,
``offsets``, ``manifest``, ``processes``, ``ratelimits``, ``status_facts`` (the ``status`` table); ``schema`` writes the
tables down and ``db`` opens connections and migrates.
"""

from ztfd.store.db import atomic, connect, transaction
from ztfd.store.manifest import record_files
from ztfd.store.offsets import StoredOffset, save_offset, stored_offsets
from ztfd.store.processes import heartbeat
from ztfd.store.status_facts import get_status, set_status

__all__ = [
    "StoredOffset",
    "atomic",
    "connect",
    "get_status",
    "heartbeat",
    "record_files",
    "save_offset",
    "set_status",
    "stored_offsets",
    "transaction",
]
