"""``ztfd consume --topic T``: one Kafka consumer that stores every alert of one topic exactly once.

The exactly-once argument, in the order things happen for each batch of messages (as Kafka Connect's S3 sink
does it: data first, offsets after):
1. messages already in the store are set aside (a redelivery never rewrites a file);
2. the alert files are written (temporary file + rename) under names derived from the message's identity
   (topic, partition, generation, offset), so writing one again replaces it rather than adding a second;
3. one store transaction inserts the alerts, the rejected messages, the stamp jobs, the files' manifest rows and
   the partitions' next offsets. Alerts are keyed by their identity, so a message is never stored twice;
4. the offsets are committed to Kafka too, for lag tools; ztfd itself never reads them back.
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

The consumer assigns itself the topic's partitions (no consumer-group membership, see ``_look_at_topic``)
starting at the stored offsets. ``enable.auto.commit`` is off; the lasair package's ``lasair_consumer``
auto-commits (an alert could be acknowledged before it is stored), so it is not used.

Lasair deletes and recreates a topic whenever its filter is edited, restarting its offsets at 0. Seeking to the
stored offset then falls out of range, librdkafka resets to the earliest offset, and the consumer sees an offset
below the one it expected: it starts a new *generation* of that partition, so the new messages get identities
(and file names) of their own instead of being taken for redeliveries.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import re
import sqlite3
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, NamedTuple

from ztfd import sources, store
from ztfd.config import Config, ConfigError
from ztfd.daemon import lifecycle
from ztfd.daemon.localtrouble import Condition, describe, is_local
from ztfd.files import remove_stale_temporaries
from ztfd.ingest import nights, topics
from ztfd.ingest.breaker import Breaker
from ztfd.ingest.filewriter import BatchSkippedError, FileWriter
from ztfd.ingest.partitions import KafkaView, Partition, PartitionWatch
from ztfd.ingest.quota import QuotaWatch
from ztfd.logs import AlertLog, Throttle
from ztfd.stamps import providers
from ztfd.stamps.providers.packet import PREVIEW_JOB, carries_stamps
from ztfd.store import gaps as store_gaps
from ztfd.store.alerts import NewAlert, dates_received_since, last_received_at, stored_offsets_between
from ztfd.store.avro_schemas import StoredSchemas
from ztfd.store.batches import AlertToStore, BatchToStore, StoredBatch
from ztfd.store.jobs import FETCH_JOB, detection_key
from ztfd.store.rejected import NewRejected, latest_rejected

log = logging.getLogger(__name__)

POLL_TIMEOUT = 0.5
DRAIN_TIMEOUT = 0.005
BATCH_MAX_BYTES = 2 * 1024 * 1024  # a batch stops growing past this many bytes of messages (kafka.batch_size: count)
BATCH_CHUNK = 50  # messages taken from librdkafka's queue at a time while a batch fills
PREFETCH_KBYTES = 8192  # librdkafka's queued.max.messages.kbytes unless kafka.options sets it
HEARTBEAT_EVERY = 5.0
METADATA_EVERY = 10.0  # seconds between looks at the topic's partitions (new topic, new partitions, recreation)
RECENT_DATES_WINDOW = 2 * 86400.0
REGISTRY_TIMEOUT = 30.0  # seconds per request to a schema registry


class Incoming(NamedTuple):
    """A Kafka message with the generation of its partition at the moment it was read.

    This and the other records made for every message (``AlertFile``, ``Accepted``, ``sources.TimeField``,
    ``store.alerts.NewAlert``, ``nights.Dating``) are NamedTuples: as frozen dataclasses their construction was
    8% of the consumer's time (py-spy on ``bin/bench ingest``)."""

    msg: Any
    partition: int
    offset: int
    generation: int


def next_offsets(items: list[Incoming]) -> dict[int, tuple[int, int]]:
    """Per partition, (generation, next offset) after ``items``: the newest generation wins.

    A batch can hold the last messages of a deleted topic and the first of its successor; the offset to resume
    from is the successor's, not the highest number seen.
    """
    result: dict[int, tuple[int, int]] = {}
    for item in items:
        candidate = (item.generation, item.offset + 1)
        if candidate > result.get(item.partition, (-1, -1)):
            result[item.partition] = candidate
    return result


