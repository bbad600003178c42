"""The file writer's journal: the alert files of the batch it is writing, so that a batch cut short is found.

Why: the consumer's file writer creates each alert file under its final name (``files.create_new``: an open, a
write and a close, about half the kernel's work of a temporary file and a rename, which was most of the writer's
time on ``bin/bench ingest``). A kill -9 in the middle of a batch can then leave a torn file under an alert's
name. Nothing reads such a file before the store records its alert: the syncer, the archive and the report read
what the store lists. Only ``sync --full`` walks the tree. So before each batch the writer lists the batch's files
here, and

- at start, a consumer removes the files listed by its topic's dead writers whose alerts the store does not hold
  (``sweep``): Kafka delivers their messages again and they are written again, whole;
- ``sync --full`` leaves every listed file alone that the manifest does not know (``listed_paths``).

``<home>/state/writing/<topic>.<writer pid>``, one line per file: ``<partition> <generation> <offset> <path>``
(path under home), rewritten for each batch: the batch before it is stored by then (the writer stores batches in
order, each after its files). Only files under ``data/`` are listed: a cutout under ``images/`` may also be a stamp
fetcher's file, and is written through a temporary as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

from ztfd.daemon.procs import pid_alive
from ztfd.files import write_all

log = logging.getLogger(__name__)

FOLDER = "writing"  # under the home's state folder
DIRECT_PREFIX = "data/"  # the files created under their final name (and so journaled)

# (partition, generation, lowest offset, highest offset) -> the offsets of that span the store holds
StoredLookup = Callable[[int, int, int, int], Iterable[int]]


def journal_folder(state_dir: Path) -> Path:
    return state_dir / FOLDER


def is_direct(path: str) -> bool:
    """True for a file the writer creates under its final name (and lists in its journal first)."""
    return path.startswith(DIRECT_PREFIX)


class WriteJournal:
    """The journal of one file writer (``pid``) of one topic."""

    def __init__(self, folder: Path, topic: str, pid: int) -> None:
        self.folder = folder
        self.path = folder / f"{topic}.{pid}"

    def begin(self, entries: list[tuple[int, int, int, str]]) -> None:
        """List a batch's files, (partition, generation, offset, path), before any of them is written."""
        data = "".join(f"{partition} {generation} {offset} {path}\n"
                       for partition, generation, offset, path in entries).encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)

    def end(self) -> None:
        """The writer is done (its input closed): every batch it listed is stored or was refused."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _entries(path: Path) -> list[tuple[int, int, int, str]]:
    entries = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            fields = line.split(" ", 3)
            if len(fields) == 4 and all(f.isdigit() for f in fields[:3]) and is_direct(fields[3]):
                entries.append((int(fields[0]), int(fields[1]), int(fields[2]), fields[3]))
    return entries


def _writer_pid(path: Path) -> int | None:
    pid = path.name.rsplit(".", 1)[-1]
    return int(pid) if pid.isdigit() else None


def sweep(home: Path, state_dir: Path, topic: str, stored: StoredLookup) -> int:
    """Remove the files that the topic's dead writers listed and whose alerts the store does not hold; each such
    journal is claimed (renamed) first, so that two consumers starting together do not both act on it. The number
    of files removed."""
    folder = journal_folder(state_dir)
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for path in folder.glob(f"{topic}.*"):
            pid = _writer_pid(path)
            if pid is None or path.name != f"{topic}.{pid}" or pid_alive(pid):
                continue
            claimed = path.with_name(f".{path.name}.sweeping-{os.getpid()}")
            try:
                os.rename(path, claimed)
            except FileNotFoundError:
                continue  # another consumer claimed it
            removed += _remove_unstored(home, _entries(claimed), stored)
            claimed.unlink()
    if removed:
        log.info("removed %d alert files that a writer killed in the middle of a batch left unstored (they are "
                 "written again when Kafka delivers them again)", removed)
    return removed


def _remove_unstored(home: Path, entries: list[tuple[int, int, int, str]], stored: StoredLookup) -> int:
    spans: dict[tuple[int, int], list[tuple[int, str]]] = defaultdict(list)
    for partition, generation, offset, path in entries:
        spans[(partition, generation)].append((offset, path))
    removed = 0
    for (partition, generation), items in spans.items():
        offsets = [offset for offset, _ in items]
        held = set(stored(partition, generation, min(offsets), max(offsets)))
        for offset, path in items:
            if offset not in held:
                with contextlib.suppress(FileNotFoundError):
                    (home / path).unlink()
                    removed += 1
    return removed


def listed_paths(state_dir: Path) -> set[str]:
    """Every path any writer's journal lists (a batch being written, or cut short and not yet swept)."""
    found: set[str] = set()
    with contextlib.suppress(FileNotFoundError):
        for path in journal_folder(state_dir).iterdir():
            found.update(entry[3] for entry in _entries(path))
    return found
