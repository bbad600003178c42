"""The evidence rules of ztfd.ingest.partitions, with a broker seen through a scripted view (the real broker cannot be
made to report a low watermark on demand; tests/test_consumer_offsets.py runs the same rules against Tansu)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ztfd.ingest.partitions import CONFIRM_AFTER, PartitionWatch


@dataclass
class ScriptedBroker:
    ids: list[str | None] = field(default_factory=lambda: [None])
    marks: list[tuple[int, int] | None] = field(default_factory=list)
    asked_marks: int = 0

    def topic_id(self) -> str | None:
        return self.ids[0] if len(self.ids) == 1 else self.ids.pop(0)

    def watermarks(self, partition: int) -> tuple[int, int] | None:
        self.asked_marks += 1
        return self.marks[0] if len(self.marks) == 1 else self.marks.pop(0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def watch(broker: ScriptedBroker, expected: int | None = 100, known_id: str | None = "id-1") -> PartitionWatch:
    result = PartitionWatch("t", broker, known_id, clock=Clock())
    result.start(0, generation=0, expected=expected)
    return result


def test_an_unchanged_topic_id_overrules_a_low_end():
    broker = ScriptedBroker(ids=["id-1"], marks=[(0, 3)])
    assert watch(broker).offset_seen(0, 0).kind == "same"
    assert not watch(broker).idle_partition_ended_early(0, cached_end=3)


def test_a_changed_topic_id_is_a_recreation():
    broker = ScriptedBroker(ids=["id-2"], marks=[(0, 500)])
    assert watch(broker).offset_seen(0, 0).kind == "recreated"
    assert watch(broker).idle_partition_ended_early(0, cached_end=2)


def test_the_first_id_seen_is_adopted_not_taken_for_a_change():
    broker = ScriptedBroker(ids=["id-9"])
    w = watch(broker, known_id=None)
    assert w.topic_recreated() is False and w.known_id == "id-9"


def test_without_ids_one_low_answer_is_not_enough_for_an_idle_partition():
    broker = ScriptedBroker(ids=[None], marks=[(0, 3)])
    w = watch(broker)
    assert not w.idle_partition_ended_early(0, cached_end=3)
    w.clock.now += CONFIRM_AFTER / 2
    assert not w.idle_partition_ended_early(0, cached_end=3)
    w.clock.now += CONFIRM_AFTER
    assert w.idle_partition_ended_early(0, cached_end=3)


def test_without_ids_an_answer_at_or_past_the_expected_offset_clears_the_suspicion():
    broker = ScriptedBroker(ids=[None], marks=[(0, 3), (0, 100), (0, 3)])
    w = watch(broker)
    assert not w.idle_partition_ended_early(0, cached_end=3)
    w.clock.now += CONFIRM_AFTER * 2
    assert not w.idle_partition_ended_early(0, cached_end=3)  # the broker said 100 this time
    w.clock.now += CONFIRM_AFTER * 2
    assert not w.idle_partition_ended_early(0, cached_end=3)  # a new first answer, to be confirmed


def test_without_ids_a_message_below_the_expected_offset_needs_two_low_answers():
    assert watch(ScriptedBroker(marks=[(0, 3), (0, 3)])).offset_seen(0, 0).kind == "recreated"
    assert watch(ScriptedBroker(marks=[(0, 3), (0, 120)])).offset_seen(0, 0).kind == "same"
    assert watch(ScriptedBroker(marks=[(0, 120)])).offset_seen(0, 0).kind == "same"  # a redelivery


def test_without_ids_the_earliest_offset_moving_back_is_a_recreation():
    broker = ScriptedBroker(marks=[(50, 200), (0, 200)])
    w = watch(broker, expected=150)
    assert not w.idle_partition_ended_early(0, cached_end=140)
    assert w.idle_partition_ended_early(0, cached_end=140)


def test_a_jump_past_the_earliest_offset_is_a_gap_of_exactly_the_lost_offsets():
    verdict = watch(ScriptedBroker(ids=["id-1"], marks=[(160, 300)])).offset_seen(0, 170)
    assert verdict.kind == "gap"
    assert (verdict.gap.first_offset, verdict.gap.last_offset, verdict.gap.missing) == (100, 159, 60)


def test_a_jump_the_broker_still_covers_is_no_gap():
    # Transaction markers and compaction skip offsets without losing a message.
    assert watch(ScriptedBroker(ids=["id-1"], marks=[(0, 300)])).offset_seen(0, 170).kind == "same"
    assert watch(ScriptedBroker(ids=["id-1"], marks=[None])).offset_seen(0, 170).kind == "same"


def test_the_expected_offset_and_a_fresh_partition_ask_nothing():
    broker = ScriptedBroker(marks=[(0, 0)])
    assert watch(broker).offset_seen(0, 100).kind == "same"
    assert watch(broker, expected=None).offset_seen(0, 7).kind == "same"
    assert broker.asked_marks == 0


def test_reading_on_from_the_expected_offset_keeps_the_generation_and_asks_nothing():
    broker = ScriptedBroker(marks=[(0, 0)])
    w = watch(broker)
    assert [w.offset_read(0, offset) for offset in (100, 101, 102)] == [(0, None)] * 3
    assert w.offset_read(1, 7) == (0, None)  # a partition not assigned yet: read from where it is
    assert broker.asked_marks == 0


def test_a_message_of_a_recreated_topic_starts_the_next_generation_and_is_expected_after():
    w = watch(ScriptedBroker(ids=["id-2"]))
    generation, verdict = w.offset_read(0, 0)
    assert generation == 1 and verdict is not None and (verdict.kind, verdict.expected) == ("recreated", 100)
    assert w.offset_read(0, 1) == (1, None)


def test_a_gap_is_reported_once_and_reading_goes_on_after_it():
    w = watch(ScriptedBroker(ids=["id-1"], marks=[(160, 300)]))
    generation, verdict = w.offset_read(0, 170)
    assert generation == 0 and verdict is not None and verdict.gap is not None and verdict.gap.missing == 60
    assert w.offset_read(0, 171) == (0, None)
