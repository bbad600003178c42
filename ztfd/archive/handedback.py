"""Archive rows of a partition this host handed back (fleet mode): the next holder's to write, never this host's.

A partition handed back cleanly (a rebalance, ``ztfd stop``) is committed at ``c`` as far as it is durable, and
the next holder reads it from ``c``, looks in the bucket once for rows other hosts' files hold
(``ztfd.archive.elsewhere``) and writes the rest. This host's dataset files not yet uploaded then can only hold rows
at or past ``c`` (the commit passes a row only once its file is uploaded): uploaded later, after the successor's
look, they would put those offsets in the bucket twice, for good. So the consumer records each partition handed back
with its generation and commit (``store.archive_marks.note_handed_back``), and until the group hands it in again:

- the writer writes no row of it at or past ``c``, compaction folds none (``store.archive_marks.marks_held``);
- the syncer uploads no file of it whose name reaches ``c`` (``past_commit``), and at each pass ``drop`` takes every
  such file off this host: one not uploaded is dropped (never to be uploaded; its rows below the commit, which only
  a file written after them can hold, such as the archive switched on late or a full rebuild, are kept in a file of
  their own unless objects it replaced hold them), one uploaded is left to the bucket as if another host's (its
  rows are durable there, and a later look of this host in the bucket finds it). Its manifest row goes, objects
  waiting for it to replace them stay in the bucket, and the partition's mark goes
  down to ``c - 1``, in one transaction that also lists the files to delete from disk
  (``store.archive_marks.note_dropping``), deleted after it and again by the next pass should a kill -9 come in
  between. Should the partition come back, the writer writes its rows from ``c`` again, leaving out those the
  bucket holds (the partition moved: it looks there first).

This host's own dataset (``ztfd query`` on it) then lacks those files' rows; the bucket has the fleet's.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ztfd.archive.alerts import CHUNK_OFFSETS, write_parquet
from ztfd.archive.layout import alerts_file, alerts_file_name
from ztfd.store import archive_marks, deletions, manifest
from ztfd.store.archive_marks import PartitionKey
from ztfd.store.db import transaction
from ztfd.store.manifest import FileState

log = logging.getLogger(__name__)

ALERTS_PREFIX = "archive/alerts/"  # the alerts dataset's files, relative to the home


def past_commit(path: str, given_up: Mapping[PartitionKey, int]) -> PartitionKey | None:
    """The partition generation handed back whose rows at or past its commit the alerts file at ``path`` (relative
    to the home) may hold, by its name; None for any other file."""
    parts = path.split("/")
    if len(parts) != 5 or not path.startswith(ALERTS_PREFIX) or not parts[3].startswith("topic="):
        return None
    held = alerts_file(parts[4])
    if held is None:
        return None
    key = PartitionKey(parts[3].removeprefix("topic="), held.partition, held.generation)
    last = held.first - held.first % CHUNK_OFFSETS + CHUNK_OFFSETS - 1 if held.last is None else held.last
    return key if key in given_up and last >= given_up[key] else None


def drop(conn: sqlite3.Connection, home: Path) -> int:
    """Take every alerts file of a partition handed back that may hold rows at or past its commit off this host
    (see the module's docstring); the number of files taken off."""
    finish(conn, home)
    given_up = archive_marks.handed_back(conn)
    if not given_up:
        return 0
    states = manifest.states_under(conn, ALERTS_PREFIX)
    taken = {path: (key, state) for path, state in states.items()
             if state != FileState.ARCHIVED and (key := past_commit(path, given_up)) is not None}
    marks = archive_marks.marks(conn)
    above = [key for key, offset in given_up.items() if marks.get(key, -1) >= offset]
    if not taken and not above:
        return 0
    replacing = deletions.awaited(conn, taken)
    cuts = [(key, cut) for path, (key, state) in taken.items() if state == FileState.PENDING
            and path not in replacing and (cut := _rows_before(home, path, given_up[key])) is not None]
    kept = [row for _, row in cuts]
    with transaction(conn):
        for key in above:
            archive_marks.lower(conn, key, given_up[key] - 1)
        if taken:
            manifest.drop_files(conn, taken)
            deletions.cancel_waiting_for(conn, taken)
            manifest.record_files(conn, kept)
            deletions.keep(conn, [row[0] for row in kept])
            archive_marks.note_dropping(conn, set(taken) - {row[0] for row in kept})
    counts = Counter((key, state == FileState.PENDING) for key, state in taken.values())
    for key in sorted({key for key, _ in taken.values()}):
        log.info("archive: %s [%d] generation %d was handed back at offset %d: %d files of its rows from there on "
                 "dropped before upload, %d uploaded ones left to the bucket (the next holder's rows; this host's "
                 "dataset no longer has them)%s", key.topic, key.partition, key.generation, given_up[key],
                 counts[(key, True)], counts[(key, False)],
                 "".join(f", {row[0]} kept (its rows below the commit)" for of, row in cuts if of == key))
    finish(conn, home)
    return len(taken)


def _rows_before(home: Path, path: str, offset: int) -> tuple[str, int, str] | None:
    """A file not uploaded that holds rows below the commit too (the archive switched on after them, or a full
    rebuild): those rows, in a file of their own named by their offsets, written beside it (its manifest row)."""
    held = alerts_file(path.rsplit("/", 1)[1])
    if held is None or held.first >= offset:
        return None
    try:
        table = pq.read_table(home / path)
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowException) as exc:  # unreadable: its rows cannot be kept, the drop goes on
        log.warning("archive: %s cannot be read (%s): its rows below the commit are not kept", path, exc)
        return None
    table = table.filter(pc.less(table["offset"], offset))
    if not table.num_rows:
        return None
    offsets = table["offset"]
    name = alerts_file_name(held.partition, held.generation, offsets[0].as_py(), offsets[-1].as_py())
    return write_parquet(home, home / path.rsplit("/", 1)[0] / name, table)


def finish(conn: sqlite3.Connection, home: Path) -> None:
    """Delete from disk the files a drop took off the manifest (again, after a kill -9 between the two)."""
    paths = archive_marks.dropping(conn)
    if not paths:
        return
    left = []
    for path in paths:
        if manifest.recorded_file(conn, path) is not None:
            continue  # written anew since (the partition back, its rows written again): this host's again
        try:
            (home / path).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("archive: cannot delete %s (%s): trying again at the next pass", path, exc)
            left.append(path)
    with transaction(conn):
        archive_marks.note_dropping(conn, left)
