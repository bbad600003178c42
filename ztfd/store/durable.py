"""How far a partition is durable in S3: the offset a fleet host may commit to Kafka (``kafka.assignment =
"group"``, docs/fleet.md).

An alert is durable once everything the fleet keeps of it is in the bucket, so that a host lost with its disk
loses nothing of it:
- its files (the message's file, and embedded cutouts under ``images/<date>/<object_id>/``) are uploaded: their
  manifest rows are ``done`` or ``archived``, or forgotten (``ztfd prune`` forgets rows only after their upload);
- its stamps are settled: no stamp job of its object and observation time (``store.jobs.detection_key``, the key
  one job serves every alert of that detection by) waits or runs; a job done or failed for good is settled;
- the files its stamp job wrote (stamps and preview, under the same ``images/<date>/<object_id>/``) are uploaded.
  A job records each file in the manifest before it is settled, so a settled job's files are all in the manifest;
- with the Parquet archive on (``[archive] enabled``), its row is in the dataset (the partition generation's
  ``archive_marks`` mark is at or past its offset) and the dataset files holding that row (a part named by its
  offset range, or the file a fold of parts made: ``archive.layout.alerts_file``) and the dataset's schema file are
  uploaded. A row another host's file in the bucket holds already is left out by this host's writer after a
  takeover (``archive.elsewhere``): no file of this host names it, the mark passing it is enough. With the archive
  off nothing waits for it.

A rejected message is durable once its export (``store.rejected.export_path``, one file per message in fleet mode,
written by its consumer within seconds: ``ingest.durability``) is uploaded; until then it holds its partition's
frontier as an alert would, so that a host lost with its disk loses no poison message either.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ztfd.store.jobs import detection_key
from ztfd.store.rejected import Rejected, export_path
from ztfd.store.states import JobState, literal

KEY_FUNCTION = "ztfd_detection_key"
ARCHIVE_PREFIX_FUNCTION = "ztfd_archive_prefix"
ARCHIVE_HOLDS_FUNCTION = "ztfd_archive_holds"
EXPORT_FUNCTION = "ztfd_rejected_export"
ARCHIVE_SCHEMA_FUNCTION = "ztfd_archive_schema_file"
_UPLOADED = "'done', 'archived'"
_OPEN = f"{literal(JobState.READY)}, {literal(JobState.LEASED)}"

# An alert row ``a`` that is not yet durable. The folder range works because object ids are plain identifiers
# (letters, digits, _ and -): every path under ``images/<date>/<object_id>/`` sorts below ``…/<object_id>0``.
NOT_DURABLE = f"""(
    EXISTS (SELECT 1 FROM manifest m WHERE m.path = a.path AND m.state = 'pending')
    OR EXISTS (SELECT 1 FROM manifest m
               WHERE m.path >= 'images/' || a.date || '/' || a.object_id || '/'
                 AND m.path < 'images/' || a.date || '/' || a.object_id || '0' AND m.state = 'pending')
    OR EXISTS (SELECT 1 FROM jobs j WHERE j.dedupe_key = {KEY_FUNCTION}(a.object_id, a.obs_mjd, a.date)
               AND j.state IN ({_OPEN}))
)"""


# With the archive on, also: the alert's row not yet in the dataset, or a dataset file holding it (a part named by
# its offset range, or the file a fold made of them) or the dataset's schema not yet uploaded. The path range
# picks the partition generation's files of the alert's night folder; the file's name says which offsets it holds.
NOT_ARCHIVED = f"""(
    NOT EXISTS (SELECT 1 FROM archive_marks am WHERE am.topic = a.topic AND am.partition = a.partition
                AND am.generation = a.generation AND am.written_through >= a.kafka_offset)
    OR EXISTS (SELECT 1 FROM manifest m
               WHERE m.path >= {ARCHIVE_PREFIX_FUNCTION}(a.date, a.topic, a.partition, a.generation)
                 AND m.path < {ARCHIVE_PREFIX_FUNCTION}(a.date, a.topic, a.partition, a.generation) || '~'
                 AND m.state = 'pending' AND {ARCHIVE_HOLDS_FUNCTION}(m.path, a.kafka_offset))
    OR EXISTS (SELECT 1 FROM manifest m WHERE m.path = {ARCHIVE_SCHEMA_FUNCTION}() AND m.state = 'pending')
)"""

_REJECTED_COLUMNS = "r.id, r.topic, r.partition, r.generation, r.kafka_offset, r.received_at, r.reason, r.raw"
_EXPORT_OF_R = f"{EXPORT_FUNCTION}(r.topic, r.partition, r.generation, r.kafka_offset, r.received_at)"


def _archive_prefix(date: str, topic: str, partition: int, generation: int) -> str:
    """The start of the names of a partition generation's dataset files in a night's folder (relative to home)."""
    from ztfd.archive.layout import Layout  # pyarrow: only where the archive is on

    return f"{Layout(Path()).alerts_folder(date, topic).as_posix()}/p{partition}-g{generation}-o"


def _archive_holds(path: str, offset: int) -> bool:
    """Whether the dataset file ``path`` holds ``offset``, by what its name says (``archive.layout.alerts_file``)."""
    from ztfd.archive.alerts import CHUNK_OFFSETS
    from ztfd.archive.layout import alerts_file

    named = alerts_file(path.rsplit("/", 1)[-1])
    if named is None:
        return False
    last = named.first + CHUNK_OFFSETS - 1 if named.last is None else named.last  # a file of the old, block name
    return named.first <= offset <= last


def _archive_schema_file() -> str:
    from ztfd.archive.layout import Layout

    return Layout(Path()).alerts_schema_path.as_posix()


def register_functions(conn: sqlite3.Connection) -> None:
    """Teach ``conn`` the names the durable frontier joins on, computed by the very functions that name them: an
    alert's job key, the dataset files of its row, a rejected message's export."""
    conn.create_function(KEY_FUNCTION, 3, detection_key, deterministic=True)
    conn.create_function(ARCHIVE_PREFIX_FUNCTION, 4, _archive_prefix, deterministic=True)
    conn.create_function(ARCHIVE_HOLDS_FUNCTION, 2, _archive_holds, deterministic=True)
    conn.create_function(ARCHIVE_SCHEMA_FUNCTION, 0, _archive_schema_file, deterministic=True)
    conn.create_function(EXPORT_FUNCTION, 5, export_path, deterministic=True)


def durable_through(conn: sqlite3.Connection, topic: str, partition: int, generation: int, start: int,
                    end: int, archive: bool = False) -> int:
    """The first offset in ``start``..``end`` whose alert or rejected message is not yet durable, else ``end``:
    every message of the partition generation from ``start`` up to the offset returned is in S3 (or is no alert
    and was not rejected), so Kafka may be told to resume there. ``end`` is the offset this host has stored up to
    (``store.offsets``); ``archive``: the Parquet archive is on, and an alert waits for its row in it too.

    One indexed walk from ``start`` that stops at the first alert not durable: cheap when the frontier follows
    close behind the uploads, as a periodic committer keeps it. Rejected messages are rare: all of the range."""
    if end <= start:
        return start
    register_functions(conn)
    condition = f"({NOT_DURABLE} OR {NOT_ARCHIVED})" if archive else NOT_DURABLE
    row = conn.execute(
        "SELECT a.kafka_offset FROM alerts a WHERE a.topic = ? AND a.partition = ? AND a.generation = ? "
        f"AND a.kafka_offset >= ? AND a.kafka_offset < ? AND {condition} ORDER BY a.kafka_offset LIMIT 1",
        (topic, partition, generation, start, end),
    ).fetchone()
    frontier = end if row is None else int(row[0])
    held = conn.execute(
        "SELECT min(r.kafka_offset) FROM rejected r WHERE r.topic = ? AND r.partition = ? AND r.generation = ? "
        "AND r.kafka_offset >= ? AND r.kafka_offset < ? "
        f"AND NOT EXISTS (SELECT 1 FROM manifest m WHERE m.path = {_EXPORT_OF_R} AND m.state IN ({_UPLOADED}))",
        (topic, partition, generation, start, frontier),
    ).fetchone()[0]
    return frontier if held is None else int(held)


def rejected_not_exported(conn: sqlite3.Connection, topic: str, partition: int, generation: int, start: int,
                          end: int) -> list[Rejected]:
    """Rejected messages of a partition generation at offsets ``start``..``end`` whose export file is not in the
    manifest yet (fleet mode exports each at once: it holds the frontier until uploaded)."""
    register_functions(conn)
    rows = conn.execute(
        f"SELECT {_REJECTED_COLUMNS} FROM rejected r WHERE r.topic = ? AND r.partition = ? AND r.generation = ? "
        "AND r.kafka_offset >= ? AND r.kafka_offset < ? "
        f"AND NOT EXISTS (SELECT 1 FROM manifest m WHERE m.path = {_EXPORT_OF_R}) ORDER BY r.kafka_offset",
        (topic, partition, generation, start, end),
    ).fetchall()
    return [Rejected(*row[:7], bytes(row[7] or b"")) for row in rows]
