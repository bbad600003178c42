"""Archive rows of one partition from two hosts of a fleet (docs/fleet.md, "A host lost, disk and all"): which file
names overlap, the rows another host's files already hold (``ztfd.archive.elsewhere``), and readers that count a
row once where names overlap partly. The fleet scenario itself runs through the real parts in tests/test_fleet.py."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs

from ztfd import archive, config, store
from ztfd.archive import columns
from ztfd.archive.alerts import AlertsWriter, healpix_29
from ztfd.archive.compaction import Compactor
from ztfd.archive.elsewhere import Elsewhere, runs
from ztfd.archive.layout import Layout, alerts_file_name, overlapping, superseded
from ztfd.archive.messages import SchemaSource
from ztfd.archive.query import once_per_alert
from ztfd.store import archive_marks, deletions
from ztfd.store.alerts import NewAlert, insert_alerts
from ztfd.store.archive_marks import PartitionKey

NIGHT = "2024-03-01"


def test_names_that_overlap_partly_are_found_and_those_within_another_are_not() -> None:
    a, b = alerts_file_name(0, 0, 0, 7), alerts_file_name(0, 0, 4, 11)
    folded_part = alerts_file_name(0, 0, 0, 3)  # within a's range: superseded, not overlapping
    apart = alerts_file_name(0, 0, 12, 20)
    other_partition = alerts_file_name(1, 0, 5, 6)
    other_generation = alerts_file_name(0, 1, 5, 6)
    old_name = "p0-g0-o000000000000.parquet"  # named by its block alone: left alone
    names = [a, b, folded_part, apart, other_partition, other_generation, old_name, "_common_metadata"]
    assert overlapping(names) == {a, b}
    assert superseded(names) == {folded_part}
    assert overlapping([a, apart, other_partition]) == set()
    # a chain: each meets the next, the first and last do not meet each other
    chain = [alerts_file_name(0, 0, 0, 5), alerts_file_name(0, 0, 5, 9), alerts_file_name(0, 0, 9, 14)]
    assert overlapping(chain) == set(chain)
    # one file reaching over two later ones that do not meet each other
    wide, left, right = alerts_file_name(0, 0, 0, 10), alerts_file_name(0, 0, 8, 12), alerts_file_name(0, 0, 9, 30)
    assert overlapping([wide, left, right]) == {wide, left, right}


def test_once_per_alert_keeps_the_first_row_of_each_message_in_order() -> None:
    table = pa.table({"topic": ["t", "t", "t", "u", "t"], "partition": [0, 0, 0, 0, 1],
                      "generation": [0, 0, 0, 0, 0], "offset": [5, 4, 5, 5, 5], "file": ["a", "b", "c", "d", "e"]})
    assert once_per_alert(table)["file"].to_pylist() == ["a", "b", "d", "e"]
    assert once_per_alert(table.slice(0, 2)).equals(table.slice(0, 2))


def write_rows(home: Path, night: str, offsets: list[int], object_id: str = "ZTF24aaaaaaa",
               topic: str = "t") -> Path:
    """An alerts file of partition 0, generation 0, named by its offsets, in the dataset's own column types."""
    ras, decs = [150.0 + o * 1e-4 for o in offsets], [2.0] * len(offsets)
    when = dt.datetime(2024, 3, 1, tzinfo=dt.UTC)
    rows = [{"object_id": object_id, "survey": "ztf", "partition": 0, "generation": 0, "offset": o,
             "detection_id": str(o), "observed_at": when, "received_at": when, "ra": ra, "dec": dec,
             "file": f"data/{night}/{topic}/{object_id}_p0-o{o}.json", "message": b"{}"}
            for o, ra, dec in zip(offsets, ras, decs, strict=True)]
    schema = columns.fixed_schema(columns.ALERT_COLUMNS)
    table = pa.Table.from_pylist(rows, schema=schema.remove(schema.get_field_index("_healpix_29")))
    table = table.append_column(schema.field("_healpix_29"), healpix_29(ras, decs))
    path = Layout(home).alerts_folder(night, topic) / alerts_file_name(0, 0, offsets[0], offsets[-1])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def test_readers_count_a_row_once_where_file_names_overlap_partly(tmp_path: Path) -> None:
    write_rows(tmp_path, NIGHT, list(range(8)))  # the lost host's file
    write_rows(tmp_path, NIGHT, list(range(4, 12)))  # its successor's, uploaded before it could see the first
    write_rows(tmp_path, "2024-03-02", [20, 21], object_id="ZTF24bbbbbbb")  # another night: read as it is
    reader = archive.open(tmp_path)
    assert reader.alerts.count_rows() == 18  # the bare dataset: rows 4-7 twice
    table = reader.to_table()
    assert sorted(table["offset"].to_pylist()) == [*range(12), 20, 21]
    assert reader.sql('SELECT count(*) AS n, count(DISTINCT "offset") AS d FROM alerts').to_pylist() == \
        [{"n": 14, "d": 14}]
    assert sorted(reader.object_rows("ZTF24aaaaaaa")["offset"].to_pylist()) == list(range(12))
    near = reader.cone(150.0005, 2.0, 30)
    assert sorted(map(int, near["detection_id"].to_pylist())) == [*range(12), 20, 21]


