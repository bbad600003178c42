"""A child process that writes a consumer's alert files, so that creating them overlaps the consumer's own work.

Why a process and not a thread: each file costs four system calls (open, write, close, rename), and a thread has
to take the GIL back after every one of them. While the consumer's main thread prepares the next batch in
Python, CPython hands the GIL to a waiting thread only once per switch interval (5 ms), so a writer *thread*
crawled until the main thread stopped to wait for it, and the two halves of the pipeline ran one after the
other. A child process has an interpreter of its own: the kernel's file creation and the consumer's Python run on
two cores. (The stamp fetchers need none of this: they are processes already.)

The protocol, over the child's stdin and stdout: each request is a length-prefixed pickle of ``[(path, bytes),
...]``; the child writes the files in order with ``atomic_write`` and answers with a length-prefixed pickle of
``[(size, md5), ...]`` of the files (the sync manifest's MD5s are computed here, beside the consumer: for Avro
packets, ~160 kB an alert, they were a sixth of the consumer's time) or ``(errno, text)`` of the error (``wait`` raises
``LocalTroubleError`` for a full disk and the like, which the consumer waits out, ``FileWriterError`` otherwise).
Answers come in the order of the requests. The child ignores SIGINT and SIGTERM (on those the consumer
finishes its batch, which needs the child, then closes the pipe), exits at the end of its input, and is killed
with its parent (``PR_SET_PDEATHSIG``), so that no file of a consumer killed with -9 is written after its
successor started. Its temporary files carry its own pid, which ``remove_stale_temporaries`` checks like any
other.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
from typing import IO

from ztfd import lifecycle
from ztfd.files import atomic_write, md5_hex, write_all
from ztfd.localtrouble import LOCAL_ERRNOS, LocalTroubleError
from ztfd.procs import die_with_parent

HEADER = struct.Struct(">Q")
PIPE_BYTES = 1024 * 1024  # the size asked for the pipe to the child
CLOSE_TIMEOUT = 30.0  # seconds the child may take to finish what it was given once its input is closed


class FileWriterError(RuntimeError):
    """The child could not write a batch, or is gone: the consumer stops without storing that batch."""


class FileWriter:
    """The consumer's side of the child: ``submit`` batches, ``wait`` for them in order.

    The child starts at the first ``submit``; ``close`` ends it after it has answered everything submitted.
    """

    def __init__(self) -> None:
        self._child: subprocess.Popen[bytes] | None = None
        self.pending = 0

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    def start(self) -> None:
        """Start the child now (the consumer does at start, so that its first batch does not wait for it)."""
        if self._child is None:
            self._start()

    def submit(self, files: list[tuple[str, bytes]]) -> None:
        """Hand the child a batch of (absolute path, bytes). Blocks only while the child is busy reading
        (the pipe holds ``PIPE_BYTES``), i.e. until it has finished the batch before."""
        child = self._child or self._start()
        assert child.stdin is not None
        payload = pickle.dumps(files, protocol=pickle.HIGHEST_PROTOCOL)
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

    def wait(self) -> list[tuple[int, str]]:
        """Block until the oldest batch submitted is on disk: the size and MD5 of each of its files, in order;
        raise if the child failed to write it."""
        if not self.pending or self._child is None or self._child.stdout is None:
            raise FileWriterError("no batch is waiting to be written")
        answer = _read_frame(self._child.stdout)
        if answer is None:
            raise self._gone()
        self.pending -= 1
        result = pickle.loads(answer)
        if isinstance(result, tuple):
            code, text = result
            if code in LOCAL_ERRNOS:
                raise LocalTroubleError(f"writing alert files failed: {text}")
            raise FileWriterError(f"writing alert files failed: {text}")
        return result

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
            [sys.executable, "-m", "ztfd.filewriter", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, close_fds=True,
        )
        assert self._child.stdin is not None
        # A batch of Avro packets is megabytes: through a 64 KiB pipe the consumer waited on the child's every
        # read. Linux lets a pipe grow to /proc/sys/fs/pipe-max-size (1 MiB by default); elsewhere it stays.
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(self._child.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        return self._child

    def _gone(self) -> FileWriterError:
        child = self._child
        code = child.poll() if child is not None else None
        pid = child.pid if child is not None else None
        return FileWriterError(f"the alert-file writer (pid {pid}) has exited (code {code})")


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


def serve(requests: IO[bytes], answers: IO[bytes]) -> None:
    """The child's loop: write each batch, answer, until the end of input."""
    while (frame := _read_frame(requests)) is not None:
        result: list[tuple[int, str]] | tuple[int | None, str] = []
        try:
            for path, data in pickle.loads(frame):
                atomic_write(path, data)
                result.append((len(data), md5_hex(data)))
        except OSError as exc:
            result = (exc.errno, f"{exc.strerror or exc} ({exc.filename})" if exc.filename else str(exc))
        answer = pickle.dumps(result)
        try:
            write_all(answers.fileno(), HEADER.pack(len(answer)) + answer)
        except BrokenPipeError:  # the consumer is gone and wants no answer
            return


def main() -> None:
    lifecycle.ignore(lifecycle.STOP_SIGNALS)  # the consumer's stop needs us: we end at the end of input
    if not die_with_parent(int(sys.argv[1]), signal.SIGKILL):  # the consumer is already gone
        os._exit(0)
    with open(0, "rb", buffering=0, closefd=False) as requests, open(1, "wb", buffering=0, closefd=False) as answers:
        serve(requests, answers)


if __name__ == "__main__":
    main()
