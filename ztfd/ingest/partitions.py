"""What an offset means: the same partition, a recreated topic, or alerts the broker no longer has.

Two mistakes are possible and both break the promise. Taking a recreated topic for the old one makes its first
messages look like redeliveries of stored ones: they are skipped, lost. Taking the old topic for a recreated one
starts a new generation and stores a week of alerts again under new names: duplicates. So a new generation starts
only on positive evidence:
- the topic's id (KIP-516) differs from the one ztfd read it under; where the broker reports ids this decides
  both ways, and an unchanged id overrules any watermark;
- without ids: the end of the partition, asked of the broker (not cached), below the offset ztfd expects next,
  in two answers at least ``CONFIRM_AFTER`` seconds apart; or the earliest offset moved back below one seen before.
One low cached watermark (what a new partition leader may briefly report) is never enough.

A jump forward is a gap only when the broker's earliest offset has passed the offset expected next (retention
deleted them before ztfd read them); a jump without that (transaction markers, compaction) loses nothing.

The broker is seen through ``BrokerView`` so the rules are tested without one; ``KafkaView`` is the real one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ztfd.store.gaps import Gap

log = logging.getLogger(__name__)

CONFIRM_AFTER = 5.0  # seconds between the two uncached answers that confirm a partition ended early


class BrokerView(Protocol):
    def topic_id(self) -> str | None:
        """The topic's id, None when the broker does not say (or the topic does not exist)."""
        ...

    def watermarks(self, partition: int) -> tuple[int, int] | None:
        """(earliest, end) asked of the broker, None when it cannot answer now."""
        ...


@dataclass
class Partition:
    generation: int
    expected: int | None  # the next offset ztfd expects; None: read from the beginning
    earliest_seen: int | None = None
    ended_early_at: float | None = None  # when an uncached answer first put the end below ``expected``


@dataclass
class Verdict:
    """What to do with an offset (or an idle partition): ``same``, ``recreated`` or ``gap`` (with ``gap``)."""

    kind: str
    gap: Gap | None = None


@dataclass
class PartitionWatch:
    topic: str
    view: BrokerView
    known_id: str | None  # the id stored with the offsets; None before the first look
    partitions: dict[int, Partition] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic

    # --- the topic as a whole ------------------------------------------------------------------------------

    def topic_recreated(self) -> bool | None:
        """True on a changed id, False on the same id, None when the broker reports none (no evidence).

        The first id seen is adopted (``known_id``); the caller stores it with ``store.gaps.save_topic_id``."""
        current = self.view.topic_id()
        if current is None:
            return None
        if self.known_id is None:
            self.known_id = current
            return False
        return current != self.known_id

    # --- one partition ---------------------------------------------------------------------------------------

    def offset_seen(self, partition: int, offset: int) -> Verdict:
        """Judge the offset of a message about to be stored, against the one expected next."""
        state = self.partitions[partition]
        if state.expected is None or offset == state.expected:
            return Verdict("same")
        if offset < state.expected:
            return Verdict("recreated") if self._ended_early(partition, state, confirm_now=True) else Verdict("same")
        marks = self.view.watermarks(partition)
        if marks is not None and marks[0] > state.expected:
            last = min(marks[0], offset) - 1
            return Verdict("gap", Gap(self.topic, partition, state.generation, state.expected, last, time.time()))
        return Verdict("same")

    def idle_partition_ended_early(self, partition: int, cached_end: int) -> bool:
        """An idle partition whose cached end is below the expected offset: recreated, on evidence only."""
        state = self.partitions[partition]
        if state.expected is None or cached_end < 0 or cached_end >= state.expected:
            state.ended_early_at = None
            return False
        return self._ended_early(partition, state, confirm_now=False)

    def _ended_early(self, partition: int, state: Partition, confirm_now: bool) -> bool:
        recreated = self.topic_recreated()
        if recreated is not None:
            return recreated
        marks = self.view.watermarks(partition)
        if marks is None:
            return False
        earliest, end = marks
        moved_back = state.earliest_seen is not None and earliest < state.earliest_seen
        state.earliest_seen = earliest if state.earliest_seen is None else max(state.earliest_seen, earliest)
        if moved_back:
            return True
        if state.expected is None or end >= state.expected:
            state.ended_early_at = None
            return False
        if confirm_now:  # a message below the expected offset is waiting: a second answer, asked now
            second = self.view.watermarks(partition)
            return second is not None and second[1] < state.expected
        now = self.clock()
        if state.ended_early_at is None:
            state.ended_early_at = now
            return False
        return now - state.ended_early_at >= CONFIRM_AFTER


class KafkaView:
    """The real broker: topic ids from the admin API, watermarks from the consumer without its cache."""

    def __init__(self, consumer: Any, admin: Any, topic: str, timeout: float = 5.0) -> None:
        self.consumer = consumer
        self.admin = admin
        self.topic = topic
        self.timeout = timeout

    def topic_id(self) -> str | None:
        from confluent_kafka import TopicCollection

        try:
            description = self.admin.describe_topics(TopicCollection([self.topic]), request_timeout=self.timeout)
            topic_id = description[self.topic].result(timeout=self.timeout).topic_id
        except Exception as exc:
            log.debug("no topic id for %s: %s", self.topic, exc)
            return None
        text = str(topic_id) if topic_id is not None else ""
        return text if text and text.strip("A=") else None  # the all-zero id means "not reported"

    def watermarks(self, partition: int) -> tuple[int, int] | None:
        from confluent_kafka import TopicPartition

        try:
            return self.consumer.get_watermark_offsets(
                TopicPartition(self.topic, partition), timeout=self.timeout, cached=False
            )
        except Exception as exc:
            log.debug("no watermarks for %s[%d]: %s", self.topic, partition, exc)
            return None
