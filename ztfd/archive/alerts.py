"""The alerts dataset: ``<home>/archive/alerts/night=<date>/topic=<topic>/p<p>-g<g>-o<first>-<last>.parquet``.

Every file names what it holds: the partition and generation of its rows and the first and last of their offsets,
all within one block of ``CHUNK_OFFSETS`` offsets and one night. Each (topic, partition, generation, offset) is
in exactly one file, once; writing a file again (a kill -9, a redelivery, a rebuild) writes the same name with
the same rows, and a file that holds another's rows under a wider range replaces it (``compaction``).

The writer (``AlertsWriter.write_pass``) reads the stored alerts above each partition's mark
(``ztfd.store.archive_marks``) and writes the new rows of each night and block as a new *part* file, named by their
offsets: nothing written before is read back or written again (a night that gets a few alerts every interval costs
a small file each time, not a rewrite of all its rows). Then, in one store transaction, it records the files in the
manifest (sync uploads them under ``<s3.prefix>archive/…``) and advances the mark. A part left by a pass killed
before its mark moved (its offsets above the mark, never recorded) is deleted before the next one is written there.
``compaction`` later folds a night's parts into one file. A late alert of a night already written lands in that
night's folder the same way. In a fleet, after a partition moved, rows another host's files in the bucket hold
already are left out, and the parts are cut around them (``elsewhere``).

Types: ``columns`` (ztfd's own columns) and ``arrowtypes`` (the message's fields). The dataset's schema, every
column with its pinned type, is ``archive/alerts/_common_metadata`` (written before any file that uses a new
column), the file Spark, Dask and pyarrow read a dataset's schema from. In a fleet the hosts agree on it through the
fleet topic (``fleetschema``), so that every host writes the same types and the same schema file.
"""

from __future__ import annotations

import io
import json
import logging
import math
import multiprocessing
import os
import sqlite3
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ztfd import files
from ztfd.archive import arrowtypes, columns, messages
from ztfd.archive.elsewhere import Elsewhere, runs
from ztfd.archive.fleetschema import FleetSchema
from ztfd.archive.layout import Layout, alerts_file, alerts_file_name
from ztfd.store import alerts as stored_alerts
from ztfd.store import archive_marks, deletions, manifest
from ztfd.store.alerts import StoredAlert
from ztfd.store.archive_marks import PartitionKey
from ztfd.store.db import transaction
from ztfd.store.status_facts import get_status, set_status

log = logging.getLogger(__name__)

# Processes that build a large step's rows: one core is left to the consumer beside it, so on 2 cores none (the
# step runs in the archiver itself). Measured on 2 cores with 5,000 full Lasair-LSST alerts (bin/bench archive's
# messages): 2,044/s in the archiver alone, 1,721/s shared by 2 forked processes, 1,223/s by 4.
WORKERS = min(4, (os.cpu_count() or 1) - 1)
PARALLEL_BYTES = 16 * 1024 * 1024  # a step's messages from which they are shared out: small ones cost less than a
# fork and the way back of the rows (Lasair-ZTF rows: 2x slower in two processes; full Rubin alerts: 1.3x faster)
_FORKED: tuple[AlertsWriter, list[StoredAlert]] | None = None
CHUNK_OFFSETS = 10_000  # offsets per file (per night): part of every file name, so never changed
READ_LIMIT = 4_000  # alerts read from the store per partition per step (full Rubin alerts: ~300 MB in Arrow)
ROWS_SLICE = 500  # alerts whose messages are parsed at once
MJD_UNIX_EPOCH = 40587.0
COMPRESSION = "zstd"
STARTING_OVER = "archive.starting_over"  # status fact: a full rebuild is removing every alerts file


def chunk_start(offset: int) -> int:
    return offset - offset % CHUNK_OFFSETS


def file_name(key: PartitionKey, first: int, last: int) -> str:
    return alerts_file_name(key.partition, key.generation, first, last)


