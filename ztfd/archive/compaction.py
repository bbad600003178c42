"""Folding a night's part files into one file (``ztfd archive``, after each pass's writing).

The writer adds a part file per night and block at every pass that brings new alerts (``ztfd.archive.alerts``).
A block's parts are folded into one file named by the offsets it holds (``p<P>-g<G>-o<first>-<last>.parquet``,
first and last of all its rows) when
- the night is quiet: none of its alerts came for ``archive.compact_after`` seconds (the night is over);
- the block is complete: the partition's mark passed its last offset, so no row can come to it any more;
- it has ``MAX_FILES`` files: a night still busy is folded every so often, so its files stay few;
- one of them is named the old way (by its block alone: a dataset written before part files).

How, so that every offset stays in the dataset exactly once through a kill -9 at any point: the intent is kept in
the store (``archive.compacting``); the new file is written (through a temporary and a rename); one transaction
records it in the manifest and asks for the folded files' deletion from S3 (``ztfd.store.deletions``: sync deletes
them once the new file is uploaded) while dropping their manifest rows; the folded files are deleted; the intent
is cleared. A writer that finds the intent at its start folds that block again (rows are taken once per offset,
so folding the folded file with its parts is the same file). Between the rename and the deletions a reader sees
the rows twice, unless it leaves out the files whose range lies within another's, as ``ztfd.archive`` does.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ztfd import files
from ztfd.archive.alerts import CHUNK_OFFSETS, AlertsWriter, chunk_start, file_name
from ztfd.archive.elsewhere import runs
from ztfd.archive.layout import AlertsFile, alerts_file
from ztfd.store import archive_marks
from ztfd.store.archive_marks import PartitionKey
from ztfd.store.db import transaction
from ztfd.store.status_facts import get_status, set_status

log = logging.getLogger(__name__)

MAX_FILES = 48  # a block with this many files is folded even while its night is busy
INTENT = "archive.compacting"  # the block being folded: {"folder", "partition", "generation", "start"}


class Compactor:
    """Folds part files; uses its writer's store connection, schema and file writing."""

    def __init__(self, writer: AlertsWriter, quiet_seconds: float) -> None:
        self.writer = writer
        self.quiet_seconds = quiet_seconds
        self.conn = writer.conn
        self.home = writer.layout.home

    def finish_interrupted(self) -> None:
        """Fold again the block a compaction killed before its end was folding."""
        fact = get_status(self.conn, INTENT)
        if fact is None or fact[0] is None:
            return
        intent = json.loads(fact[0])
        folder = self.home / intent["folder"]
        topic = folder.name.removeprefix("topic=")
        key = PartitionKey(topic, intent["partition"], intent["generation"])
        mark = archive_marks.marks_held(self.conn).get(key, -1)
        names = [name for name, held in _files(folder).items()  # none past a mark lowered meanwhile (handed back)
                 if (held.partition, held.generation) == key[1:] and chunk_start(held.first) == intent["start"]
                 and _ready(held, mark)]
        log.info("archive: finishing the compaction of %s (partition %d, offsets from %d) a killed pass began",
                 intent["folder"], key.partition, intent["start"])
        for run in self._runs(folder, key, intent["start"], names):
            self.fold(folder, key, intent["start"], run, mark)

    def compact_pass(self, now: float | None = None) -> int:
        """Fold the blocks due in the folders the writer added parts to (``archive_marks.unfolded``: a few, not a
        year of folders); the number of files folded away. A folder left with one file per block is done. Rows of
        a partition handed back, from its commit on, are not folded (``ztfd.archive.handedback``)."""
        now = time.time() if now is None else now
        marks = archive_marks.marks_held(self.conn)
        folded, done = 0, []
        for date, topic in archive_marks.unfolded(self.conn):
            received = archive_marks.last_received(self.conn, date, topic) or 0.0
            folder = self.writer.layout.alerts_folder(date, topic)
            blocks: dict[tuple[int, int, int], list[tuple[str, AlertsFile]]] = defaultdict(list)
            for name, held in _files(folder).items():
                blocks[(held.partition, held.generation, chunk_start(held.first))].append((name, held))
            left = 0
            for (partition, generation, start), found in sorted(blocks.items()):
                key = PartitionKey(topic, partition, generation)
                mark = marks.get(key, -1)
                ready = [(name, held) for name, held in found if _ready(held, mark)]
                if len(found) < 2:
                    continue
                if len(ready) >= 2 and (
                        now - received >= self.quiet_seconds or mark >= start + CHUNK_OFFSETS - 1
                        or len(ready) >= MAX_FILES or any(held.last is None for _, held in ready)):
                    groups = self._runs(folder, key, start, [name for name, _ in ready])
                    for group in groups:
                        if len(group) > 1:
                            self.fold(folder, key, start, group, mark)
                            folded += len(group)
                    left += len(found) > len(ready)
                else:
                    left += 1
            if not left:
                done.append((date, topic))
        if done:
            with transaction(self.conn):
                archive_marks.note_folded(self.conn, done)
        return folded

    def _runs(self, folder: Path, key: PartitionKey, start: int, names: list[str]) -> list[list[str]]:
        """The files of a block in the groups that may each be folded into one file: all of them, unless another
        host's files in the bucket hold offsets between two of them (fleet mode, after a takeover: the fold's name
        would span that file's range without its rows, ``elsewhere.runs``)."""
        date = folder.parent.name.removeprefix("night=")
        others = self.writer._held_elsewhere(key, date, start)
        if not others:
            return [names]
        spans = sorted((_span(held), name) for name in names if (held := alerts_file(name)) is not None)
        return [[name for _, name in spans[low:high]] for low, high in runs([span for span, _ in spans], others)]

    def fold(self, folder: Path, key: PartitionKey, start: int, names: list[str], mark: int) -> None:
        """Fold the files ``names`` of one block into one file: its rows at or below the mark, once per offset."""
        with transaction(self.conn):
            set_status(self.conn, INTENT, json.dumps({
                "folder": files.relative_to_home(self.home, folder), "partition": key.partition,
                "generation": key.generation, "start": start}))
        tables = []
        for name in sorted(names):
            try:
                tables.append(pq.read_table(folder / name))
            except FileNotFoundError:
                continue
        merged = _once_per_offset(self.writer._file_table(tables), mark) if tables else None
        recorded, target = [], None
        if merged is not None and merged.num_rows:
            offsets = merged["offset"]
            target = folder / file_name(key, offsets[0].as_py(), offsets[-1].as_py())
            recorded.append(self.writer._write_file(target, merged))
        folded = [folder / name for name in names if folder / name != target]
        self.writer.replace_files(dict.fromkeys(folded, target), recorded)
        with transaction(self.conn):
            set_status(self.conn, INTENT, None)
        if folded:
            log.info("archive: %d files of %s folded into %s", len(folded), files.relative_to_home(self.home, folder),
                     target.name if target else "none")


def _ready(held: AlertsFile, mark: int) -> bool:
    """Whether a file's rows are all at or below the mark (one named the old way: its first)."""
    return (held.first if held.last is None else held.last) <= mark


def _span(held: AlertsFile) -> tuple[int, int]:
    """The offsets a file's name says it holds (one named by its block alone: the whole block)."""
    return held.first, held.first + CHUNK_OFFSETS - 1 if held.last is None else held.last


def _files(folder: Path) -> dict[str, AlertsFile]:
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return {}
    return {name: held for name in names if (held := alerts_file(name)) is not None}


def _once_per_offset(table: pa.Table, mark: int) -> pa.Table:
    """The rows at or below the mark (a file named the old way may hold more, from a pass killed before its mark
    moved), each offset once (a fold killed after its rename folds its own file again with the parts)."""
    offsets = table["offset"].to_numpy()
    keep = offsets <= mark
    keep[1:] &= offsets[1:] != offsets[:-1]
    return table if keep.all() else table.filter(pa.array(keep))