def fleet_home(tmp_path: Path) -> tuple[Any, Path]:
    """What the archiver knows of a host's configuration, its bucket a local folder (pyarrow's local filesystem
    stands in for S3 here)."""
    bucket = tmp_path / "bucket"
    cfg = SimpleNamespace(home=tmp_path / "home", s3=config.S3Config(bucket=str(bucket), prefix="fleet/"))
    return cfg, bucket / "fleet"


def test_the_rows_other_hosts_files_hold_are_read_once_per_folder_and_move(tmp_path: Path) -> None:
    cfg, mirror = fleet_home(tmp_path)
    conn = store.connect(tmp_path / "store.sqlite3")
    key = PartitionKey("t", 0, 0)
    elsewhere = Elsewhere(cfg, conn, filesystem=fs.LocalFileSystem())
    write_rows(mirror, NIGHT, list(range(8)))  # another host's
    write_rows(mirror, NIGHT, [1, 2])  # another host's, below the offsets asked for: not read
    assert elsewhere.held(key, NIGHT, 4) == frozenset()  # the partition never moved (outside fleet mode): no look
    with store.transaction(conn):
        archive_marks.note_moved(conn, "t", [0])
    assert elsewhere.held(key, NIGHT, 4) == frozenset(range(4, 8))
    write_rows(mirror, NIGHT, [9, 10])  # uploaded after the look: not seen until the partition moves again
    assert elsewhere.held(key, NIGHT, 4) == frozenset(range(4, 8))
    # This host's own files are not another's: on its disk, or replaced and waiting to be deleted from S3.
    mine = write_rows(cfg.home, NIGHT, [9, 10])
    replaced = write_rows(mirror, NIGHT, [11, 12])
    with store.transaction(conn):
        archive_marks.note_moved(conn, "t", [0])
        deletions.request(conn, [replaced.relative_to(mirror).as_posix()], None)
    assert mine.name == alerts_file_name(0, 0, 9, 10)
    assert elsewhere.held(key, NIGHT, 4) == frozenset(range(4, 8))
    assert elsewhere.held(PartitionKey("t", 0, 1), NIGHT, 0) == frozenset()  # another generation: no file of it
    assert elsewhere.held(key, "2024-03-05", 0) == frozenset()  # a folder not in the bucket


def test_runs_are_cut_where_another_hosts_offsets_lie_between() -> None:
    assert runs([(o, o) for o in (0, 1, 2, 8, 9)], {4, 5}) == [(0, 3), (3, 5)]
    assert runs([(o, o) for o in (0, 1, 2, 8, 9)], set()) == [(0, 5)]
    assert runs([(o, o) for o in (0, 1, 2)], {7, 9}) == [(0, 3)]  # beyond the last: nothing between
    assert runs([(0, 3), (4, 6), (9, 12), (13, 20)], {7, 8, 30}) == [(0, 2), (2, 4)]  # files
    assert runs([], {1}) == []


