"""``ztfd archive``: the dataset writer, as the daemon's ``archiver`` role, once, or rebuilding.

One writer at a time per home: it holds an ``flock`` on ``archive/.lock`` while it writes (a rebuild waits for
the daemon's pass, and the other way round).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

from ztfd import config, store
from ztfd.archive.alerts import AlertsWriter
from ztfd.archive.compaction import Compactor
from ztfd.archive.elsewhere import Elsewhere
from ztfd.archive.fleetschema import FleetSchema
from ztfd.archive.layout import Layout
from ztfd.archive.messages import SchemaSource
from ztfd.archive.stamps import StampsWriter, writer_name
from ztfd.daemon import lifecycle
from ztfd.daemon.heartbeat import Heartbeat
from ztfd.ingest import topics
from ztfd.ingest.fleet import FleetBook, member_id
from ztfd.store import archive_marks, avro_schemas, manifest
from ztfd.store.db import transaction
from ztfd.store.states import Role

log = logging.getLogger(__name__)


@contextlib.contextmanager
def writer_lock(layout: Layout) -> Iterator[None]:
    layout.root.mkdir(parents=True, exist_ok=True)
    with open(layout.lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def schema_source(cfg: config.Config, conn: sqlite3.Connection) -> SchemaSource:
    """Where the archiver finds writer schemas: the registry's, as the consumers kept them in the store (read once
    into memory: the writer's row builders may run in forked processes, which must not touch the store)."""
    registry = cfg.kafka.schema_registry_url.rstrip("/")
    kept = avro_schemas.schemas_of(conn, registry) if registry else {}
    return SchemaSource(
        registry_schema=kept.get if registry else None,
        topic_schema=lambda topic: topics.lookup(cfg.kafka.schemas, topic),
    )


class Archiver:
    def __init__(self, cfg: config.Config, conn: sqlite3.Connection) -> None:
        self.cfg = cfg
        self.conn = conn
        self.layout = Layout(cfg.home)
        self.stamps = StampsWriter(cfg.home, writer_name(cfg))
        # Fleet mode: rows other hosts put in the bucket are not written again (kept across passes: its listings)
        self.elsewhere = Elsewhere(cfg, conn) if cfg.kafka.group_mode else None

    def alerts_writer(self) -> AlertsWriter:
        fleet = FleetSchema(FleetBook(self.cfg.kafka, member_id(self.cfg.home))) if self.cfg.kafka.group_mode else None
        return AlertsWriter(self.cfg.home, self.conn, schema_source(self.cfg, self.conn), self.elsewhere, fleet)

    def one_pass(self, stop: lifecycle.Stop | None = None, progress: Any = None) -> int:
        with writer_lock(self.layout):
            writer, compactor = self._writers()
            written = writer.write_pass(stop, progress)
            if stop is None or not stop.is_set():
                compactor.compact_pass()
            self.stamps.write_pass(self.conn)
        if written:
            log.info("archive: %d alerts written into the dataset", written)
        return written

    def rebuild(self, date: str | None) -> int:
        """Without a date, every alerts file removed (from S3 too) and written again from the store's alerts and
        the files on disk, as passes do; the number written. With one, the passes catch up first, then night
        ``date``'s files are written again, one per partition and block. Interrupted and run again, it ends with
        the same dataset."""
        with writer_lock(self.layout):
            writer, compactor = self._writers()
            if date is None:
                writer.start_over()
                total = writer.write_pass()
            else:
                writer.write_pass()
                total = writer.rebuild_date(date)
            compactor.compact_pass()
            for night in [date] if date else archive_marks.dates_of(self.conn):
                if (self.cfg.home / "images" / night).is_dir():
                    row = self.stamps.write_night(night, self.conn)
                    if row is not None:
                        with transaction(self.conn):
                            manifest.record_files(self.conn, [row])
        return total

    def _writers(self) -> tuple[AlertsWriter, Compactor]:
        """The alerts writer and its compactor, once they finished what a killed writer left undone."""
        writer = self.alerts_writer()
        compactor = Compactor(writer, self.cfg.archive.compact_after)
        writer.finish_interrupted()
        compactor.finish_interrupted()
        return writer, compactor


def run(cfg: config.Config, name: str) -> int:
    """The daemon role: a pass every ``archive.interval`` seconds until SIGTERM."""
    with lifecycle.stop_on_signals() as stop:
        conn = store.connect(cfg.db_path)
        heartbeat = Heartbeat(name, Role.ARCHIVER)
        archiver = Archiver(cfg, conn)
        try:
            while not stop.is_set():
                heartbeat.beat(conn)
                started = time.monotonic()
                try:
                    archiver.one_pass(stop, lambda: heartbeat.beat_if_due(conn))
                except (OSError, sqlite3.OperationalError) as exc:
                    log.error("archive pass failed (retried in %.0f s): %s", cfg.archive.interval, exc)
                # Between passes, beat at the usual rate: archive.interval may be longer than heartbeat_timeout.
                next_pass = started + cfg.archive.interval
                while (not stop.wait(max(0.0, min(heartbeat.interval, next_pass - time.monotonic())))
                       and time.monotonic() < next_pass):
                    heartbeat.beat_if_due(conn)
        finally:
            conn.close()
    return 0
