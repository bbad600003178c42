"""The file writer's journal: the alert files of the batch it is writing, so that a batch cut short is found.

Why: the consumer's file writer creates each alert file under its final name (``files.create_new``: an open, a
write and a close, about half the kernel's work of a temporary file and a rename, which was most of the writer's
time on ``bin/bench ingest``). A kill -9 or a full disk in the middle of a batch can then leave a torn file under an
alert's name. Nothing reads such a file before the store records its alert: the syncer, the archive and the report
read what the store lists. Only ``sync --full`` walks the tree. So before each batch the writer lists the batch's
files here, and keeps them listed until the batch is stored (a batch that failed stays listed when the writer ends):

- at start, a consumer removes the files listed by its topic's dead writers whose alerts the store does not hold
  (``sweep``): Kafka delivers their messages again and they are written again, whole;
- ``sync --full`` leaves every listed file alone that the manifest does not know (``listed_paths``).

``<home>/state/writing/<topic>.<writer pid>`` (a long topic name shortened as its alert log's), one line per
file: ``<partition> <generation> <offset> <path>``
(path under home), rewritten for each batch: the batch before it is stored by then (the writer stores batches in
order, each after its files). Only files under ``data/`` are listed: a cutout under ``images/`` may also be a stamp
fetcher's file, and is written through a temporary as before. Every living writer of a topic holds a shared lock on
``<topic>.lock`` beside its journal; a sweep holds it exclusively, so it never runs while another consumer of the
same topic (against the same home) may be writing one of the files it would remove.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

from ztfd.daemon.procs import pid_alive
from ztfd.files import write_all
from ztfd.logs import log_file_name

log = logging.getLogger(__name__)

FOLDER = "writing"  # under the home's state folder
LOCK_SUFFIX = ".lock"
DIRECT_PREFIX = "data/"  # the files created under their final name (and so journaled)

# (partition, generation, lowest offset, highest offset) -> the offsets of that span the store holds
StoredLookup = Callable[[int, int, int, int], Iterable[int]]


def journal_folder(state_dir: Path) -> Path:
    return state_dir / FOLDER


def is_direct(path: str) -> bool:
    """True for a file the writer creates under its final name (and lists in its journal first)."""
    return path.startswith(DIRECT_PREFIX)


class WriteJournal:
    """The journal of one file writer (``pid``) of one topic; it holds the topic's writers' lock while it lives."""

    def __init__(self, folder: Path, topic: str, pid: int) -> None:
        self.folder = folder
        self.path = folder / f"{_stem(topic)}.{pid}"
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = _open_lock(folder, topic)
        fcntl.flock(self._lock, fcntl.LOCK_SH)
        self.open_batch = False  # a batch listed and not yet stored

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
        self.open_batch = True

    def stored(self) -> None:
        """The batch listed last is stored: its files are the store's."""
        self.open_batch = False

    def end(self) -> None:
        """The writer is done (its input closed). Its journal goes unless a batch it listed was not stored (it
        failed, and the consumer stopped before handing it over again): then the next sweep removes its files."""
        if not self.open_batch:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        os.close(self._lock)


def _open_lock(folder: Path, topic: str) -> int:
    return os.open(folder / f"{_stem(topic)}{LOCK_SUFFIX}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _stem(topic: str) -> str:
    """The topic's part of the journal's names: the topic, shortened as the alert log's name is when a long one
    (Kafka allows 249 characters) would leave no room for ``.<pid>`` within 255 bytes."""
    return log_file_name(topic, "")


def _entries(path: Path) -> list[tuple[int, int, int, str]]:
    entries = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            fields = line.split(" ", 3)
            if len(fields) == 4 and all(f.isdigit() for f in fields[:3]) and _plain_path(fields[3]):
                entries.append((int(fields[0]), int(fields[1]), int(fields[2]), fields[3]))
    return entries


def _plain_path(path: str) -> bool:
    """A file under ``data/`` named as the writer names them (a line cut short by a kill may name a folder)."""
    parts = path.split("/")
    return is_direct(path) and len(parts) == 4 and all(part not in ("", ".", "..") for part in parts)


def _writer_pid(path: Path) -> int | None:
    pid = path.name.rsplit(".", 1)[-1]
    return int(pid) if pid.isdigit() else None


def sweep(home: Path, state_dir: Path, topic: str, stored: StoredLookup) -> int:
    """Remove the files that the topic's dead writers listed and whose alerts the store does not hold, then their
    journals; nothing while another writer of the topic lives (the lock: see the module's docstring). The number
    of files removed."""
    folder = journal_folder(state_dir)
    if not folder.is_dir():
        return 0
    lock = _open_lock(folder, topic)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another writer of %s is alive: the journals of dead ones wait for a sweep without it", topic)
            return 0
        removed = 0
        stem = _stem(topic)
        for path in folder.glob(f"{glob.escape(stem)}.*"):
            pid = _writer_pid(path)
            if pid is None or path.name != f"{stem}.{pid}" or pid_alive(pid):
                continue
            removed += _remove_unstored(home, _entries(path), stored)
            path.unlink()  # a sweeper killed before this line sweeps it again next time: the same files
    finally:
        os.close(lock)  # the lock goes with it
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
                try:
                    (home / path).unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
                except OSError as exc:  # a folder where a file was listed, a read-only disk: left for later
                    log.warning("could not remove %s, listed by a writer killed mid-batch: %s", path, exc)
    return removed


def listed_paths(state_dir: Path) -> set[str]:
    """Every path any writer's journal lists (a batch being written, or cut short and not yet swept)."""
    found: set[str] = set()
    with contextlib.suppress(FileNotFoundError):
        for path in journal_folder(state_dir).iterdir():
            if not path.name.endswith(LOCK_SUFFIX):
                found.update(entry[3] for entry in _entries(path))
    return found
