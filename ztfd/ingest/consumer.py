"""``ztfd consume --topic T``: one Kafka consumer that stores every alert of one topic exactly once.

The exactly-once argument, in the order things happen for each batch of messages (as Kafka Connect's S3 sink
does it: data first, offsets after):
1. messages already in the store are set aside (a redelivery never rewrites a file);
2. the alert files are written (temporary file + rename) under names derived from the message's identity
   (topic, partition, generation, offset), so writing one again replaces it rather than adding a second;
3. one store transaction inserts the alerts, the rejected messages, the stamp jobs, the files' manifest rows and
   the partitions' next offsets. Alerts are keyed by their identity, so a message is never stored twice;
4. the offsets are committed to Kafka too, for lag tools; ztfd itself never reads them back. In fleet mode
   (``kafka.assignment = "group"``) Kafka's offsets are the fleet's truth instead, and a partition's offset is
   committed only once every alert before it is durable in S3 (``ztfd.ingest.durability``, docs/fleet.md).
Steps 2 and 3 run in a child process (``ztfd.ingest.filewriter``: a thread would have to fight the main thread for the
GIL after every system call and every row), overlapping step 1 of the next batch; step 4 runs on the main thread
once the child has answered. A kill -9 before (3) commits loses nothing: the store still holds the old offsets,
Kafka redelivers the batch and its files are written again under the same names. Once (3) commits, every stored
alert already has its file.
What a message *is* (its identity, survey, observation time, date rule, the bytes to keep, embedded cutouts) is
the topic's *source*'s business (``ztfd.sources``, chosen by ``kafka.formats``): the consumer only stores what the
source makes of it. Whatever one message makes the code raise, in the source or here (dating, naming, its
metadata), rejects that message alone, with its raw bytes and the reason; the stream goes on. A message that kills
the process while it decodes is found by the crash-loop breaker (``ztfd.ingest.breaker``) and rejected too.

When ztfd's own writes fail for a local reason (disk full, I/O error, read-only file system, out of file
descriptors, the store locked: ``ztfd.daemon.localtrouble``), the consumer
pauses with its batches in hand, nothing stored
and no offset moved, and writes and stores the same batches again once it can.

The consumer is four objects, each its own module: this loop (``TopicConsumer``: the pipeline, storing, the
heartbeat, local trouble), its Kafka clients (``ztfd.ingest.kafka``), the batch builder (``ztfd.ingest.batch``:
step 1, no broker needed) and the partitions it reads (``ztfd.ingest.assignment``: every partition from the
stored offsets, no consumer-group membership; recreated topics become new generations, see there).
``enable.auto.commit`` is off; the lasair package's ``lasair_consumer`` auto-commits (an alert could be
acknowledged before it is stored), so it is not used.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import sqlite3
import time
from collections import deque
from typing import Any

from ztfd import sources, store
from ztfd.config import Config
from ztfd.daemon import lifecycle
from ztfd.daemon.heartbeat import Heartbeat
from ztfd.daemon.localtrouble import Condition, describe, is_local
from ztfd.files import remove_stale_temporaries
from ztfd.ingest import journal, nights, seen_ends, topics
from ztfd.ingest.assignment import TopicAssignment
from ztfd.ingest.batch import Accepted, Batch, BatchBuilder
from ztfd.ingest.broker_errors import BrokerErrors
from ztfd.ingest.durability import DurableCommits
from ztfd.ingest.filewriter import AlertLogSettings, BatchSkippedError, FileWriter, Written
from ztfd.ingest.fleet import COUNT_EVERY, RECOUNT_AFTER, FleetBook, Progress, live_members, member_id
from ztfd.ingest.kafka import DRAIN_TIMEOUT, KafkaAdapter, message_size
from ztfd.ingest.quota import QuotaWatch
from ztfd.logs import Throttle
from ztfd.store import archive_marks
from ztfd.store.alerts import dates_received_since, last_received_at, stored_offsets_between
from ztfd.store.rejected import latest_rejected
from ztfd.store.states import Role
from ztfd.store.status_facts import FLEET_MEMBERS
from ztfd.text import escape_controls

log = logging.getLogger(__name__)

POLL_TIMEOUT = 0.5
IN_FLIGHT = 2  # batches handed to the file writer before the consumer waits for the oldest
BATCH_MAX_BYTES = 2 * 1024 * 1024  # a batch stops growing past this many bytes of messages (kafka.batch_size: count)
RECENT_DATES_WINDOW = 2 * 86400.0
# Fleet mode, a stop in the middle of a rebalance: how long the host keeps serving the group for Kafka to take its
# commits (a join takes about half of session.timeout.ms; kept under supervisor.stop_timeout's 30 s default),
# and how long each wait between two tries is.
LEAVE_WAIT = 15.0
SERVE_WHILE_LEAVING = 0.5
RETENTION_ASK_EVERY = 3600.0  # fleet mode: seconds between asks for a retention the broker did not say


class TopicConsumer:
    """The loop of ``ztfd consume --topic T``: read a batch, build it, hand it to the file writer, and once it is
    stored commit its offsets to Kafka and log it (the module's docstring has the argument)."""

    def __init__(self, cfg: Config, topic: str, name: str, kafka: KafkaAdapter | None = None) -> None:
        self.cfg = cfg
        self.topic = topic
        self.name = name
        self.conn = store.connect(cfg.db_path)
        self.builder = BatchBuilder.for_topic(cfg, topic, self.conn, alive=self._heartbeat)
        self.kafka = kafka or KafkaAdapter(cfg.kafka, topic)
        # Per partition: its generation and the next offset expected (set on assignment), judged on evidence.
        self.group = cfg.kafka.group_mode
        self.fleet = FleetBook(cfg.kafka, member_id(cfg.home)) if self.group else None
        # The first count RECOUNT_AFTER s after the rebalance this host's joining causes, as the others count again
        # (``ztfd.stamps.ratelimit``: its fetchers wait until then), or after COUNT_EVERY s without one.
        self.fleet_counted = time.monotonic()
        self.retention_asked = 0.0  # when the broker was last asked for the topic's retention (fleet mode)
        self.leaving = False  # fleet mode: stopping, said in the fleet topic with what it holds
        self.assignment = TopicAssignment(self.conn, topic, self.kafka, self.fleet)
        # Fleet mode: what Kafka has committed per partition held, moved forward once durable in S3.
        self.commits = (DurableCommits(self.conn, topic, self.kafka, self.assignment.generation,
                                       cfg.kafka.commit_every, cfg.home, cfg.archive.enabled) if self.group else None)
        self.trouble = Condition(name)
        # librdkafka's reason a broker cannot be reached, kept where ``ztfd status`` reads it.
        self.broker_errors = BrokerErrors(name, cfg.kafka.bootstrap_servers)
        self.kafka.on_error = lambda error: self.broker_errors.failed(self.conn, str(error.name()), error.str())
        self.kafka.on_answer = lambda: self.broker_errors.answered(self.conn)
        if self.commits is not None:  # a commit Kafka refused is sent again
            self.kafka.on_commit = self.commits.answered
        self.quota = QuotaWatch(topic, cfg.kafka.lasair_byte_quota)
        self.stopping = lifecycle.Stop()  # set by SIGTERM/SIGINT: the batch in hand is finished and stored
        # A topic found by a pattern: its consumer exits once it is drained and quiet (``topics.EXIT_IDLE``).
        self.quiet = topics.QuietWatch(topics.from_pattern(cfg.kafka.topics, topic), cfg.kafka.idle_topic_seconds,
                                       last_received_at(self.conn, topic))
        self.files = FileWriter(cfg.db_path, topic, AlertLogSettings(str(cfg.logs_dir), cfg.logging.max_bytes,
                                                                     cfg.logging.backup_count))
        self.throttled = Throttle(log)
        self.heartbeat = Heartbeat(name, Role.CONSUMER, topic)
        self.stored_total = 0

    def run(self) -> int:
        self.stopping.install()
        self._heartbeat(force=True)
        self.sweep_temporaries()
        self.files.start()
        self.kafka.open()
        if self.commits is not None:
            self._judge_retention()
            self.kafka.subscribe(self._handed_in, self._handed_back, self._taken_away, self._rebalanced)
        self._look_at_topic(force=True)
        log.info("consuming %s from %s as group %s", self.topic, self.cfg.kafka.bootstrap_servers,
                 self.cfg.kafka.group_id)
        # A pipeline: while the file writer writes and stores batch k, the main thread polls and prepares the
        # next ones, hands them over, and waits for batch k once IN_FLIGHT batches are in the writer's hands (two:
        # with one, each side waited for the other at every batch whose work took the other longer). The writer
        # stores batches in order, each after its files are on disk.
        in_flight: deque[Batch] = deque()
        code = 0
        try:
            while not self.stopping.is_set():
                # With a batch in hand, only a glance at Kafka: waiting the whole poll timeout for messages
                # that may not come would leave the batch's answer unread, its Kafka commit and log lines
                # late (after a burst ending on a full batch, 0.5 s: a fifth of bin/bench ingest's run).
                messages = self.kafka.next_batch(DRAIN_TIMEOUT if in_flight else POLL_TIMEOUT,
                                                 self.cfg.kafka.batch_size, BATCH_MAX_BYTES)
                self._heartbeat()
                if messages:
                    self.quiet.saw_messages()
                    self.broker_errors.answered(self.conn)
                batch = self.prepare(messages) if messages else None
                if batch is not None:
                    self._write_files(batch)
                    in_flight.append(batch)
                # Wait for the older batch once a newer one is submitted; at a trickle (Kafka had no more waiting)
                # or when idle, at once rather than after the next poll.
                caught_up = not self._full(messages)
                while in_flight and (len(in_flight) > IN_FLIGHT or caught_up or self.files.answered()):
                    self._store_oldest(in_flight)
                self._look_at_topic()
                if self.commits is not None:
                    self.commits.tick()
                    self._count_fleet()
                if self.quiet.done(holding=bool(in_flight)):
                    log.info("%s has been drained and quiet for %.0fs (kafka.idle_topic_seconds): exiting until "
                             "it has messages again", self.topic, self.quiet.idle_seconds)
                    code = topics.EXIT_IDLE
                    break
            while in_flight:
                self._store_oldest(in_flight)
        except sources.SourceUnavailableError as exc:
            log.error("%s; stopping without storing the batch in hand (read again at the restart)", exc)
            code = 1
            while in_flight:  # those handed to the writer are good and being stored: log and commit them
                self._store_oldest(in_flight)
        finally:
            self.close()
        log.info("stopped consuming %s after storing %d alerts", self.topic, self.stored_total)
        return code

    def _handed_in(self, partitions: list[int]) -> list[int]:
        """Fleet mode: the group gave this host ``partitions``; they start at the group's committed offsets, those
        of a recreated topic at their beginning (returned)."""
        assert self.commits is not None
        committed = self.kafka.committed(partitions)
        fresh = self.assignment.joined(partitions, committed)
        redo = self._log_takeover(partitions, committed)
        self._note_moved(partitions, back=None)
        self.commits.hold(committed, partitions, redo)
        self.quiet.reading(True)
        self._publish_holding(self.kafka.assigned)
        return fresh

    def _log_takeover(self, partitions: list[int], committed: dict[int, int]) -> dict[int, Progress]:
        """What a partition handed in means in messages: how many to read from the commit to the end, how many of
        them this host's store holds already (set aside, not stored again), and how many its previous holder had
        stored from there on (its last word in the fleet topic: redone here, at least that many). Returns the
        latter, from where this host starts (``durable``) to what that holder had stored."""
        assert self.fleet is not None
        stored = store.stored_offsets(self.conn, self.topic)
        try:
            said = {p: told for (topic, p), told in self.fleet.progress().items() if topic == self.topic}
        except Exception as exc:  # the log line goes without it; reading and committing go on
            self.throttled("fleet-progress", logging.WARNING, "could not read the fleet's progress: %s", exc)
            said = {}
        parts, redo = [], {}
        for partition in partitions:
            start = committed.get(partition)
            marks = self.kafka.watermarks(partition)
            begin = start if start is not None else (marks[0] if marks else 0)
            to_read = f"{marks[1] - begin}" if marks else "?"
            known = stored.get(partition)
            here = (max(0, known.next_offset - begin)
                    if known and known.generation == self.assignment.generation(partition) else 0)
            part = (f"[{partition}] from {'offset ' + str(start) if start is not None else 'the earliest'}: "
                    f"{to_read} messages to the end as the broker says, {here} of them stored here already")
            before = said.get(partition)
            if before is not None and before.member != self.fleet.member and before.stored > begin:
                redo[partition] = before._replace(durable=begin)
                part += (f"; {before.member} had stored {before.stored - begin} from there on, not durable (its last "
                         f"word, {max(0.0, time.time() - before.at):.0f} s ago): redone here")
            parts.append(part)
        log.info("taking over %s: %s", self.topic, "; ".join(parts))
        return redo

    def _handed_back(self, partitions: list[int]) -> None:
        """Fleet mode: ``partitions`` leave this host (a rebalance, a stop): commit them as far as durable first.
        Those it no longer holds (handed back already: the close's last revocation) are not said again."""
        assert self.commits is not None
        back = self.commits.release(partitions)
        if not back:
            return
        self._note_moved(partitions, back=back)
        self._publish_holding(self.kafka.assigned - set(partitions), self.commits.handed_over)

    def _judge_retention(self) -> None:
        """Fleet mode: learn how long the broker keeps the topic's messages (a commit held back near that long is
        warned about), and warn at once when a stamp job may hold a commit longer than that."""
        assert self.commits is not None
        self.retention_asked = time.monotonic()
        self.commits.keeps_for = self.kafka.retention_seconds()
        give_up = self.cfg.stamps.unavailable_give_up
        if self.commits.keeps_for and self.cfg.stamps.enabled and give_up >= self.commits.keeps_for:
            log.warning("config: stamps.unavailable_give_up (%.0f h) is not shorter than %s's retention on the broker "
                        "(%.0f h): a stamp job waiting that long holds its partition's commit past the messages' "
                        "life, and a host lost meanwhile loses them", give_up / 3600, self.topic,
                        self.commits.keeps_for / 3600)

    def _settle_before_leaving(self) -> None:
        """Fleet mode, a stop: Kafka refuses this member's commits while the group rebalances, until it has joined
        the group's new generation (``ILLEGAL_GENERATION``), so a stop in the middle of a rebalance would hand its
        partitions over behind what it made durable; and a leave in the middle of a join can wedge a Tansu group
        (docs/kafka-groups.md). So, fetching paused, the host keeps serving the group until Kafka takes every held
        partition's durable offset, at most ``LEAVE_WAIT`` s (then what Kafka lacks is redone by the next owner)."""
        assert self.commits is not None
        if not self.kafka.assigned:
            return
        self.kafka.pause()
        deadline = time.monotonic() + LEAVE_WAIT
        tries = 1
        while not self.commits.commit_held():
            if time.monotonic() >= deadline:
                log.warning("%s: Kafka still refused the commits after %.0f s of waiting for the group to settle: "
                            "leaving without them (the next owner redoes what it lacks)", self.topic, LEAVE_WAIT)
                return
            self.kafka.serve(SERVE_WHILE_LEAVING)
            tries += 1
        if tries > 1:
            log.info("%s: the group settled and Kafka took the commits at try %d: leaving", self.topic, tries)

    def _taken_away(self, partitions: list[int]) -> None:
        """Fleet mode: ``partitions`` were given to another host already (this session expired): too late to commit;
        what this host has not uploaded of them past its last commit is the next holder's all the same."""
        assert self.commits is not None
        back = self.commits.held(partitions)
        self.commits.forget(partitions)
        self._note_moved(partitions, back)

    def _note_moved(self, partitions: list[int], back: dict[int, tuple[int, int]] | None) -> None:
        """Tell the archiver that these partitions moved: before it writes more rows of them, it looks in the bucket
        for rows another host put there (a takeover redoes what the previous holder had not committed). Those handed
        back (``back``: generation and committed offset; None for partitions handed in) are not this host's to
        archive from their commit on, until they are handed in again (``ztfd.archive.handedback``)."""
        with store.atomic(self.conn):
            archive_marks.note_moved(self.conn, self.topic, partitions)
            if back is None:
                archive_marks.note_handed_in(self.conn, self.topic, partitions)
            else:
                archive_marks.note_handed_back(self.conn, self.topic, back)

    def _count_fleet(self) -> None:
        """Fleet mode, every ``fleet.COUNT_EVERY`` s: say this host is alive (what it holds, again), then count the
        live members, kept in the store, where this host's fetchers take their share of ``stamps.rate_limit``."""
        assert self.fleet is not None
        now = time.monotonic()
        if now - self.fleet_counted < COUNT_EVERY:
            return
        self.fleet_counted = now
        unknown = self.commits is not None and self.commits.keeps_for is None
        if unknown and now - self.retention_asked > RETENTION_ASK_EVERY:
            self._judge_retention()  # the broker did not say at the start (down, or refused): asked again hourly
        try:
            self._publish(sorted(self.kafka.assigned))
            members = live_members(self.fleet.members(), self.fleet.member)
            with store.transaction(self.conn):
                store.set_status(self.conn, FLEET_MEMBERS, str(members))
        except Exception as exc:  # the last count stands; reading and committing go on
            self.throttled("fleet-count", logging.WARNING, "could not count the fleet's members: %s", exc)

    def _count_soon(self) -> None:
        """Fleet mode, after a rebalance: count the members again once the others have said what they hold now."""
        self.fleet_counted = time.monotonic() - COUNT_EVERY + RECOUNT_AFTER

    def _rebalanced(self) -> None:
        """Fleet mode, after every rebalance: say at once what this host holds, none perhaps (a host joining is
        usually given nothing by the first round), so that the members counting ``RECOUNT_AFTER`` s after this
        rebalance count it too; then count again itself."""
        self._publish_holding(self.kafka.assigned)

    def _publish_holding(self, partitions: set[int], handed_over: dict[int, Progress] | None = None) -> None:
        """Fleet mode: tell the fleet topic which partitions this host holds (``ztfd status`` reads it), that it
        left once it stops (with the progress of the partitions it ``handed_over``), and count the members again
        once the others have told it too."""
        assert self.fleet is not None
        self._count_soon()
        try:
            self._publish(sorted(partitions), self.leaving, handed_over)
        except Exception as exc:  # what status shows; reading and committing go on without it
            self.throttled("fleet-member", logging.WARNING, "could not publish this host's partitions: %s", exc)

    def _publish(self, partitions: list[int], left: bool = False,
                 handed_over: dict[int, Progress] | None = None) -> None:
        """This host's record in the fleet topic: what it holds, its client id, and how far each partition it holds
        (or ``handed_over``) is stored and durable."""
        assert self.fleet is not None and self.commits is not None
        self.fleet.publish_member(self.topic, partitions, left, self.kafka.client_id,
                                  {**(handed_over or {}), **self.commits.progress(partitions)})

    def _full(self, messages: list[Any]) -> bool:
        """The batch stopped at a limit (count or bytes), not because Kafka had no more waiting."""
        return len(messages) >= self.cfg.kafka.batch_size or sum(map(message_size, messages)) >= BATCH_MAX_BYTES

    def _look_at_topic(self, force: bool = False) -> None:
        if self.assignment.look(force):
            self.quiet.reading(True)

    def prepare(self, messages: list[Any]) -> Batch | None:
        """Step 1 (``ztfd.ingest.batch``): the batch of ``messages``, None when there is nothing to store."""
        return self.builder.build(self.kafka.without_events(messages), self.assignment.generation_of)

    def _store_oldest(self, in_flight: deque[Batch]) -> None:
        """Wait for the oldest batch to be written and stored; through local trouble, pause and redo every batch
        in hand, in order (a stop during the pause leaves them unstored: Kafka redelivers them)."""
        try:
            written = self.files.wait()
        except Exception as exc:
            if not is_local(exc):
                raise
            self._ride_out(in_flight, exc)
        else:
            self._stored(in_flight.popleft(), written)

    def _ride_out(self, in_flight: deque[Batch], trouble: BaseException) -> None:
        """Pause, then write and store each batch in hand again until that works or a stop is asked for.

        Nothing is stored and no offset moves meanwhile; rewriting a file that is already there is harmless (same
        name, same bytes, atomic)."""
        while self.files.pending:  # the later batches: the writer skipped them after the failure (written below)
            with contextlib.suppress(BatchSkippedError):  # anything else (the writer gone) ends the consumer
                self.files.wait()
        pause = self.trouble.failed(self.conn, describe(trouble))
        while in_flight and not self.stopping.wait(pause):
            self._heartbeat()
            try:
                self.write_and_store(in_flight[0])
            except Exception as exc:
                if not is_local(exc):
                    raise
                pause = self.trouble.failed(self.conn, describe(exc))
                continue
            in_flight.popleft()
            pause = 0.0
        if in_flight:
            log.info("stopping during local trouble: %d batches not stored, Kafka delivers them again",
                     len(in_flight))
            in_flight.clear()
        else:
            self.trouble.recovered(self.conn)

    def close(self) -> None:
        try:
            if self.commits is not None:
                self._hand_everything_back()
        finally:
            self.kafka.close()
            self.builder.close()
            self.files.close()
            self.conn.close()

    def _hand_everything_back(self) -> None:
        """Fleet mode, closing: every partition handed back, committed as far as durable. Only a stop says ``left``
        (from now on, a last revocation during the close included), and clears this host's count: the others stop
        counting it at once, so its fetchers must wait. A consumer exiting otherwise (idle, crashed) leaves them
        running: the host goes on counting until its word is old. Whatever fails here only leaves Kafka at its
        last commit (the next owner redoes the rest): the close goes on."""
        self.leaving = self.stopping.is_set()
        try:
            if self.broker_errors.record is None:  # the broker answering: worth waiting for it to take the commits
                self._settle_before_leaving()
            assert self.commits is not None
            held = sorted(self.kafka.assigned)
            back = self.commits.release(held)
            if back:
                self._note_moved(held, back=back)
            self._publish_holding(set(), self.commits.handed_over)  # holding nothing now (left, if a stop)
            if self.leaving:
                with store.transaction(self.conn):
                    store.set_status(self.conn, FLEET_MEMBERS, None)
        except Exception as exc:
            log.warning("%s: handing the partitions back failed (%s): the next owners start at Kafka's last commit "
                        "and redo the rest", self.topic, exc)

    def _heartbeat(self, force: bool = False) -> None:
        try:
            if force:
                self.heartbeat.beat(self.conn)
            elif not self.heartbeat.beat_if_due(self.conn):
                return
        except sqlite3.Error as exc:  # a store locked or full: the batches say so; the stream must go on
            self.throttled("heartbeat", logging.WARNING, "heartbeat failed: %s", exc)
            return
        # What our fetches heard of the ends of the partitions we read: the lag status and metrics show.
        if self.broker_errors.record is None:
            seen_ends.record(self.conn, self.topic, self.kafka.assigned, self.kafka.cached_end, held=self.group)
        else:
            seen_ends.forget(self.conn, self.topic)

    def _write_files(self, batch: Batch) -> None:
        """Steps 2 and 3: hand the batch to the file writer, which writes its alert files (paths under home), then
        stores it."""
        self.files.submit(batch.files(), batch.to_store, root=str(self.cfg.home))

    def write_and_store(self, batch: Batch) -> list[Accepted]:
        """Steps 2 to 4 for one batch, waiting for each: the alerts it stored."""
        self._write_files(batch)
        return self._stored(batch, self.files.wait())

    def _stored(self, batch: Batch, written: Written) -> list[Accepted]:
        """Step 4, once the file writer has stored the batch (and written its alert log's lines): Kafka and the
        logs; the alerts it stored (not those another consumer of the same topic stored first)."""
        stored = written.stored
        assert stored is not None  # every batch is submitted with its store part
        accepted = [batch.documents[index] for index in stored.accepted]
        # Nothing below may raise: the batch is stored, and storing it again would only find it there.
        if self.commits is None:  # in fleet mode Kafka learns an offset only once it is durable in S3
            self.kafka.commit({partition: offset for partition, (_, offset) in batch.resume_at.items()})
        self.quota.check(stored.days)
        for item, reason in batch.rejected:
            log.warning("rejected %s[%d]@%d: %s", self.topic, item.partition, item.offset, reason)
        if written.log_error is not None:
            self.throttled("alert-log", logging.WARNING, "could not write %s.log: %s", self.topic, written.log_error)
        self.stored_total += len(accepted)
        return accepted

    def sweep_temporaries(self) -> None:
        """Remove the temporary files a kill -9 left in the middle of a write.

        Only this topic's consumer writes into ``data/<date>/<topic>/``, and only for dates of alerts it stored
        recently (a batch being written when the process died has its dates among the last ones stored, or is
        redelivered and written again), so those are the folders to look in, not the whole tree.
        """
        since = time.time() - RECENT_DATES_WINDOW
        for date in dates_received_since(self.conn, self.topic, since):
            remove_stale_temporaries(self.cfg.data_dir / date / self.topic)
        # And the files of the batch a writer was in the middle of, created under their final names.
        journal.sweep(self.cfg.home, self.cfg.state_dir, self.topic,
                      lambda partition, generation, low, high: stored_offsets_between(
                          self.conn, self.topic, partition, generation, low, high))


def run(cfg: Config, topic: str, name: str) -> int:
    """Entry point of ``ztfd consume``."""
    from astropy.utils import iers

    iers.conf.auto_download = False  # never reach for the network from a consumer
    nights.warm_up()
    return TopicConsumer(cfg, topic, name).run()


def describe_rejected(cfg: Config, topic: str | None, limit: int) -> list[str]:
    """Lines for ``ztfd rejected``: newest first, with the reason and the start of the raw bytes."""
    conn = store.connect(cfg.db_path)
    rows = latest_rejected(conn, topic, limit)
    conn.close()
    lines = []
    for row in rows:
        when = nights.iso_utc(dt.datetime.fromtimestamp(row.received_at, dt.UTC))
        lines.append(f"{when} {row.topic}[{row.partition}]@{row.kafka_offset}: {escape_controls(row.reason)} | "
                     f"{row.raw[:120]!r}")
    return lines
