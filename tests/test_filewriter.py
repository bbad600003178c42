"""The consumer's alert-file writer: a real child process, its answers, its failures and its lifetime."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import wait_until
from ztfd import store
from ztfd.daemon.procs import pid_alive
from ztfd.ingest.filewriter import BatchSkippedError, FileWriter, FileWriterError
from ztfd.store.alerts import NewAlert, count_alerts
from ztfd.store.batches import AlertToStore, BatchToStore
from ztfd.store.manifest import manifest_files
from ztfd.store.offsets import stored_offsets


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
        assert writer.pending == 0  # nothing more is coming: a loop draining the answers ends
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
         "import sys; from ztfd.ingest.filewriter import FileWriter\n"
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
        assert writer.wait().digests == [(len(data), hashlib.md5(data).hexdigest()) for _, data in files]
    finally:
        writer.close()


def batch_of(offsets: range, folder: str = "data/2024-01-01/t") -> tuple[list[tuple[str, bytes]], BatchToStore]:
    """The files (under home) and the store part of a batch of one topic's messages at ``offsets``."""
    files = [(f"{folder}/ZTF24a{n:06d}_p0-o{n}.json", f"alert {n}".encode()) for n in offsets]
    alerts = [AlertToStore(NewAlert(0, 0, n, f"ZTF24a{n:06d}", "2024-01-01", None, path), (path,), "stamps",
                           f"ZTF24a{n:06d}@2024-01-01") for n, (path, _) in zip(offsets, files, strict=True)]
    return files, BatchToStore("t", 1_700_000_000.0, alerts, [], {0: (0, offsets[-1] + 1)}, [])


def test_a_batch_is_stored_after_its_files_in_one_transaction(tmp_path: Path) -> None:
    """The store part of a batch: alerts, manifest rows with the MD5s of the bytes written, stamp jobs and the
    partition's next offset; an alert stored already (a redelivery) is not accepted again."""
    db = tmp_path / "state" / "ztfd.sqlite3"
    store.connect(db).close()
    writer = FileWriter(db)
    try:
        files, batch = batch_of(range(5))
        writer.submit(files, batch, root=str(tmp_path))
        written = writer.wait()
        assert written.stored is not None and written.stored.accepted == [0, 1, 2, 3, 4]
        again_files, again = batch_of(range(3, 8))
        writer.submit(again_files, again, root=str(tmp_path))
        assert writer.wait().stored.accepted == [2, 3, 4]  # offsets 5..7; 3 and 4 were stored
    finally:
        writer.close()
    conn = store.connect(db)
    assert count_alerts(conn) == 8
    rows = {row.path: row for row in manifest_files(conn, "data/")}
    assert all((tmp_path / path).read_bytes() == data for path, data in files + again_files)
    assert {path: (rows[path].size, rows[path].md5) for path, _ in files} == {
        path: (len(data), hashlib.md5(data).hexdigest()) for path, data in files}
    assert stored_offsets(conn, "t")[0].next_offset == 8
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 8
    conn.close()


def test_a_batch_behind_one_that_failed_is_skipped_until_the_failure_is_read(tmp_path: Path) -> None:
    """A batch queued behind one that failed must not be stored (its offsets would pass the failed one's
    messages): the child skips it, writing nothing; submitted again once the failure is read, it goes in."""
    db = tmp_path / "state" / "ztfd.sqlite3"
    store.connect(db).close()
    (tmp_path / "data").write_bytes(b"")  # data/ is a file: the first batch cannot be written
    writer = FileWriter(db)
    try:
        first_files, first = batch_of(range(3))
        second_files, second = batch_of(range(3, 6), folder="images/2024-01-01/ZTF24a")
        writer.submit(first_files, first, root=str(tmp_path))
        writer.submit(second_files, second, root=str(tmp_path))
        with pytest.raises(FileWriterError, match="Not a directory"):
            writer.wait()
        with pytest.raises(BatchSkippedError):
            writer.wait()
        assert not (tmp_path / "images").exists()
        conn = store.connect(db)
        assert count_alerts(conn) == 0 and stored_offsets(conn, "t") == {}
        writer.submit(second_files, second, root=str(tmp_path))
        assert writer.wait().stored.accepted == [0, 1, 2]
        assert count_alerts(conn) == 3 and stored_offsets(conn, "t")[0].next_offset == 6
        conn.close()
    finally:
        writer.close()


@pytest.mark.timeout(60)
def test_a_long_answer_does_not_block_a_large_submission(tmp_path: Path) -> None:
    """The answer to a batch of many files is larger than a default pipe (64 KiB) and the next batch is larger than
    the requests' pipe: the child must be able to answer while the consumer submits (it once deadlocked)."""
    many = [(f"{tmp_path}/many/{n}.json", b"{}") for n in range(3000)]  # ~130 kB of (size, md5) answers
    large = [(f"{tmp_path}/large/{n}.bin", b"x" * 100_000) for n in range(20)]  # 2 MB, twice the pipe
    writer = FileWriter()
    try:
        writer.submit(many)
        writer.submit(large)
        assert len(writer.wait().digests) == 3000
        assert len(writer.wait().digests) == 20
    finally:
        writer.close()
