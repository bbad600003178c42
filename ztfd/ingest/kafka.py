"""ztfd's one door to Kafka: the librdkafka clients and everything said through them.

Here and nowhere else in ``ztfd.ingest``: the consumer and admin clients and their settings (``kafka.options``,
whose values never reach a log or an error: ``option_problem`` masks them), reading a batch, assigning partitions,
seeking and committing, the watermarks and topic id that ``ztfd.ingest.partitions`` judges offsets on, the
broker's topics for the supervisor's pattern scan (``look``) and the end offsets ``ztfd status`` computes its lag
from (``end_offsets``). Changing how ztfd talks to Kafka is changing this module.

Partitions are taken one of two ways (``kafka.assignment``): ``KafkaAdapter.assign_all``, every partition of the
topic with no consumer-group membership (why: ``ztfd.ingest.assignment``), where the offsets ztfd commits are
informational (for lag tools) and the store's are the truth; or ``subscribe`` (fleet mode, docs/fleet.md): the group
shares the partitions among its hosts with the cooperative-sticky protocol, each partition starts at the group's
committed offset, and ztfd commits only what is durable in S3 (``ztfd.ingest.durability``). Either way
``enable.auto.commit`` and ``enable.auto.offset.store`` are forced off: ztfd decides when an offset is done.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_STORED,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, OffsetSpec, ResourceType

from ztfd.config import ConfigError, KafkaConfig
from ztfd.ingest.topics import BrokerTopics
from ztfd.logs import Throttle

log = logging.getLogger(__name__)

DRAIN_TIMEOUT = 0.005  # seconds to wait for more of a batch once its first message is in
BATCH_CHUNK = 50  # messages taken from librdkafka's queue at a time while a batch fills
PREFETCH_KBYTES = 8192  # librdkafka's queued.max.messages.kbytes unless kafka.options sets it
VIEW_TIMEOUT = 5.0  # seconds for an uncached watermark, a topic id or the topic's metadata
LIST_TIMEOUT = 10.0  # seconds for the supervisor's look at the broker's topics
DELIVERY_GRACE = 2.0  # seconds a flush waits beyond the messages' own timeout, for their delivery reports
GROUP_STRATEGY = "cooperative-sticky"  # fleet mode: a rebalance moves only the partitions that change hands
CONSUMER_ONLY = ("group.", "auto.", "enable.auto", "session.timeout", "max.poll", "fetch.", "isolation.", "heartbeat.",
                 "partition.assignment")
SECURITY = ("security.", "sasl.", "ssl.")
LIBRDKAFKA_CLIENT_ID = "rdkafka"  # librdkafka's client.id when nobody sets one


def client_id(settings: KafkaConfig, topic: str) -> str:
    """The consumer's ``client.id``, which a broker lists beside each member of the group (and ``ztfd status``
    shows, from the fleet topic): ``kafka.options``' own, else in fleet mode ``ztfd-<host>-<topic>`` (librdkafka's
    default names no host), else librdkafka's default."""
    if "client.id" in settings.options:
        return str(settings.options["client.id"])
    return f"ztfd-{socket.gethostname()}-{topic}" if settings.group_mode else LIBRDKAFKA_CLIENT_ID


def librdkafka_logger() -> logging.Logger:
    """The logger librdkafka's own lines go to, each kind at most once per 30 s."""
    logger = logging.getLogger("ztfd.librdkafka")
    if not any(isinstance(f, Throttle) for f in logger.filters):
        logger.addFilter(Throttle(logger))
    return logger


def option_problem(exc: BaseException, options: Mapping[str, Any]) -> str:
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


