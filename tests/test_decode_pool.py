"""The decode pool (``kafka.decode_workers``, issue 26) through the real broker with real ZTF packets: every alert
stored once with the files the consumer's own decoding writes, byte for byte; a consumer killed with -9 takes its
workers with it and its successor stores each alert once; a worker killed with -9 costs a retry of its batch, not
an alert; a message that kills a worker is isolated and rejected by the crash-loop breaker."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.conftest import child_env, wait_until
from tests.killer_source import CONSUME, FORMAT, KILLER
from tests.test_consumer import Consumers, count, produce_with_timestamps, seqs_on_disk, terminate, unique
from ztfd import sources
from ztfd.embedded import avro_samples, samples
from ztfd.embedded.kafka import KafkaBroker
from ztfd.embedded.samples import packets
from ztfd.ingest.decodepool import workers_for

HOSTILE = b"Obj\x01 not really"


@pytest.fixture
def consumers() -> Consumers:
    running = Consumers()
    yield running
    running.stop_all()


def distinct_packets(count_: int) -> list[bytes]:
    """``count_`` real ZTF packets, each with its own objectId and candid (so each gets its own files)."""
    base = packets()
    return [avro_samples.ztf_packet_bytes(dataclasses.replace(
        base[i % len(base)], object_id=f"ZTF26pool{i:05d}", candid=base[i % len(base)].candid + i + 1))
        for i in range(count_)]


def pool_config(make_config: Callable[..., Path], home: Path, bootstrap: str, topic: str, workers: int | str,
                batch_size: int = 50) -> Path:
    return make_config(home, kafka={"bootstrap_servers": bootstrap, "group_id": unique("g"), "topics": [topic],
                                    "batch_size": batch_size, "decode_workers": workers},
                       kafka__formats={topic: "ztf-avro"})


def workers_of(proc: subprocess.Popen[bytes]) -> list[int]:
    """The consumer's decode workers (forked: they have its command line; the file writer has its own)."""
    try:
        children = psutil.Process(proc.pid).children()
    except psutil.NoSuchProcess:
        return []
    return [child.pid for child in children if "ztfd.ingest.filewriter" not in child.cmdline()]


def files_of(home: Path) -> dict[str, bytes]:
    """Every alert file under home, by path, with the received time (a fact of the run) taken out of the .json."""
    found = {}
    for path in [*(home / "data").rglob("*"), *(home / "images").rglob("*")]:
        if path.is_file() and path.suffix != ".jsonl":
            data = path.read_bytes()
            if path.suffix == ".json":
                document = json.loads(data)
                document["ztfd"].pop("received_at")
                view = data[:data.index(b', "ztfd": ')]  # the packet's view, byte for byte
                data = view + json.dumps(document["ztfd"], sort_keys=True).encode()
            found[str(path.relative_to(home))] = data
    return found


def stored_once(db: Path, total: int) -> None:
    assert count(db, "SELECT count(*) FROM alerts") == total
    assert count(db, "SELECT count(DISTINCT object_id) FROM alerts") == total
    assert count(db, "SELECT count(*) FROM manifest WHERE path LIKE 'data/%.avro'") == total


def test_a_pool_stores_every_packet_once_with_the_files_of_the_consumers_own_decoding(
    kafka: KafkaBroker, make_config: Callable[..., Path], consumers: Consumers, tmp_path: Path
) -> None:
    topic, total = unique("ztf_pool"), 120
    kafka.create_topic(topic, partitions=2)
    values = distinct_packets(total)
    kafka.produce(topic, [*values[:60], HOSTILE, *values[60:]])
    homes = {}
    for workers in (0, 2):
        home = tmp_path / f"workers-{workers}"
        config_path = pool_config(make_config, home, kafka.bootstrap, topic, workers)
        db = home / "state" / "ztfd.sqlite3"
        proc = consumers.start(config_path, topic)
        if workers:
            wait_until(lambda p=proc: len(workers_of(p)) == 2, 30, "two decode workers")
        wait_until(lambda d=db: count(d, "SELECT count(*) FROM alerts") >= total
                   and count(d, "SELECT count(*) FROM rejected") >= 1, 120, f"{total} alerts stored")
        assert terminate(proc) == 0
        stored_once(db, total)
        assert count(db, "SELECT count(*) FROM rejected") == 1
        homes[workers] = files_of(home)
    assert len([path for path in homes[0] if path.endswith(".avro")]) == total
    assert homes[2].keys() == homes[0].keys()
    assert [path for path in homes[0] if homes[2][path] != homes[0][path]] == []


def test_a_consumer_killed_with_its_pool_mid_stream_stores_each_alert_once(
    kafka: KafkaBroker, make_config: Callable[..., Path], consumers: Consumers, tmp_path: Path
) -> None:
    topic, total = unique("ztf_pool_kill"), 600
    kafka.create_topic(topic, partitions=2)
    kafka.produce(topic, distinct_packets(total))
    config_path = pool_config(make_config, tmp_path / "home", kafka.bootstrap, topic, 2, batch_size=20)
    db = config_path.parent / "state" / "ztfd.sqlite3"
    for threshold in (100, 300):
        proc = consumers.start(config_path, topic)
        wait_until(lambda t=threshold: count(db, "SELECT count(*) FROM alerts") >= t, 120, f"{threshold} stored")
        workers = workers_of(proc)
        assert len(workers) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        wait_until(lambda w=workers: not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
                                             for pid in w), 30, "the workers gone with their consumer")
        assert count(db, "SELECT count(*) FROM alerts") < total, "the stream ended before the kill: make it longer"
    proc = consumers.start(config_path, topic)
    wait_until(lambda: count(db, "SELECT count(*) FROM alerts") >= total, 180, "every alert")
    assert terminate(proc) == 0
    stored_once(db, total)
    names = Counter(path.name for path in (config_path.parent / "data").rglob("*.avro"))
    assert len(names) == total and max(names.values()) == 1
    assert not [p for p in (config_path.parent / "data").rglob("*") if p.name.startswith(".")]
    assert count(db, "SELECT sum(next_offset) FROM offsets WHERE topic = ?", topic) == total