class AlertFile(NamedTuple):
    """One file of an alert: its path under home and its bytes (their MD5, for the sync manifest, is the file
    writer's)."""

    path: str
    data: bytes


class Accepted(NamedTuple):
    """An alert to write and store: its files (the one keeping the message first, then embedded cutouts)."""

    item: Incoming
    alert: sources.Alert
    date: str
    files: list[AlertFile]
    kafka_time: dt.datetime | None = None  # the message's Kafka timestamp, read once

    @property
    def path(self) -> str:
        """The file that keeps the message (``alerts.path``)."""
        return self.files[0].path


@dataclass(frozen=True)
class Batch:
    """A prepared batch: the file writer writes its alerts' files, then stores ``to_store``."""

    documents: list[Accepted]
    rejected: list[tuple[Incoming, str]]
    resume_at: dict[int, tuple[int, int]]
    to_store: BatchToStore


class _NoBroker:
    """The broker before the consumer connects: it says nothing, so nothing is judged on it."""

    def topic_id(self) -> str | None:
        return None

    def watermarks(self, partition: int) -> tuple[int, int] | None:
        return None


class TopicConsumer:
    def __init__(self, cfg: Config, topic: str, name: str) -> None:
        self.cfg = cfg
        self.topic = topic
        self.name = name
        self.conn = store.connect(cfg.db_path)
        self.source = topic_source(cfg, topic, StoredSchemas(self.conn))
        self.breaker = Breaker(self.conn, topic, self._decode, alive=self._heartbeat)
        self.stamp_providers = providers.providers_for(cfg.stamps) if cfg.stamps.enabled else {}
        self.trouble = Condition(name)
        self.quota = QuotaWatch(topic, cfg.kafka.lasair_byte_quota)
        self.stopping = lifecycle.Stop()  # set by SIGTERM/SIGINT: the batch in hand is finished and stored
        # A topic found by a pattern: its consumer exits once it is drained and quiet (``topics.EXIT_IDLE``).
        self.quiet = topics.QuietWatch(topics.from_pattern(cfg.kafka.topics, topic), cfg.kafka.idle_topic_seconds,
                                       last_received_at(self.conn, topic))
        self.files = FileWriter(cfg.db_path)
        self.alert_log = AlertLog(cfg.logs_dir, topic, cfg.logging.max_bytes, cfg.logging.backup_count)
        self.throttled = Throttle(log)
        self.consumer: Any = None
        # Per partition: its generation and the next offset expected (set on assignment), judged on evidence.
        self.watch = PartitionWatch(topic, _NoBroker(), store_gaps.topic_id(self.conn, topic))
        self.last_heartbeat = 0.0
        self.assigned: set[int] = set()
        self.last_metadata_check = -METADATA_EVERY
        self.stored_total = 0

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def run(self) -> int:
        self.stopping.install()
        self._heartbeat(force=True)
        self.sweep_temporaries()
        self.files.start()
        self.consumer = self._new_consumer()
        self.watch.view = KafkaView(self.consumer, self._new_admin(), self.topic)
        self._look_at_topic(force=True)
        log.info("consuming %s from %s as group %s", self.topic, self.cfg.kafka.bootstrap_servers,
                 self.cfg.kafka.group_id)
        # A pipeline one batch deep: while the file writer writes and stores batch k, the main thread polls and
        # prepares batch k+1, hands it over, then waits for batch k. The writer stores batches in order, each
        # after its files are on disk.
        in_flight: deque[Batch] = deque()
        code = 0
        try:
            while not self.stopping.is_set():
                # With a batch in hand, only a glance at Kafka: waiting the whole poll timeout for messages
                # that may not come would leave the batch's answer unread, its Kafka commit and log lines
                # late (after a burst ending on a full batch, 0.5 s: a fifth of bin/bench ingest's run).
                messages = self._next_batch(DRAIN_TIMEOUT if in_flight else POLL_TIMEOUT)
                self._heartbeat()
                if messages:
                    self.quiet.saw_messages()
                batch = self.prepare(messages) if messages else None
                if batch is not None:
                    self._write_files(batch)
                    in_flight.append(batch)
                # Wait for the older batch once a newer one is submitted; at a trickle (Kafka had no more waiting)
                # or when idle, at once rather than after the next poll.
                caught_up = not self._full(messages)
                while in_flight and (len(in_flight) > 1 or caught_up or self.files.answered()):
                    self._store_oldest(in_flight)
                self._look_at_topic()
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

    def _full(self, messages: list[Any]) -> bool:
        """The batch stopped at a limit (count or bytes), not because Kafka had no more waiting."""
        return len(messages) >= self.cfg.kafka.batch_size or sum(map(_size, messages)) >= BATCH_MAX_BYTES

    def _next_batch(self, timeout: float) -> list[Any]:
        """Wait up to ``timeout`` for one message, then take what is already fetched, up to a batch.

        ``consume(n, timeout)`` would wait for n messages or the whole timeout: at a trickle of alerts every one
        would sit for the timeout before being stored. Here the first message is stored as soon as it arrives,
        and under load the batch fills from librdkafka's prefetched queue at once.
        """
        first = self.consumer.poll(timeout)
        if first is None:
            return []
        batch, size, limit = [first], _size(first), self.cfg.kafka.batch_size
        # Bounded in bytes too: a batch of 1000 Lasair-LSST full-output messages (~40 kB each) held twice over
        # (the one being written, the one being prepared) took the consumer past 400 MB.
        while len(batch) < limit and size < BATCH_MAX_BYTES:
            more = self.consumer.consume(min(limit - len(batch), BATCH_CHUNK), DRAIN_TIMEOUT)
            if not more:
                break
            batch.extend(more)
            size += sum(_size(msg) for msg in more)
        return batch

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
            self._stored(in_flight.popleft(), written.stored)

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
        if self.consumer is not None:
            try:
                self.consumer.close()
            except Exception as exc:  # closing must not turn a clean stop into a crash
                log.warning("closing the Kafka consumer failed: %s", exc)
            self.consumer = None
        self.files.close()
        self.alert_log.close()
        self.conn.close()

    def _new_consumer(self) -> Any:
        from confluent_kafka import Consumer

        settings: dict[str, Any] = {
            "bootstrap.servers": self.cfg.kafka.bootstrap_servers,
            "group.id": self.cfg.kafka.group_id,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
            # librdkafka prefetches up to 64 MB a partition by default: with ZTF's 70 kB packets the consumer
            # peaked near 300 MB. 8 MB, looked at again every 10 ms once full (below), keeps fetching while a
            # batch is prepared (bin/bench avro and lsst: the same rates as 32 MB, 192 MB peak against 295 MB;
            # with the default 1 s backoff 8 MB was 0.6x the rate); kafka.options may set it.
            "queued.max.messages.kbytes": PREFETCH_KBYTES,
            "fetch.queue.backoff.ms": 10,  # with a full queue, look again after 10 ms (default 1 s)
            "error_cb": self._on_kafka_error,
            "logger": librdkafka_logger(),
        }
        settings.update(self.cfg.kafka.options)
        # Not negotiable: ztfd decides when an offset is done, after the alert is stored.
        settings["enable.auto.commit"] = False
        settings["enable.auto.offset.store"] = False
        try:
            consumer = Consumer(settings)
        except Exception as exc:  # librdkafka refuses an option: a configuration error, named without its value
            raise ConfigError(f"config: kafka.options: {kafka_option_problem(exc, self.cfg.kafka.options)}") from None
        self.assigned.clear()
        return consumer

    def _new_admin(self) -> Any:
        """An admin client on the same brokers and credentials: it asks for the topic's id (recreation evidence)."""
        from confluent_kafka.admin import AdminClient

        settings = topics.admin_settings(self.cfg.kafka.bootstrap_servers, self.cfg.kafka.options)
        return AdminClient({**settings, "error_cb": self._on_kafka_error, "logger": librdkafka_logger()})

    def _on_kafka_error(self, error: Any) -> None:
        self.throttled(f"kafka:{error.code()}", logging.WARNING, "kafka: %s", error.str())

    def _heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_heartbeat >= HEARTBEAT_EVERY:
            try:
                store.heartbeat(self.conn, self.name, "consumer", self.topic)
            except sqlite3.Error as exc:  # a store locked or full: the batches say so; the stream must go on
                self.throttled("heartbeat", logging.WARNING, "heartbeat failed: %s", exc)
                return
            self.last_heartbeat = now

    # --- partitions --------------------------------------------------------------------------------------------

    def _look_at_topic(self, force: bool = False) -> None:
        """Assign the topic's partitions to this consumer, and keep looking while it is idle.

        ztfd does not join a consumer group: the supervisor runs exactly one consumer per topic, and the offsets
        that matter are in the store, so a group's rebalancing would only add failure modes (Tansu, for one,
        wedges a group whose members leave during a rebalance). ``group_id`` still names the offsets committed
        to Kafka for lag tools. Looking again every ``METADATA_EVERY`` seconds picks up a topic created after
        the consumer started, partitions added later, and a topic recreated under it.
        """
        now = time.monotonic()
        if not force and now - self.last_metadata_check < METADATA_EVERY:
            return
        self.last_metadata_check = now
        try:
            metadata = self.consumer.list_topics(self.topic, timeout=5)
        except Exception as exc:
            self.throttled("metadata", logging.WARNING, "cannot reach Kafka for metadata: %s", exc)
            return
        info = metadata.topics.get(self.topic)
        if info is None or info.error is not None or not info.partitions:
            self.throttled("missing-topic", logging.INFO, "topic %s does not exist (yet): waiting for it", self.topic)
            self.quiet.reading(True)  # a pattern's topic that is gone has nothing more to read
            return
        if self.watch.topic_recreated():
            self._recreated(sorted(set(info.partitions) | set(store.stored_offsets(self.conn, self.topic))),
                            "its topic id changed")
        elif self.watch.known_id is not None and store_gaps.topic_id(self.conn, self.topic) is None:
            with store.transaction(self.conn):
                store_gaps.save_topic_id(self.conn, self.topic, self.watch.known_id)
        self.quiet.reading(True)
        new = sorted(set(info.partitions) - self.assigned)
        if new:
            self._assign(new)
        self._detect_restarted_offsets()

    def _assign(self, partitions: list[int]) -> None:
        """Start reading ``partitions`` where the store says (else where Kafka's committed offset, else the
        earliest one, says): the seek that makes a restart resume exactly after the last stored alert."""
        from confluent_kafka import OFFSET_STORED, TopicPartition

        stored = store.stored_offsets(self.conn, self.topic)
        assignment = []
        for partition in partitions:
            known = stored.get(partition)
            self.watch.partitions[partition] = Partition(known.generation if known else 0,
                                                         known.next_offset if known else None)
            offset = known.next_offset if known else OFFSET_STORED
            assignment.append(TopicPartition(self.topic, partition, offset))
        self.consumer.incremental_assign(assignment)
        self.assigned.update(partitions)
        log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in assignment))
        known_offsets = [tp for tp in assignment if tp.partition in stored]
        if known_offsets:  # so that lag tools see where ztfd stands before the first batch
            try:
                self.consumer.commit(offsets=known_offsets, asynchronous=True)
            except Exception as exc:
                self.throttled("commit", logging.WARNING, "could not commit offsets to Kafka: %s", exc)

    def _detect_restarted_offsets(self) -> None:
        """Notice an idle partition whose end is now below the offset expected next: perhaps a recreated topic.

        A broker should answer such a fetch with OFFSET_OUT_OF_RANGE (librdkafka then resets to the earliest
        offset, which ``_follow_generation`` judges); Tansu answers with nothing, so an idle consumer compares its
        position with the high watermark cached from its fetches, and ``ztfd.ingest.partitions`` asks for evidence.
        """
        from confluent_kafka import TopicPartition

        for partition in sorted(self.assigned):
            try:
                _low, high = self.consumer.get_watermark_offsets(TopicPartition(self.topic, partition), cached=True)
            except Exception:
                continue
            if self.watch.idle_partition_ended_early(partition, high):
                self._recreated([partition], f"it ends at {high}, before the expected offset, on evidence")

    def _recreated(self, partitions: list[int], why: str) -> None:
        """Start a new generation of ``partitions``, read from the beginning: recorded at once with the topic's id
        (one transaction), so a restart resumes in the new generation instead of taking its messages for
        redeliveries of the old one."""
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        generations = []
        for partition in partitions:
            state = self.watch.partitions.setdefault(partition, Partition(0, None))
            state.generation += 1
            state.expected = None
            generations.append((partition, state.generation))
        with store.transaction(self.conn):
            store_gaps.start_generation(self.conn, self.topic, self.watch.view.topic_id(), generations)
        self.watch.known_id = store_gaps.topic_id(self.conn, self.topic) or self.watch.known_id
        log.warning("%s was recreated (%s): reading %s from the beginning", self.topic, why,
                    ", ".join(f"[{p}] as generation {g}" for p, g in generations))
        for partition in partitions:
            if partition in self.assigned:
                self.consumer.seek(TopicPartition(self.topic, partition, OFFSET_BEGINNING))

    # --- the batch ---------------------------------------------------------------------------------------------

    def prepare(self, messages: list[Any]) -> Batch | None:
        """Step 1: decode, set aside what is stored already, date, build each alert's files.

        Each message is decoded, dated, named and described on its own: whatever it makes the code raise rejects
        it (with its raw bytes and the reason) and no other."""
        received = dt.datetime.now(dt.UTC)
        decoded: list[tuple[Incoming, sources.Alert]] = []
        rejected: list[tuple[Incoming, str]] = []
        items = [Incoming(msg, msg.partition(), msg.offset(), self._follow_generation(msg.partition(), msg.offset()))
                 for msg in messages if not self._is_kafka_error(msg)]
        # Through the crash-loop breaker (ztfd.ingest.breaker); SourceUnavailableError goes up: not the message's
        # fault, nothing of this batch is stored, and Kafka delivers it again.
        outcomes = self.breaker.decode([(item.partition, item.generation, item.offset) for item in items],
                                       [(item.msg.value(), item.msg.key()) for item in items])
        for item, outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                rejected.append((item, rejection_reason(outcome)))
            else:
                decoded.append((item, outcome))
        if not decoded and not rejected:
            return None
        resume_at = next_offsets([item for item, _ in decoded] + [item for item, _ in rejected])
        fresh = self._dated(self._not_yet_stored(decoded), rejected)
        received_iso = nights.iso_utc(received)  # one batch, one receive time
        documents, to_store = [], []
        for item, alert in fresh:
            try:
                entry = self._document(item, alert, received, received_iso)
                row = self._alert_to_store(entry)
            except Exception as exc:
                rejected.append((item, rejection_reason(exc)))
                continue
            documents.append(entry)
            to_store.append(row)
        traffic = QuotaWatch.count(
            [(e.kafka_time or received, len(e.item.msg.value() or b""), e.alert.survey) for e in documents]
            + [(produced_at(item.msg, received), len(item.msg.value() or b""), None) for item, _ in rejected])
        kept = [NewRejected(item.partition, item.generation, item.offset, reason, item.msg.value())
                for item, reason in rejected]
        return Batch(documents, rejected, resume_at,
                     BatchToStore(self.topic, received.timestamp(), to_store, kept, resume_at, traffic))

    def _is_kafka_error(self, msg: Any) -> bool:
        """True for an error event in place of a message (logged, throttled)."""
        from confluent_kafka import KafkaError

        error = msg.error()
        if error is None:
            return False
        if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            self.throttled("missing-topic", logging.INFO, "topic %s does not exist (yet): waiting for it", self.topic)
        elif error.code() != KafkaError._PARTITION_EOF:
            self.throttled(f"msg:{error.code()}", logging.WARNING, "kafka: %s", error.str())
        return True

    def _decode(self, value: bytes | None, key: bytes | None) -> sources.Alert:
        """The topic's source makes an alert of the message; its id must be safe as a folder and file name."""
        limit = self.cfg.kafka.max_message_bytes
        if value is not None and len(value) > limit:
            raise sources.InvalidMessageError(
                f"message of {len(value)} bytes exceeds kafka.max_message_bytes ({limit})")
        alert = self.source.decode(value, key)
        for name, value in (("object id", alert.object_id), ("detection id", alert.detection_id)):
            if value is not None and not sources.PLAIN_ID.match(value):
                raise sources.InvalidMessageError(
                    f"{name} {json.dumps(value[:80])} is not a plain identifier (letters, digits, _ and - only)")
        return alert

    def _dated(
        self, fresh: list[tuple[Incoming, sources.Alert]], rejected: list[tuple[Incoming, str]]
    ) -> list[tuple[Incoming, sources.Alert]]:
        """Convert the batch's time fields in one go; if that fails, alert by alert, rejecting those that fail."""
        try:
            nights.convert_times([alert for _, alert in fresh])
            return fresh
        except Exception:
            log.debug("converting a batch's times failed; converting alert by alert", exc_info=True)
        kept = []
        for item, alert in fresh:
            alert.times_utc.clear()
            alert.obs_mjd = alert.obs_iso = alert.obs_day = None
            try:
                nights.convert_times([alert])
            except Exception as exc:
                rejected.append((item, rejection_reason(exc)))
            else:
                kept.append((item, alert))
        return kept

    def _document(self, item: Incoming, alert: sources.Alert, received: dt.datetime, received_iso: str) -> Accepted:
        """An alert's files: where they go and what they hold (written by the file writer)."""
        when = kafka_time(item.msg)
        dating = nights.date_of(alert, when, received)
        date = dating.date
        stem = sources.file_stem(alert.object_id, item.partition, item.offset, item.generation)
        files = sources.alert_files(alert, f"data/{date}/{self.topic}", stem, f"images/{date}/{alert.object_id}",
                                    self._metadata(item, alert, dating, when, received_iso))
        return Accepted(item, alert, date, [AlertFile(path, data) for path, data in files], when)

    def _write_files(self, batch: Batch) -> None:
        """Steps 2 and 3: hand the batch to the file writer, which writes its alert files (paths under home), then
        stores it."""
        self.files.submit([(file.path, file.data) for entry in batch.documents for file in entry.files],
                          batch.to_store, root=str(self.cfg.home))

    def write_and_store(self, batch: Batch) -> list[Accepted]:
        """Steps 2 to 4 for one batch, waiting for each: the alerts it stored."""
        self._write_files(batch)
        return self._stored(batch, self.files.wait().stored)

    def _stored(self, batch: Batch, stored: StoredBatch | None) -> list[Accepted]:
        """Step 4, once the file writer has stored the batch: Kafka and the logs; the alerts it stored (not those
        another consumer of the same topic stored first)."""
        assert stored is not None  # every batch is submitted with its store part
        accepted = [batch.documents[index] for index in stored.accepted]
        # Nothing below may raise: the batch is stored, and storing it again would only find it there.
        self._commit_to_kafka(batch.resume_at)
        self.quota.check(stored.days)
        for item, reason in batch.rejected:
            log.warning("rejected %s[%d]@%d: %s", self.topic, item.partition, item.offset, reason)
        try:
            self.alert_log.write(log_lines(self.topic, accepted))
        except OSError as exc:
            self.throttled("alert-log", logging.WARNING, "could not write %s.log: %s", self.topic, exc)
        self.stored_total += len(accepted)
        return accepted

    def _follow_generation(self, partition: int, offset: int) -> int:
        """The generation of a message just read. An offset off the expected one is judged on evidence: below it,
        a recreated topic or a redelivery; past it, alerts lost upstream (a gap, recorded and logged) or not."""
        state = self.watch.partitions.setdefault(partition, Partition(0, None))
        verdict = self.watch.offset_seen(partition, offset)
        if verdict.kind == "recreated":
            self._recreated([partition], f"offset {offset} came after {state.expected}")
            # The message itself is the new topic's: the seek to the beginning redelivers any before it.
        elif verdict.gap is not None:
            self._record_gap(verdict.gap)
        state.expected = offset + 1
        return state.generation

    def _record_gap(self, gap: store_gaps.Gap) -> None:
        with store.transaction(self.conn):
            new = store_gaps.record_gap(self.conn, gap)
        if new:
            log.error("%s[%d] generation %d: offsets %d..%d (%d alerts) are gone from the broker (retention passed "
                      "them before ztfd read them): lost upstream, recorded as a gap", gap.topic, gap.partition,
                      gap.generation, gap.first_offset, gap.last_offset, gap.missing)

    def _metadata(
        self, item: Incoming, alert: sources.Alert, dating: nights.Dating, when: dt.datetime | None, received_iso: str
    ) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "topic": self.topic,
            "partition": item.partition,
            "offset": item.offset,
            "kafka_timestamp": nights.iso_utc(when) if when else None,
            "received_at": received_iso,
            "date": dating.date,
            "date_rule": dating.rule,
            "dated_by": dating.dated_by,
            "survey": alert.survey,
            "object_id": alert.object_id,
            "times_utc": alert.times_utc,
        }
        if alert.detection_id is not None:
            meta["detection_id"] = alert.detection_id
        if item.generation:
            meta["generation"] = item.generation
        return meta

    def _not_yet_stored(self, valid: list[tuple[Incoming, sources.Alert]]) -> list[tuple[Incoming, sources.Alert]]:
        """Drop messages already in the store (a redelivery after lost offsets): one indexed query per batch."""
        if not valid:
            return valid
        stored: set[tuple[int, int, int]] = set()
        spans: dict[tuple[int, int], list[int]] = {}
        for item, _ in valid:
            spans.setdefault((item.partition, item.generation), []).append(item.offset)
        for (partition, generation), offsets in spans.items():
            stored.update(
                (partition, generation, offset) for offset in stored_offsets_between(
                    self.conn, self.topic, partition, generation, min(offsets), max(offsets))
            )
        return [(item, message) for item, message in valid
                if (item.partition, item.generation, item.offset) not in stored]

    def _alert_to_store(self, entry: Accepted) -> AlertToStore:
        """The alert's row, files and stamp job, as the file writer stores them."""
        alert = entry.alert
        row = NewAlert(entry.item.partition, entry.item.generation, entry.item.offset, alert.object_id, entry.date,
                       alert.obs_mjd, entry.path, alert.survey, alert.detection_id, alert.band)
        kind = self._stamp_job_kind(alert)
        key = detection_key(alert.object_id, alert.obs_mjd, entry.date) if kind is not None else None
        return AlertToStore(row, tuple(file.path for file in entry.files), kind, key)

    def _stamp_job_kind(self, alert: sources.Alert) -> str | None:
        """The alert's stamp job: only the preview when its packet carried the three stamps (written with the
        alert), else a fetch from its survey's provider, if one serves it; None for no job."""
        if carries_stamps(alert):
            return PREVIEW_JOB if self.cfg.stamps.enabled and self.cfg.stamps.previews else None
        return FETCH_JOB if self._wants_stamps(alert) else None

    def _wants_stamps(self, alert: sources.Alert) -> bool:
        """A stamp job for the alerts the provider of their survey (``stamps.<survey>_provider``) can serve."""
        provider = self.stamp_providers.get(alert.survey)
        return provider is not None and provider.serves(alert)

    def _commit_to_kafka(self, resume_at: dict[int, tuple[int, int]]) -> None:
        from confluent_kafka import TopicPartition

        try:
            self.consumer.commit(
                offsets=[TopicPartition(self.topic, p, o) for p, (_, o) in resume_at.items()], asynchronous=True
            )
        except Exception as exc:  # Kafka's copy of the offsets is informational; the store's is the truth
            self.throttled("commit", logging.WARNING, "could not commit offsets to Kafka: %s", exc)

    # --- recovery ----------------------------------------------------------------------------------------------

    def sweep_temporaries(self) -> None:
        """Remove the temporary files a kill -9 left in the middle of a write.

        Only this topic's consumer writes into ``data/<date>/<topic>/``, and only for dates of alerts it stored
        recently (a batch being written when the process died has its dates among the last ones stored, or is
        redelivered and written again), so those are the folders to look in, not the whole tree.
        """
        since = time.time() - RECENT_DATES_WINDOW
        for date in dates_received_since(self.conn, self.topic, since):
            remove_stale_temporaries(self.cfg.data_dir / date / self.topic)