def admin_settings(bootstrap_servers: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The librdkafka settings of an admin client: the consumers' connection and security options, without the
    consumer-only ones (an AdminClient refuses nothing but warns about them)."""
    settings = {k: v for k, v in options.items() if not k.startswith(CONSUMER_ONLY)}
    settings["bootstrap.servers"] = bootstrap_servers
    return settings


def admin_client(bootstrap_servers: str, options: Mapping[str, Any], **callbacks: Any) -> Any:
    """An admin client on the consumers' brokers and credentials (``callbacks``: librdkafka's ``error_cb``,
    ``logger``)."""
    return AdminClient({**admin_settings(bootstrap_servers, options), **callbacks})


def look(admin: Any, ends_of: Iterable[str]) -> BrokerTopics:
    """List the broker's topics, and the end offsets of the partitions of ``ends_of`` that exist."""
    metadata = admin.list_topics(timeout=LIST_TIMEOUT)
    topics = frozenset(name for name, info in metadata.topics.items() if info.error is None)
    request = {TopicPartition(name, p): OffsetSpec.latest() for name in ends_of if name in topics
               for p in metadata.topics[name].partitions}
    ends: dict[str, dict[int, int]] = {}
    if request:
        for tp, future in admin.list_offsets(request, request_timeout=LIST_TIMEOUT).items():
            ends.setdefault(tp.topic, {})[tp.partition] = future.result(timeout=LIST_TIMEOUT).offset
    return BrokerTopics(topics, ends)


class Refusal(NamedTuple):
    """Why Kafka refused a partition's commit: the error's name (``ILLEGAL_GENERATION``…) and its text."""

    name: str
    text: str

    def __str__(self) -> str:
        return f"{self.name}: {self.text}"


def commit_answer(topic: str, partitions: Iterable[Any], error: Any) -> tuple[dict[int, int], dict[int, Refusal]]:
    """A commit's answer for ``topic``: the offsets taken, and the partitions refused (a partition's own error, else
    the request's: a partition is taken only when neither says otherwise)."""
    taken: dict[int, int] = {}
    refused: dict[int, Refusal] = {}
    for tp in partitions:
        if tp.topic != topic:
            continue
        failure = tp.error or error
        if failure is None:
            taken[tp.partition] = tp.offset
        else:
            refused[tp.partition] = Refusal(str(failure.name()), str(failure.str()))
    return taken, refused