def test_a_worker_killed_with_9_costs_its_batch_a_retry_and_no_alert(
    kafka: KafkaBroker, make_config: Callable[..., Path], consumers: Consumers, tmp_path: Path
) -> None:
    topic, total = unique("ztf_pool_worker"), 600
    kafka.create_topic(topic)
    kafka.produce(topic, distinct_packets(total))
    config_path = pool_config(make_config, tmp_path / "home", kafka.bootstrap, topic, 2, batch_size=20)
    db = config_path.parent / "state" / "ztfd.sqlite3"
    proc = consumers.start(config_path, topic)
    wait_until(lambda: count(db, "SELECT count(*) FROM alerts") >= 60, 120, "60 stored")
    first = workers_of(proc)
    for pid in first:
        os.kill(pid, signal.SIGKILL)
    assert count(db, "SELECT count(*) FROM alerts") < total, "the stream ended before the kill: make it longer"
    wait_until(lambda: count(db, "SELECT count(*) FROM alerts") >= total, 180, "every alert")
    assert proc.poll() is None, "the consumer itself went on"
    replaced = workers_of(proc)
    assert len(replaced) == 2 and not set(replaced) & set(first)
    assert terminate(proc) == 0
    stored_once(db, total)
    assert count(db, "SELECT count(*) FROM rejected") == 0


def test_a_message_that_kills_a_worker_is_isolated_and_rejected_while_the_consumer_goes_on(
    kafka: KafkaBroker, make_config: Callable[..., Path]
) -> None:
    topic = unique("breaker_pool")
    kafka.create_topic(topic)
    good = [json.dumps(m).encode() for m in samples.message_stream(11)]
    # Last of the batch: in the worker's slice (the consumer decodes the first half itself).
    produce_with_timestamps(kafka.bootstrap, topic, [(v, None) for v in good[:10]] + [(KILLER, None)])
    config_path = make_config(kafka={"bootstrap_servers": kafka.bootstrap, "group_id": unique("g"),
                                     "topics": [topic], "batch_size": 100, "decode_workers": 1},
                              kafka__formats={topic: FORMAT})
    db = config_path.parent / "state" / "ztfd.sqlite3"
    proc = subprocess.Popen([sys.executable, "-c", CONSUME, "--config", str(config_path), "consume", "--topic", topic],
                            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: count(db, "SELECT count(*) FROM rejected") >= 1, 120, "the killer rejected")
        wait_until(lambda: count(db, "SELECT count(*) FROM alerts") >= 10, 60, "the other ten stored")
        produce_with_timestamps(kafka.bootstrap, topic, [(good[10], None)])  # the topic goes on
        wait_until(lambda: count(db, "SELECT count(*) FROM alerts") >= 11, 60, "the next message stored")
        assert proc.poll() is None, "the consumer never died: its worker did"
        assert terminate(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    conn = sqlite3.connect(db)
    (raw, reason, offset), = conn.execute("SELECT raw, reason, kafka_offset FROM rejected").fetchall()
    conn.close()
    assert (bytes(raw), offset) == (KILLER, 10) and reason == "crashed the decoder (signal 11, SIGSEGV)"
    assert sorted(seqs_on_disk(config_path.parent)) == list(range(11))
    assert count(db, "SELECT count(*) FROM decode_deaths") == count(db, "SELECT count(*) FROM decode_marks") == 0


def test_auto_is_a_worker_per_spare_core_for_the_avro_formats_only() -> None:
    ztf, lasair = sources.source_for("ztf-avro"), sources.source_for("lasair")
    assert workers_for("auto", ztf, cores=4) == 2 and workers_for("auto", ztf, cores=2) == 0
    assert workers_for("auto", lasair, cores=4) == 0 and workers_for(2, lasair) == 2
    assert workers_for(3, sources.source_for("confluent-avro", registry_url="http://127.0.0.1:1")) == 0


def test_closing_the_pool_ends_its_workers_by_themselves() -> None:
    from ztfd.ingest.decodepool import DecodePool

    pool = DecodePool(sources.source_for("ztf-avro").decode, 2)
    pool.start()
    pids = pool.pids
    outcomes = pool.decode([(packet.path.read_bytes(), None) for packet in packets()] + [(HOSTILE, None)])
    assert [o.object_id for o in outcomes[:-1]] == [packet.object_id for packet in packets()]
    assert isinstance(outcomes[-1], sources.InvalidMessageError)
    assert pool.close() == [0, 0], "a worker was killed: it never saw its pipe closed (an end left open)"
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in pids)


def test_a_worker_that_died_between_batches_is_replaced_without_a_death() -> None:
    from ztfd.ingest.decodepool import DecodePool

    pool = DecodePool(sources.source_for("ztf-avro").decode, 1)
    pool.start()
    messages = [(packet.path.read_bytes(), None) for packet in packets()]
    try:
        [first] = pool.pids
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: psutil.Process(first).status() == "zombie" if psutil.pid_exists(first) else True, 30,
                   "the worker dead")
        outcomes = pool.decode(messages)  # not a DecoderDiedError: the worker held nothing of this batch
        assert [o.object_id for o in outcomes] == [packet.object_id for packet in packets()]
        assert pool.pids != [first]
    finally:
        pool.close()
