"""A partition this host handed back (fleet mode, docs/fleet.md "Archive rows after a handover"): its archive rows
from the commit on are the next holder's, so this host writes, folds and uploads none of them, takes its files of
them off, and writes them again where no other host's file holds them should the partition come back. Through a real
store and dataset; the fleet scenario itself runs through the real parts in tests/test_fleet.py."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pyarrow import fs

from tests.test_archive_overlap import NIGHT, fleet_home, write_rows
from ztfd import files, store
from ztfd.archive import handedback
from ztfd.archive.alerts import AlertsWriter
from ztfd.archive.compaction import Compactor
from ztfd.archive.elsewhere import Elsewhere
from ztfd.archive.layout import Layout, alerts_file_name
from ztfd.archive.messages import SchemaSource
from ztfd.store import archive_marks, deletions, manifest
from ztfd.store.alerts import NewAlert, insert_alerts
from ztfd.store.archive_marks import PartitionKey
from ztfd.store.manifest import FileRecord, FileState, UploadedFile

KEY = PartitionKey("t", 0, 0)


def stored(conn: sqlite3.Connection, offsets: list[int]) -> None:
    with store.transaction(conn):
        insert_alerts(conn, "t", [NewAlert(0, 0, o, "ZTF24aaaaaaa", NIGHT, None, f"data/{o}.json") for o in offsets],
                      received_at=1.0e9)
        store.save_offset(conn, "t", 0, 0, offsets[-1] + 1)


def uploaded(conn: sqlite3.Connection, home: Path, names: list[str]) -> None:
    folder = files.relative_to_home(home, Layout(home).alerts_folder(NIGHT, "t"))
    for name in names:
        row = manifest.recorded_file(conn, f"{folder}/{name}")
        assert row is not None and row.state == FileState.PENDING
        manifest.mark_uploaded(conn, [UploadedFile(row.path, row.md5, row.size, row.md5, "etag")], [])


def names_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob("*.parquet"))


def test_a_partition_handed_back_is_neither_written_folded_nor_uploaded_past_its_commit_until_it_comes_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """This host wrote parts 0-1 and 2-3 (uploaded) and 4-7 (not yet) and stored 8-9, then handed the partition back
    committed at 4. Nothing from 4 on is written, folded or uploaded; the part 4-7 is dropped with its manifest row,
    the mark goes back to 3. Handed in again, it writes 4-9 again but for what another host's file in the bucket
    holds (4-6, written meanwhile by the next holder)."""
    cfg, mirror = fleet_home(tmp_path)
    conn = store.connect(tmp_path / "store.sqlite3")
    writer = AlertsWriter(cfg.home, conn, SchemaSource(), Elsewhere(cfg, conn, filesystem=fs.LocalFileSystem()))
    folder = Layout(cfg.home).alerts_folder(NIGHT, "t")
    relative = files.relative_to_home(cfg.home, folder)
    for offsets in ([0, 1], [2, 3], [4, 5, 6, 7]):
        stored(conn, offsets)
        writer.write_pass()
    uploaded(conn, cfg.home, [alerts_file_name(0, 0, 0, 1), alerts_file_name(0, 0, 2, 3)])
    stored(conn, [8, 9])  # stored, not yet in the dataset when the partition leaves
    past = f"{relative}/{alerts_file_name(0, 0, 4, 7)}"
    with store.transaction(conn):  # a fold of it waits for it to replace the old object: that object must stay
        deletions.request(conn, [f"{relative}/old.parquet"], past)
        archive_marks.note_moved(conn, "t", [0])
        archive_marks.note_handed_back(conn, "t", {0: (0, 4)})
    assert archive_marks.handed_back(conn) == {KEY: 4}

    assert writer.write_pass() == 0  # 8 and 9 are the next holder's
    Compactor(writer, 0).compact_pass(now=2.0e9)  # folds 0-1 and 2-3, not 4-7 (past the commit)
    assert names_in(folder) == [alerts_file_name(0, 0, 0, 3), alerts_file_name(0, 0, 4, 7)]
    assert handedback.past_commit(past, {KEY: 4}) == KEY  # the syncer does not upload it
    assert handedback.past_commit(f"{relative}/{alerts_file_name(0, 0, 0, 3)}", {KEY: 4}) is None
    assert handedback.past_commit(f"{relative}/{alerts_file_name(1, 0, 4, 7)}", {KEY: 4}) is None

    with caplog.at_level(logging.INFO, logger="ztfd.archive.handedback"):
        assert handedback.drop(conn, cfg.home) == 1
    assert "handed back at offset 4: 1 files of its rows from there on dropped before upload, 0 uploaded" in caplog.text
    assert names_in(folder) == [alerts_file_name(0, 0, 0, 3)]
    assert manifest.recorded_file(conn, past) is None and archive_marks.dropping(conn) == []
    assert deletions.count(conn) == 2  # 0-1 and 2-3, replaced by the fold; old.parquet waits for nothing now
    assert f"{relative}/old.parquet" not in deletions.requested_under(conn, relative)
    assert archive_marks.marks(conn)[KEY] == 3
    assert handedback.drop(conn, cfg.home) == 0  # nothing more: the next passes do nothing

    write_rows(mirror, NIGHT, [4, 5, 6])  # the next holder's file, uploaded while it held the partition
    with store.transaction(conn):  # handed in again, committed at 7
        archive_marks.note_moved(conn, "t", [0])
        archive_marks.note_handed_in(conn, "t", [0])
    assert archive_marks.handed_back(conn) == {}
    writer.write_pass()
    assert names_in(folder) == [alerts_file_name(0, 0, 0, 3), alerts_file_name(0, 0, 7, 9)]
    assert archive_marks.marks(conn)[KEY] == 9


def test_an_uploaded_file_past_the_commit_is_left_to_the_bucket_and_a_killed_drop_is_finished(tmp_path: Path) -> None:
    """A part uploaded while stamp jobs held the commit back reaches past it: it stays in the bucket (its rows are
    durable there), and leaves this host's disk and manifest. A drop killed after its transaction deletes its files
    at the next pass; a file written anew since under the same name is kept."""
    cfg, _ = fleet_home(tmp_path)
    conn = store.connect(tmp_path / "store.sqlite3")
    writer = AlertsWriter(cfg.home, conn, SchemaSource())
    folder = Layout(cfg.home).alerts_folder(NIGHT, "t")
    relative = files.relative_to_home(cfg.home, folder)
    stored(conn, [0, 1, 2, 3])
    writer.write_pass()
    uploaded(conn, cfg.home, [alerts_file_name(0, 0, 0, 3)])
    with store.transaction(conn):
        archive_marks.note_handed_back(conn, "t", {0: (0, 2), 3: (1, 0)})
        archive_marks.note_handed_back(conn, "u", {0: (0, 5)})
    assert archive_marks.handed_back(conn) == {KEY: 2, PartitionKey("t", 3, 1): 0, PartitionKey("u", 0, 0): 5}
    assert handedback.drop(conn, cfg.home) == 1
    assert names_in(folder) == [] and archive_marks.marks(conn)[KEY] == 1
    assert manifest.states_under(conn, "archive/alerts/") == {}

    left, rewritten = folder / "p0-g0-o000000000009-000000000009.parquet", folder / "p0-g0-o000000000008.parquet"
    for path in (left, rewritten):
        path.write_bytes(b"x")
    with store.transaction(conn):  # as if killed after the transaction that took them off, before deleting them
        archive_marks.note_dropping(conn, [f"{relative}/{left.name}", f"{relative}/{rewritten.name}"])
        manifest.record_files(conn, [(f"{relative}/{rewritten.name}", 1, "m")])  # the partition back meanwhile
    handedback.finish(conn, cfg.home)
    assert not left.exists() and rewritten.exists() and archive_marks.dropping(conn) == []
    assert manifest.recorded_file(conn, f"{relative}/{rewritten.name}") == FileRecord(
        f"{relative}/{rewritten.name}", 1, "m")


def test_rows_below_the_commit_in_a_file_not_uploaded_are_kept_in_a_file_of_their_own(tmp_path: Path) -> None:
    """The archive switched on after the commit passed 0-3: the file of 0-7 is written after the commit and not yet
    uploaded when the partition is handed back at 4. Rows 0-3 are this host's (nobody else writes them again): kept,
    in a file of their own to upload; 4-7 are the next holder's."""
    cfg, _ = fleet_home(tmp_path)
    conn = store.connect(tmp_path / "store.sqlite3")
    folder = Layout(cfg.home).alerts_folder(NIGHT, "t")
    relative = files.relative_to_home(cfg.home, folder)
    stored(conn, list(range(8)))
    AlertsWriter(cfg.home, conn, SchemaSource()).write_pass()
    with store.transaction(conn):
        archive_marks.note_handed_back(conn, "t", {0: (0, 4)})
    assert handedback.drop(conn, cfg.home) == 1
    assert names_in(folder) == [alerts_file_name(0, 0, 0, 3)]
    kept = manifest.recorded_file(conn, f"{relative}/{alerts_file_name(0, 0, 0, 3)}")
    assert kept is not None and kept.state == FileState.PENDING
    assert pq.read_table(folder / alerts_file_name(0, 0, 0, 3))["offset"].to_pylist() == [0, 1, 2, 3]