class KafkaAdapter:
    """One topic's Kafka clients, as its consumer uses them. Until ``open`` it has no clients: it then reads
    nothing, commits nothing and knows no topic id or watermark (so nothing is judged on it)."""

    def __init__(self, settings: KafkaConfig, topic: str) -> None:
        self.settings = settings
        self.topic = topic
        self.consumer: Any = None
        self.admin: Any = None
        self.assigned: set[int] = set()  # the partitions this consumer reads
        self.client_id = client_id(settings, topic)
        self.throttled = Throttle(log)
        # What the consumer learns of the broker beside the log: each error librdkafka reports, and each answer.
        self.on_error: Callable[[Any], None] | None = None
        self.on_answer: Callable[[], None] | None = None
        # What Kafka answered to a commit: the offsets it took, and the partitions whose commit it refused (why).
        self.on_commit: Callable[[dict[int, int], dict[int, Refusal]], None] | None = None

    def open(self) -> None:
        """Create the clients; a refused ``kafka.options`` entry is a ``ConfigError`` naming it, without values."""
        self.consumer = self._new_consumer()
        self.assigned.clear()
        self.admin = self._new_admin()

    def close(self) -> None:
        if self.consumer is not None:
            try:
                self.consumer.close()
            except Exception as exc:  # closing must not turn a clean stop into a crash
                log.warning("closing the Kafka consumer failed: %s", exc)
            self.consumer = None

    def _new_consumer(self) -> Any:
        settings: dict[str, Any] = {
            "bootstrap.servers": self.settings.bootstrap_servers,
            "group.id": self.settings.group_id,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
            # librdkafka prefetches up to 64 MB a partition by default: with ZTF's 70 kB packets the consumer
            # peaked near 300 MB. 8 MB, looked at again every 10 ms once full (below), keeps fetching while a
            # batch is prepared (bin/bench avro and lsst: the same rates as 32 MB, 192 MB peak against 295 MB;
            # with the default 1 s backoff 8 MB was 0.6x the rate); kafka.options may set it.
            "queued.max.messages.kbytes": PREFETCH_KBYTES,
            "fetch.queue.backoff.ms": 10,  # with a full queue, look again after 10 ms (default 1 s)
            "error_cb": self._on_error,
            "on_commit": self._on_commit,
            "logger": librdkafka_logger(),
        }
        if self.settings.group_mode:
            settings["partition.assignment.strategy"] = GROUP_STRATEGY
            settings["client.id"] = self.client_id
        settings.update(self.settings.options)
        # Not negotiable: ztfd decides when an offset is done, after the alert is stored.
        settings["enable.auto.commit"] = False
        settings["enable.auto.offset.store"] = False
        try:
            return Consumer(settings)
        except Exception as exc:  # librdkafka refuses an option: a configuration error, named without its value
            raise ConfigError(f"config: kafka.options: {option_problem(exc, self.settings.options)}") from None

    def _new_admin(self) -> Any:
        """An admin client on the same brokers and credentials: it asks for the topic's id (recreation evidence)."""
        return admin_client(self.settings.bootstrap_servers, self.settings.options, error_cb=self._on_error,
                            logger=librdkafka_logger())

    def _on_error(self, error: Any) -> None:
        self.throttled(f"kafka:{error.code()}", logging.WARNING, "kafka: %s", error.str())
        if self.on_error is not None:
            self.on_error(error)

    def _on_commit(self, error: Any, partitions: list[Any]) -> None:
        """librdkafka's answer to a commit sent without waiting (served by the next poll, on the caller's thread).
        It may be refused (a rebalance in progress, the coordinator moving): the caller must then send it again, or
        Kafka would stay behind until the next offset moves (more redone after a loss, never less)."""
        if error is not None and error.code() == KafkaError._NO_OFFSET:
            return
        taken, refused = commit_answer(self.topic, partitions, error)
        if refused:
            log.debug("kafka refused the commit of %s %s", self.topic, refused)
        if self.on_commit is not None:
            self.on_commit(taken, refused)

    def _missing_topic(self) -> None:
        self.throttled("missing-topic", logging.INFO, "topic %s does not exist (yet): waiting for it", self.topic)

    # --- reading -------------------------------------------------------------------------------------------------

    def next_batch(self, timeout: float, limit: int, max_bytes: int) -> list[Any]:
        """Wait up to ``timeout`` for one message, then take what is already fetched, up to ``limit`` messages or
        ``max_bytes`` of them. Error events come back among the messages (``without_events`` drops them).

        ``consume(n, timeout)`` would wait for n messages or the whole timeout: at a trickle of alerts every one
        would sit for the timeout before being stored. Here the first message is stored as soon as it arrives,
        and under load the batch fills from librdkafka's prefetched queue at once.
        """
        first = self.consumer.poll(timeout)
        if first is None:
            return []
        batch, size = [first], message_size(first)
        while len(batch) < limit and size < max_bytes:
            more = self.consumer.consume(min(limit - len(batch), BATCH_CHUNK), DRAIN_TIMEOUT)
            if not more:
                break
            batch.extend(more)
            size += sum(message_size(msg) for msg in more)
        return batch

    def without_events(self, messages: list[Any]) -> list[Any]:
        """The messages, without the error events librdkafka hands out in their place (logged, throttled)."""
        events = [msg for msg in messages if msg.error() is not None]
        if not events:
            return messages
        for event in events:
            error = event.error()
            if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                self._missing_topic()
            elif error.code() != KafkaError._PARTITION_EOF:
                self.throttled(f"msg:{error.code()}", logging.WARNING, "kafka: %s", error.str())
        return [msg for msg in messages if msg.error() is None]

    # --- partitions ----------------------------------------------------------------------------------------------

    def partitions(self) -> list[int] | None:
        """The topic's partitions from the broker's metadata: [] when the topic does not exist (yet), None when
        the broker cannot be reached (both logged, throttled)."""
        try:
            metadata = self.consumer.list_topics(self.topic, timeout=VIEW_TIMEOUT)
        except Exception as exc:
            self.throttled("metadata", logging.WARNING, "cannot reach Kafka for metadata: %s", exc)
            return None
        if self.on_answer is not None:
            self.on_answer()
        info = metadata.topics.get(self.topic)
        if info is None or info.error is not None or not info.partitions:
            self._missing_topic()
            return []
        return list(info.partitions)

    def assign_all(self, partitions: list[int], start_at: Mapping[int, int]) -> None:
        """Read ``partitions`` too, each from its offset in ``start_at`` (the store's), else from Kafka's
        committed offset, else from the earliest: no group, no rebalancing. The offsets known are committed at
        once, so that lag tools see where ztfd stands before its first batch."""
        assignment = [TopicPartition(self.topic, p, start_at.get(p, OFFSET_STORED)) for p in partitions]
        self.consumer.incremental_assign(assignment)
        self.assigned.update(partitions)
        log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in assignment))
        known = {p: start_at[p] for p in partitions if p in start_at}
        if known:
            self.commit(known)

    def subscribe(self, on_assign: Callable[[list[int]], Iterable[int]], on_revoke: Callable[[list[int]], None],
                  on_lost: Callable[[list[int]], None], on_rebalance: Callable[[], None] = lambda: None) -> None:
        """Join the group (fleet mode): the group hands partitions in and out, each starting at the group's
        committed offset (else the earliest). The callbacks run inside ``next_batch``'s poll, on the caller's
        thread: ``on_assign`` returns the partitions to read from their beginning instead (a recreated topic),
        ``on_revoke`` runs before a partition is released (commit what is durable), ``on_lost`` when it was taken
        away already (the session expired: committing is too late), ``on_rebalance`` after every rebalance, this
        member's holdings changed or not (the others' may have)."""

        def numbers(partitions: list[Any]) -> list[int]:
            return sorted(tp.partition for tp in partitions if tp.topic == self.topic)

        def assigned(consumer: Any, partitions: list[Any]) -> None:
            got = numbers(partitions)
            if got:  # a cooperative rebalance hands in nothing new to most members
                self.assigned.update(got)
                log.info("the group gave %s partitions %s: %d held here now", self.topic, got, len(self.assigned))
                rewind = set(on_assign(got))
                for tp in partitions:
                    if tp.topic == self.topic and tp.partition in rewind:
                        tp.offset = OFFSET_BEGINNING
            elif not self.assigned:
                log.info("the group gave %s no partition: more members than partitions", self.topic)
            consumer.incremental_assign(partitions)
            on_rebalance()

        def revoked(_consumer: Any, partitions: list[Any]) -> None:
            gone = numbers(partitions)
            if gone:
                log.info("the group takes back %s partitions %s: %d held here after", self.topic, gone,
                         len(self.assigned - set(gone)))
                on_revoke(gone)
                self.assigned.difference_update(gone)

        def lost(_consumer: Any, partitions: list[Any]) -> None:
            gone = numbers(partitions)
            log.warning("%s partitions %s were lost to the group (session expired): not committed", self.topic, gone)
            on_lost(gone)
            self.assigned.difference_update(gone)

        self.consumer.subscribe([self.topic], on_assign=assigned, on_revoke=revoked, on_lost=lost)

    def pause(self) -> None:
        """Fetch nothing more for the partitions held (a stop): ``serve`` still runs the group's callbacks."""
        if self.consumer is not None and self.assigned:
            self.consumer.pause([TopicPartition(self.topic, p) for p in sorted(self.assigned)])

    def serve(self, timeout: float) -> None:
        """Serve the group for up to ``timeout`` s: heartbeats answered, a rebalance joined, its callbacks run. A
        message it hands out (fetched before ``pause``, or of a partition handed in meanwhile) is left unread: it is
        never stored nor committed here, so the partition's next owner reads it."""
        if self.consumer is not None:
            self.consumer.poll(timeout)

    def committed(self, partitions: Iterable[int]) -> dict[int, int]:
        """The group's committed offset of each of ``partitions`` that has one (none when the broker cannot say)."""
        asked = [TopicPartition(self.topic, p) for p in partitions]
        if not asked:
            return {}
        try:
            answer = self.consumer.committed(asked, timeout=VIEW_TIMEOUT)
        except Exception as exc:
            self.throttled("committed", logging.WARNING, "cannot read the group's committed offsets: %s", exc)
            return {}
        return {tp.partition: tp.offset for tp in answer if tp.error is None and tp.offset >= 0}

    def commit_now(self, next_offsets: Mapping[int, int]) -> dict[int, int]:
        """Commit and wait for the answer (a partition about to be released): the offsets Kafka took. librdkafka
        raises only when every partition failed; a partial refusal comes back per partition (both logged)."""
        if self.consumer is None or not next_offsets:
            return {}
        try:
            answer = self.consumer.commit(offsets=[TopicPartition(self.topic, p, o) for p, o in next_offsets.items()],
                                          asynchronous=False)
        except Exception as exc:
            log.warning("could not commit %s offsets %s to Kafka: %s", self.topic, dict(next_offsets), exc)
            return {}
        taken, refused = commit_answer(self.topic, answer or [], None)
        if refused:
            log.warning("kafka refused the commit of %s %s", self.topic,
                        {p: str(refusal) for p, refusal in refused.items()})
        return taken

    def rewind(self, partitions: Iterable[int]) -> None:
        """Read the assigned ones of ``partitions`` again from their beginning (a recreated topic)."""
        for partition in partitions:
            if partition in self.assigned:
                self.consumer.seek(TopicPartition(self.topic, partition, OFFSET_BEGINNING))

    def commit(self, next_offsets: Mapping[int, int]) -> None:
        """Tell Kafka the next offset per partition, without waiting: a failure is logged, throttled, never raised.
        With ``assign_all`` Kafka's copy of the offsets is informational (the store's is the truth); in fleet mode
        it is the fleet's truth, and only durable offsets are passed here (a lost commit leaves Kafka behind, so
        more is redone after a failover, never less)."""
        if self.consumer is None:
            return
        try:
            self.consumer.commit(offsets=[TopicPartition(self.topic, p, o) for p, o in next_offsets.items()],
                                 asynchronous=True)
        except Exception as exc:
            self.throttled("commit", logging.WARNING, "could not commit offsets to Kafka: %s", exc)

    # --- what the broker says (``ztfd.ingest.partitions.BrokerView``) ----------------------------------------------

    def topic_id(self) -> str | None:
        """The topic's id (KIP-516) from the admin API; None when the broker does not say or cannot now."""
        if self.admin is None:
            return None
        try:
            description = self.admin.describe_topics(TopicCollection([self.topic]), request_timeout=VIEW_TIMEOUT)
            topic_id = description[self.topic].result(timeout=VIEW_TIMEOUT).topic_id
        except Exception as exc:
            log.debug("no topic id for %s: %s", self.topic, exc)
            return None
        text = str(topic_id) if topic_id is not None else ""
        return text if text and text.strip("A=") else None  # the all-zero id means "not reported"

    def retention_seconds(self) -> float | None:
        """How long the broker keeps the topic's messages (its ``retention.ms``): None when it keeps them for ever,
        does not say (Tansu, for a topic created without it) or cannot be asked now."""
        if self.admin is None:
            return None
        try:
            resource = ConfigResource(ResourceType.TOPIC, self.topic)
            described = self.admin.describe_configs([resource], request_timeout=VIEW_TIMEOUT)[resource].result(
                VIEW_TIMEOUT)
            kept_ms = float(described["retention.ms"].value)
        except Exception as exc:  # not said, not a number, or no answer: nothing to judge by
            log.debug("no retention.ms for %s: %s", self.topic, exc)
            return None
        return kept_ms / 1000.0 if kept_ms > 0 else None

    def watermarks(self, partition: int) -> tuple[int, int] | None:
        """(earliest, end) of a partition, asked of the broker (not cached); None when it cannot answer now."""
        if self.consumer is None:
            return None
        try:
            return self.consumer.get_watermark_offsets(  # type: ignore[no-any-return]
                TopicPartition(self.topic, partition), timeout=VIEW_TIMEOUT, cached=False)
        except Exception as exc:
            log.debug("no watermarks for %s[%d]: %s", self.topic, partition, exc)
            return None

    def cached_end(self, partition: int) -> int | None:
        """The end of a partition as librdkafka last heard it from its fetches (no request); None if unknown."""
        try:
            _low, high = self.consumer.get_watermark_offsets(TopicPartition(self.topic, partition), cached=True)
        except Exception:
            return None
        return high  # type: ignore[no-any-return]


