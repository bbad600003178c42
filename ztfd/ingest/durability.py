"""Fleet mode's commits (``kafka.assignment = "group"``): Kafka learns a partition's offset only once every alert
before it is durable in S3, as Kafka Connect's S3 sink does it.

A host lost with its disk then loses nothing: the group hands its partitions to the others, which resume at the
committed offsets and redo what was not durable yet, writing the same S3 keys (every key is derived from the
message's identity: topic, partition, generation, offset). What "durable" means is ``ztfd.store.durable``'s.

Per partition held, the offset last committed (the group's, read when the partition was handed in) is the start of
a walk to the durable frontier (``store.durable.durable_through``), bounded by what this host has stored
(``store.offsets``). Every ``kafka.commit_every`` seconds the frontiers that moved are committed, without waiting;
a partition handed back (a rebalance, ``ztfd stop``) is committed as far as it is durable, waiting for the answer,
before it is released. A committed offset never goes back within a generation; a new generation (a recreated
topic) starts the walk again at 0.

A commit sent without waiting can be refused (Kafka refuses them while the group rebalances, or while its
coordinator moves) or go unanswered: the next tick then sends it again, with the frontier if it moved meanwhile (a
refusal at once, silence after ``ANSWER_WAIT`` seconds). Otherwise the commit would stay behind for good once the
partition's last alerts were durable (nothing would move again), and a takeover would redo all of it. What is sent
never goes below what was sent before: an offset once durable stays durable, although the store's walk may stop
lower later (a newer stamp of the same object pending upload).

A rejected message of a partition held is exported at the next walk, a file of its own named by its Kafka identity
(``daemon.housekeeping.write_export``: the file housekeeping would write for it, so the same key on every host),
and holds the frontier until that file is uploaded. Its row stays in the store for ``ztfd rejected`` until
housekeeping's ``store.rejected_keep_days``.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from ztfd import store
from ztfd.daemon.housekeeping import write_export
from ztfd.ingest.fleet import Progress
from ztfd.ingest.kafka import KafkaAdapter, Refusal
from ztfd.logs import Throttle
from ztfd.store.durable import durable_through, rejected_not_exported

log = logging.getLogger(__name__)

ANSWER_WAIT = 10.0  # seconds a commit sent without waiting may go unanswered before it is sent again
# A partition's commit held back this long (the broker's retention unknown) is warned about: Fink keeps 4 days,
# Lasair 7, and a host lost with its disk after the broker dropped the messages behind the commit loses them.
HELD_WARN_UNKNOWN_RETENTION = 86400.0
HELD_WARN_EVERY = 3600.0  # a held commit is said again at most once an hour
# Refusals every rebalance brings (a commit made under the member's previous generation): said at INFO, not WARNING.
REBALANCE_REFUSALS = frozenset({"ILLEGAL_GENERATION", "REBALANCE_IN_PROGRESS", "UNKNOWN_MEMBER_ID"})


class DurableCommits:
    """The partitions this host holds in the group, each with the offset committed for it, moved forward as the
    alerts behind it become durable."""

    def __init__(self, conn: sqlite3.Connection, topic: str, kafka: KafkaAdapter, generation_of: Callable[[int], int],
                 every: float, home: Path, archive: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.conn = conn
        self.home = home  # where rejected messages are exported
        self.archive = archive  # the Parquet archive is on: an alert waits for its row there too
        self.topic = topic
        self.kafka = kafka
        self.generation_of = generation_of  # the generation this host reads a partition in
        self.every = every
        self.clock = clock
        self.committed: dict[int, int] = {}  # partition held -> the offset last sent to Kafka for it
        self.confirmed: dict[int, int] = {}  # partition held -> the offset Kafka is known to have for it
        self.generations: dict[int, int] = {}  # partition held -> the generation that offset belongs to
        self.sent_at: dict[int, float] = {}  # partition held -> when its commit not yet confirmed was sent
        self.again: set[int] = set()  # partitions whose commit the next tick sends again
        self.resent = 0  # commits sent again, Kafka having refused them or left them unanswered
        self.handed_over: dict[int, Progress] = {}  # the partitions last handed back, as they left (the fleet's)
        self.redoing: dict[int, Progress] = {}  # partition taken over -> what its previous holder had stored
        self.throttled = Throttle(log)
        self.keeps_for: float | None = None  # how long the broker keeps the topic's messages (None: unknown)
        self.moved_at: dict[int, float] = {}  # partition held -> when its commit last moved (or it was handed in)
        self.stored_to: dict[int, int] = {}  # partition held -> the next offset this host stored, at the last walk
        self.held_warned = Throttle(log, every=HELD_WARN_EVERY, clock=clock)
        self.last_tick = clock()

    def hold(self, committed: dict[int, int], partitions: list[int],
             redo: dict[int, Progress] | None = None) -> None:
        """Partitions handed in, with the group's committed offsets (a partition without one starts at 0), and
        ``redo``: of those taken over, what the previous holder had stored past the commit (logged once durable)."""
        for partition in partitions:
            self.committed[partition] = self.confirmed[partition] = committed.get(partition, 0)
            self.generations[partition] = self.generation_of(partition)
            self.moved_at[partition] = self.clock()
        self.redoing.update({p: told for p, told in (redo or {}).items() if p in partitions})

    def _start(self, partition: int, generation: int) -> int:
        """Where the walk of ``partition`` starts: its committed offset, or 0 once a recreated topic started a new
        generation (Kafka's offset then belongs to the deleted topic; a commit in the new one may go below it)."""
        if self.generations.get(partition) != generation:
            self.generations[partition] = generation
            self.committed[partition] = self.confirmed[partition] = 0
            self.sent_at.pop(partition, None)
            self.again.discard(partition)
            self.redoing.pop(partition, None)
        return self.committed[partition]

    def answered(self, taken: dict[int, int], refused: dict[int, Refusal]) -> None:
        """Kafka's answer to commits sent without waiting (``KafkaAdapter.on_commit``): the offsets it took are
        confirmed; a partition whose commit it refused is committed again at the next tick."""
        for partition, offset in taken.items():
            if partition in self.confirmed and self.confirmed[partition] < offset <= self.committed[partition]:
                self.confirmed[partition] = offset
                if offset == self.committed[partition]:
                    self.sent_at.pop(partition, None)
                    self.again.discard(partition)
        for partition, refusal in sorted(refused.items()):
            level = logging.INFO if refusal.name in REBALANCE_REFUSALS else logging.WARNING
            self._send_again(partition, level, f"refused it ({refusal})")

    def _send_again(self, partition: int, level: int, why: str) -> None:
        """Have the next tick commit ``partition`` again, whether or not its frontier moved."""
        if partition not in self.committed or self.committed[partition] <= self.confirmed[partition]:
            return
        self.resent += 1
        self.throttled(f"again:{partition}", level, "kafka %s: the commit of %s[%d] at %d is sent again at the next "
                       "tick (Kafka has %d; %d sent again so far)", why, self.topic, partition,
                       self.committed[partition], self.confirmed[partition], self.resent)
        self.again.add(partition)
        self.sent_at.pop(partition, None)

    def frontiers(self, partitions: list[int]) -> dict[int, int]:
        """The durable frontier of each of ``partitions`` that moved past its committed offset."""
        stored = store.stored_offsets(self.conn, self.topic)
        moved = {}
        for partition in partitions:
            if partition not in self.committed:
                continue
            generation = self.generation_of(partition)
            start = self._start(partition, generation)
            known = stored.get(partition)
            end = known.next_offset if known is not None and known.generation == generation else start
            if self.stored_to.get(partition, start) <= start < end:  # alerts again after a spell with none waiting
                self.moved_at[partition] = self.clock()  # the commit is held from now, not from the last move
            self.stored_to[partition] = end
            self._export_rejected(partition, generation, start, end)
            frontier = durable_through(self.conn, self.topic, partition, generation, start, end, self.archive)
            if frontier > start:
                moved[partition] = frontier
        return moved

    def _export_rejected(self, partition: int, generation: int, start: int, end: int) -> None:
        """Export each rejected message not yet exported between the commit and what is stored, so that the syncer
        uploads it and the frontier can pass it. A disk that fails here only leaves the frontier held."""
        rows = rejected_not_exported(self.conn, self.topic, partition, generation, start, end)
        if not rows:
            return
        try:
            written = [write_export(self.home, [row]) for row in rows]
        except OSError as exc:
            log.warning("cannot export the rejected messages of %s[%d]: %s", self.topic, partition, exc)
            return
        with store.transaction(self.conn):
            store.record_files(self.conn, written)
        log.info("exported %d rejected messages of %s[%d] for upload", len(written), self.topic, partition)

    def tick(self, force: bool = False) -> dict[int, int]:
        """Every ``every`` seconds (``force``: now), commit the frontiers that moved, without waiting."""
        now = self.clock()
        if not force and now - self.last_tick < self.every:
            return {}
        self.last_tick = now
        for partition, sent in sorted(self.sent_at.items()):
            if now - sent > ANSWER_WAIT:
                self._send_again(partition, logging.WARNING, f"did not answer within {ANSWER_WAIT:.0f} s")
        try:
            moved = self.frontiers(sorted(self.committed))
        except sqlite3.Error as exc:  # the store locked or full: the next tick tries again, nothing is lost
            log.warning("cannot compute the durable frontiers of %s: %s", self.topic, exc)
            moved = {}
        moved = {**{p: self.committed[p] for p in self.again if p in self.committed}, **moved}
        self.again.clear()
        if moved:
            self.kafka.commit(moved)
            self.moved_at.update({p: now for p, offset in moved.items() if offset > self.committed[p]})
            self.committed.update(moved)
            self.sent_at.update(dict.fromkeys(moved, now))
            log.debug("committed %s durable through %s", self.topic, moved)
            self._redone_durable()
        self._warn_held(now)
        return moved

    def _redone_durable(self) -> None:
        """Log each partition taken over whose durable frontier has passed what its previous holder had stored:
        the work redone, counted."""
        for partition, told in sorted(self.redoing.items()):
            if self.committed.get(partition, -1) >= told.stored:
                start = told.durable
                log.info("redone %s[%d]: the %d offsets %d..%d that %s had stored but not made durable are durable "
                         "now", self.topic, partition, told.stored - start, start, told.stored - 1, told.member)
                del self.redoing[partition]

    def held_warning_after(self) -> float:
        """How long a commit may stay held back before it is warned about: half the broker's retention, else a
        day."""
        return self.keeps_for / 2 if self.keeps_for else HELD_WARN_UNKNOWN_RETENTION

    def _warn_held(self, now: float) -> None:
        """Warn of a partition whose commit has not moved for ``held_warning_after`` s while this host stored past
        it: the broker drops messages after its retention, and a host lost with its disk after that loses the
        alerts behind the commit (the next owner cannot read them again). Usually a stamp job waiting for the stamp
        service (``stamps.unavailable_give_up``) or uploads failing."""
        limit = self.held_warning_after()
        for partition, committed in sorted(self.committed.items()):
            held = now - self.moved_at.get(partition, now)
            if self.stored_to.get(partition, committed) > committed and held >= limit:
                kept = f"{self.keeps_for / 3600:.0f} h" if self.keeps_for else "for a time it does not say"
                self.held_warned(
                    f"held:{partition}", logging.WARNING,
                    "the commit of %s[%d] has stayed at %d for %.1f h while this host stored through %d: the alert at "
                    "that offset is not durable in S3 yet (its files, stamps or archive row: ztfd status says what "
                    "is pending). The broker keeps messages %s: should this host be lost with its disk after that, "
                    "the alerts behind the commit are lost", self.topic, partition, committed, held / 3600,
                    self.stored_to[partition], kept)

    def _commit_waiting(self, partitions: list[int]) -> bool:
        """Commit ``partitions`` as far as they are durable, with any commit sent earlier whose answer has not come,
        and wait for Kafka's answer. True when Kafka has each one's offset (or none was due)."""
        try:
            moved = self.frontiers(partitions)
        except sqlite3.Error as exc:
            log.warning("cannot compute the durable frontiers of %s: %s: handing over at the last commit", self.topic,
                        exc)
            moved = {}
        # an unanswered commit is waited for now, or the next owner would start before it
        unconfirmed = {p: self.committed[p] for p in partitions if self.committed[p] > self.confirmed[p]}
        final = {**unconfirmed, **moved}
        if not final:
            return True
        taken = self.kafka.commit_now(final)
        self.confirmed.update({p: o for p, o in taken.items() if p in self.confirmed})
        self.committed.update(final)
        for partition in final:
            self.sent_at.pop(partition, None)
            self.again.discard(partition)
        return all(self.confirmed[p] >= offset for p, offset in final.items())

    def commit_held(self) -> bool:
        """Commit every partition held as far as it is durable and wait for the answer, still holding them. True
        when Kafka took it all: a host stopping in the middle of a rebalance (Kafka refuses its commits until it
        joins the group's new generation) asks again until then (``Consumer._settle_before_leaving``)."""
        return self._commit_waiting(sorted(self.committed))

    def release(self, partitions: list[int]) -> dict[int, tuple[int, int]]:
        """Partitions handed back: commit them as far as they are durable, waiting for Kafka's answer, then forget
        them. What is not durable yet is redone by the next owner, under the same S3 keys. Returns each one's
        generation and committed offset (``held``); ``handed_over`` keeps their progress, for the fleet topic."""
        partitions = [p for p in partitions if p in self.committed]
        self.handed_over = {}
        if not partitions:
            return {}
        self._commit_waiting(partitions)
        # Kafka has what it confirmed: that is where the next owner starts
        self.committed.update({p: self.confirmed[p] for p in partitions})
        self.handed_over = self.progress(partitions)
        log.info("handing over %s: %s", self.topic, ", ".join(
            f"[{p}] committed at {told.durable} ({told.not_durable} stored here past it: the next owner redoes them)"
            for p, told in self.handed_over.items()))
        handed = self.held(partitions)
        self.forget(partitions)
        return handed

    def held(self, partitions: list[int]) -> dict[int, tuple[int, int]]:
        """The generation and committed offset of each of ``partitions`` held (those not held left out)."""
        return {p: (self.generations.get(p, self.generation_of(p)), self.committed[p])
                for p in partitions if p in self.committed}

    def progress(self, partitions: list[int] | None = None) -> dict[int, Progress]:
        """Each partition held (of ``partitions``): the next offset stored here (its commit when this store holds
        less of it) and its durable frontier as last walked, for the fleet topic (``ztfd status`` on any host)."""
        stored = store.stored_offsets(self.conn, self.topic)
        return {p: Progress(self.committed[p] + self._redone(stored.get(p), p), self.committed[p])
                for p in sorted(self.committed) if partitions is None or p in partitions}

    def _redone(self, stored: store.StoredOffset | None, partition: int) -> int:
        """How many offsets this host stored past the partition's commit (work the next owner does again)."""
        if stored is None or stored.generation != self.generation_of(partition):
            return 0
        return max(0, stored.next_offset - self.committed[partition])

    def forget(self, partitions: list[int]) -> None:
        """Partitions gone without a word (the session expired): another host already reads them."""
        for partition in partitions:
            self.moved_at.pop(partition, None)
            self.stored_to.pop(partition, None)
            self.committed.pop(partition, None)
            self.confirmed.pop(partition, None)
            self.sent_at.pop(partition, None)
            self.again.discard(partition)
            self.generations.pop(partition, None)
            self.redoing.pop(partition, None)
