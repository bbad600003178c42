"""The consumer's alert-file writer: a real child process, its answers, its failures and its lifetime."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import wait_until
from ztfd.filewriter import FileWriter, FileWriterError
from ztfd.procs import pid_alive


def test_batches_are_written_in_order_and_answered_one_by_one(tmp_path: Path) -> None:
    writer = FileWriter()
    try:
        first = [(f"{tmp_path}/2024-01-01/t/a{i}.json", f"first {i}".encode()) for i in range(300)]
        second = [(f"{tmp_path}/2024-01-02/t/a{i}.json", b"x" * 100_000) for i in range(3)]
        writer.submit(first)
        writer.submit(second)  # more than a pipe holds: the child reads while it works
        assert writer.pending == 2
        writer.wait()
        assert all(Path(path).read_bytes() == body for path, body in first)
        writer.wait()
        assert all(Path(path).read_bytes() == body for path, body in second)
        assert writer.pending == 0 and not writer.answered()
        assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    finally:
        writer.close()


def test_a_file_that_cannot_be_written_is_reported_and_the_writer_goes_on(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")
    writer = FileWriter()
    try:
        writer.submit([(f"{blocker}/a.json", b"{}")])
        with pytest.raises(FileWriterError, match="not-a-folder"):
            writer.wait()
        writer.submit([(f"{tmp_path}/b.json", b"{}")])
        writer.wait()
        assert (tmp_path / "b.json").read_bytes() == b"{}"
    finally:
        writer.close()


def test_a_writer_that_died_is_an_error_not_a_hang(tmp_path: Path) -> None:
    writer = FileWriter()
    try:
        writer.submit([(f"{tmp_path}/a.json", b"{}")])
        writer.wait()
        assert writer.pid is not None
        os.kill(writer.pid, signal.SIGKILL)
        with pytest.raises(FileWriterError, match="has exited"):
            writer.submit([(f"{tmp_path}/b.json", b"{}")] * 50_000)  # larger than a pipe: the write fails
            writer.wait()
    finally:
        writer.close()


def test_the_writer_ignores_sigterm_and_ends_when_its_input_does(tmp_path: Path) -> None:
    """On SIGTERM the consumer finishes its batch, which needs the writer: the signal must not stop it."""
    writer = FileWriter()
    writer.submit([(f"{tmp_path}/a.json", b"{}")])
    writer.wait()
    pid = writer.pid
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    writer.submit([(f"{tmp_path}/b.json", b"{}")])
    writer.wait()
    assert (tmp_path / "b.json").exists()
    writer.close()
    assert not pid_alive(pid)


def test_the_writer_dies_with_a_consumer_killed_with_minus_9(tmp_path: Path) -> None:
    """No file of a killed consumer may be written after its successor started."""
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from ztfd.filewriter import FileWriter\n"
         "w = FileWriter(); w.submit([(sys.argv[1], b'{}')]); w.wait(); print(w.pid, flush=True)\n"
         "sys.stdin.read()",
         str(tmp_path / "a.json")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert pid_alive(child)
        parent.kill()
        parent.wait(10)
        wait_until(lambda: not pid_alive(child), 10, "the writer to die with its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait(10)


def test_the_writer_answers_with_each_files_size_and_md5(tmp_path: Path) -> None:
    """The sync manifest's MD5s are the child's: of the bytes it wrote, in the order given."""
    import hashlib

    files = [(f"{tmp_path}/d/{n}.bin", bytes([n]) * (1000 * n + 1)) for n in range(5)]
    writer = FileWriter()
    try:
        writer.submit(files)
        assert writer.wait() == [(len(data), hashlib.md5(data).hexdigest()) for _, data in files]
    finally:
        writer.close()