def message_size(msg: Any) -> int:
    value = msg.value()
    return len(value) if value else 0


# --- ``ztfd status``: where each topic ends ---------------------------------------------------------------------


class ClientRefusedError(Exception):
    """librdkafka refused to build a client from the configured options; the message masks their values."""


class TopicEnds(NamedTuple):
    """What the broker said of one topic: ``broker`` is ``ok``, ``no such topic``, ``unreachable`` or ``error:
    …``; ``ends`` the end offset per partition, when every one was read."""

    broker: str
    ends: dict[int, int] | None = None


def end_offsets(settings: KafkaConfig, topics: list[str], timeout: float) -> dict[str, TopicEnds]:
    """The end of every partition of ``topics``, read within ``timeout`` by a throwaway consumer that never joins
    the group or commits.

    Tansu reports a wrong high watermark through ``list_offsets`` (the base offset of the last batch + 1); the
    watermark cached from a fetch is right, so each partition is read once at its reported end and the cached
    watermark used. A real broker gives the same figure either way.
    """
    quiet = logging.getLogger("ztfd.reporting.status.kafka")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "group.id": f"{settings.group_id}.status",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "socket.timeout.ms": int(timeout * 1000),
        # The first metadata request is often lost when librdkafka swaps the bootstrap connection for the broker it
        # learned about; it then waits reconnect.backoff.ms / 2 (at least 11 ms) before asking again: 50 ms by default.
        "reconnect.backoff.ms": 10,
        "logger": quiet,
    }
    config.update({k: v for k, v in settings.options.items() if k.startswith(SECURITY)})
    deadline = time.monotonic() + timeout
    result: dict[str, TopicEnds] = {}
    try:
        consumer = Consumer(config)
    except (KafkaException, ValueError, TypeError) as exc:  # librdkafka refuses the options (a missing password)
        raise ClientRefusedError(option_problem(exc, settings.options)) from None
    try:
        try:
            metadata = consumer.list_topics(timeout=timeout)
        except KafkaException:
            return {topic: TopicEnds("unreachable") for topic in topics}
        assigned = []
        for topic in topics:
            meta = metadata.topics.get(topic)
            if meta is None or meta.error is not None:
                result[topic] = TopicEnds("no such topic")
                continue
            result[topic] = TopicEnds("ok")
            for partition in meta.partitions:
                remaining = max(0.1, deadline - time.monotonic())
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=remaining)
                assigned.append(TopicPartition(topic, partition, max(low, high - 1)))
        if assigned:
            consumer.assign(assigned)
            pending = {(tp.topic, tp.partition) for tp in assigned}
            while pending and time.monotonic() < deadline:
                # As many as there are partitions still to hear from (a message or the end of an empty one):
                # consume() waits for that many or for its timeout, whichever comes first.
                wait = min(0.5, max(0.05, deadline - time.monotonic()))
                for message in consumer.consume(len(pending), wait):
                    pending.discard((message.topic(), message.partition()))
        ends: dict[str, dict[int, int]] = {topic: {} for topic, said in result.items() if said.broker == "ok"}
        for tp in assigned:
            _low, high = consumer.get_watermark_offsets(tp, cached=True)
            if high is None or high < 0:
                _low, high = consumer.get_watermark_offsets(tp, timeout=0.5)
            ends[tp.topic][tp.partition] = high
        return {**result, **{topic: TopicEnds("ok", found) for topic, found in ends.items()}}
    except KafkaException as exc:
        return {topic: result.get(topic, TopicEnds(f"error: {exc}")) for topic in topics}
    finally:
        consumer.close()