def test_a_host_that_took_a_partition_over_writes_and_folds_around_another_hosts_rows(tmp_path: Path) -> None:
    """This host stored offsets 0-11 of a partition; another host's file in the bucket holds 4-7 (it held the
    partition between, and was lost before its commit passed them). The writer leaves 4-7 out and names no file
    over them, so the other host's file is neither doubled nor taken as folded; compaction folds on each side."""
    cfg, mirror = fleet_home(tmp_path)
    conn = store.connect(tmp_path / "store.sqlite3")
    key = PartitionKey("t", 0, 0)
    writer = AlertsWriter(cfg.home, conn, SchemaSource(), Elsewhere(cfg, conn, filesystem=fs.LocalFileSystem()))
    theirs = write_rows(mirror, NIGHT, list(range(4, 8)))
    with store.transaction(conn):
        archive_marks.note_moved(conn, "t", [0])
    for offsets in ([0, 1], [2, 3, 4, 5, 6, 7, 8, 9], [10, 11]):  # three passes: a part each, cut at 4-7
        with store.transaction(conn):
            insert_alerts(conn, "t", [NewAlert(0, 0, o, "ZTF24aaaaaaa", NIGHT, None, f"data/{o}.json")
                                      for o in offsets], received_at=1.0e9)
            store.save_offset(conn, "t", 0, 0, offsets[-1] + 1)
        writer.write_pass()
    folder = Layout(cfg.home).alerts_folder(NIGHT, "t")
    names = sorted(path.name for path in folder.glob("*.parquet"))
    assert names == [alerts_file_name(0, 0, *span) for span in [(0, 1), (2, 3), (8, 9), (10, 11)]]
    assert archive_marks.marks(conn)[key] == 11  # 4-7 count as written: they are in the bucket
    Compactor(writer, 0).compact_pass(now=2.0e9)
    names = sorted(path.name for path in folder.glob("*.parquet"))
    assert names == [alerts_file_name(0, 0, 0, 3), alerts_file_name(0, 0, 8, 11)]
    everything = [*names, theirs.name]
    assert superseded(everything) == set() and overlapping(everything) == set()
    rows = [o for path in folder.glob("*.parquet") for o in pq.read_table(path)["offset"].to_pylist()]
    assert sorted(rows + list(range(4, 8))) == list(range(12))


def test_readers_count_a_stamp_once_where_two_hosts_files_of_a_night_list_it(tmp_path: Path) -> None:
    """A stamp fetched again by the host that took a lost host's partition over is in both hosts' stamps files of
    the night (each host writes its own); ``stamps`` in ``sql`` has each path once."""
    from ztfd.archive.stamps import StampsWriter

    def host(name: str, detections: list[str], night: str = NIGHT) -> Path:
        home = tmp_path / name
        for detection in detections:
            folder = home / "images" / night / "ZTF24aaaaaaa"
            folder.mkdir(parents=True, exist_ok=True)
            for kind in ("science", "template", "difference"):
                (folder / f"{detection}_{kind}.fits.gz").write_bytes(f"{detection} {kind}".encode())
        assert StampsWriter(home, writer=f"{name}-0000000{len(name)}").write_night(night) is not None
        return home

    lost, survivor = host("lost", ["1", "2"]), host("survivor", ["2", "3"])  # detection 2 fetched by both
    host("survivor", ["4"], night="2024-03-02")  # a night only the survivor has: read as it is
    [lost_file] = (lost / "archive" / "stamps").rglob("*.parquet")
    folder = survivor / "archive" / "stamps" / f"night={NIGHT}"
    (folder / lost_file.name).write_bytes(lost_file.read_bytes())  # both in one place, as in the bucket
    reader = archive.open(survivor)
    assert reader.stamps.count_rows() == 15  # the bare dataset: detection 2's three files twice
    assert reader.sql("SELECT count(*) AS n, count(DISTINCT path) AS d FROM stamps").to_pylist() == \
        [{"n": 12, "d": 12}]
    assert reader.sql(f"SELECT count(*) AS n FROM stamps WHERE night = DATE '{NIGHT}'").to_pylist() == [{"n": 9}]
    alone = archive.open(lost)  # one host's files: read as they are
    assert alone.sql("SELECT count(*) AS n FROM stamps").to_pylist() == [{"n": 6}]
