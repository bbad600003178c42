"""Recreated topics and lost offsets, judged on evidence (ztfd.ingest.partitions) by a consumer on a real broker
(Tansu).

Tansu reports topic ids (KIP-516) but supports neither retention nor DeleteRecords, so a gap cannot be made on it:
the gap test drives the consumer's own code with a broker view that reports an earliest offset past the stored
one, against a real store (tests/test_partitions.py has the rules themselves)."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import child_env, wait_until, ztfd_command
from tests.kafka_fakes import FakeMessage, NoKafka
from tests.test_consumer import (
    Consumers,
    alert_files,
    count,
    first_delivery,
    seqs_on_disk,
    store_batch,
    terminate,
    unique,
)
from ztfd import config, store
from ztfd.embedded import samples
from ztfd.embedded.kafka import KafkaBroker
from ztfd.ingest.consumer import TopicConsumer
from ztfd.ingest.kafka import KafkaAdapter, Refusal
from ztfd.store import gaps as store_gaps


@pytest.fixture
def consumers():
    running = Consumers()
    yield running
    running.stop_all()


def delete_topic(kafka: KafkaBroker, topic: str) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    admin.delete_topics([topic])[topic].result(30)


def test_a_topic_recreated_while_ztfd_was_down_with_more_messages_is_told_apart_by_its_id(
    kafka: KafkaBroker, make_config: Callable[..., Path], consumers: Consumers
) -> None:
    """The new topic already holds more messages than ztfd had read of the old one: offsets alone would take
    its first 20 for redeliveries (lost); the changed topic id starts generation 1 instead."""
    topic, config_path, home, db = first_delivery(kafka, make_config, consumers, "lasair_recreated", 20)
    assert count(db, "SELECT count(*) FROM topic_ids WHERE topic = ?", topic) == 1

    delete_topic(kafka, topic)
    kafka.create_topic(topic)
    kafka.produce(topic, [dict(m, seq=100 + m["seq"]) for m in samples.message_stream(30)])
    proc = consumers.start(config_path, topic)
    wait_until(lambda: count(db, "SELECT count(*) FROM alerts WHERE generation = 1") >= 30, 90, "the new topic")
    assert terminate(proc) == 0
    assert count(db, "SELECT count(*) FROM alerts") == 50
    assert sorted(seqs_on_disk(home)) == [*range(20), *range(100, 130)]
    assert count(db, "SELECT generation FROM offsets WHERE topic = ?", topic) == 1


def test_the_same_topic_read_again_keeps_its_generation_whatever_its_watermarks_say(
    kafka: KafkaBroker, make_config: Callable[..., Path], consumers: Consumers
) -> None:
    """Tansu's uncached high watermark is the base offset of the last batch + 1, below the real end (the kind of
    low answer a new partition leader may give): with the topic id unchanged, no new generation, no duplicate."""
    topic = unique("lasair_same")
    kafka.create_topic(topic)
    kafka.produce(topic, samples.message_stream(60))  # one producer batch: the uncached end reads low
    config_path = make_config(kafka={"bootstrap_servers": kafka.bootstrap, "group_id": unique("g"), "topics": [topic]})
    home = config_path.parent
    db = home / "state" / "ztfd.sqlite3"
    for _ in range(2):  # read it all, then resume at the end after a restart
        proc = consumers.start(config_path, topic)
        wait_until(lambda p=proc: count(db, "SELECT count(*) FROM processes WHERE pid = ?", p.pid) == 1, 60, "up")
        wait_until(lambda: count(db, "SELECT count(*) FROM alerts") >= 60, 90, "every alert")
        assert terminate(proc) == 0
    kafka.produce(topic, [dict(m, seq=200 + m["seq"]) for m in samples.message_stream(5)])
    proc = consumers.start(config_path, topic)
    wait_until(lambda: count(db, "SELECT count(*) FROM alerts") >= 65, 90, "the new alerts")
    assert terminate(proc) == 0
    assert count(db, "SELECT count(*) FROM alerts WHERE generation > 0") == 0
    on_disk = seqs_on_disk(home)
    assert max(on_disk.values()) == 1 and len(alert_files(home)) == 65


class BrokerPastTheStoredOffset(KafkaAdapter):
    """A broker whose retention has passed ztfd's stored offset: the earliest offset it still has is 40."""

    def topic_id(self) -> str | None:
        return "id-1"

    def watermarks(self, partition: int) -> tuple[int, int] | None:
        return (40, 60)