def librdkafka_logger() -> logging.Logger:
    """The logger librdkafka's own lines go to, each kind at most once per 30 s."""
    logger = logging.getLogger("ztfd.librdkafka")
    if not any(isinstance(f, Throttle) for f in logger.filters):
        logger.addFilter(Throttle(logger))
    return logger


def _size(msg: Any) -> int:
    value = msg.value()
    return len(value) if value else 0


def kafka_time(msg: Any) -> dt.datetime | None:
    """The message's Kafka timestamp: the same at every redelivery, unlike ztfd's own clock. A producer may set
    any 64-bit value; one that is no date (beyond year 9999) rejects the message."""
    kind, stamp = msg.timestamp()
    if not kind or stamp <= 0:
        return None
    try:
        return dt.datetime.fromtimestamp(stamp / 1000, dt.UTC)
    except (ValueError, OverflowError, OSError):
        raise sources.InvalidMessageError(f"Kafka timestamp {stamp} ms is not a date") from None


def produced_at(msg: Any, received: dt.datetime) -> dt.datetime:
    """When the message was produced, for counting its bytes: its Kafka timestamp, else the receive time."""
    try:
        return kafka_time(msg) or received
    except sources.InvalidMessageError:
        return received


def rejection_reason(exc: BaseException) -> str:
    """The reason kept beside a rejected message: a source's own words, else what went wrong where."""
    if isinstance(exc, sources.InvalidMessageError):
        text = str(exc)
    else:
        log.warning("a message raised %s in the consumer: rejected", exc.__class__.__name__, exc_info=exc)
        text = f"cannot be stored: {exc.__class__.__name__}: {exc}"
    return text[: sources.MAX_REASON]


