"""Where the archive's files are under a ztfd home (``archive/``), and the alerts dataset's schema file."""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ztfd import files

if TYPE_CHECKING:
    import pyarrow as pa

ARCHIVE = "archive"
COMMON_METADATA = "_common_metadata"
ALERTS_FILE = re.compile(r"^p(\d+)-g(\d+)-o(\d+)(?:-(\d+))?\.parquet$")
STAMPS_FILE = "stamps.parquet"  # a night's stamps file on one host; in a fleet, the fleet's index of the night


class AlertsFile(NamedTuple):
    """What an alerts file's name says it holds: partition ``p``, generation ``g``, offsets ``first`` to ``last``
    (``last`` None for a file named by its block alone, as ztfd named them before its part files)."""

    partition: int
    generation: int
    first: int
    last: int | None


def alerts_file_name(partition: int, generation: int, first: int, last: int) -> str:
    """``p<P>-g<G>-o<first>-<last>.parquet``: the offsets the file holds, the first and last of them (12 digits)."""
    return f"p{partition}-g{generation}-o{first:012d}-{last:012d}.parquet"


def alerts_file(name: str) -> AlertsFile | None:
    found = ALERTS_FILE.match(name)
    if found is None:
        return None
    return AlertsFile(int(found[1]), int(found[2]), int(found[3]), None if found[4] is None else int(found[4]))


def superseded(names: Iterable[str]) -> set[str]:
    """The files of one folder whose offsets another file there holds too (its range lies within another's): the
    parts a compaction has just folded into one file, before they are deleted. A reader leaves them out."""
    ranges: dict[tuple[int, int], list[tuple[int, int, str]]] = defaultdict(list)
    for name in names:
        held = alerts_file(name)
        if held is not None and held.last is not None:
            ranges[(held.partition, held.generation)].append((held.first, held.last, name))
    found = set()
    for spans in ranges.values():
        for first, last, name in spans:
            if any(other != name and low <= first and last <= high for low, high, other in spans):
                found.add(name)
    return found


def overlapping(names: Iterable[str]) -> set[str]:
    """The files of one folder whose offsets meet another file's there while neither range lies within the other
    (the files ``superseded`` left out first). In a fleet, the host that took a partition over and the one it took
    it from may both have put rows of some offsets in the bucket (docs/fleet.md): a reader counts the rows of these
    files once per (partition, generation, offset). Names alone tell: the common case reads nothing more."""
    names = list(names)
    gone = superseded(names)
    ranges: dict[tuple[int, int], list[tuple[int, int, str]]] = defaultdict(list)
    for name in names:
        held = alerts_file(name)
        if held is not None and held.last is not None and name not in gone:
            ranges[(held.partition, held.generation)].append((held.first, held.last, name))
    found = set()
    for spans in ranges.values():
        spans.sort()
        reach, reaching = -1, ""  # the furthest last offset of the files before, and its file
        for first, last, name in spans:
            if first <= reach:
                found.update((name, reaching))
            if last > reach:
                reach, reaching = last, name
    return found


class Layout:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.root = home / ARCHIVE
        self.alerts = self.root / "alerts"
        self.stamps = self.root / "stamps"
        self.schemas = self.root / "schemas"
        self.lock = self.root / ".lock"

    def alerts_night(self, date: str) -> Path:
        return self.alerts / f"night={date}"

    def alerts_folder(self, date: str, topic: str) -> Path:
        return self.alerts_night(date) / f"topic={topic}"

    def stamps_file(self, date: str, writer: str = "") -> Path:
        """``stamps.parquet``, or in a fleet ``stamps-<writer>.parquet``: each host's own (``stamps.writer_name``)."""
        return self.stamps / f"night={date}" / (f"stamps-{writer}.parquet" if writer else STAMPS_FILE)

    def schema_file(self, schema: dict[str, Any]) -> Path:
        """``archive/schemas/<sha256 of the schema's canonical JSON, 16 hex>.avsc``."""
        text = json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()
        return self.schemas / f"{hashlib.sha256(text).hexdigest()[:16]}.avsc"

    @property
    def alerts_schema_path(self) -> Path:
        return self.alerts / COMMON_METADATA

    def read_alerts_schema(self) -> pa.Schema | None:
        try:
            return _parquet().read_schema(self.alerts_schema_path)
        except FileNotFoundError:
            return None

    def write_alerts_schema(self, schema: pa.Schema) -> tuple[str, int, str]:
        """Write the dataset's schema file; its manifest row."""
        buffer = io.BytesIO()
        _parquet().write_metadata(schema, buffer)
        data = buffer.getvalue()
        files.atomic_write(self.alerts_schema_path, data)
        return files.relative_to_home(self.home, self.alerts_schema_path), len(data), files.md5_hex(data)


def _parquet() -> Any:
    """pyarrow.parquet, imported when a schema file is read or written: the syncer reads the layout's names only,
    and pyarrow would be ~45 MB of its memory."""
    import pyarrow.parquet

    return pyarrow.parquet
