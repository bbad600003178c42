"""The crash-loop breaker (issue 21): a message that kills the decoding process is isolated after two deaths,
rejected with the signal that killed it, and every other message of its batch is stored once; the topic goes on.
Through the real broker, with a decoder that really dies (SIGSEGV)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import child_env, wait_until
from tests.killer_source import CONSUME, FORMAT, KILLER
from tests.test_consumer import count, produce_with_timestamps, seqs_on_disk, terminate, unique
from ztfd import sources, store
from ztfd.embedded import samples
from ztfd.embedded.kafka import KafkaBroker
from ztfd.ingest.breaker import Breaker, isolated
from ztfd.store import decode_marks


def consume(config_path: Path, topic: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", CONSUME, "--config", str(config_path), "consume", "--topic", topic],
                            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_message_that_kills_the_decoder_is_isolated_rejected_and_its_batch_stored_once(
    kafka: KafkaBroker, make_config: Callable[..., Path]
) -> None:
    topic = unique("breaker")
    kafka.create_topic(topic)
    good = [json.dumps(m).encode() for m in samples.message_stream(11)]
    produce_with_timestamps(kafka.bootstrap, topic, [(v, None) for v in good[:5]] + [(KILLER, None)]
                            + [(v, None) for v in good[5:10]])
    config_path = make_config(kafka={"bootstrap_servers": kafka.bootstrap, "group_id": unique("g"),
                                     "topics": [topic], "batch_size": 100}, kafka__formats={topic: FORMAT})
    db = config_path.parent / "state" / "ztfd.sqlite3"
    for _ in range(2):  # dies at the same messages, twice
        assert consume(config_path, topic).wait(120) == -signal.SIGSEGV
    proc = consume(config_path, topic)
    wait_until(lambda: count(db, "SELECT count(*) FROM alerts") >= 10, 90, "the other ten stored")
    wait_until(lambda: count(db, "SELECT count(*) FROM rejected") >= 1, 30, "the killer rejected")
    produce_with_timestamps(kafka.bootstrap, topic, [(good[10], None)])  # the topic goes on
    wait_until(lambda: count(db, "SELECT count(*) FROM alerts") >= 11, 60, "the next message stored")
    assert proc.poll() is None and terminate(proc) == 0
    conn = sqlite3.connect(db)
    (raw, reason, offset), = conn.execute("SELECT raw, reason, kafka_offset FROM rejected").fetchall()
    assert (bytes(raw), offset) == (KILLER, 5) and reason == "crashed the decoder (signal 11, SIGSEGV)"
    assert sorted(seqs_on_disk(config_path.parent)) == list(range(11))  # each once
    assert count(db, "SELECT count(*) FROM alerts") == 11
    assert count(db, "SELECT next_offset FROM offsets") == 12
    assert count(db, "SELECT count(*) FROM decode_deaths") == count(db, "SELECT count(*) FROM decode_marks") == 0


def _decode(value: bytes | None, key: bytes | None) -> sources.Alert:
    """Lasair JSON, except that ``kill`` really kills the process, and ``bug`` raises."""
    if value == b"bug":
        raise RuntimeError("a bug in a source")
    if value == KILLER:
        import os

        os.kill(os.getpid(), signal.SIGSEGV)
    return sources.source_for("lasair").decode(value, key)


def test_isolated_decoding_keeps_order_and_names_what_killed_each_culprit() -> None:
    good = [json.dumps(m).encode() for m in samples.message_stream(3)]
    messages = [(good[0], None), (KILLER, None), (b"bug", None), (good[1], None), (KILLER, None), (good[2], None)]
    outcomes = isolated(_decode, messages)
    assert [o.object_id for o in outcomes if isinstance(o, sources.Alert)] == [
        json.loads(g)["objectId"] for g in good]
    assert [str(o) for o in outcomes if not isinstance(o, sources.Alert)] == [
        "crashed the decoder (signal 11, SIGSEGV)", "a bug in a source", "crashed the decoder (signal 11, SIGSEGV)"]


def test_deaths_count_only_over_the_same_messages_and_are_forgotten_once_explained(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "ztfd.sqlite3")
    breaker = Breaker(conn, "t", _decode)
    good = [json.dumps(m).encode() for m in samples.message_stream(2)]
    # A consumer that died decoding offsets 10..12, then 11..13: each left its mark behind.
    decode_marks.enter(conn, "t", json.dumps({"0:0": [10, 12]}))
    decode_marks.enter(conn, "t", json.dumps({"0:0": [11, 13]}))
    # Another partition's batch is decoded in the process as usual (a bug is a rejection, not a death).
    outcomes = breaker.decode([(1, 0, 5), (1, 0, 6)], [(good[0], None), (b"bug", None)])
    assert isinstance(outcomes[0], sources.Alert) and isinstance(outcomes[1], RuntimeError)
    assert len(decode_marks.deaths(conn, "t")) == 2  # the two of partition 0; the clean batch left no mark
    outcomes = breaker.decode([(0, 0, 11), (0, 0, 12)], [(KILLER, None), (good[1], None)])
    assert str(outcomes[0]) == "crashed the decoder (signal 11, SIGSEGV)" and isinstance(outcomes[1], sources.Alert)
    assert decode_marks.deaths(conn, "t") == []
    assert conn.execute("SELECT count(*) FROM decode_marks").fetchone()[0] == 0


def test_a_store_that_cannot_take_the_mark_does_not_stop_decoding(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "ztfd.sqlite3")
    breaker = Breaker(conn, "t", _decode)
    conn.close()  # every statement now fails, as a store locked past its timeout or full would
    (good,) = [json.dumps(m).encode() for m in samples.message_stream(1)]
    (outcome,) = breaker.decode([(0, 0, 1)], [(good, None)])
    assert isinstance(outcome, sources.Alert)
