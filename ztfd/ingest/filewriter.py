"""A child process that writes a consumer's batches, files first and then the batch's store transaction, so that
both overlap the consumer's own work (decoding and dating the next batch).

Why a process and not a thread: each file costs four system calls (open, write, close, rename), and sqlite3 gives
up and takes back the GIL at every row it steps; a thread has to take the GIL back after every one of them. While
the consumer's main thread prepares the next batch in Python, CPython hands the GIL to a waiting thread only once
per switch interval (5 ms), so a writer *thread* crawled until the main thread stopped to wait for it, and the two
halves of the pipeline ran one after the other. A child process has an interpreter of its own: the kernel's file
creation, SQLite and the consumer's Python run on two cores. With the store transaction on the main thread, the
main thread was the limit on a fast disk (bin/bench ingest on tmpfs: 0.82x the naive writer); here it runs beside.

The protocol, over the child's stdin and stdout: each request is a length-prefixed pickle of ``(root, [(path,
bytes), ...], batch.packed(), epoch)``; the child writes the files in order (under ``root`` when it is not empty),
then, if ``batch`` (a ``store.batches.BatchToStore``) is given, stores it with the files' sizes and MD5s
in one transaction (the sync manifest's MD5s are computed here: for Avro packets, ~160 kB an alert, they were a
sixth of the consumer's time), and writes the stored alerts' lines to the topic's alert log (``<topic>.log``). It
answers with a length-prefixed pickle of ``("written", [(size, md5), ...], stored, log error)`` (the digests only
when no store part was given: the store has them otherwise, and an answer of a few bytes per file could fill the
pipe back while the consumer waits to submit), ``("failed", local, text)`` or
``("skipped",)``. Answers come in the order of the requests.

Batches are stored in order, each after its files, and never one after a batch that failed: once a request fails,
the child skips (writes and stores nothing of) every later request of the same *epoch*; the consumer's side moves
to the next epoch when it reads the failure, so what it submits after that is written again. Without this a batch
queued behind one that hit a full disk could be stored, moving the offsets past the one that was not.

``wait`` raises ``LocalTroubleError`` for a full disk, a locked store and the like (``localtrouble.is_local``),
which the consumer waits out, and ``FileWriterError`` otherwise. The child ignores SIGINT and SIGTERM (on those the
consumer finishes its batch, which needs the child, then closes the pipe), exits at the end of its input, and is
killed with its parent (``PR_SET_PDEATHSIG``), so that no file or transaction of a consumer killed with -9 comes
after its successor started (a transaction cut short rolls back). Its temporary files carry its own pid, which
``remove_stale_temporaries`` checks like any other.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pickle
import select
import signal
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path
from typing import IO, Any, NamedTuple

from ztfd import store
from ztfd.daemon import lifecycle
from ztfd.daemon.localtrouble import LocalTroubleError, describe, is_local
from ztfd.daemon.procs import die_with_parent
from ztfd.files import atomic_write, create_new, md5_hex, write_all
from ztfd.ingest.journal import WriteJournal, is_direct, journal_folder
from ztfd.logs import AlertLog
from ztfd.store.batches import BatchToStore, StoredBatch, store_batch

HEADER = struct.Struct(">Q")
PIPE_BYTES = 1024 * 1024  # the size asked for the pipe to the child
CLOSE_TIMEOUT = 90.0  # seconds the child may take to finish what it was given once its input is closed
# (a store transaction may wait up to the store's 60 s busy timeout for another writer)


class FileWriterError(RuntimeError):
    """The child could not write or store a batch, or is gone: the consumer stops without that batch."""


class BatchSkippedError(FileWriterError):
    """Nothing of this batch was written: an earlier one failed (the consumer submits it again, or stops)."""


class AlertLogSettings(NamedTuple):
    """Where the child writes the topic's alert log (``logs.AlertLog``) once a batch is stored."""

    logs_dir: str
    max_bytes: int
    backup_count: int


class Written(NamedTuple):
    """A batch on disk: without a store part, the (size, MD5) of each of its files, in order; with one, what its
    store transaction did (``stored``; ``digests`` is then empty: the manifest has them)."""

    digests: list[tuple[int, str]]
    stored: StoredBatch | None
    log_error: str | None = None  # why the alert log's lines of the batch could not be written


