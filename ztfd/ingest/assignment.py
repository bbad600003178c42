"""Which partitions of its topic a consumer reads, from which offset, and under which generation.

ztfd does not join a consumer group: the supervisor runs exactly one consumer per topic, and the offsets that
matter are in the store, so a group's rebalancing would only add failure modes (Tansu, for one, wedges a group
whose members leave during a rebalance). ``kafka.group_id`` still names the offsets committed to Kafka for lag
tools. The consumer takes every partition (``KafkaAdapter.assign_all``), starting at the store's offsets, and looks
at the topic again every ``METADATA_EVERY`` seconds: that picks up a topic created after the consumer started,
partitions added later, and a topic recreated under it.

Lasair deletes and recreates a topic whenever its filter is edited, restarting its offsets at 0. Seeking to the
stored offset then falls out of range, librdkafka resets to the earliest offset, and the consumer sees an offset
below the one it expected: ``ztfd.ingest.partitions`` judges it on evidence, and a recreation starts a new
*generation* of the partition, recorded at once, so the new messages get identities (and file names) of their
own instead of being taken for redeliveries. Offsets the broker no longer had are recorded as a gap.

In fleet mode (``kafka.assignment = "group"``, docs/fleet.md) the group decides which partitions this host reads:
``look`` assigns nothing, and ``joined`` starts each partition the group hands in at the group's committed offset
(what the store holds already is set aside by the batch builder, never stored twice).
"""

from __future__ import annotations

import logging
import sqlite3
import time

from ztfd import store
from ztfd.ingest.fleet import FleetBook, FleetGeneration
from ztfd.ingest.kafka import KafkaAdapter
from ztfd.ingest.partitions import PartitionWatch, Verdict
from ztfd.store import gaps as store_gaps

log = logging.getLogger(__name__)

METADATA_EVERY = 10.0  # seconds between looks at the topic's partitions (new topic, new partitions, recreation)