class AlertsWriter:
    """Writes stored alerts into the dataset; one per process, holding the home's archive lock while it writes."""

    def __init__(self, home: Path, conn: sqlite3.Connection, schemas: messages.SchemaSource,
                 elsewhere: Elsewhere | None = None, fleet: FleetSchema | None = None) -> None:
        self.layout = Layout(home)
        self.conn = conn
        self.schemas = schemas
        self.elsewhere = elsewhere  # fleet mode: what other hosts' files in the bucket hold, left out here
        self.schema = self.layout.read_alerts_schema() or columns.fixed_schema(columns.ALERT_COLUMNS)
        self.fleet = fleet  # fleet mode: the schema is the one the fleet agrees (``ztfd.archive.fleetschema``)
        self.avro_seen: set[str] = set()
        self._avro_pending: list[dict[str, Any]] = []

    # --- incremental ---------------------------------------------------------------------------------------------

    def write_pass(self, stop: Any = None, progress: Any = None) -> int:
        """Write every stored alert above its mark; the number of alerts written. ``progress()`` is called after
        each step (the role heartbeats there: a backlog takes many steps)."""
        self._follow_fleet()
        written = 0
        marks = archive_marks.marks(self.conn)
        given_up = archive_marks.handed_back(self.conn)  # fleet mode: rows from these offsets on are not ours
        for key in archive_marks.partitions_to_look_at(self.conn):
            mark = marks.get(key, -1)
            while stop is None or not stop.is_set():
                alerts = archive_marks.alerts_above(self.conn, key, mark, READ_LIMIT)
                if key in given_up:
                    alerts = [alert for alert in alerts if alert.kafka_offset < given_up[key]]
                if not alerts:
                    break
                self._write_step(key, mark, alerts)
                mark = alerts[-1].kafka_offset
                written += len(alerts)
                if progress is not None:
                    progress()
        return written

    def _write_step(self, key: PartitionKey, mark: int, alerts: list[StoredAlert]) -> None:
        """One step: the new alerts' rows built together (a column any of them has a value in is typed for all, so
        a night where it is null in every row still has it), split by night and block, each piece a new part file,
        then recorded with the mark in one transaction."""
        new = self.rows(alerts)
        groups: dict[tuple[str, int], list[int]] = defaultdict(list)
        for index, alert in enumerate(alerts):
            groups[(alert.date, chunk_start(alert.kafka_offset))].append(index)
        recorded = self._widen_schema([new])
        for (date, _start), indices in groups.items():
            folder = self.layout.alerts_folder(date, key.topic)
            remove_unrecorded_parts(folder, key, mark)
            others = self._held_elsewhere(key, date, alerts[indices[0]].kafka_offset)
            indices = [index for index in indices if alerts[index].kafka_offset not in others]
            for low, high in runs([(alerts[index].kafka_offset,) * 2 for index in indices], others):
                piece = indices[low:high]
                name = file_name(key, alerts[piece[0]].kafka_offset, alerts[piece[-1]].kafka_offset)
                recorded.append(self._write_file(folder / name, self._file_table([_rows_at(new, piece)])))
        recorded.extend(self._new_avro_schemas())
        with transaction(self.conn):
            self.record(recorded)
            archive_marks.advance(self.conn, key, alerts[-1].kafka_offset, len(alerts))
            archive_marks.note_unfolded(self.conn, [(date, key.topic) for date, _ in groups])

    def _held_elsewhere(self, key: PartitionKey, date: str, lowest: int) -> frozenset[int]:
        """Fleet mode: the offsets from ``lowest`` on of a partition generation's night that another host's files in
        the bucket hold already (after a takeover, ``ztfd.archive.elsewhere``); their rows are not written here."""
        return frozenset() if self.elsewhere is None else self.elsewhere.held(key, date, lowest)

    def record(self, rows: list[tuple[str, int, str]]) -> None:
        """Record written files in the manifest (inside the caller's transaction); none of them is to be deleted
        from S3 any more, should an older file of the same name have been."""
        manifest.record_files(self.conn, rows)
        deletions.keep(self.conn, [row[0] for row in rows])

    # --- rows ----------------------------------------------------------------------------------------------------

    def rows(self, alerts: list[StoredAlert]) -> pa.Table:
        """The dataset's rows of some alerts: ztfd's columns, then the message's fields.

        Parsing the messages is the writer's main cost (a full Rubin alert is ~40 kB of JSON), so a large step is
        split between ``WORKERS`` forked processes, each building the rows of its share; the pieces are then put
        together in the dataset's types. The children only read alert files: they never touch the store."""
        if WORKERS < 2 or len(alerts) < 2 * ROWS_SLICE or self._step_bytes(alerts) < PARALLEL_BYTES:
            return self._rows(alerts)
        global _FORKED  # what the forked children inherit: nothing is pickled to them
        _FORKED = (self, alerts)
        share = -(-len(alerts) // WORKERS)
        bounds = [(start, min(start + share, len(alerts))) for start in range(0, len(alerts), share)]
        try:
            with ProcessPoolExecutor(len(bounds), mp_context=multiprocessing.get_context("fork")) as pool:
                pieces = list(pool.map(_rows_of_share, bounds))
        finally:
            _FORKED = None
        for _table, schemas in pieces:
            for schema in schemas:
                self._remember_avro(schema)
        return _combined([table for table, _ in pieces])

    def _step_bytes(self, alerts: list[StoredAlert]) -> int:
        """About how many bytes of messages ``alerts`` are (the first one's file, times their number)."""
        try:
            return os.path.getsize(f"{self.layout.home}/{alerts[0].path}") * len(alerts)
        except OSError:
            return 0

    def _rows(self, alerts: list[StoredAlert]) -> pa.Table:
        """``ROWS_SLICE`` alerts at a time: parsed messages take ~10 times their size in Python objects."""
        return _combined([self._slice_rows(alerts[low:low + ROWS_SLICE])
                          for low in range(0, len(alerts), ROWS_SLICE)])

    def _slice_rows(self, alerts: list[StoredAlert]) -> pa.Table:
        found = [self._message(alert) for alert in alerts]
        positions = [messages.position(m.record) if m else (None, None) for m in found]
        ras = [p[0] for p in positions]
        decs = [p[1] for p in positions]
        data: dict[str, pa.Array] = {
            "object_id": pa.array([a.object_id for a in alerts], pa.string()),
            "survey": pa.array([a.survey for a in alerts], pa.string()),
            "partition": pa.array([a.partition for a in alerts], pa.int32()),
            "generation": pa.array([a.generation for a in alerts], pa.int32()),
            "offset": pa.array([a.kafka_offset for a in alerts], pa.int64()),
            "detection_id": pa.array([a.detection_id for a in alerts], pa.string()),
            "observed_at": pa.array([_mjd_to_micros(a.obs_mjd) for a in alerts], pa.int64()).cast(columns.UTC_TIME),
            "received_at": pa.array([round(a.received_at * 1e6) for a in alerts], pa.int64()).cast(columns.UTC_TIME),
            "ra": pa.array(ras, pa.float64()),
            "dec": pa.array(decs, pa.float64()),
            "_healpix_29": healpix_29(ras, decs),
            "file": pa.array([a.path for a in alerts], pa.string()),
            "message": pa.array([m.raw if m else None for m in found], pa.binary()),
        }
        data.update(self._message_columns([m.record if m else None for m in found],
                                          [m.schema for m in found if m and m.schema]))
        return pa.table(data)

    def _message(self, alert: StoredAlert) -> messages.Message | None:
        try:
            found = messages.read(self.layout.home, alert.path, alert.topic, self.schemas)
        except FileNotFoundError:
            log.warning("archive: %s is not on disk (retention?): its row has no message", alert.path)
            return None
        except (ValueError, OSError, EOFError, KeyError) as exc:
            log.warning("archive: %s cannot be read back (%s): its row has no message", alert.path, exc)
            return None
        if found.schema is not None:
            self._remember_avro(found.schema)
        return found

    def _message_columns(self, records: list[dict[str, Any] | None],
                         avro: list[dict[str, Any]]) -> dict[str, pa.Array]:
        avro_types: dict[str, pa.DataType] = {}
        for schema in avro:
            for fld in schema.get("fields", []):
                if not fld["name"].startswith(messages.CUTOUT_PREFIX):
                    dtype = arrowtypes.avro_type(fld["type"], {})  # several schema versions: their union
                    avro_types[fld["name"]] = arrowtypes.widen(avro_types.get(fld["name"], dtype), dtype)
        names: dict[str, None] = dict.fromkeys(avro_types)
        for record in records:
            if record:
                names.update(dict.fromkeys(record))
        out: dict[str, pa.Array] = {}
        for name in names:
            column = columns.column_name(name)
            values = [record.get(name) if record else None for record in records]
            inferred, seen = arrowtypes.inferred_array(values)
            seen = avro_types.get(name) or seen
            index = self.schema.get_field_index(column)
            if index >= 0:
                dtype = arrowtypes.widen(self.schema.field(index).type, seen)
            elif seen is None:
                continue  # never seen with a value: not written (see ztfd.archive.arrowtypes)
            else:
                dtype = seen
            out[column] = arrowtypes.as_type(values, inferred, dtype)
        return out

    # --- schema and files ----------------------------------------------------------------------------------------

    def _widen_schema(self, tables: Iterable[pa.Table]) -> list[tuple[str, int, str]]:
        """Add the new columns (and nested fields) of ``tables`` to the dataset's schema, and write it down before
        any file that holds them; the schema file's manifest row when it was written."""
        schema = self.schema
        for table in tables:
            for fld in table.schema:
                index = schema.get_field_index(fld.name)
                if index < 0:
                    schema = schema.append(columns.field(fld.name, fld.type, columns.MESSAGE_FIELD))
                else:
                    pinned = schema.field(index)
                    widened = arrowtypes.widen(pinned.type, fld.type)
                    if widened != pinned.type:
                        schema = schema.set(index, pinned.with_type(widened))
        if self.fleet is not None:
            schema = self.fleet.agree(self.schema, schema)  # asks the broker only when something is new
        if schema.equals(self.schema, check_metadata=True):
            return []
        self.schema = schema
        return [self.layout.write_alerts_schema(schema)]

    def _follow_fleet(self) -> None:
        """Fleet mode, once a pass: take the schema the fleet has agreed (the other hosts' new columns; this host's
        own, proposed, should the fleet not have them) and write the schema file when it changed, so that every
        host's file, and the bucket's, ends the same."""
        if self.fleet is None:
            return
        agreed = self.fleet.agree(self.fleet.read(), self.schema)
        if agreed.equals(self.schema, check_metadata=True):
            return
        self.schema = agreed
        with transaction(self.conn):
            self.record([self.layout.write_alerts_schema(agreed)])

    def _file_table(self, tables: list[pa.Table]) -> pa.Table:
        """One file's rows in the dataset's types, sorted by offset; the file holds the columns its rows have."""
        names = {name for table in tables for name in table.column_names}
        schema = pa.schema([fld for fld in self.schema if fld.name in names])
        merged = pa.concat_tables([arrowtypes.conform(t, schema) for t in tables])
        offsets = merged["offset"]
        if len(offsets) > 1 and not pc.all(pc.less(offsets[:-1], offsets[1:])).as_py():
            merged = merged.sort_by("offset")  # a copy of every value: only when not in order already
        return merged.replace_schema_metadata(
            {"ztfd": json.dumps({"dataset": "alerts", "chunk_offsets": CHUNK_OFFSETS})})

    def _write_file(self, path: Path, table: pa.Table) -> tuple[str, int, str]:
        return write_parquet(self.layout.home, path, table)

    def _remember_avro(self, schema: dict[str, Any]) -> None:
        text = json.dumps(schema, sort_keys=True)
        if text not in self.avro_seen:
            self.avro_seen.add(text)
            self._avro_pending.append(schema)

    def _new_avro_schemas(self) -> list[tuple[str, int, str]]:
        """The Avro schemas met since the last step, each written once as ``archive/schemas/<fingerprint>.avsc``."""
        written = []
        pending, self._avro_pending = self._avro_pending, []
        for schema in pending:
            path = self.layout.schema_file(schema)
            if not path.exists():
                data = json.dumps(schema, indent=1).encode()
                files.atomic_write(path, data)
                written.append((files.relative_to_home(self.layout.home, path), len(data), files.md5_hex(data)))
        return written

    # --- rebuild -------------------------------------------------------------------------------------------------

    def rebuild_date(self, date: str) -> int:
        """Write every file of night ``date`` again from the store's alerts at or below their marks (the alerts
        above come with the next pass), one file per partition and block; remove every other file of that night
        (from S3 too, once the new ones are there)."""
        marks = archive_marks.marks_held(self.conn)
        by_file: dict[tuple[str, PartitionKey, int], list[StoredAlert]] = defaultdict(list)
        for alert in stored_alerts.alerts_on(self.conn, date):
            key = PartitionKey(alert.topic, alert.partition, alert.generation)
            if alert.kafka_offset <= marks.get(key, -1):
                by_file[(alert.topic, key, chunk_start(alert.kafka_offset))].append(alert)
        wanted: dict[tuple[str, int, int, int], Path] = {}
        written: set[Path] = set()
        recorded = []
        for (topic, key, start), alerts in sorted(by_file.items()):
            alerts.sort(key=lambda alert: alert.kafka_offset)
            others = self._held_elsewhere(key, date, alerts[0].kafka_offset)
            alerts = [alert for alert in alerts if alert.kafka_offset not in others]
            for low, high in runs([(alert.kafka_offset,) * 2 for alert in alerts], others):  # cut at others' rows
                table = self.rows(alerts[low:high])
                recorded.extend(self._widen_schema([table]))
                path = self.layout.alerts_folder(date, topic) / file_name(key, alerts[low].kafka_offset,
                                                                         alerts[high - 1].kafka_offset)
                recorded.append(self._write_file(path, self._file_table([table])))
                written.add(path)
                wanted[(topic, key.partition, key.generation, start)] = path
        recorded.extend(self._new_avro_schemas())
        stale = {}
        for path in self.layout.alerts_night(date).glob("topic=*/*.parquet"):
            held = alerts_file(path.name)
            if path not in written:
                stale[path] = None if held is None else wanted.get(
                    (path.parent.name.removeprefix("topic="), held.partition, held.generation, chunk_start(held.first)))
        self.replace_files(stale, recorded)
        return sum(len(a) for a in by_file.values())

    def start_over(self) -> None:
        """Remove every alerts file and forget the marks, so that the next pass writes every stored alert (a full
        rebuild). The intent is kept in the store first, with the files' deletion from S3 and from the manifest:
        a writer that finds it (this one killed) starts over again before it writes anything, so no file is left
        beside the ones written anew."""
        stale = [files.relative_to_home(self.layout.home, path)
                 for path in self.layout.alerts.glob("night=*/topic=*/*.parquet")]
        with transaction(self.conn):
            set_status(self.conn, STARTING_OVER, "1")
            deletions.request(self.conn, stale, None)
        for path in stale:
            (self.layout.home / path).unlink(missing_ok=True)
        with transaction(self.conn):
            archive_marks.forget(self.conn)
            set_status(self.conn, STARTING_OVER, None)

    def finish_interrupted(self) -> None:
        """Start over again if a full rebuild was killed while it started over."""
        fact = get_status(self.conn, STARTING_OVER)
        if fact is not None and fact[0] is not None:
            log.info("archive: a rebuild was killed while it removed the dataset's files: removing them again")
            self.start_over()

    def replace_files(self, stale: dict[Path, Path | None], recorded: list[tuple[str, int, str]]) -> None:
        """Record the files written (``recorded``) and remove the ``stale`` ones: from the manifest in the same
        transaction, then from disk, and from S3 once the file that replaces each one (its value) is uploaded."""
        home = self.layout.home
        by_replacement: dict[str | None, list[str]] = defaultdict(list)
        for path, replacement in stale.items():
            by_replacement[None if replacement is None else files.relative_to_home(home, replacement)].append(
                files.relative_to_home(home, path))
        with transaction(self.conn):
            self.record(recorded)
            for replacement, paths in by_replacement.items():
                deletions.request(self.conn, paths, replacement)
        for path in stale:
            path.unlink(missing_ok=True)


def remove_unrecorded_parts(folder: Path, key: PartitionKey, mark: int) -> None:
    """Delete the part files of ``key`` in ``folder`` that hold offsets above its mark: written by a pass killed
    before it recorded them (the mark moves in the transaction that records them), so never uploaded. The step
    about to write there writes those rows again, maybe with more, under another name."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return
    for name in names:
        held = alerts_file(name)
        if (held is not None and held.last is not None and (held.partition, held.generation) == key[1:]
                and held.first > mark):
            log.info("archive: removing %s/%s, written by a pass killed before it recorded it", folder, name)
            (folder / name).unlink(missing_ok=True)


def _rows_at(table: pa.Table, indices: list[int]) -> pa.Table:
    """The rows at ``indices`` (ascending): a zero-copy slice when they follow one another, as they mostly do (a
    step is one partition's offsets in order); ``take`` copies every nested value (a third of a pass with full
    Rubin alerts)."""
    if indices[-1] - indices[0] + 1 == len(indices):
        return table.slice(indices[0], len(indices))
    return table.take(indices)


def _combined(tables: list[pa.Table]) -> pa.Table:
    """Row pieces built apart, as one table: a column one piece lacks (null in all its rows) is null there."""
    if len(tables) == 1:
        return tables[0]
    names: dict[str, pa.DataType] = {}
    for table in tables:
        for fld in table.schema:
            names[fld.name] = arrowtypes.widen(names[fld.name], fld.type) if fld.name in names else fld.type
    schema = pa.schema([pa.field(name, dtype) for name, dtype in names.items()])
    return pa.concat_tables([arrowtypes.conform(table, schema) for table in tables])


def _rows_of_share(bounds: tuple[int, int]) -> tuple[pa.Table, list[dict[str, Any]]]:
    """In a forked child: the rows of ``alerts[low:high]`` and the Avro schemas met there."""
    assert _FORKED is not None
    writer, alerts = _FORKED
    writer._avro_pending = []
    table = writer._rows(alerts[bounds[0]:bounds[1]])
    return table, writer._avro_pending


def write_parquet(home: Path, path: Path, table: pa.Table) -> tuple[str, int, str]:
    """Write ``table`` to ``path`` atomically; the manifest's (path, size, md5)."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression=COMPRESSION)
    data = buffer.getvalue()
    files.atomic_write(path, data)
    return files.relative_to_home(home, path), len(data), files.md5_hex(data)


def _mjd_to_micros(mjd: float | None) -> int | None:
    if mjd is None or not math.isfinite(mjd):
        return None
    return round((mjd - MJD_UNIX_EPOCH) * 86_400_000_000)


def healpix_29(ras: list[float | None], decs: list[float | None]) -> pa.Array:
    """The nested HEALPix index at order 29 of each position; null without one."""
    import numpy as np

    from ztfd.archive import sky

    ra = np.array([math.nan if r is None else r for r in ras], dtype=float)
    dec = np.array([math.nan if d is None else d for d in decs], dtype=float)
    known = np.isfinite(ra) & np.isfinite(dec)
    index = np.zeros(len(ra), dtype=np.int64)
    if known.any():
        index[known] = sky.healpix_29(ra[known], dec[known])
    return pa.array(index, pa.int64(), mask=~known)



