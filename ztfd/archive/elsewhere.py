"""Archive rows another host of the fleet has already put in the bucket (``kafka.assignment = "group"``).

A host's commit can lag behind its archive rows in the bucket: its part files are uploaded while stamp jobs of
later alerts still hold the partition's commit back. When it is lost, the host that takes the partition over reads
those messages again from the commit and would write their rows a second time, in a file whose range only partly
meets the first one's (neither supersedes the other). So, before the archiver writes rows of a partition that moved
to or from this host (``store.archive_marks.note_moved``, recorded by the consumer at every hand-in and hand-back),
it lists that partition generation's files in the bucket's folder of the night it writes to, once per folder and
move, reads the offset column of the files that are not its own and may hold the offsets it writes (their names
say which), and leaves those rows out: they are durable in S3 already, written from the same messages.

The rows left out are not in this host's files, so no file of its may be named over them: a range that holds
another host's file's range would make readers take that file as folded into it (``layout.superseded``). The
writer's parts and compaction's folds are cut where another host's offsets lie between (``runs``).

What one listing cannot see is a lost host's upload just after it: left to the readers, ``ztfd.archive`` counts a
row once where file names overlap (``layout.overlapping``). A host that hands a partition back never uploads its
rows past the commit (``ztfd.archive.handedback``).
"""

from __future__ import annotations

import bisect
import logging
import sqlite3
from collections.abc import Collection, Sequence
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import pyarrow.parquet as pq

from ztfd import files
from ztfd.archive.layout import Layout, alerts_file
from ztfd.config import Config
from ztfd.store import archive_marks, deletions
from ztfd.store.archive_marks import PartitionKey

log = logging.getLogger(__name__)

MAX_FOLDERS = 256  # listings kept (a partition generation's night folder each)


class Listing(NamedTuple):
    moved: int  # the partition's move count it was made after
    lowest: int  # the offsets it holds are those at or above this one
    offsets: frozenset[int]


def bucket_filesystem(cfg: Config) -> Any:
    """pyarrow's S3 filesystem on ``s3.endpoint_url`` (or AWS) in ``s3.region``; the standard credential chain."""
    from pyarrow import fs

    options: dict[str, str] = {}
    if cfg.s3.endpoint_url:
        url = urlsplit(cfg.s3.endpoint_url)
        options.update(endpoint_override=url.netloc, scheme=url.scheme or "https")
    if cfg.s3.region:
        options["region"] = cfg.s3.region
    return fs.S3FileSystem(**options)


class Elsewhere:
    """The offsets of a partition generation's night that other hosts' files in the bucket hold."""

    def __init__(self, cfg: Config, conn: sqlite3.Connection, filesystem: Any = None) -> None:
        self.cfg = cfg
        self.conn = conn
        self.layout = Layout(cfg.home)
        self.root = f"{cfg.s3.bucket}/{cfg.s3.prefix}".rstrip("/")
        self._filesystem = filesystem
        self._listings: dict[tuple[PartitionKey, str], Listing] = {}

    @property
    def filesystem(self) -> Any:
        if self._filesystem is None:
            self._filesystem = bucket_filesystem(self.cfg)
        return self._filesystem

    def held(self, key: PartitionKey, date: str, lowest: int) -> frozenset[int]:
        """The offsets of ``key`` at or above ``lowest`` in night ``date`` that another host's files in the bucket
        hold; none for a partition that never moved (outside fleet mode). One listing per folder and move."""
        moved = archive_marks.moves(self.conn, key.topic).get(key.partition)
        if moved is None:
            return frozenset()
        found = self._listings.pop((key, date), None)
        if found is None or found.moved != moved or found.lowest > lowest:
            found = Listing(moved, lowest, self._read(key, date, lowest))
        self._listings[(key, date)] = found  # the newest last: the oldest go first
        while len(self._listings) > MAX_FOLDERS:
            del self._listings[next(iter(self._listings))]
        return found.offsets

    def _read(self, key: PartitionKey, date: str, lowest: int) -> frozenset[int]:
        """One LIST of the night's folder in the bucket; the offset column of the files that are not this host's (on
        its disk, or replaced and waiting for their deletion from S3) and whose names reach ``lowest``."""
        from pyarrow import fs

        folder = self.layout.alerts_folder(date, key.topic)
        relative = files.relative_to_home(self.layout.home, folder)
        replaced = deletions.requested_under(self.conn, relative + "/")
        listed = self.filesystem.get_file_info(fs.FileSelector(f"{self.root}/{relative}", allow_not_found=True))
        offsets: set[int] = set()
        read = []
        for info in listed:
            named = alerts_file(info.base_name)
            if (named is None or (named.partition, named.generation) != (key.partition, key.generation)
                    or (named.last is not None and named.last < lowest) or (folder / info.base_name).exists()
                    or f"{relative}/{info.base_name}" in replaced):
                continue
            column = pq.read_table(info.path, columns=["offset"], filesystem=self.filesystem)["offset"]
            offsets.update(offset for offset in column.to_pylist() if offset >= lowest)
            read.append(info.base_name)
        if offsets:
            log.info("archive: %s [%d] generation %d moved: %d rows of night %s from offset %d are in the bucket "
                     "already, in another host's files (%s): not written again", key.topic, key.partition,
                     key.generation, len(offsets), date, lowest, ", ".join(read))
        return frozenset(offsets)




def runs(spans: Sequence[tuple[int, int]], held: Collection[int]) -> list[tuple[int, int]]:
    """``spans`` (first and last offsets of rows or files, ascending, holding none of the ``held`` offsets) cut
    into runs, as ``(start, stop)`` index ranges, so that no ``held`` offset lies between two spans of a run: each
    run can be one file, named by its range."""
    if not spans:
        return []
    ordered = sorted(held)
    found, start = [], 0
    for index in range(1, len(spans)):
        after = bisect.bisect_right(ordered, spans[index - 1][1])
        if after < len(ordered) and ordered[after] < spans[index][0]:
            found.append((start, index))
            start = index
    found.append((start, len(spans)))
    return found