# --- the fleet's own topic (``ztfd.ingest.fleet``) ----------------------------------------------------------------


def ensure_log_topic(settings: KafkaConfig, topic: str, timeout: float = VIEW_TIMEOUT) -> None:
    """Create ``topic`` (one partition, compacted: the last value per key is what counts) unless it exists; refuse
    one that exists with other settings (``check_log_topic``)."""
    admin = admin_client(settings.bootstrap_servers, settings.options, logger=librdkafka_logger())
    existing = admin.list_topics(timeout=timeout).topics.get(topic)
    if existing is not None and existing.error is None:
        check_log_topic(admin, topic, len(existing.partitions), timeout)
        return
    futures = admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1,
                                            config={"cleanup.policy": "compact"})], request_timeout=timeout)
    try:
        futures[topic].result(timeout)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:  # another host created it first: fine
            raise


def check_log_topic(admin: Any, topic: str, partitions: int, timeout: float = VIEW_TIMEOUT) -> None:
    """Raise ``KafkaException`` (INVALID_CONFIG, naming the topic and what is wrong) unless the topic has one
    partition and ``cleanup.policy=compact``: only partition 0 is read (one order for every host), and a policy
    that deletes old records would drop what the fleet agreed (a column's type would be pinned anew). A broker that
    does not report the policy (Tansu, for a topic created without it) gets a warning: it cannot be told."""
    if partitions != 1:
        raise KafkaException(KafkaError(KafkaError.INVALID_CONFIG, f"{topic} has {partitions} partitions: a fleet "
                                        "topic must have exactly 1 (and cleanup.policy=compact); delete it and "
                                        "let ztfd create it"))
    try:
        resource = ConfigResource(ResourceType.TOPIC, topic)
        described = admin.describe_configs([resource], request_timeout=timeout)[resource].result(timeout)
    except KafkaException as exc:
        log.warning("%s: cannot ask the broker for its cleanup.policy (%s): it must be compact", topic, exc)
        return
    entry = described.get("cleanup.policy")
    if entry is None or not entry.value:
        log.warning("%s: the broker does not report its cleanup.policy: it must be compact (the fleet's agreements "
                    "must never expire)", topic)
    elif {part.strip() for part in entry.value.split(",")} != {"compact"}:
        raise KafkaException(KafkaError(KafkaError.INVALID_CONFIG, f"{topic} has cleanup.policy={entry.value}: a "
                                        "fleet topic must be compact only (old records must never expire); set "
                                        "cleanup.policy=compact"))


