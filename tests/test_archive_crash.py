"""The dataset writer killed with -9 (a real ``ztfd archive`` process) while it writes, and a rebuild killed the
same way: run again, each ends with every stored alert exactly once, the same dataset a clean rebuild makes. And
the store's new table (``archive_marks``) comes to an older store by migration."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(ztfd_command(self.config, *args), capture_output=True, text=True, timeout=300,
                              env=child_env())
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


def test_an_older_store_gains_the_archive_marks_table(tmp_path: Path) -> None:
    db = tmp_path / "ztfd.sqlite3"
    conn = store.connect(db)
    conn.execute("DROP TABLE archive_marks")
    conn.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
    conn.close()
    conn = store.connect(db)
    try:
        assert schema_version(conn) == SCHEMA_VERSION == 7
        assert conn.execute("SELECT count(*) FROM archive_marks").fetchone()[0] == 0
    finally:
        conn.close()
    with pytest.raises(sqlite3.IntegrityError):
        sqlite3.connect(db).execute("INSERT INTO archive_marks (topic) VALUES ('t')")  # NOT NULL columns: it is real
