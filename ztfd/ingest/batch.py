"""Step 1 of a consumer's batch: Kafka messages in, a ``Batch`` out (its alerts' files, its rows, its rejections
and the partitions' next offsets), with no broker and no file written.

Each message is decoded by the topic's source, set aside if the store already has it (a redelivery never rewrites
a file), dated and named on its own: whatever it makes the code raise rejects that message alone, with its raw
bytes and the reason; the stream goes on. An alert is built once, by its source: dating returns its converted
times (``nights.ObservedTimes``) beside it, and the batch is made of both.

The builder asks two things of the world, both handed to it: the generation of each message's partition (the
consumer's partition judgement, ``ztfd.ingest.assignment``) and which offsets the store already holds.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, NamedTuple

from ztfd import sources
from ztfd.config import Config, ConfigError
from ztfd.ingest import nights, topics
from ztfd.ingest.breaker import Breaker, Outcome, Position
from ztfd.ingest.decodepool import DecodePool, workers_for
from ztfd.ingest.quota import QuotaWatch
from ztfd.stamps import providers
from ztfd.stamps.providers.packet import PREVIEW_JOB, carries_stamps
from ztfd.store.alerts import NewAlert, stored_offsets_between
from ztfd.store.avro_schemas import StoredSchemas
from ztfd.store.batches import AlertToStore, BatchToStore
from ztfd.store.jobs import FETCH_JOB, detection_key
from ztfd.store.rejected import NewRejected

log = logging.getLogger(__name__)

REGISTRY_TIMEOUT = 30.0  # seconds per request to a schema registry

# (partition, generation, lowest offset, highest offset) -> the offsets of that span the store holds
StoredLookup = Callable[[int, int, int, int], Iterable[int]]
# (partition, offset) of a message just read -> the generation of its partition
GenerationOf = Callable[[int, int], int]
# A batch's messages (value, key) at their positions -> each one's alert or what it raised.
DecodeAll = Callable[[Sequence[Position], Sequence[tuple[bytes | None, bytes | None]]], list[Outcome]]


class Incoming(NamedTuple):
    """A Kafka message with the generation of its partition at the moment it was read.

    This and the other records made for every message (``Accepted``, ``sources.Alert``,
    ``sources.TimeField``, ``nights.ObservedTimes``, ``store.alerts.NewAlert``, ``nights.Dating``) are NamedTuples:
    as frozen dataclasses their construction was 8% of the consumer's time (py-spy on ``bin/bench ingest``)."""

    msg: Any
    partition: int
    offset: int
    generation: int


class Accepted(NamedTuple):
    """An alert to write and store: its files (the one keeping the message first, then embedded cutouts)."""

    item: Incoming
    alert: sources.Alert
    date: str
    files: list[tuple[str, bytes]]  # (path under home, bytes); their MD5s, for the sync manifest, are the writer's
    kafka_time: dt.datetime | None = None  # the message's Kafka timestamp, read once

    @property
    def path(self) -> str:
        """The file that keeps the message (``alerts.path``)."""
        return self.files[0][0]


@dataclass(frozen=True)
class Batch:
    """A prepared batch: the file writer writes its alerts' files, then stores ``to_store``."""

    documents: list[Accepted]
    rejected: list[tuple[Incoming, str]]
    resume_at: dict[int, tuple[int, int]]
    to_store: BatchToStore

    def files(self) -> list[tuple[str, bytes]]:
        """Every file of the batch's alerts, (path under home, bytes), as the file writer takes them."""
        return [file for entry in self.documents for file in entry.files]


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


