"""``ztfd consume`` against a real Kafka broker (Tansu): exactly once across kill -9, poison, late topics."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sqlite3
import subprocess
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import child_env, wait_until, ztfd_command
from tests.kafka_fakes import FakeMessage, NoKafka
from ztfd import sources, store
from ztfd.embedded import samples
from ztfd.embedded.kafka import KafkaBroker
from ztfd.ingest.consumer import TopicConsumer
from ztfd.store import jobs as store_jobs
from ztfd.store.alerts import alerts_by_id
from ztfd.store.manifest import manifest_files


def count(db: Path, sql: str, *args: object) -> int:
    if not db.exists():
        return 0
    conn = sqlite3.connect(db, timeout=30)
    try:
        return conn.execute(sql, args).fetchone()[0]
    except sqlite3.OperationalError:  # the schema is being created by the consumer right now
        return 0
    finally:
        conn.close()


def alert_files(home: Path) -> list[Path]:
    return sorted((home / "data").rglob("*.json"))


def seqs_on_disk(home: Path) -> Counter[int]:
    return Counter(json.loads(path.read_bytes())["message"]["seq"] for path in alert_files(home))


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


class Consumers:
    """Start ``ztfd consume`` child processes and make sure none outlives the test."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, config_path: Path, topic: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(ztfd_command(config_path, "consume", "--topic", topic), env=child_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)


@pytest.fixture
def consumers() -> Iterator[Consumers]:
    running = Consumers()
    yield running
    running.stop_all()


