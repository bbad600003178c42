"""What the store keeps, and for how long (docs/store.md): ``ztfd prune``, which the supervisor also runs
every ``PRUNE_EVERY`` seconds.

The store keeps what ztfd needs to go on and what nothing else holds: every alert (the list of what should be on
disk and in S3), what is known about its stamps, the sync state of files not yet safe in S3, the offsets, open and
failed stamp jobs.
It forgets what has been folded into those:

- done stamp jobs, a day after they finished: what they learned is the alert's stamp record (``stamps``), how
  many there were is a counter;
- manifest rows of files safe in S3, a day after their upload, when retention is off (with it on, every row is
  kept): a file the manifest no longer lists and that is no newer than the horizon of the rows forgotten is one
  that was uploaded (``ztfd.store.manifest``); how many there were is a counter;
- rows of processes that are gone (no live pid, no heartbeat for a day): the supervisor rewrites its own at start,
  and ``ztfd fetch`` run by hand or by supervisord without a fixed name leaves one row per pid;
- rejected messages received more than ``store.rejected_keep_days`` days ago: exported first, whole UTC days at a
  time, as JSON lines (raw bytes in base64), one file per day, topic and partition generation named by the Kafka
  identity of its first message (``store.rejected.export_path``:
  ``data/<date>/<topic>/rejected-[g<generation>-]p<partition>-o<first offset>.jsonl``), recorded in the sync
  manifest and so uploaded like any alert file, then deleted. A crash between the file and the deletion writes the
  same file again (same name, same bytes): nothing is lost, and nothing is uploaded twice. In fleet mode
  (``kafka.assignment = "group"``) each message is a file of its own, the very file its consumer exported within
  seconds of the rejection (``ingest.durability``), so that no two hosts write different bytes under one key.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from ztfd.config import Config
from ztfd.daemon.procs import pid_alive
from ztfd.files import atomic_write, md5_hex
from ztfd.store import jobs, manifest, record_files, transaction
from ztfd.store.processes import forget_processes, processes
from ztfd.store.rejected import Rejected, export_path, forget_rejected, received_before
from ztfd.store.states import Role

log = logging.getLogger(__name__)

PRUNE_EVERY = 3600.0
DONE_JOBS_KEEP = 86400.0
GONE_PROCESSES_KEEP = 86400.0
UPLOADED_KEEP = 86400.0  # seconds a manifest row is kept after its upload (retention off)
FORGET_ROWS = 5000  # manifest rows forgotten per transaction: the write lock is held briefly
EXPORT_ROWS = 5000  # rejected messages per export transaction


@dataclass
class Pruned:
    done_jobs: int = 0
    uploaded_files: int = 0
    processes: int = 0
    rejected: int = 0
    exports: list[str] = field(default_factory=list)  # files written, relative to home


def prune(conn: sqlite3.Connection, cfg: Config, now: float | None = None) -> Pruned:
    """Forget what the store no longer needs (see the module's docstring); each step its own short transaction."""
    now = time.time() if now is None else now
    pruned = Pruned()
    with transaction(conn):
        pruned.done_jobs = jobs.forget_done(conn, now - DONE_JOBS_KEEP)
    pruned.uploaded_files = forget_uploaded_files(conn, cfg, now)
    gone = [row.name for row in processes(conn)
            if row.role != Role.SUPERVISOR and (row.heartbeat_at or row.started_at or 0.0) < now - GONE_PROCESSES_KEEP
            and not (row.pid is not None and pid_alive(row.pid))]
    with transaction(conn):
        pruned.processes = forget_processes(conn, gone)
    if cfg.store.rejected_keep_days > 0:
        export_rejected(conn, cfg, _day_start(now - cfg.store.rejected_keep_days * 86400.0), pruned)
    if pruned.done_jobs or pruned.uploaded_files or pruned.processes or pruned.rejected:
        log.info("pruned the store: %d done jobs, %d rows of uploaded files, %d rows of gone processes, %d rejected "
                 "messages exported to %d files", pruned.done_jobs, pruned.uploaded_files, pruned.processes,
                 pruned.rejected, len(pruned.exports))
    return pruned


def forget_uploaded_files(conn: sqlite3.Connection, cfg: Config, now: float) -> int:
    """Forget the manifest rows of files uploaded more than a day ago, when retention is off. With retention on
    the manifest keeps every row: retention needs the done ones, and the archived ones are all that says which
    files are in S3 only (a night report rebuilt later links them)."""
    if cfg.s3.delete_local_after_days > 0:
        return 0
    forgotten = 0
    while True:
        with transaction(conn):
            count = manifest.forget_uploaded(conn, now - UPLOADED_KEEP, FORGET_ROWS)
        forgotten += count
        if count < FORGET_ROWS:
            return forgotten


def export_rejected(conn: sqlite3.Connection, cfg: Config, before: float, pruned: Pruned) -> None:
    """Move rejected messages received before ``before`` out of the store into files under ``data/``."""
    while True:
        rows = received_before(conn, before, EXPORT_ROWS)
        if not rows:
            return
        groups: dict[tuple[str, str, int, int, int], list[Rejected]] = {}
        for row in rows:  # in fleet mode a message per file: another host may export its neighbours
            groups.setdefault((_utc_date(row.received_at), row.topic, row.generation, row.partition,
                               row.kafka_offset if cfg.kafka.group_mode else 0), []).append(row)
        # before the rows go: a crash here only writes them again
        written = [write_export(cfg.home, members) for _, members in sorted(groups.items())]
        with transaction(conn):
            record_files(conn, written)
            pruned.rejected += forget_rejected(conn, [row.id for row in rows])
        pruned.exports += [path for path, _, _ in written]


def write_export(home: Path, rows: list[Rejected]) -> tuple[str, int, str]:
    """Write rejected messages of one day and partition generation, by offset, to the file named after the first
    (``store.rejected.export_path``); its manifest row (path relative to home, size, MD5)."""
    rows = sorted(rows, key=lambda row: row.kafka_offset)
    first = rows[0]
    relative = export_path(first.topic, first.partition, first.generation, first.kafka_offset, first.received_at)
    body = b"".join(_line(row) for row in rows)
    atomic_write(home / relative, body)
    return relative, len(body), md5_hex(body)


def _line(row: Rejected) -> bytes:
    record = {"topic": row.topic, "partition": row.partition, "generation": row.generation,
              "offset": row.kafka_offset, "received_at": _iso(row.received_at), "reason": row.reason,
              "raw_base64": base64.b64encode(row.raw).decode("ascii")}
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def _utc_date(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).date().isoformat()


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _day_start(ts: float) -> float:
    """The start (00:00 UTC) of the day holding ``ts``: exports hold whole days."""
    day = dt.datetime.fromtimestamp(ts, dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day.timestamp()