def test_offsets_gone_from_the_broker_are_recorded_once_as_a_gap_and_logged(
    make_config: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    config_path = make_config(kafka={"topics": ["t"]})
    cfg = config.load(config_path)
    messages = [FakeMessage(json.dumps(m).encode(), offset) for offset, m in enumerate(samples.message_stream(60))]
    consumer = TopicConsumer(cfg, "t", "consumer:t", kafka=BrokerPastTheStoredOffset(cfg.kafka, "t"))
    consumer.kafka.consumer = NoKafka()
    store_batch(consumer, messages[:10])  # ztfd read 0..9, then was down while retention deleted 10..39
    with caplog.at_level(logging.ERROR, logger="ztfd.ingest.assignment"):
        store_batch(consumer, messages[40:50])
    consumer.close()
    # A restart that reads the same offsets again.
    again = TopicConsumer(cfg, "t", "consumer:t", kafka=BrokerPastTheStoredOffset(cfg.kafka, "t"))
    again.kafka.consumer = NoKafka()
    again.assignment.watch.start(0, generation=0, expected=10)
    store_batch(again, messages[40:60])
    again.close()
    conn = store.connect(cfg.db_path)
    gaps = store_gaps.recent_gaps(conn)
    assert [(g.topic, g.partition, g.generation, g.first_offset, g.last_offset, g.missing) for g in gaps] == [
        ("t", 0, 0, 10, 39, 30)
    ]
    assert store_gaps.missing_by_topic(conn) == {"t": 30}
    assert sqlite3.connect(cfg.db_path).execute("SELECT count(*) FROM alerts").fetchone()[0] == 30
    conn.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "10..39 (30 alerts)" in errors[0]
    shown = subprocess.run(ztfd_command(config_path, "status", "--json"), env=child_env(), capture_output=True,
                           text=True, timeout=60)
    report = json.loads(shown.stdout)
    assert [(g["topic"], g["first_offset"], g["last_offset"], g["missing"]) for g in report["gaps"]] == [
        ("t", 10, 39, 30)]
    assert [t["lost_upstream"] for t in report["topics"] if t["topic"] == "t"] == [30]
    table = subprocess.run(ztfd_command(config_path, "status"), env=child_env(), capture_output=True, text=True,
                           timeout=60).stdout
    assert "LOST UPSTREAM t[0]: offsets 10..39 (30 alerts)" in table


def test_the_kafka_adapter_tells_which_commits_the_broker_took_and_which_it_refused(kafka: KafkaBroker) -> None:
    topic = f"answers-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(topic, partitions=2)
    group = f"g-{uuid.uuid4().hex[:8]}"
    absent = f"absent-{uuid.uuid4().hex[:8]}"  # a topic the broker does not have: it refuses its commits

    @contextlib.contextmanager
    def adapter_of(topic: str) -> Iterator[tuple[KafkaAdapter, list[tuple[dict[int, int], dict[int, Refusal]]]]]:
        adapter = KafkaAdapter(config.KafkaConfig(group_id=group, topics=(topic,), bootstrap_servers=kafka.bootstrap),
                               topic)
        answers: list[tuple[dict[int, int], dict[int, Refusal]]] = []
        adapter.on_commit = lambda taken, refused: answers.append((taken, refused))
        adapter.open()
        try:
            yield adapter, answers
        finally:
            adapter.close()

    def answer_to(topic: str, offsets: dict[int, int]) -> tuple[dict[int, int], dict[int, Refusal]]:
        with adapter_of(topic) as (adapter, answers):
            adapter.commit(offsets)  # without waiting: the answer comes with a later poll, on this thread
            wait_until(lambda: adapter.next_batch(0.1, 10, 1 << 20) == [] and answers, 30, "the commit's answer")
        [answer] = answers
        return answer

    assert answer_to(topic, {1: 7}) == ({1: 7}, {})
    taken, refused = answer_to(absent, {0: 3})
    assert taken == {} and list(refused) == [0] and refused[0].name == "UNKNOWN_TOPIC_OR_PART"
    # waiting for the answer (a partition handed back): what Kafka took, per partition
    with adapter_of(topic) as (adapter, _):
        assert adapter.commit_now({0: 4, 1: 9}) == {0: 4, 1: 9}
    with adapter_of(absent) as (adapter, _):
        assert adapter.commit_now({0: 3}) == {}


def test_the_kafka_adapter_reads_how_long_the_broker_keeps_a_topics_messages(kafka: KafkaBroker) -> None:
    """Fleet mode warns of a commit held back near the broker's retention: the adapter reads ``retention.ms`` from
    the broker (given at the topic's creation here; Tansu says nothing for a topic created without it)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    kept, plain = f"kept-{uuid.uuid4().hex[:8]}", f"plain-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})  # kept alive until the answer
    admin.create_topics([NewTopic(kept, 1, 1, config={"retention.ms": str(4 * 86400 * 1000)})])[kept].result(30)
    kafka.create_topic(plain)

    def retention(topic: str) -> float | None:
        adapter = KafkaAdapter(config.KafkaConfig(group_id="g", topics=(topic,), bootstrap_servers=kafka.bootstrap),
                               topic)
        adapter.open()
        try:
            return adapter.retention_seconds()
        finally:
            adapter.close()

    assert retention(kept) == 4 * 86400.0
    assert retention(plain) is None


class BrokerKeepingTwoDays(KafkaAdapter):
    """A broker that keeps the topic's messages for two days (``retention.ms``)."""

    def retention_seconds(self) -> float | None:
        return 2 * 86400.0


def test_a_fleet_consumer_warns_when_a_stamp_job_may_hold_its_commit_past_the_brokers_retention(
    make_config: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    """``stamps.unavailable_give_up`` (a week by default) longer than the topic's retention: a job waiting that long
    holds its partition's commit after the broker dropped the messages, and a host lost then loses them. Said at
    start, naming the key; a give-up inside the retention is not."""
    def warnings(give_up: float) -> list[str]:
        cfg = config.load(make_config(kafka={"topics": ["t"], "assignment": "group"}, s3={"bucket": "b"},
                                      stamps={"enabled": True, "unavailable_give_up": give_up}))
        consumer = TopicConsumer(cfg, "t", "consumer:t", kafka=BrokerKeepingTwoDays(cfg.kafka, "t"))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ztfd.ingest.consumer"):
            consumer._judge_retention()
        assert consumer.commits is not None and consumer.commits.keeps_for == 2 * 86400.0
        return [r.getMessage() for r in caplog.records if "stamps.unavailable_give_up" in r.getMessage()]

    [said] = warnings(604800.0)
    assert said.startswith("config: stamps.unavailable_give_up (168 h) is not shorter than t's retention")
    assert warnings(86400.0) == []


class BrokerFailingAtTheClose(KafkaAdapter):
    """A broker whose client fails while the consumer hands its partitions back; records that it was closed."""

    closed = False

    def pause(self) -> None:
        raise RuntimeError("the client failed")

    def close(self) -> None:
        self.closed = True


def test_a_fleet_consumer_whose_hand_back_fails_still_closes_its_clients_and_store(
    make_config: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Closing in fleet mode waits for the group and commits: an exception there (librdkafka re-raises one from a
    rebalance callback, the store is full) must not skip closing the Kafka clients (the leave) and the store. Said,
    and the next owner starts at Kafka's last commit."""
    cfg = config.load(make_config(kafka={"topics": ["t"], "assignment": "group"}, s3={"bucket": "b"}))
    kafka = BrokerFailingAtTheClose(cfg.kafka, "t")
    consumer = TopicConsumer(cfg, "t", "consumer:t", kafka=kafka)
    assert consumer.commits is not None
    kafka.assigned.add(0)
    consumer.commits.hold({}, [0])
    with caplog.at_level(logging.WARNING, logger="ztfd.ingest.consumer"):
        consumer.close()
    assert kafka.closed
    assert "t: handing the partitions back failed (the client failed)" in caplog.text
    with pytest.raises(sqlite3.ProgrammingError):  # the store was closed too
        consumer.conn.execute("SELECT 1")