def terminate(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(30)


def test_kill_minus_9_mid_stream_loses_and_duplicates_nothing(
    kafka: KafkaBroker, make_config: Callable[..., Path], consumers: Consumers
) -> None:
    topic, total = unique("lasair_kill"), 2500
    kafka.create_topic(topic, partitions=2)
    kafka.produce(topic, samples.message_stream(total))
    config_path = make_config(kafka={"bootstrap_servers": kafka.bootstrap, "group_id": unique("g"), "topics": [topic],
                                     "batch_size": 40})
    home = config_path.parent
    db = home / "state" / "ztfd.sqlite3"
    stored = lambda: count(db, "SELECT count(*) FROM alerts")  # noqa: E731
    kills = 0
    for threshold in (300, 900, 1600):
        proc = consumers.start(config_path, topic)
        wait_until(lambda t=threshold: stored() >= t, 90, f"{threshold} alerts stored")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        kills += 1
        assert stored() < total, "the stream ended before the kill: make it longer"
    proc = consumers.start(config_path, topic)
    wait_until(lambda: count(db, "SELECT count(*) FROM alerts") >= total, 120, "every alert")
    assert terminate(proc) == 0
    assert kills == 3
    assert stored() == total
    on_disk = seqs_on_disk(home)
    assert set(on_disk) == set(range(total)), "an alert is missing on disk"
    assert max(on_disk.values()) == 1, "an alert was written twice"
    assert not [p for p in (home / "data").rglob("*") if p.name.startswith(".")], "a temporary file was left"
    assert count(db, "SELECT count(*) FROM manifest WHERE path LIKE 'data/%'") == total
    assert count(db, "SELECT sum(next_offset) FROM offsets WHERE topic = ?", topic) == total


def test_two_topics_at_once_and_stamp_jobs_queued(
    kafka: KafkaBroker, make_config: Callable[..., Path], consumers: Consumers
) -> None:
    topics = [unique("lasair_a"), unique("lasair_b")]
    for topic in topics:
        kafka.create_topic(topic)
    messages = list(samples.message_stream(40))
    kafka.produce(topics[0], messages[:25])
    kafka.produce(topics[1], messages[25:])
    config_path = make_config(kafka={"bootstrap_servers": kafka.bootstrap, "group_id": unique("g"), "topics": topics},
                              stamps={"enabled": True})
    home = config_path.parent
    db = home / "state" / "ztfd.sqlite3"
    procs = [consumers.start(config_path, topic) for topic in topics]
    wait_until(lambda: count(db, "SELECT count(*) FROM alerts") >= 40, 90, "both topics stored")
    assert [terminate(proc) for proc in procs] == [0, 0]
    for topic, expected in zip(topics, (messages[:25], messages[25:]), strict=True):
        files = list((home / "data").glob(f"*/{topic}/*.json"))
        assert sorted(json.loads(p.read_bytes())["message"]["seq"] for p in files) == [m["seq"] for m in expected]
        log_lines = (home / "logs" / f"{topic}.log").read_text().splitlines()
        assert len(log_lines) == len(expected)
    # One stamp job per object and observation time (Lasair resends objects), carrying what the fetcher needs.
    def observed(m: dict) -> str:
        if "mjdmax" in m:
            return f"{m['mjdmax']:.6f}"
        if "jdmax" in m:
            return f"{m['jdmax'] - 2400000.5:.6f}"
        return m["UTC"][:10]

    distinct = {(m["objectId"], observed(m)) for m in messages}
    assert 10 < len(distinct) < 40, "the sample stream should repeat objects"
    conn = store.connect(db)
    queued = store_jobs.list_jobs(conn)
    assert [job.state for job in queued] == ["ready"] * len(distinct)
    # Each job refers to its stored alert, which carries what the fetcher needs.
    alerts = alerts_by_id(conn, (job.alert_id for job in queued))
    assert sorted(alerts) == sorted(job.alert_id for job in queued)
    assert all(a.object_id.startswith("ZTF") and a.date for a in alerts.values())
    # A file's partition date is the UTC date of its newest observation time.
    sample = json.loads(alert_files(home)[0].read_bytes())
    assert sample["ztfd"]["date"] == alert_files(home)[0].parent.parent.name


POISON = [
    (b"", "empty message"),
    (b"\xc3\x28 not utf-8", "not UTF-8"),
    (b"{'objectId': 'ZTF21abvawaj'}", "not valid JSON"),
    (b"[1, 2, 3]", "not a JSON object"),
    (b'{"ramean": 1.5, "UTC": "2021-09-01 06:38:12"}', "no objectId"),
    (b'{"objectId": "../../../etc/cron.d/x"}', "not a plain identifier"),
    (b'{"objectId": "ZTF21abvawaj", "mjdmax": "59458.26"}', "time field mjdmax must be a number"),
    (b'{"objectId": "ZTF21abvawaj", "jdmax": 1.0}', "out of range"),
    (json.dumps({"objectId": "ZTF21abvawaj", "pad": "x" * 5000}).encode(), "exceeds kafka.max_message_bytes"),
]


def test_poison_messages_are_kept_with_their_reason_and_the_stream_goes_on(
    kafka: KafkaBroker, make_config: Callable[..., Path], consumers: Consumers
) -> None:
    topic = unique("lasair_poison")
    kafka.create_topic(topic)
    good = list(samples.message_stream(20))
    interleaved = list(itertools.chain.from_iterable(
        zip([json.dumps(m).encode() for m in good[: len(POISON)]], [raw for raw, _ in POISON], strict=True)))
    kafka.produce(topic, interleaved)
    config_path = make_config(kafka={"bootstrap_servers": kafka.bootstrap, "group_id": unique("g"), "topics": [topic],
                                     "max_message_bytes": 4096})
    db = config_path.parent / "state" / "ztfd.sqlite3"
    proc = consumers.start(config_path, topic)
    wait_until(lambda: count(db, "SELECT count(*) FROM rejected") >= len(POISON), 90, "poison rejected")
    kafka.produce(topic, good[len(POISON):])  # the stream goes on after the poison
    wait_until(lambda: count(db, "SELECT count(*) FROM alerts") >= len(good), 60, "good alerts")
    assert proc.poll() is None, "the consumer must not die on poison"
    assert terminate(proc) == 0
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT raw, reason FROM rejected ORDER BY kafka_offset").fetchall()
    assert [bytes(raw or b"") for raw, _ in rows] == [raw for raw, _ in POISON]
    for (_, reason), (_, expected) in zip(rows, POISON, strict=True):
        assert expected in reason
    assert sorted(seqs_on_disk(config_path.parent)) == list(range(20))
    listing = subprocess.run(ztfd_command(config_path, "rejected", "--limit", "50"), capture_output=True, text=True,
                             env=child_env(), timeout=60)
    assert listing.returncode == 0 and len(listing.stdout.splitlines()) == len(POISON)
    assert "not a plain identifier" in listing.stdout
    assert "rejected" in (config_path.parent / "logs" / "errors.log").read_text()


def test_a_topic_created_after_the_consumer_started_is_waited_for(
    kafka: KafkaBroker, make_config: Callable[..., Path], consumers: Consumers
) -> None:
    topic = unique("lasair_late")
    config_path = make_config(kafka={"bootstrap_servers": kafka.bootstrap, "group_id": unique("g"), "topics": [topic]})
    db = config_path.parent / "state" / "ztfd.sqlite3"
    proc = consumers.start(config_path, topic)
    wait_until(lambda: count(db, "SELECT count(*) FROM processes WHERE role = 'consumer'") == 1, 60, "consumer up")
    kafka.create_topic(topic)
    kafka.produce(topic, samples.message_stream(10))
    wait_until(lambda: count(db, "SELECT count(*) FROM alerts") >= 10, 120, "late topic consumed")
    assert proc.poll() is None
    assert terminate(proc) == 0


def first_delivery(
    kafka: KafkaBroker, make_config: Callable[..., Path], consumers: Consumers, prefix: str, total: int
) -> tuple[str, Path, Path, Path]:
    """A new topic of ``total`` sample messages, consumed to the end by a consumer that then stops cleanly:
    (topic, config path, home, store path)."""
    topic = unique(prefix)
    kafka.create_topic(topic)
    kafka.produce(topic, samples.message_stream(total))
    config_path = make_config(kafka={"bootstrap_servers": kafka.bootstrap, "group_id": unique("g"), "topics": [topic]})
    home = config_path.parent
    db = home / "state" / "ztfd.sqlite3"
    proc = consumers.start(config_path, topic)
    wait_until(lambda: count(db, "SELECT count(*) FROM alerts") >= total, 90, "first delivery")
    assert terminate(proc) == 0
    return topic, config_path, home, db


def test_redelivery_writes_nothing_twice(
    kafka: KafkaBroker, make_config: Callable[..., Path], consumers: Consumers
) -> None:
    topic, config_path, home, db = first_delivery(kafka, make_config, consumers, "lasair_redeliver", 30)
    before = {path: path.stat().st_mtime_ns for path in alert_files(home)}
    manifest_before = count(db, "SELECT count(*) FROM manifest")
    # Forget where we were and join as a new group: Kafka delivers the whole topic again.
    conn = sqlite3.connect(db)
    conn.execute("DELETE FROM offsets")
    conn.commit()
    conn.close()
    config_path.write_text(config_path.read_text().replace('group_id = "', 'group_id = "again-'))
    proc = consumers.start(config_path, topic)
    wait_until(lambda: count(db, "SELECT count(*) FROM offsets WHERE next_offset >= 30") == 1, 90, "redelivery")
    kafka.produce(topic, [dict(m, seq=100 + m["seq"]) for m in samples.message_stream(5)])
    wait_until(lambda: count(db, "SELECT count(*) FROM alerts") >= 35, 60, "new messages after the redelivery")
    assert terminate(proc) == 0
    assert count(db, "SELECT count(*) FROM alerts") == 35
    after = {path: path.stat().st_mtime_ns for path in alert_files(home)}
    assert {p: after[p] for p in before} == before, "a redelivered alert's file was rewritten"
    assert len(after) == 35
    assert count(db, "SELECT count(*) FROM manifest") == manifest_before + 5


def store_batch(consumer: TopicConsumer, messages: list[FakeMessage]) -> None:
    """One batch start to end, as the pipeline in ``TopicConsumer.run`` does it with batches overlapping."""
    batch = consumer.prepare(messages)
    if batch is not None:
        consumer.write_and_store(batch)


def test_a_crash_between_the_files_and_the_store_writes_the_same_files_again(
    make_config: Callable[..., Path],
) -> None:
    """A kill -9 after the files are written but before the store commits: the redelivered batch replaces
    the same files and is stored once."""
    from ztfd import config

    cfg = config.load(make_config(kafka={"topics": ["t"]}))
    batch = [FakeMessage(json.dumps(m).encode(), offset) for offset, m in enumerate(samples.message_stream(12))]
    crashed = TopicConsumer(cfg, "t", "consumer:t")
    prepared = crashed.prepare(batch)
    assert prepared is not None
    crashed.files.submit(prepared.files(),
                         root=str(cfg.home))  # the files, and the process dies before the store transaction
    crashed.files.wait()
    crashed.close()
    written_before = sorted(alert_files(cfg.home))
    assert len(written_before) == 12
    assert count(cfg.db_path, "SELECT count(*) FROM alerts") == 0
    assert count(cfg.db_path, "SELECT count(*) FROM offsets") == 0  # so Kafka redelivers the batch

    for _restart in range(2):  # the redelivery, then once more as after lost offsets: nothing is written again
        restarted = TopicConsumer(cfg, "t", "consumer:t")
        restarted.kafka.consumer = NoKafka()
        store_batch(restarted, batch)
        restarted.close()
    assert sorted(alert_files(cfg.home)) == written_before
    assert sorted(seqs_on_disk(cfg.home)) == list(range(12))
    assert count(cfg.db_path, "SELECT count(*) FROM alerts") == 12
    assert count(cfg.db_path, "SELECT count(*) FROM manifest") == 12
    assert count(cfg.db_path, "SELECT next_offset FROM offsets WHERE topic = 't'") == 12


class BurstThenQuiet(NoKafka):
    """A Kafka consumer that hands out a burst of messages, then has none: at each wait that is more than a
    glance, it notes how many alerts the consumer has seen stored; after a few such waits it asks it to stop."""

    def __init__(self, messages: list[FakeMessage], consumer: TopicConsumer) -> None:
        self.messages, self.consumer = list(messages), consumer
        self.stored_at_each_wait: list[int] = []

    def poll(self, timeout: float) -> FakeMessage | None:
        if self.messages:
            return self.messages.pop(0)
        if timeout >= 0.1:
            self.stored_at_each_wait.append(self.consumer.stored_total)
            if len(self.stored_at_each_wait) >= 2:
                self.consumer.stopping.set()
        return None

    def consume(self, limit: int, _timeout: float) -> list[FakeMessage]:
        taken, self.messages = self.messages[:limit], self.messages[limit:]
        return taken


def test_a_burst_ending_on_a_full_batch_is_stored_before_the_consumer_waits_at_kafka(
    make_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last batch of a burst, full to the batch size, is stored and seen stored (committed to Kafka, logged)
    before the consumer sits in a poll for new messages: it once waited there for the whole poll timeout first."""
    from ztfd import config

    cfg = config.load(make_config(kafka={"topics": ["t"], "batch_size": 10}))
    burst = [FakeMessage(json.dumps(m).encode(), offset) for offset, m in enumerate(samples.message_stream(20))]
    consumer = TopicConsumer(cfg, "t", "consumer:t")
    kafka = BurstThenQuiet(burst, consumer)
    monkeypatch.setattr(consumer.kafka, "_new_consumer", lambda: kafka)
    monkeypatch.setattr(consumer.kafka, "_new_admin", lambda: None)
    monkeypatch.setattr(consumer, "_look_at_topic", lambda force=False: None)
    monkeypatch.setattr(consumer.stopping, "install", lambda *args, **kwargs: None)
    monkeypatch.setattr(consumer.files, "answered", lambda: False)  # as if the writer were still at the last batch
    assert consumer.run() == 0
    assert kafka.stored_at_each_wait and all(stored == 20 for stored in kafka.stored_at_each_wait)


def test_a_recreated_topic_starts_a_new_generation(
    kafka: KafkaBroker, make_config: Callable[..., Path], consumers: Consumers
) -> None:
    """Lasair deletes and recreates a topic when its filter is edited: offsets restart at 0."""
    from confluent_kafka.admin import AdminClient

    topic = unique("lasair_edited")
    kafka.create_topic(topic)
    kafka.produce(topic, samples.message_stream(20))
    config_path = make_config(kafka={"bootstrap_servers": kafka.bootstrap, "group_id": unique("g"), "topics": [topic]})
    home = config_path.parent
    db = home / "state" / "ztfd.sqlite3"
    proc = consumers.start(config_path, topic)
    wait_until(lambda: count(db, "SELECT count(*) FROM alerts") >= 20, 90, "first generation")
    first = {path: path.read_bytes() for path in alert_files(home)}
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})  # kept alive until the deletion is confirmed
    admin.delete_topics([topic])[topic].result(30)
    kafka.create_topic(topic)
    kafka.produce(topic, [dict(m, seq=100 + m["seq"]) for m in samples.message_stream(5)])

    # librdkafka may crash when its topic vanishes under it; the supervisor restarts it, and so do we here.
    def all_stored() -> bool:
        nonlocal proc
        if count(db, "SELECT count(*) FROM alerts") >= 25:
            return True
        if proc.poll() is not None:
            proc = consumers.start(config_path, topic)
        return False

    wait_until(all_stored, 120, "the new generation's alerts", interval=0.2)
    assert count(db, "SELECT count(*) FROM alerts WHERE generation = 1") == 5
    if proc.poll() is None:
        assert terminate(proc) == 0
    assert {path: path.read_bytes() for path in first} == first, "an alert of the old topic was overwritten"
    new_files = [path for path in alert_files(home) if path not in first]
    assert len(new_files) == 5 and all("_g1-p0-o" in path.name for path in new_files)
    assert sorted(seqs_on_disk(home)) == [*range(20), *range(100, 105)]


def test_a_batch_spanning_a_recreation_resumes_in_the_new_generation() -> None:
    from ztfd.ingest.batch import Incoming, next_offsets

    # The deleted topic's last offsets (100, 101) and the recreated topic's first (0..4) in one batch.
    items = [Incoming(None, 0, 100, 0), Incoming(None, 0, 101, 0)] + [Incoming(None, 0, o, 1) for o in range(5)]
    items.append(Incoming(None, 1, 7, 0))
    assert next_offsets(items) == {0: (1, 5), 1: (0, 8)}


def test_stale_temporaries_of_dead_writers_are_removed_but_not_those_of_live_ones(tmp_path: Path) -> None:
    from ztfd.files import remove_stale_temporaries

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".a.json.{dead.pid}-1.tmp"
    live = tmp_path / f".a.json.{os.getpid()}-1.tmp"
    keep = tmp_path / "a.json"
    for path in (stale, live, keep):
        path.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == 1
    assert not stale.exists() and live.exists() and keep.exists()


def test_a_second_consumer_of_the_same_topic_stores_nothing_twice(make_config: Callable[..., Path]) -> None:
    """Two consumers racing on one topic (a misconfiguration): the store's key keeps each alert once, and only
    the consumer that stored an alert queues its stamp job and records its file."""
    from ztfd import config

    cfg = config.load(make_config(kafka={"topics": ["t"]}, stamps={"enabled": True}))
    batch = [FakeMessage(json.dumps(m).encode(), offset) for offset, m in enumerate(samples.message_stream(12))]
    first = TopicConsumer(cfg, "t", "consumer:t")
    first.kafka.consumer = NoKafka()
    store_batch(first, batch[:5])
    first.close()
    second = TopicConsumer(cfg, "t", "consumer:t#2")
    second.kafka.consumer = NoKafka()
    with pytest.MonkeyPatch.context() as patch:  # as if it had read the batch before the first one stored it
        patch.setattr(second.builder, "_not_yet_stored", lambda valid: valid)
        prepared = second.prepare(batch)
        assert prepared is not None and len(prepared.documents) == 12
        accepted = second.write_and_store(prepared)
    second.close()
    assert sorted(entry.item.offset for entry in accepted) == list(range(5, 12))
    assert count(cfg.db_path, "SELECT count(*) FROM alerts") == 12
    assert count(cfg.db_path, "SELECT count(DISTINCT alert_id) FROM jobs") == count(cfg.db_path,
                                                                                  "SELECT count(*) FROM jobs")
    assert count(cfg.db_path, "SELECT count(*) FROM manifest") == 12


# --- no message can stop a partition (issue 12, item 1) ---------------------------------------------------------------

BEYOND_YEAR_9999_MS = 300_000_000_000_000  # a Kafka timestamp a producer may set (int64 ms) that is no date
HOSTILE = [  # (value, Kafka timestamp or None, what the reason says)
    (b'{"objectId":"ZTF21abcdefh","x":' + b"1" * 5000 + b"}", None, "more than 4300 digits"),
    (b'{"objectId":"ZTF21abcdefh","UTC":"0001-01-01T00:00:00+01:00"}', None, "UTC"),
    (b'{"objectId":"ZTF21abvawaj","mjdmax":59458.2}', BEYOND_YEAR_9999_MS, "Kafka timestamp"),
    (b"[" * 100_000 + b"]" * 100_000, None, "nested too deeply"),
    (b'{"objectId":"ZTF21ab\\ud800x"}', None, "not a plain identifier"),
    (b'{"diaObjectId":99999999999999999999999999999999}', None, "64-bit"),
    (b'{"objectId":"ZTF21abvawaj","jdmax":1e308}', None, "out of range"),
]


def produce_with_timestamps(bootstrap: str, topic: str, messages: list[tuple[bytes, int | None]]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": False})
    for value, timestamp in messages:
        producer.produce(topic, value=value, **({"timestamp": timestamp} if timestamp is not None else {}))
    assert producer.flush(60) == 0


def test_hostile_messages_between_good_ones_are_rejected_and_every_good_one_stored(
    kafka: KafkaBroker, make_config: Callable[..., Path], consumers: Consumers
) -> None:
    """Each of these once stopped its topic for good (the consumer died before storing the batch, restarted at
    the same offset and died again): now each is rejected with its reason and the stream goes on."""
    topic = unique("lasair_hostile")
    kafka.create_topic(topic)
    good = [json.dumps(m).encode() for m in samples.message_stream(len(HOSTILE) + 1)]
    interleaved: list[tuple[bytes, int | None]] = [(good[0], None)]
    for (value, timestamp, _), after in zip(HOSTILE, good[1:], strict=True):
        interleaved += [(value, timestamp), (after, None)]
    produce_with_timestamps(kafka.bootstrap, topic, interleaved)
    config_path = make_config(kafka={"bootstrap_servers": kafka.bootstrap, "group_id": unique("g"), "topics": [topic]})
    db = config_path.parent / "state" / "ztfd.sqlite3"
    proc = consumers.start(config_path, topic)
    wait_until(lambda: count(db, "SELECT count(*) FROM alerts") >= len(good), 90, "every good message stored")
    wait_until(lambda: count(db, "SELECT count(*) FROM rejected") >= len(HOSTILE), 30, "every hostile one rejected")
    assert proc.poll() is None, "no message may stop the consumer"
    assert terminate(proc) == 0
    assert sorted(seqs_on_disk(config_path.parent)) == list(range(len(good)))
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT raw, reason FROM rejected ORDER BY kafka_offset").fetchall()
    assert [bytes(raw) for raw, _ in rows] == [value for value, _, _ in HOSTILE]
    for (_, reason), (_, _, expected) in zip(rows, HOSTILE, strict=True):
        assert expected in reason, reason
    assert count(db, "SELECT next_offset FROM offsets") == len(interleaved)


class FakeCutoutSource:
    """A source whose packets carry their stamps (as Avro alerts do), and one that breaks on ``b"boom"``."""

    format = "test-cutouts"

    def __init__(self, **_settings: object) -> None:
        pass

    def decode(self, value: bytes | None, key: bytes | None) -> sources.Alert:
        if value == b"boom":
            raise RuntimeError("a bug in a source")
        candid = value.decode()  # type: ignore[union-attr]
        jd = 2459458.76448 + int(candid[-3:]) / 86400  # each detection at its own time
        return sources.Alert(
            raw=b"\x00avro\x01" + value, survey=sources.ZTF, object_id="ZTF21abvawaj",  # type: ignore[operator]
            detection_id=candid, times=[sources.TimeField("jd", jd, "jd", "utc")],
            observation_key="jd", date_rule=sources.UTC_DATE, suffix=".avro", view={"candid": candid},
            cutouts=tuple(sources.Cutout(kind, f"{kind} of {candid}".encode(), ".fits.gz")
                          for kind in sources.STAMP_TYPES),
        )


def test_a_source_with_cutouts_gets_them_written_and_recorded_with_its_alert(
    make_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ztfd import config

    monkeypatch.setitem(sources.SOURCES, FakeCutoutSource.format, FakeCutoutSource)
    cfg = config.load(make_config(kafka={"topics": ["t"]}, kafka__formats={"t": FakeCutoutSource.format},
                                  stamps={"enabled": True}))
    consumer = TopicConsumer(cfg, "t", "consumer:t")
    consumer.kafka.consumer = NoKafka()
    store_batch(consumer, [FakeMessage(b"1704217901015015001", 0), FakeMessage(b"boom", 1),
                           FakeMessage(b"1704174284215015008", 2)])
    consumer.close()
    home, date = cfg.home, "2021-09-01"
    for offset, candid in ((0, "1704217901015015001"), (2, "1704174284215015008")):
        raw = (home / f"data/{date}/t/ZTF21abvawaj_p0-o{offset}.avro").read_bytes()
        assert raw == b"\x00avro\x01" + candid.encode()
        companion = json.loads((home / f"data/{date}/t/ZTF21abvawaj_p0-o{offset}.json").read_bytes())
        assert companion["message"] == {"candid": candid} and companion["ztfd"]["detection_id"] == candid
        for kind in sources.STAMP_TYPES:
            path = home / f"images/{date}/ZTF21abvawaj/{candid}_{kind}.fits.gz"
            assert path.read_bytes() == f"{kind} of {candid}".encode()
    conn = store.connect(cfg.db_path)
    recorded = {row.path for row in manifest_files(conn)}
    assert len(recorded) == 2 * (2 + 3)  # per alert: its raw file, its companion, three cutouts: one transaction
    assert all(path in recorded for path in (f"images/{date}/ZTF21abvawaj/1704217901015015001_science.fits.gz",
                                            f"data/{date}/t/ZTF21abvawaj_p0-o0.avro"))
    stored = alerts_by_id(conn, [1, 2])
    assert [(a.kafka_offset, a.survey, a.detection_id) for a in stored.values()] == [
        (0, "ztf", "1704217901015015001"), (2, "ztf", "1704174284215015008")]
    ((reason,),) = conn.execute("SELECT reason FROM rejected").fetchall()
    assert reason == "cannot be stored: RuntimeError: a bug in a source"
    assert len(store_jobs.list_jobs(conn)) == 2  # the worker will find the stamps there and draw the previews


def test_a_writer_killed_in_the_middle_of_a_batch_leaves_nothing_torn(make_config: Callable[..., Path]) -> None:
    """Alert files are created under their final names, listed first in the writer's journal. A writer killed
    with -9 mid-batch: its files are whole, torn or missing; ``sync --full`` records none of them meanwhile; the
    restarted consumer removes them (its alerts are not stored) and the redelivery writes them whole, once."""
    from ztfd import config
    from ztfd.ingest import journal
    from ztfd.sync.reconcile import reconcile

    cfg = config.load(make_config(kafka={"topics": ["t"]}))
    batch = [FakeMessage(json.dumps(m).encode(), offset) for offset, m in enumerate(samples.message_stream(12))]
    first = TopicConsumer(cfg, "t", "consumer:t")
    first.kafka.consumer = NoKafka()
    store_batch(first, batch[:4])  # stored before the kill: its files must stay
    pid = first.files.pid
    assert pid is not None
    prepared = first.prepare(batch[4:])
    assert prepared is not None
    os.kill(pid, signal.SIGKILL)  # the writer dies; what it was writing is simulated below, as its journal says
    wait_until(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
               timeout=10)
    entries = [(entry.alert.partition, entry.alert.generation, entry.alert.kafka_offset, path)
               for entry in prepared.to_store.alerts for path in entry.files]
    dead = journal.WriteJournal(journal.journal_folder(cfg.state_dir), "t", pid)  # the dead writer's journal
    dead.begin(entries)
    files = prepared.files()
    for path, data in files[:3]:  # whole, then one torn, the rest never written
        (cfg.home / path).parent.mkdir(parents=True, exist_ok=True)
        (cfg.home / path).write_bytes(data)
    (cfg.home / files[3][0]).parent.mkdir(parents=True, exist_ok=True)
    (cfg.home / files[3][0]).write_bytes(files[3][1][: len(files[3][1]) // 2])
    first.files.close()
    first.close()

    alive = journal.WriteJournal(journal.journal_folder(cfg.state_dir), "t", os.getpid())  # another writer of t
    assert journal.sweep(cfg.home, cfg.state_dir, "t", lambda *_: ()) == 0  # no sweep while it may write
    assert (cfg.home / files[0][0]).exists()
    alive.end()
    dead.end()  # (only its lock: its batch was never stored, so the journal stays for the sweep)
    assert dead.path.exists()

    conn = store.connect(cfg.db_path)
    try:
        plan = reconcile(conn, cfg)
        assert not {path for path, _, _ in plan.added} & {path for path, _ in files}  # sync --full leaves them
    finally:
        conn.close()

    restarted = TopicConsumer(cfg, "t", "consumer:t")
    restarted.kafka.consumer = NoKafka()
    restarted.sweep_temporaries()
    assert not any((cfg.home / path).exists() for path, _ in files[:4])  # whole or torn: not stored, removed
    assert len(alert_files(cfg.home)) == 4  # the stored batch's files stay
    assert [p.name for p in journal.journal_folder(cfg.state_dir).iterdir()] == ["t.lock"]  # the journal swept
    store_batch(restarted, batch[4:])  # Kafka's redelivery
    restarted.close()
    assert sorted(seqs_on_disk(cfg.home)) == list(range(12))  # every file whole (each parses), once
    assert all((cfg.home / path).is_file() for path, _ in files)
    assert count(cfg.db_path, "SELECT count(*) FROM manifest") == 12


def test_sync_full_judges_an_unrecorded_file_after_reading_it(make_config: Callable[..., Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``sync --full`` reads a file the manifest does not know; meanwhile a consumer's writer lists it (a batch
    begun, or cut short: torn), or the sweep removes it. Neither is recorded; a file nobody claims is."""
    from ztfd import config, files
    from ztfd.ingest import journal
    from ztfd.sync import reconcile

    cfg = config.load(make_config(kafka={"topics": ["t"]}))
    folder = cfg.home / "data" / "2021-09-01" / "t"
    folder.mkdir(parents=True)
    listed, swept, hand_made = (folder / f"ZTF21aaaaaa{name}_p0-o{offset}.json"
                                for offset, name in enumerate(("aa", "ab", "ac")))
    for path in (listed, swept, hand_made):
        path.write_bytes(b'{"message": {"objectId": "half')
    writer = journal.WriteJournal(journal.journal_folder(cfg.state_dir), "t", os.getpid())
    md5_file = files.md5_file

    def meanwhile(path: Path) -> str:
        digest = md5_file(path)
        if path == listed:
            writer.begin([(0, 0, 0, files.relative_to_home(cfg.home, listed))])
        elif path == swept:
            swept.unlink()
        return digest

    monkeypatch.setattr(reconcile.files, "md5_file", meanwhile)
    conn = store.connect(cfg.db_path)
    try:
        added = {path for path, _, _ in reconcile.reconcile(conn, cfg).added}
    finally:
        conn.close()
        writer.end()
    assert added == {files.relative_to_home(cfg.home, hand_made)}
