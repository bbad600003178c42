"""Local trouble on a real small file system: a tmpfs mounted by the test, filled to the brim, then grown.

A full disk is not the alert's or the remote's fault: stamp jobs are given back without counting an attempt, the
consumer pauses with its batch in hand (nothing stored, no offset moved), and everything is there, once, when the
disk has room again. Mounting needs root (CI runs as root); elsewhere these tests are skipped and say why.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sqlite3
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import child_env, small_fs, wait_until, ztfd_command
from tests.stamp_support import add_alerts, all_final, jobs, stamps_config, start_fetcher, stop_fetcher
from ztfd import config, store
from ztfd.embedded import samples
from ztfd.embedded.kafka import KafkaBroker
from ztfd.embedded.samples import packets
from ztfd.stamps.fetcher import preview_path, stamp_path
from ztfd.store.alerts import count_alerts
from ztfd.store.manifest import manifest_files
from ztfd.store.status_facts import statuses_with_prefix

GROWN = "64m"


def fill(path: Path) -> None:
    """Write a file until not one more byte fits."""
    fd = os.open(path / "filler.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for chunk in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, bytes(chunk))
        with pytest.raises(OSError) as full:
            os.write(fd, b"x")
        assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


def grow(path: Path) -> None:
    subprocess.run(["mount", "-o", f"remount,size={GROWN}", str(path)], check=True)


@contextlib.contextmanager
def reading(db: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to the store: opening it normally writes (its migration), and the disk is full."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        yield conn
    finally:
        conn.close()


def trouble(db: Path) -> dict[str, tuple[str, float]]:
    with reading(db) as conn:
        return statuses_with_prefix(conn, "local_trouble:")


def test_a_full_images_disk_gives_stamp_jobs_back_until_it_has_room(
    make_config: Callable[..., Path], stamp_service, tmp_path: Path
) -> None:
    cfg_path = stamps_config(make_config, stamp_service.url)
    cfg = config.load(cfg_path)
    chosen = packets()
    with small_fs(cfg.images_dir, "1m"):
        fill(cfg.images_dir)
        conn = store.connect(cfg.db_path)
        add_alerts(conn, chosen)
        log_path = tmp_path / "worker.log"
        worker = start_fetcher(cfg_path, "fetcher-1", log_path)
        try:
            wait_until(lambda: "still local trouble" in log_path.read_text(), timeout=60,
                       what="the worker to back off and try again while the disk is full")
            assert "No space left on device" in trouble(cfg.db_path)["fetcher-1"][0]
            shown = subprocess.run(ztfd_command(cfg_path, "status", "--json"), capture_output=True, text=True,
                                   env=child_env(), timeout=60)
            assert "fetcher-1" in json.loads(shown.stdout)["local_trouble"]
            assert all(job["state"] != "failed" and job["attempts"] <= 1 for job in jobs(conn))
            grow(cfg.images_dir)
            wait_until(lambda: all_final(conn), timeout=120, what="every job done once the disk has room")
        finally:
            assert stop_fetcher(worker) == 0
        assert [(job["state"], job["attempts"]) for job in jobs(conn)] == [("done", 1)] * len(chosen)
        for job, packet in zip(jobs(conn), chosen, strict=True):
            date = job["payload"]["date"]
            for kind, served in packet.cutouts.items():
                assert stamp_path(cfg.images_dir, date, packet.object_id, packet.candid, kind).read_bytes() == served
            assert preview_path(cfg.images_dir, date, packet.object_id, packet.candid).exists()
        assert len(manifest_files(conn, "images/")) == 4 * len(chosen)
        assert trouble(cfg.db_path) == {}, "the condition is cleared once writing works again"
        assert not [p for p in cfg.images_dir.rglob(".*.tmp")], "a temporary was left behind"


def seqs_on_disk(home: Path) -> Counter[int]:
    return Counter(json.loads(path.read_bytes())["message"]["seq"] for path in (home / "data").rglob("*.json"))


def stored(db: Path) -> int:
    with reading(db) as conn:
        try:
            return count_alerts(conn)
        except sqlite3.OperationalError:  # the consumer is creating the store right now
            return 0


def next_offsets(db: Path, topic: str) -> int:
    with reading(db) as conn:
        return sum(offset.next_offset for offset in store.stored_offsets(conn, topic).values())


def test_a_full_home_pauses_the_consumer_until_it_has_room(
    kafka: KafkaBroker, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    topic, first, second = f"lasair_full_{os.getpid()}_{tmp_path.name[-6:]}", 40, 40
    kafka.create_topic(topic)
    messages = list(samples.message_stream(first + second))
    kafka.produce(topic, messages[:first])
    home = tmp_path / "home"
    with small_fs(home, "8m"):  # the store, the logs and the alert files all on it
        cfg_path = make_config(home, kafka={"bootstrap_servers": kafka.bootstrap, "group_id": f"g-{topic}",
                                            "topics": [topic], "batch_size": 10})
        db = home / "state" / "ztfd.sqlite3"
        errors = tmp_path / "consumer.err"
        consumer = subprocess.Popen(ztfd_command(cfg_path, "consume", "--topic", topic), env=child_env(),
                                    stdout=subprocess.DEVNULL, stderr=errors.open("wb"))
        try:
            wait_until(lambda: db.exists() and stored(db) == first, timeout=90, what="the first wave")
            fill(home)
            kafka.produce(topic, messages[first:])
            wait_until(lambda: "still local trouble" in errors.read_text(errors="replace"), timeout=90,
                       what="the consumer to pause and try again while the home is full")
            assert stored(db) == first, "nothing may be stored while the files cannot be written"
            assert next_offsets(db, topic) == first, "no offset may move while paused"
            assert consumer.poll() is None, "the consumer must pause, not die"
            grow(home)
            wait_until(lambda: stored(db) == first + second, timeout=120, what="the second wave")
        finally:
            consumer.send_signal(signal.SIGTERM)
            assert consumer.wait(60) == 0
        on_disk = seqs_on_disk(home)
        assert set(on_disk) == set(range(first + second)) and max(on_disk.values()) == 1
        assert next_offsets(db, topic) == first + second
        with reading(db) as conn:
            assert len(manifest_files(conn, "data/")) == first + second
        assert not [p for p in (home / "data").rglob(".*.tmp")], "a temporary was left behind"