class BatchBuilder:
    """Turns one topic's messages into batches (``build``)."""

    def __init__(self, topic: str, source: sources.Source, already_stored: StoredLookup, *, max_message_bytes: int,
                 stamp_providers: dict[str, Any], previews: bool) -> None:
        self.topic = topic
        self.source = source
        # How a batch's messages are decoded: in this process by default; the consumer's goes through its
        # crash-loop breaker (``ztfd.ingest.breaker``), which takes the same messages and answers the same way.
        self.decode_all: DecodeAll = self._decode_here
        self.already_stored = already_stored
        self.max_message_bytes = max_message_bytes
        self.stamp_providers = stamp_providers  # survey -> the provider of its stamps (none: no stamp jobs)
        self.previews = previews  # queue a preview job for alerts whose packet carried their stamps
        self.pool: DecodePool | None = None  # the consumer's decode workers (``kafka.decode_workers``), if any

    @classmethod
    def for_topic(cls, cfg: Config, topic: str, conn: sqlite3.Connection,
                  alive: Callable[[], None] = lambda: None) -> BatchBuilder:
        """The builder of a consumer of ``topic``: its source (``kafka.formats``), the store's offsets, the stamp
        providers of ``stamps``, decoding through the crash-loop breaker (``alive``: the consumer's heartbeat,
        called between messages decoded one by one), spread over ``kafka.decode_workers`` processes forked now
        (``ztfd.ingest.decodepool``; ``close`` ends them)."""
        stamps = cfg.stamps
        builder = cls(topic, topic_source(cfg, topic, StoredSchemas(conn)),
                      lambda partition, generation, low, high: stored_offsets_between(
                          conn, topic, partition, generation, low, high),
                      max_message_bytes=cfg.kafka.max_message_bytes,
                      stamp_providers=providers.providers_for(stamps) if stamps.enabled else {},
                      previews=stamps.enabled and stamps.previews)
        workers = workers_for(cfg.kafka.decode_workers, builder.source)
        if workers:
            builder.pool = DecodePool(builder.decode_one, workers, alive)
            builder.pool.start()
        builder.decode_all = Breaker(conn, topic, builder.decode_one, alive=alive,
                                     decode_batch=builder.pool.decode if builder.pool else None).decode
        return builder

    def close(self) -> None:
        """End the decode workers, if any."""
        if self.pool is not None:
            self.pool.close()

    def build(self, messages: list[Any], generation_of: GenerationOf) -> Batch | None:
        """Decode, set aside what is stored already, date, build each alert's files and rows; None when there is
        nothing to store. ``messages`` are Kafka messages (error events already taken out)."""
        received = dt.datetime.now(dt.UTC)
        decoded: list[tuple[Incoming, sources.Alert]] = []
        rejected: list[tuple[Incoming, str]] = []
        items = []
        for msg in messages:
            partition, offset = msg.partition(), msg.offset()
            items.append(Incoming(msg, partition, offset, generation_of(partition, offset)))
        # SourceUnavailableError goes up: not the message's fault, nothing of this batch is stored, and Kafka
        # delivers it again.
        outcomes = self.decode_all([(item.partition, item.generation, item.offset) for item in items],
                                   [(item.msg.value(), item.msg.key()) for item in items])
        for item, outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                rejected.append((item, rejection_reason(outcome)))
            else:
                decoded.append((item, outcome))
        if not decoded and not rejected:
            return None
        resume_at = next_offsets([item for item, _ in decoded] + [item for item, _ in rejected])
        fresh = self._not_yet_stored(decoded)
        observed = self._dated(fresh, rejected)
        received_iso = nights.iso_utc(received)  # one batch, one receive time
        documents, to_store = [], []
        for (item, alert), times in observed:
            try:
                entry, row = self._document(item, alert, times, received, received_iso)
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

    def _decode_here(self, positions: Sequence[Position], messages: Sequence[tuple[bytes | None, bytes | None]]
                     ) -> list[Outcome]:
        """Each message's alert, or what it raised (its rejection); ``SourceUnavailableError`` goes up."""
        outcomes: list[Outcome] = []
        for value, key in messages:
            try:
                outcomes.append(self.decode_one(value, key))
            except sources.SourceUnavailableError:
                raise
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    def decode_one(self, value: bytes | None, key: bytes | None) -> sources.Alert:
        """The topic's source makes an alert of the message; its id must be safe as a folder and file name."""
        limit = self.max_message_bytes
        if value is not None and len(value) > limit:
            raise sources.InvalidMessageError(
                f"message of {len(value)} bytes exceeds kafka.max_message_bytes ({limit})")
        alert = self.source.decode(value, key)
        for name, value in (("object id", alert.object_id), ("detection id", alert.detection_id)):
            if value is not None and not sources.PLAIN_ID.match(value):
                raise sources.InvalidMessageError(
                    f"{name} {json.dumps(value[:80])} is not a plain identifier (letters, digits, _ and - only)")
        return alert

    def _not_yet_stored(self, valid: list[tuple[Incoming, sources.Alert]]) -> list[tuple[Incoming, sources.Alert]]:
        """Drop messages already in the store (a redelivery after lost offsets): one indexed query per span."""
        if not valid:
            return valid
        stored: set[tuple[int, int, int]] = set()
        spans: dict[tuple[int, int], list[int]] = {}
        for item, _ in valid:
            spans.setdefault((item.partition, item.generation), []).append(item.offset)
        for (partition, generation), offsets in spans.items():
            stored.update((partition, generation, offset)
                          for offset in self.already_stored(partition, generation, min(offsets), max(offsets)))
        return [(item, message) for item, message in valid
                if (item.partition, item.generation, item.offset) not in stored]

    def _dated(
        self, fresh: list[tuple[Incoming, sources.Alert]], rejected: list[tuple[Incoming, str]]
    ) -> list[tuple[tuple[Incoming, sources.Alert], nights.ObservedTimes]]:
        """Each alert with its converted times, the batch's in one go; if that fails, alert by alert, rejecting
        those that fail."""
        try:
            return list(zip(fresh, nights.convert_times([alert for _, alert in fresh]), strict=True))
        except Exception:
            log.debug("converting a batch's times failed; converting alert by alert", exc_info=True)
        kept = []
        for entry in fresh:
            try:
                [times] = nights.convert_times([entry[1]])
            except Exception as exc:
                rejected.append((entry[0], rejection_reason(exc)))
            else:
                kept.append((entry, times))
        return kept

    def _document(self, item: Incoming, alert: sources.Alert, times: nights.ObservedTimes, received: dt.datetime,
                  received_iso: str) -> tuple[Accepted, AlertToStore]:
        """An alert's files (where they go and what they hold, written by the file writer) and its row, files and
        stamp job, as the file writer stores them."""
        when = kafka_time(item.msg)
        dating = nights.date_of(alert, times, when, received)
        date = dating.date
        stem = sources.file_stem(alert.object_id, item.partition, item.offset, item.generation)
        meta: dict[str, Any] = {
            "topic": self.topic,
            "partition": item.partition,
            "offset": item.offset,
            "kafka_timestamp": nights.iso_utc_ms(item.msg.timestamp()[1]) if when else None,
            "received_at": received_iso,
            "date": date,
            "date_rule": dating.rule,
            "dated_by": dating.dated_by,
            "survey": alert.survey,
            "object_id": alert.object_id,
            "times_utc": times.times_utc,
        }
        if alert.detection_id is not None:
            meta["detection_id"] = alert.detection_id
        if item.generation:
            meta["generation"] = item.generation
        files = sources.alert_files(alert, f"data/{date}/{self.topic}", stem, f"images/{date}/{alert.object_id}", meta)
        paths = tuple(map(itemgetter(0), files))  # at C speed: this runs once per alert
        row = NewAlert(item.partition, item.generation, item.offset, alert.object_id, date, times.obs_mjd,
                       paths[0], alert.survey, alert.detection_id, alert.band)
        kind = self._stamp_job_kind(alert)
        key = detection_key(alert.object_id, times.obs_mjd, date) if kind is not None else None
        return (Accepted(item, alert, date, files, when),
                AlertToStore(row, paths, kind, key))

    def _stamp_job_kind(self, alert: sources.Alert) -> str | None:
        """The alert's stamp job: only the preview when its packet carried the three stamps (written with the
        alert), else a fetch from its survey's provider (``stamps.<survey>_provider``), if one serves it; None
        for no job."""
        if carries_stamps(alert):
            return PREVIEW_JOB if self.previews else None
        provider = self.stamp_providers.get(alert.survey)
        return FETCH_JOB if provider is not None and provider.serves(alert) else None


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
