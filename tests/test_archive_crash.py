"""The dataset writer killed with -9 (a real ``ztfd archive`` process) while it writes, and a rebuild killed the
same way: run again, each ends with every stored alert exactly once, the same dataset a clean rebuild makes. And
the store's new table (``archive_marks``) comes to an older store by migration."""

from __future__ import annotations

import collections
import hashlib
import signal
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from tests.conftest import FAST_KAFKA_OPTIONS, child_env, wait_until, write_config, ztfd_command
from tests.test_archive import dataset_keys, stored_keys, ztf_row
from ztfd import archive, store
from ztfd.embedded.kafka import KafkaBroker
from ztfd.store.db import schema_version
from ztfd.store.schema import SCHEMA_VERSION

ALERTS = 3000
NIGHTS = 6


@dataclass
class Home:
    path: Path
    config: Path
    db: Path

    def run(self, *args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(ztfd_command(self.config, *args), capture_output=True, text=True, timeout=300,
                              env=child_env(**(env_extra or {})))
        assert done.returncode == 0, done.stderr
        return done

    def kill_while_writing(self, *args: str) -> None:
        """Start ``ztfd <args>`` and kill it with -9 as soon as it has renamed its first Parquet file."""
        proc = subprocess.Popen(ztfd_command(self.config, *args), env=child_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: proc.poll() is not None or any((self.path / "archive").rglob("*.parquet")), 120,
                       "the first Parquet file", interval=0.005)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def table(self) -> pa.Table:
        table = archive.open(self.path).alerts.to_table()
        return table.sort_by([("topic", "ascending"), ("partition", "ascending"), ("offset", "ascending")])

    def clear(self) -> None:
        for parquet in (self.path / "archive").rglob("*.parquet"):
            parquet.unlink()

    def start_afresh(self) -> pa.Table:
        """The dataset a clean rebuild makes; then no file and no mark, as before the first pass."""
        from ztfd.store import archive_marks

        self.run("archive", "--rebuild")
        clean = self.table()
        self.clear()
        conn = store.connect(self.db)
        try:
            with store.transaction(conn):
                archive_marks.forget(conn)
        finally:
            conn.close()
        return clean


class KilledError(Exception):
    """Stands for a kill -9 at one point (the process stops there, nothing after it runs)."""


@pytest.fixture(scope="module")
def home(kafka: KafkaBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    run = uuid.uuid4().hex[:8]
    topic = f"archive-crash-{run}"
    path = tmp_path_factory.mktemp("archive-crash")
    config = write_config(path / "ztfd.toml", {
        "kafka": {"bootstrap_servers": kafka.bootstrap, "group_id": f"g-{run}", "topics": [topic]},
        "kafka.options": dict(FAST_KAFKA_OPTIONS), "stamps": {"enabled": False}}, path)
    kafka.create_topic(topic, partitions=2)
    kafka.produce(topic, [ztf_row(seq, 59458.3 + seq % NIGHTS, None if seq % 7 else 18.0) for seq in range(ALERTS)])
    db = path / "state" / "ztfd.sqlite3"
    proc = subprocess.Popen(ztfd_command(config, "consume", "--topic", topic), env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: db.exists() and len(stored_keys(db)) >= ALERTS, 120, "every message stored")
    finally:
        proc.terminate()
        proc.wait(60)
    yield Home(path, config, db)


def test_a_writer_killed_while_writing_leaves_nothing_twice_once_run_again(home: Home) -> None:
    home.clear()
    home.kill_while_writing("archive", "--once")
    home.run("archive", "--once")
    written = home.table()
    keys = dataset_keys(written)
    assert len(keys) == len(set(keys)) and set(keys) == stored_keys(home.db)
    assert home.run("archive", "--once").stdout.startswith("ztfd archive: 0 new alerts")
    home.run("archive", "--rebuild")
    assert home.table().equals(written)  # the same dataset a rebuild makes


def test_a_rebuild_killed_and_run_again_ends_with_the_same_dataset(home: Home) -> None:
    home.run("archive", "--rebuild")
    clean = home.table()
    home.clear()
    home.kill_while_writing("archive", "--rebuild")
    home.run("archive", "--rebuild")
    assert home.table().equals(clean)
    night = str(clean["night"][0])
    stray = home.path / "archive" / "alerts" / f"night={night}" / f"topic={clean['topic'][0]}" / "p9-g0-o0.parquet"
    stray.write_bytes(b"not a file of this dataset")
    home.run("archive", "--rebuild", "--date", night)
    assert not stray.exists() and home.table().equals(clean)
    for bad in (["--date", night], ["--rebuild", "--date", "2021-13-01"]):
        refused = subprocess.run(ztfd_command(home.config, "archive", *bad), capture_output=True, text=True,
                                 timeout=60, env=child_env())
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr


def test_a_rebuild_killed_while_it_removes_the_files_is_started_over_by_the_next_pass(
        home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after it recorded its intent (the files' deletion from S3 and the manifest asked for) and before it
    removed them: the next pass starts over, so every file is written again, recorded, and none is deleted in S3."""
    from ztfd import config
    from ztfd.archive.role import Archiver

    clean = home.start_afresh()
    home.run("archive", "--once")
    cfg = config.load(home.config)
    conn = store.connect(cfg.db_path)

    def killed(*_args: Any, **_kwargs: Any) -> None:
        raise KilledError

    try:
        writer = Archiver(cfg, conn).alerts_writer()
        with monkeypatch.context() as patched:
            patched.setattr(Path, "unlink", killed)
            with pytest.raises(KilledError):
                writer.start_over()
    finally:
        conn.close()
    home.run("archive", "--once")
    assert home.table().equals(clean)
    on_disk = {p.relative_to(home.path).as_posix() for p in (home.path / "archive" / "alerts").rglob("*.parquet")}
    db = sqlite3.connect(home.db)
    recorded = {row[0] for row in db.execute("SELECT path FROM manifest WHERE path LIKE 'archive/alerts/%'")}
    queued = {row[0] for row in db.execute("SELECT path FROM s3_deletions")}
    db.close()
    assert on_disk <= recorded and not on_disk & queued


def test_an_older_store_gains_the_archive_marks_table(tmp_path: Path) -> None:
    db = tmp_path / "ztfd.sqlite3"
    conn = store.connect(db)
    conn.execute("DROP TABLE archive_marks")
    conn.execute("UPDATE meta SET value = '9' WHERE key = 'schema_version'")
    conn.close()
    conn = store.connect(db)
    try:
        assert schema_version(conn) == SCHEMA_VERSION == 11
        assert conn.execute("SELECT count(*) FROM archive_marks").fetchone()[0] == 0
    finally:
        conn.close()
    with pytest.raises(sqlite3.IntegrityError):
        sqlite3.connect(db).execute("INSERT INTO archive_marks (topic) VALUES ('t')")  # NOT NULL columns: it is real


def test_stamps_written_by_a_finished_job_reach_the_stamps_dataset_on_the_next_pass(make_config: Any) -> None:
    """A later pass looks only at the nights the store says were touched: a stamp job done for an old night is
    one of them."""
    from ztfd import config
    from ztfd.store import jobs
    from ztfd.store.alerts import NewAlert, insert_alerts

    cfg = config.load(make_config())
    home = Home(cfg.home, cfg.path, cfg.db_path)
    conn = store.connect(cfg.db_path)
    night, other = "2021-09-01", "2021-08-31"
    folder = cfg.home / "images" / night / "ZTF21abvawaj"
    folder.mkdir(parents=True)
    (folder / "111_science.fits.gz").write_bytes(b"science")
    (cfg.home / "images" / other / "ZTF18aaaaaaa").mkdir(parents=True)
    (cfg.home / "images" / other / "ZTF18aaaaaaa" / "222_science.fits.gz").write_bytes(b"x")
    with store.transaction(conn):
        (alert_id,) = insert_alerts(conn, "t", [NewAlert(0, 0, 0, "ZTF21abvawaj", night, 59458.3, "data/x.json")],
                                    received_at=1.0e9)
        jobs.enqueue(conn, [jobs.NewStampJob(alert_id, f"k{alert_id}")])
    home.run("archive", "--once")
    stamps = archive.open(cfg.home).stamps.to_table()
    assert sorted(stamps["path"].to_pylist()) == [f"images/{other}/ZTF18aaaaaaa/222_science.fits.gz",
                                                  f"images/{night}/ZTF21abvawaj/111_science.fits.gz"]
    # A fetcher finishes the job later: its preview is on disk, the job done.
    (job,) = jobs.claim(conn, "worker", 60)
    (folder / "111.png").write_bytes(b"\x89PNG")
    assert jobs.complete(conn, job.id, "worker")
    (cfg.home / "images" / other / "ZTF18aaaaaaa" / "222.png").write_bytes(b"\x89PNG")  # no job says so: not seen
    home.run("archive", "--once")
    rows = archive.open(cfg.home).sql("SELECT night, kind, md5, bytes FROM stamps ORDER BY path").to_pylist()
    assert [(str(r["night"]), r["kind"]) for r in rows] == [(other, "science"), (night, "preview"), (night, "science")]
    assert (rows[1]["md5"], rows[1]["bytes"]) == (hashlib.md5(b"\x89PNG").hexdigest(), 4)
    conn.close()



def test_rows_built_by_forked_processes_are_the_rows_built_in_one(home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    from ztfd import config
    from ztfd.archive import alerts as writer_module
    from ztfd.archive.role import Archiver
    from ztfd.store.alerts import iter_alerts

    cfg = config.load(home.config)
    conn = store.connect(cfg.db_path)
    try:
        stored = list(iter_alerts(conn))[:1500]
        writer = Archiver(cfg, conn).alerts_writer()
        monkeypatch.setattr(writer_module, "WORKERS", 1)
        alone = writer.rows(stored)
        monkeypatch.setattr(writer_module, "WORKERS", 3)
        monkeypatch.setattr(writer_module, "PARALLEL_BYTES", 0)
        shared = writer.rows(stored)
    finally:
        conn.close()
    assert shared.num_rows == len(stored) and shared.equals(alone)


def test_a_backlog_written_in_many_small_steps_is_the_dataset_a_rebuild_makes(
        home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each step adds its own part files beside the ones the step before wrote: no row lost or doubled."""
    from ztfd import config
    from ztfd.archive import alerts as writer_module
    from ztfd.archive.role import Archiver

    clean = home.start_afresh()
    cfg = config.load(home.config)
    conn = store.connect(cfg.db_path)
    try:
        monkeypatch.setattr(writer_module, "READ_LIMIT", 97)
        assert Archiver(cfg, conn).one_pass() == len(stored_keys(home.db))
    finally:
        conn.close()
    assert home.table().equals(clean)


def test_status_tells_how_far_the_dataset_is_behind_the_store(home: Home) -> None:
    """``ztfd status`` counts the stored alerts not yet in the dataset from the marks' counts (no alert read), with
    the oldest one's receive time, and names a problem when that is older than a few ``archive.interval``s."""
    import json

    home.start_afresh()
    behind = child_env(ZTFD_ARCHIVE_ENABLED="true", ZTFD_ARCHIVE_INTERVAL="0.1")

    def status(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(ztfd_command(home.config, "status", *args), capture_output=True, text=True,
                              timeout=60, env=behind)

    report = json.loads(status("--json").stdout)
    first_received = sqlite3.connect(home.db).execute("SELECT min(received_at) FROM alerts").fetchone()[0]
    assert report["archive"]["pending"] == ALERTS and report["archive"]["written"] == 0
    assert [t["archive_pending"] for t in report["topics"]] == [ALERTS]
    assert report["archive"]["oldest_pending_age"] >= report["archive"]["interval"] * 3
    oldest = report["archive"]["oldest_pending"]
    assert oldest == status_iso(first_received)
    (problem,) = [p for p in report["problems"] if p["kind"] == "archive"]
    assert f"{ALERTS} stored alerts not in the dataset yet" in problem["reason"]
    assert problem["log"]["file"].endswith("archive.log")
    text = status().stdout
    assert f"{ALERTS} stored alerts not in it yet" in text and "the Parquet archive (archiver)" in text

    home.run("archive", "--once")
    report = json.loads(status("--json").stdout)
    assert (report["archive"]["pending"], report["archive"]["written"]) == (0, ALERTS)
    assert report["archive"]["oldest_pending"] is None
    assert not [p for p in report["problems"] if p["kind"] == "archive"]


def status_iso(ts: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def test_the_step_to_version_11_counts_the_alerts_each_mark_has_written(tmp_path: Path) -> None:
    from ztfd.store import archive_marks
    from ztfd.store.alerts import NewAlert, insert_alerts
    from ztfd.store.archive_marks import PartitionKey

    db = tmp_path / "ztfd.sqlite3"
    conn = store.connect(db)
    with store.transaction(conn):
        insert_alerts(conn, "t", [NewAlert(0, 0, offset, f"ZTF{offset}", "2021-09-01", None, f"data/{offset}.json")
                                  for offset in (3, 5, 8)], received_at=1.0e9)
        archive_marks.advance(conn, PartitionKey("t", 0, 0), 5, 0)
    conn.execute("ALTER TABLE archive_marks DROP COLUMN alerts_written")
    conn.execute("UPDATE meta SET value = '10' WHERE key = 'schema_version'")
    conn.close()
    conn = store.connect(db)
    try:
        assert schema_version(conn) == SCHEMA_VERSION
        assert archive_marks.written_per_topic(conn) == {"t": 2}  # offsets 3 and 5, at or below the mark
    finally:
        conn.close()


def test_a_compaction_killed_after_its_rename_is_finished_by_the_next_pass(
        home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts written in many small steps, then folded: killed between the new file's rename and the parts'
    deletion, the dataset still reads every alert once (the folded parts are left out by name), and the next
    ``ztfd archive --once`` finishes the fold: one file per night and block, the parts gone from disk and from the
    manifest, their objects queued for deletion from S3. A quiet night is then folded whole."""
    from ztfd import config
    from ztfd.archive import alerts as writer_module
    from ztfd.archive import compaction
    from ztfd.archive.role import Archiver
    from ztfd.store import archive_marks, deletions

    clean = home.start_afresh()
    cfg = config.load(home.config)
    conn = store.connect(cfg.db_path)
    try:
        monkeypatch.setattr(writer_module, "READ_LIMIT", 97)
        writer = Archiver(cfg, conn).alerts_writer()
        writer.write_pass()
        parts = sorted((home.path / "archive" / "alerts").rglob("*.parquet"))
        by_block = collections.Counter((p.parent, p.name.split("-")[0]) for p in parts)
        (folder, prefix), count = by_block.most_common(1)[0]
        in_folder = sorted(p.name for p in folder.glob(f"{prefix}-*.parquet"))
        assert count == len(in_folder) > 2
        def killed(*_args: Any) -> None:
            raise KilledError

        monkeypatch.setattr(writer_module.AlertsWriter, "replace_files", killed)
        key = archive_marks.PartitionKey(folder.name.removeprefix("topic="), int(prefix[1:]), 0)
        with pytest.raises(KilledError):
            compaction.Compactor(writer, 3600).fold(folder, key, 0, in_folder, archive_marks.marks(conn)[key])
    finally:
        conn.close()
    assert len(list(folder.glob(f"{prefix}-*.parquet"))) == len(in_folder) + 1  # the new file beside the parts
    assert home.table().equals(clean)  # read as one: the parts it holds are left out

    home.run("archive", "--once")
    left = sorted(p.name for p in folder.glob(f"{prefix}-*.parquet"))
    assert len(left) == 1 and left[0] not in in_folder
    assert home.table().equals(clean)
    conn = store.connect(cfg.db_path)
    try:
        queued = {row[0] for row in conn.execute("SELECT path FROM s3_deletions")}
        assert {f"{folder.relative_to(home.path).as_posix()}/{name}" for name in in_folder} <= queued
        assert not conn.execute("SELECT count(*) FROM manifest WHERE path IN (SELECT path FROM s3_deletions)"
                                ).fetchone()[0]
        assert deletions.count(conn) == len(queued)
    finally:
        conn.close()

    home.run("archive", "--once", env_extra={"ZTFD_ARCHIVE_COMPACT_AFTER": "1"})  # every night quiet by now
    files = list((home.path / "archive" / "alerts").rglob("*.parquet"))
    blocks = {(p.parent, p.name.split("-o")[0]) for p in files}
    assert len(blocks) == len(files) < len(parts)
    assert home.table().equals(clean)