def read_log_records(settings: KafkaConfig, topic: str,
                     timeout: float = LIST_TIMEOUT) -> dict[str, tuple[int, bytes]]:
    """Every key of a one-partition topic with the offset and value of its last record, read from the beginning to
    its end (a record with no value deletes its key). Raises ``KafkaException`` when the end is not reached in time.
    The offsets order the records the same for every reader (compaction keeps them).

    The end is where the fetch says the partition ends (librdkafka's end-of-partition event), not the watermark
    asked for beforehand: Tansu reports that as the base offset of the last batch + 1 (see ``end_offsets``)."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "group.id": f"{settings.group_id}.fleet-reader",  # never joins nor commits: assign() only
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "logger": librdkafka_logger(),
    }
    config.update({k: v for k, v in settings.options.items() if k.startswith(SECURITY)})
    reader = Consumer(config)
    values: dict[str, tuple[int, bytes]] = {}
    try:
        _low, end = reader.get_watermark_offsets(TopicPartition(topic, 0), timeout=timeout)
        if end <= 0:
            return values
        reader.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise KafkaException(KafkaError(KafkaError._TIMED_OUT, f"{topic} not read to its end in time"))
            msg = reader.poll(0.5)
            if msg is None:
                continue
            if msg.error() is not None:
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    return values
                continue
            key = (msg.key() or b"").decode("utf-8", "replace")
            if msg.value() is None:
                values.pop(key, None)
            else:
                values[key] = (msg.offset(), msg.value())
    finally:
        reader.close()


def write_log_topic(settings: KafkaConfig, topic: str, entries: Mapping[str, bytes],
                    timeout: float = LIST_TIMEOUT) -> None:
    """Append ``entries`` (key -> value) to the topic and wait until the broker has acknowledged every one; raises
    ``KafkaException`` naming the first that was not.

    Idempotent (``acks=all``): a ProduceRequest retried after a lost answer is not written twice. A key written twice
    would move (compaction keeps its last record) past records written in between, and the fleet's agreement is made
    from the records' order (``ztfd.ingest.fleet``). Each delivery report is checked: ``flush`` returning 0 only says
    the queue is empty, failed deliveries included."""
    producer = Producer({**admin_settings(settings.bootstrap_servers, settings.options), "linger.ms": 0,
                         "enable.idempotence": True, "acks": "all",
                         "message.timeout.ms": max(1, int(timeout * 1000)), "logger": librdkafka_logger()})
    failed: list[tuple[KafkaError, str]] = []

    def delivered(error: KafkaError | None, message: Any) -> None:
        if error is not None:
            failed.append((error, (message.key() or b"").decode("utf-8", "replace")))

    for key, value in entries.items():
        producer.produce(topic, key=key.encode(), value=value, on_delivery=delivered)
    unsent = producer.flush(timeout + DELIVERY_GRACE)
    if failed:
        error, key = failed[0]
        raise KafkaException(KafkaError(error.code(), f"{topic}: {len(failed)} write(s) not delivered, the first "
                                                      f"(key {key}): {error.str()}"))
    if unsent:
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, f"{topic}: a write was not acknowledged in time"))


def group_committed(settings: KafkaConfig, partitions: Mapping[str, Iterable[int]],
                    timeout: float) -> dict[str, dict[int, int]]:
    """The group's committed offset of each partition (topic -> partition -> offset; those without one left out),
    asked by a client that never joins the group (``ztfd status``). Raises ``KafkaException`` when the broker does
    not answer in time."""
    config: dict[str, Any] = {"bootstrap.servers": settings.bootstrap_servers, "group.id": settings.group_id,
                              "enable.auto.commit": False, "logger": librdkafka_logger()}
    config.update({k: v for k, v in settings.options.items() if k.startswith(SECURITY)})
    asked = [TopicPartition(topic, p) for topic, numbers in partitions.items() for p in numbers]
    found: dict[str, dict[int, int]] = {topic: {} for topic in partitions}
    if not asked:
        return found
    reader = Consumer(config)
    try:
        for tp in reader.committed(asked, timeout=timeout):
            if tp.error is None and tp.offset >= 0:
                found[tp.topic][tp.partition] = tp.offset
    finally:
        reader.close()
    return found