class TopicAssignment:
    """One topic's partitions as its consumer reads them: assigned from the store's offsets, each message's
    generation (``generation_of``), recreations and gaps recorded in the store."""

    def __init__(self, conn: sqlite3.Connection, topic: str, kafka: KafkaAdapter,
                 fleet: FleetBook | None = None) -> None:
        self.conn = conn
        self.topic = topic
        self.kafka = kafka
        self.fleet = fleet  # fleet mode: the group hands partitions in (``joined``), generations agreed there
        self.group = fleet is not None
        self.watch = PartitionWatch(topic, kafka, store_gaps.topic_id(conn, topic))
        self.last_look = -METADATA_EVERY

    def look(self, force: bool = False) -> bool:
        """Assign the topic's partitions not yet read, and notice a recreated topic, at most every
        ``METADATA_EVERY`` seconds (``force``: now). True when the broker answered, whether or not the topic
        exists (a pattern's topic that is gone has nothing more to read)."""
        now = time.monotonic()
        if not force and now - self.last_look < METADATA_EVERY:
            return False
        self.last_look = now
        partitions = self.kafka.partitions()
        if not partitions:
            return partitions is not None
        if self.watch.topic_recreated():
            # In fleet mode only the partitions held: the others start their new generation where they are read.
            held = self.kafka.assigned if self.group else set(partitions) | set(store.stored_offsets(self.conn,
                                                                                                      self.topic))
            self._recreated(sorted(held), "its topic id changed")
        elif self.watch.known_id is not None and store_gaps.topic_id(self.conn, self.topic) is None:
            with store.transaction(self.conn):
                store_gaps.save_topic_id(self.conn, self.topic, self.watch.known_id)
        new = sorted(set(partitions) - self.kafka.assigned)
        if new and not self.group:
            self.assign_all(new)
        self._detect_restarted_offsets()
        return True

    def assign_all(self, partitions: list[int]) -> None:
        """Start reading ``partitions`` where the store says (else where Kafka's committed offset, else the
        earliest one, says): the seek that makes a restart resume exactly after the last stored alert."""
        stored = store.stored_offsets(self.conn, self.topic)
        for partition in partitions:
            known = stored.get(partition)
            self.watch.start(partition, known.generation if known else 0, known.next_offset if known else None)
        self.kafka.assign_all(partitions, {p: stored[p].next_offset for p in partitions if p in stored})

    def joined(self, partitions: list[int], committed: dict[int, int]) -> list[int]:
        """Fleet mode: ``partitions`` handed in by the group, read from its ``committed`` offsets (the next offset
        expected, judged as any other), in the generation the fleet agreed on. Returns those that start a new
        generation here: the caller reads them from the beginning (their committed offsets, removed from
        ``committed``, are the deleted topic's)."""
        fresh = self._agree_generations(partitions)
        for partition in fresh:
            committed.pop(partition, None)
        stored = store.stored_offsets(self.conn, self.topic)
        for partition in partitions:
            known = stored.get(partition)
            expected = committed.get(partition, known.next_offset if known else None)
            self.watch.start(partition, known.generation if known else 0, expected)
        return fresh

    def _agree_generations(self, partitions: list[int]) -> list[int]:
        """Fleet mode: read each partition in the generation the fleet agreed on (``ztfd.ingest.fleet``), one more
        when the broker's topic id is no longer the one the fleet read it under (recreated while nobody held it);
        tell the fleet of a generation only this store knew (recorded here, then lost before it was published)."""
        assert self.fleet is not None
        said = self.fleet.generations(self.topic)
        broker_id = self.kafka.topic_id()
        stored = store.stored_offsets(self.conn, self.topic)
        adopt: list[tuple[int, int]] = []
        tell: dict[int, FleetGeneration] = {}
        for partition in partitions:
            mine = stored[partition].generation if partition in stored else 0
            theirs = said.get(partition)
            agreed = mine if theirs is None else theirs.generation
            if theirs is not None and theirs.topic_id and broker_id and theirs.topic_id != broker_id:
                agreed += 1
            agreed = max(agreed, mine)
            if agreed > mine:
                adopt.append((partition, agreed))
            current = FleetGeneration(agreed, broker_id or (theirs.topic_id if theirs else None))
            if current != theirs:
                tell[partition] = current
        if adopt or broker_id:
            with store.transaction(self.conn):  # the broker's id: the one this host now reads the topic under
                store_gaps.start_generation(self.conn, self.topic, broker_id, adopt)
            self.watch.adopt_id(store_gaps.topic_id(self.conn, self.topic))
        if adopt:
            log.info("%s: reading %s as the fleet agreed", self.topic,
                     ", ".join(f"[{p}] in generation {g}" for p, g in adopt))
        if tell:
            self.fleet.save_generations(self.topic, tell)
        return [p for p, _ in adopt]

    def generation(self, partition: int) -> int:
        """The generation ``partition`` is read in now."""
        return self.watch.generation(partition)

    def generation_of(self, partition: int, offset: int) -> int:
        """The generation of a message just read. An offset off the expected one is judged on evidence: below it,
        a recreated topic or a redelivery; past it, alerts lost upstream (a gap, recorded and logged) or not."""
        generation, verdict = self.watch.offset_read(partition, offset)
        if verdict is not None:
            self._judged(partition, offset, generation, verdict)
        return generation

    def _judged(self, partition: int, offset: int, generation: int, verdict: Verdict) -> None:
        if verdict.kind == "recreated":
            # The message itself is the new topic's: the seek to the beginning redelivers any before it.
            self._record_generations([(partition, generation)], f"offset {offset} came after {verdict.expected}")
        elif verdict.gap is not None:
            self._record_gap(verdict.gap)

    def _detect_restarted_offsets(self) -> None:
        """Notice an idle partition whose end is now below the offset expected next: perhaps a recreated topic.

        A broker should answer such a fetch with OFFSET_OUT_OF_RANGE (librdkafka then resets to the earliest
        offset, which ``generation_of`` judges); Tansu answers with nothing, so an idle consumer compares its
        position with the high watermark cached from its fetches, and ``ztfd.ingest.partitions`` asks for evidence.
        """
        for partition in sorted(self.kafka.assigned):
            high = self.kafka.cached_end(partition)
            if high is not None and self.watch.idle_partition_ended_early(partition, high):
                self._recreated([partition], f"it ends at {high}, before the expected offset, on evidence")

    def _recreated(self, partitions: list[int], why: str) -> None:
        """Start a new generation of ``partitions``, read from the beginning."""
        self._record_generations(self.watch.new_generations(partitions), why)

    def _record_generations(self, generations: list[tuple[int, int]], why: str) -> None:
        """Record new generations at once with the topic's id (one transaction), so a restart resumes in the new
        generation instead of taking its messages for redeliveries of the old one; read them from the beginning."""
        topic_id = self.kafka.topic_id()
        with store.transaction(self.conn):
            store_gaps.start_generation(self.conn, self.topic, topic_id, generations)
        if self.fleet is not None and generations:  # before reading on: a host taking over must key it the same
            self.fleet.save_generations(self.topic, {p: FleetGeneration(g, topic_id) for p, g in generations})
        self.watch.adopt_id(store_gaps.topic_id(self.conn, self.topic))
        if not generations:  # fleet mode, nothing held: each partition starts its generation when handed in
            log.warning("%s was recreated (%s): its new topic id recorded", self.topic, why)
            return
        log.warning("%s was recreated (%s): reading %s from the beginning", self.topic, why,
                    ", ".join(f"[{p}] as generation {g}" for p, g in generations))
        self.kafka.rewind([p for p, _ in generations])

    def _record_gap(self, gap: store_gaps.Gap) -> None:
        with store.transaction(self.conn):
            new = store_gaps.record_gap(self.conn, gap)
        if new:
            log.error("%s[%d] generation %d: offsets %d..%d (%d alerts) are gone from the broker (retention passed "
                      "them before ztfd read them): lost upstream, recorded as a gap", gap.topic, gap.partition,
                      gap.generation, gap.first_offset, gap.last_offset, gap.missing)