class FileWriter:
    """The consumer's side of the child: ``submit`` batches, ``wait`` for them in order.

    The child starts at the first ``submit`` (or ``start``); ``close`` ends it after it has answered everything
    submitted. ``db_path`` is the store the batches given to ``submit`` are stored in.
    """

    def __init__(self, db_path: Path | None = None, topic: str = "", alert_log: AlertLogSettings | None = None
                 ) -> None:
        self.db_path = db_path
        self.topic = topic  # with a store: its alert files are created under their final names, journaled
        self.alert_log = alert_log  # with a store: the stored alerts' lines are written by the child
        self._child: subprocess.Popen[bytes] | None = None
        self.pending = 0
        self.epoch = 0  # moves on at each failure read: see the module's docstring

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    def start(self) -> None:
        """Start the child now (the consumer does at start, so that its first batch does not wait for it)."""
        if self._child is None:
            self._start()

    def submit(self, files: list[tuple[str, bytes]], batch: BatchToStore | None = None, root: str = "") -> None:
        """Hand the child a batch: its files as (path, bytes), paths under ``root`` (absolute when it is empty),
        and what to store once they are written. Blocks only while the child is busy reading (the pipe holds
        ``PIPE_BYTES``), i.e. until it has finished the batch before."""
        child = self._child or self._start()
        assert child.stdin is not None
        packed = batch.packed() if batch is not None else None
        payload = pickle.dumps((root, files, packed, self.epoch), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            write_all(child.stdin.fileno(), HEADER.pack(len(payload)) + payload)
        except BrokenPipeError:
            raise self._gone() from None
        self.pending += 1

    def answered(self) -> bool:
        """True if the oldest batch submitted is finished (``wait`` will not block)."""
        if not self.pending or self._child is None or self._child.stdout is None:
            return False
        readable, _, _ = select.select([self._child.stdout], [], [], 0)
        return bool(readable)

    def wait(self) -> Written:
        """Block until the oldest batch submitted is written (and stored, if asked); raise if it was not."""
        if not self.pending or self._child is None or self._child.stdout is None:
            raise FileWriterError("no batch is waiting to be written")
        answer = _read_frame(self._child.stdout)
        if answer is None:
            self.pending = 0  # nothing more will be answered
            raise self._gone()
        self.pending -= 1
        kind, *rest = pickle.loads(answer)
        if kind == "written":
            return Written(*rest)
        if kind == "skipped":
            raise BatchSkippedError("not written: a batch before it failed")
        self.epoch += 1  # what is submitted from now on is written again
        local, text = rest
        if local:
            raise LocalTroubleError(f"writing alerts failed: {text}")
        raise FileWriterError(f"writing alerts failed: {text}")

    def close(self) -> None:
        """End the child (it finishes what it was given first). Safe to call more than once."""
        child, self._child = self._child, None
        self.pending = 0
        if child is None:
            return
        if child.stdin is not None:
            child.stdin.close()  # the child's end of input: it answers what it holds, then exits
        lifecycle.terminate([child], CLOSE_TIMEOUT)  # it ignores the SIGTERM: only a hung child is killed
        if child.stdout is not None:
            child.stdout.close()

    def _start(self) -> subprocess.Popen[bytes]:
        self._child = subprocess.Popen(
            [sys.executable, "-m", "ztfd.ingest.filewriter", str(os.getpid()), str(self.db_path or ""), self.topic,
             json.dumps(self.alert_log)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, close_fds=True,
        )
        assert self._child.stdin is not None
        # A batch of Avro packets is megabytes: through a 64 KiB pipe the consumer waited on the child's every
        # read. Linux lets a pipe grow to /proc/sys/fs/pipe-max-size (1 MiB by default); elsewhere it stays.
        # The answers' pipe too: a child blocked on a full one while the consumer blocks submitting is a deadlock.
        for pipe in (self._child.stdin, self._child.stdout):
            with contextlib.suppress(OSError, AttributeError):
                fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        return self._child

    def _gone(self) -> FileWriterError:
        child = self._child
        code = child.poll() if child is not None else None
        pid = child.pid if child is not None else None
        return FileWriterError(f"the alert writer (pid {pid}) has exited (code {code})")


def _read_frame(stream: IO[bytes]) -> bytes | None:
    """One length-prefixed frame, or None at the end of the stream."""
    header = _read_exactly(stream, HEADER.size)
    if header is None:
        return None
    return _read_exactly(stream, HEADER.unpack(header)[0])


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    chunks = []
    while size:
        chunk = stream.read(size)
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


class _Child:
    """The child's state: the store it opens at the first batch to store, and the epoch whose later requests it
    skips after a failure."""

    def __init__(self, db_path: str, topic: str = "", alert_log: AlertLogSettings | None = None) -> None:
        self.db_path = db_path
        self.topic = topic
        self.conn: sqlite3.Connection | None = None
        self.failed_epoch = -1
        self.alert_log = AlertLog(Path(alert_log.logs_dir), topic, alert_log.max_bytes, alert_log.backup_count
                                  ) if alert_log is not None and topic else None
        self.journal = (WriteJournal(journal_folder(Path(db_path).parent), topic, os.getpid())
                        if db_path and topic else None)

    def handle(self, root: str, files: list[tuple[str, bytes]], packed: tuple[Any, ...] | None, epoch: int
               ) -> tuple[Any, ...]:
        if epoch <= self.failed_epoch:
            return ("skipped",)
        batch = BatchToStore.unpacked(packed) if packed is not None else None
        try:
            direct = self._journaled(batch)
            digests = []
            for path, data in files:
                full = f"{root}/{path}" if root else path
                if path in direct:
                    create_new(full, data)
                else:
                    atomic_write(full, data)
                digests.append((len(data), md5_hex(data)))
            if batch is not None:
                stored = self._store(batch, files, digests)
                if self.journal is not None:
                    self.journal.stored()
                return ("written", [], stored, self._log(batch, stored))
        except Exception as exc:  # reported to the consumer, which decides; the child goes on
            self.failed_epoch = epoch
            return ("failed", is_local(exc), describe(exc))
        return ("written", digests, None)

    def _log(self, batch: BatchToStore, stored: StoredBatch) -> str | None:
        """The ``<topic>.log`` lines of the alerts the batch stored; why they could not be written, if so."""
        if self.alert_log is None:
            return None
        lines = [f"{alert.object_id} {alert.date} {batch.topic}[{alert.partition}]@{alert.kafka_offset} {alert.path}"
                 for alert in (batch.alerts[index].alert for index in stored.accepted)]
        try:
            self.alert_log.write(lines)
        except OSError as exc:
            return describe(exc)
        return None

    def _journaled(self, batch: BatchToStore | None) -> set[str]:
        """The batch's files to create under their final names, listed in the journal first (none without one)."""
        if self.journal is None or batch is None:
            return set()
        entries = [(entry.alert.partition, entry.alert.generation, entry.alert.kafka_offset, path)
                   for entry in batch.alerts for path in entry.files if is_direct(path)]
        self.journal.begin(entries)
        return {path for *_, path in entries}

    def _store(self, batch: BatchToStore, files: list[tuple[str, bytes]], digests: list[tuple[int, str]]
               ) -> StoredBatch:
        if self.conn is None:
            if not self.db_path:
                raise FileWriterError("no store to store the batch in")
            self.conn = store.connect(Path(self.db_path))
        return store_batch(self.conn, batch, {path: digest for (path, _), digest in zip(files, digests, strict=True)})

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self.journal is not None:
            self.journal.end()
        if self.alert_log is not None:
            self.alert_log.close()


def serve(requests: IO[bytes], answers: IO[bytes], db_path: str = "", topic: str = "",
          alert_log: AlertLogSettings | None = None) -> None:
    """The child's loop: write (and store) each batch, answer, until the end of input."""
    child = _Child(db_path, topic, alert_log)
    try:
        while (frame := _read_frame(requests)) is not None:
            answer = pickle.dumps(child.handle(*pickle.loads(frame)), protocol=pickle.HIGHEST_PROTOCOL)
            try:
                write_all(answers.fileno(), HEADER.pack(len(answer)) + answer)
            except BrokenPipeError:  # the consumer is gone and wants no answer
                return
    finally:
        child.close()


def main() -> None:
    lifecycle.ignore(lifecycle.STOP_SIGNALS)  # the consumer's stop needs us: we end at the end of input
    if not die_with_parent(int(sys.argv[1]), signal.SIGKILL):  # the consumer is already gone
        os._exit(0)
    with open(0, "rb", buffering=0, closefd=False) as requests, open(1, "wb", buffering=0, closefd=False) as answers:
        settings = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
        serve(requests, answers, *sys.argv[2:4], AlertLogSettings(*settings) if settings else None)


if __name__ == "__main__":
    main()
