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

The broker is seen through ``BrokerView`` so the rules are tested without one; ``ztfd.ingest.kafka.KafkaAdapter`` is
the real one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

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


@dataclass(frozen=True)
class Verdict:
    """What to do with an offset (or an idle partition): ``same``, ``recreated`` (``expected``: the offset that was
    expected next) or ``gap`` (with ``gap``)."""

    kind: str
    gap: Gap | None = None
    expected: int | None = None


class PartitionWatch:
    """Per partition of one topic: its generation and the offset expected next, judged on the broker's evidence.
    Its state is its own: the consumer tells it what it read (``offset_read``), what it assigned (``start``) and
    what it recorded (``new_generations``, ``adopt_id``), and asks."""

    def __init__(self, topic: str, view: BrokerView, known_id: str | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.topic = topic
        self.clock = clock
        self._view = view
        self._known_id = known_id  # the id stored with the offsets; None before the first look
        self._partitions: dict[int, Partition] = {}

    # --- the topic as a whole ------------------------------------------------------------------------------

    @property
    def known_id(self) -> str | None:
        """The topic id the offsets were read under (None before one was seen)."""
        return self._known_id

    def adopt_id(self, topic_id: str | None) -> None:
        """The id the store now holds for the topic (after a recreation was recorded); None keeps the one known."""
        self._known_id = topic_id or self._known_id

    def topic_recreated(self) -> bool | None:
        """True on a changed id, False on the same id, None when the broker reports none (no evidence).

        The first id seen is adopted (``known_id``); the caller stores it with ``store.gaps.save_topic_id``."""
        current = self._view.topic_id()
        if current is None:
            return None
        if self._known_id is None:
            self._known_id = current
            return False
        return current != self._known_id

    # --- one partition ---------------------------------------------------------------------------------------

    def start(self, partition: int, generation: int, expected: int | None) -> None:
        """A partition assigned: its stored generation and next offset (None: read from the beginning)."""
        self._partitions[partition] = Partition(generation, expected)

    def generation(self, partition: int) -> int:
        """The generation a partition is read in now (0 for one never started)."""
        state = self._partitions.get(partition)
        return 0 if state is None else state.generation

    def new_generations(self, partitions: list[int]) -> list[tuple[int, int]]:
        """Start a new generation of ``partitions``, read from the beginning: (partition, generation) each."""
        started = []
        for partition in partitions:
            state = self._state(partition)
            state.generation += 1
            state.expected = None
            started.append((partition, state.generation))
        return started

    def offset_read(self, partition: int, offset: int) -> tuple[int, Verdict | None]:
        """A message was read at ``offset``: its generation, and a verdict when the offset was not the one expected
        and meant something (``recreated``: a new generation has started with it; ``gap``). The next offset is
        expected after it. (Once per message: the offset expected costs no more than a comparison.)"""
        state = self._partitions.get(partition)
        if state is None:
            state = self._partitions[partition] = Partition(0, None)
        if state.expected is None or offset == state.expected:
            state.expected = offset + 1
            return state.generation, None
        verdict = self.offset_seen(partition, offset)
        if verdict.kind == "recreated":
            self.new_generations([partition])  # the message itself is the new topic's
        state.expected = offset + 1
        return state.generation, (None if verdict.kind == "same" else verdict)

    def offset_seen(self, partition: int, offset: int) -> Verdict:
        """Judge the offset of a message about to be stored, against the one expected next."""
        state = self._partitions[partition]
        if state.expected is None or offset == state.expected:
            return SAME
        if offset < state.expected:
            if self._ended_early(partition, state, confirm_now=True):
                return Verdict("recreated", expected=state.expected)
            return SAME
        marks = self._view.watermarks(partition)
        if marks is not None and marks[0] > state.expected:
            last = min(marks[0], offset) - 1
            return Verdict("gap", Gap(self.topic, partition, state.generation, state.expected, last, time.time()))
        return SAME

    def idle_partition_ended_early(self, partition: int, cached_end: int) -> bool:
        """An idle partition whose cached end is below the expected offset: recreated, on evidence only."""
        state = self._partitions[partition]
        if state.expected is None or cached_end < 0 or cached_end >= state.expected:
            state.ended_early_at = None
            return False
        return self._ended_early(partition, state, confirm_now=False)

    def _state(self, partition: int) -> Partition:
        state = self._partitions.get(partition)
        if state is None:
            state = self._partitions[partition] = Partition(0, None)
        return state

    def _ended_early(self, partition: int, state: Partition, confirm_now: bool) -> bool:
        recreated = self.topic_recreated()
        if recreated is not None:
            return recreated
        marks = self._view.watermarks(partition)
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
            second = self._view.watermarks(partition)
            return second is not None and second[1] < state.expected
        now = self.clock()
        if state.ended_early_at is None:
            state.ended_early_at = now
            return False
        return now - state.ended_early_at >= CONFIRM_AFTER


SAME = Verdict("same")
