"""A consumer's batch, stored in one transaction: its alerts, their files' manifest rows and stamp jobs, the
rejected messages, the partitions' next offsets and the bytes received, all or nothing.

The consumer describes the batch (``BatchToStore``, a plain record that pickles); the file writer's child stores
it once the batch's files are on disk (``ztfd.ingest.filewriter``), so that this transaction runs beside the consumer's
decoding instead of after it.
"""

from __future__ import annotations

import sqlite3
from typing import Any, NamedTuple

from ztfd.store.alerts import NewAlert, insert_alerts
from ztfd.store.db import transaction
from ztfd.store.jobs import NewStampJob, enqueue
from ztfd.store.manifest import record_files
from ztfd.store.offsets import save_offset
from ztfd.store.quota import DayBytes, add_bytes
from ztfd.store.rejected import NewRejected, add_rejected


class AlertToStore(NamedTuple):
    """An alert of the batch: its row, its files (paths under home, the message's file first) and the stamp job
    to queue once it is stored (``job_kind`` None: none)."""

    alert: NewAlert
    files: tuple[str, ...]
    job_kind: str | None = None
    dedupe_key: str | None = None


class BatchToStore(NamedTuple):
    topic: str
    received_at: float
    alerts: list[AlertToStore]
    rejected: list[NewRejected]
    offsets: dict[int, tuple[int, int]]  # partition: (generation, next offset)
    traffic: list[tuple[int, str | None, int, int]]  # (Lasair nid, survey, bytes, messages) received

    def packed(self) -> tuple[Any, ...]:
        """The batch as plain tuples, for the pipe to the file writer: pickle rebuilds a NamedTuple through a
        Python-level ``__getnewargs__`` per instance, and two per alert were a fifth of the pickling (~1.5 us an
        alert on ``bin/bench ingest``)."""
        return (self.topic, self.received_at,
                [(tuple(entry.alert), entry.files, entry.job_kind, entry.dedupe_key) for entry in self.alerts],
                self.rejected, self.offsets, self.traffic)

    @classmethod
    def unpacked(cls, packed: tuple[Any, ...]) -> BatchToStore:
        topic, received_at, alerts, rejected, offsets, traffic = packed
        return cls(topic, received_at, [AlertToStore(NewAlert._make(alert), files, kind, key)
                                        for alert, files, kind, key in alerts], rejected, offsets, traffic)


class StoredBatch(NamedTuple):
    """What the transaction did: the positions (in ``BatchToStore.alerts``) of the alerts it stored, the others
    being stored already (another consumer of the same topic), and the topic's traffic totals after it."""

    accepted: list[int]
    days: list[DayBytes]


def store_batch(conn: sqlite3.Connection, batch: BatchToStore, digests: dict[str, tuple[int, str]]) -> StoredBatch:
    """Store ``batch`` whose files are on disk; ``digests`` has the (size, MD5) of each of them, by path."""
    now = batch.received_at
    with transaction(conn):
        ids = insert_alerts(conn, batch.topic, [entry.alert for entry in batch.alerts], now)
        stored = [(index, alert_id) for index, alert_id in enumerate(ids) if alert_id is not None]
        accepted = [index for index, _ in stored]
        add_rejected(conn, batch.topic, batch.rejected, now)
        record_files(conn, [(path, *digests[path]) for index in accepted for path in batch.alerts[index].files])
        jobs = [NewStampJob(alert_id, dedupe_key=batch.alerts[index].dedupe_key, kind=kind)
                for index, alert_id in stored if (kind := batch.alerts[index].job_kind) is not None]
        if jobs:
            enqueue(conn, jobs, now=now)
        for partition, (generation, next_offset) in batch.offsets.items():
            save_offset(conn, batch.topic, partition, generation, next_offset)
        days = add_bytes(conn, batch.topic, batch.traffic)
    return StoredBatch(accepted, days)