def log_lines(topic: str, accepted: list[Accepted]) -> list[str]:
    """The ``<topic>.log`` lines of stored alerts."""
    return [f"{a.alert.object_id} {a.date} {topic}[{a.item.partition}]@{a.item.offset} {a.path}" for a in accepted]


def topic_source(cfg: Config, topic: str, schema_cache: StoredSchemas | None) -> sources.Source:
    """The source of the topic's format (``kafka.formats``, patterns included; ``lasair`` by default), with what it
    may need: the topic's schema file, the schema registry and the store's cache of its schemas."""
    name = topics.lookup(cfg.kafka.formats, topic, sources.DEFAULT_FORMAT) or sources.DEFAULT_FORMAT
    try:
        return sources.source_for(name, max_message_bytes=cfg.kafka.max_message_bytes,
                                  schema_file=topics.lookup(cfg.kafka.schemas, topic),
                                  registry_url=cfg.kafka.schema_registry_url, schema_cache=schema_cache,
                                  registry_timeout=REGISTRY_TIMEOUT)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"config: kafka.formats: topic {topic} ({name}): {exc}") from None


def kafka_option_problem(exc: BaseException, options: dict[str, Any]) -> str:
    """What librdkafka says about refused options, with every configured option value masked (librdkafka repeats
    values in its sentences, and they may be secrets); an unknown option is named."""
    error = exc.args[0] if exc.args else None
    text = error.str() if hasattr(error, "str") else str(exc)
    named = re.findall(r'property:? "([A-Za-z0-9._-]+)"', text)
    if "No such configuration property" in text and named:
        return f"librdkafka has no option {named[-1]}"
    for value in sorted({str(v) for v in options.values() if str(v)}, key=len, reverse=True):
        text = text.replace(value, "***")
    return f"librdkafka: {text.removeprefix('Failed to create consumer: ')}"


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
        lines.append(f"{when} {row.topic}[{row.partition}]@{row.kafka_offset}: {row.reason} | {row.raw[:120]!r}")
    return lines


