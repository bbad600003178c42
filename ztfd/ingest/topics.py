"""Topic names and topic patterns: which topics the configuration means, and which of them the broker has.

An entry of ``kafka.topics`` (or a key of ``kafka.formats`` / ``kafka.schemas``) that starts with ``^`` is a
regular expression, as librdkafka reads a subscription: ZTF's ``^ztf_[0-9]{8}_programid1$`` or ALeRCE's daily
topics name tomorrow's topic before it exists. The supervisor lists the broker's topics every
``kafka.topic_scan_seconds`` (``TopicScanner``) and runs one consumer for each topic that matches; a consumer of
such a topic exits once its topic has been drained and quiet for ``kafka.idle_topic_seconds`` (``EXIT_IDLE``),
and the scanner starts it again when the topic's end moves past the offsets ztfd has stored.

Lookups give a plain name precedence over patterns, and patterns count in the order they were written.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)

PATTERN_PREFIX = "^"
EXIT_IDLE = 4  # ``ztfd consume`` of a pattern's topic: drained and quiet; the supervisor does not restart it
INTERNAL_PREFIX = "__"  # Kafka's own topics (__consumer_offsets) never match a pattern

V = TypeVar("V")


def is_pattern(entry: str) -> bool:
    return entry.startswith(PATTERN_PREFIX)


@functools.lru_cache(maxsize=256)
def compiled(entry: str) -> re.Pattern[str]:
    """The regular expression of a pattern entry (``re.error`` if it is not one)."""
    return re.compile(entry)


def matches(entry: str, topic: str) -> bool:
    """True when ``entry`` names ``topic``: the same name, or a pattern that matches it."""
    if not is_pattern(entry):
        return entry == topic
    return not topic.startswith(INTERNAL_PREFIX) and compiled(entry).search(topic) is not None


def lookup(mapping: Mapping[str, V], topic: str, default: V | None = None) -> V | None:
    """The value for ``topic``: its own key, else the first pattern key that matches it, else ``default``."""
    if topic in mapping:
        return mapping[topic]
    for entry, value in mapping.items():
        if is_pattern(entry) and matches(entry, topic):
            return value
    return default


def explicit(entries: Iterable[str]) -> list[str]:
    """The plain topic names among ``entries`` (consumed whether or not they exist yet)."""
    return [entry for entry in entries if not is_pattern(entry)]


def from_pattern(entries: Iterable[str], topic: str) -> bool:
    """True when ``topic`` is consumed because a pattern matches it, not because it is listed by name: only such
    consumers exit when their topic goes quiet."""
    entries = list(entries)
    return topic not in entries and any(is_pattern(e) and matches(e, topic) for e in entries)


def wanted(entries: Iterable[str], available: Iterable[str]) -> list[str]:
    """The topics to consume: every plain entry, and every available topic a pattern entry matches."""
    entries = list(entries)
    chosen = explicit(entries)
    patterns = [e for e in entries if is_pattern(e)]
    for topic in sorted(available):
        if topic not in chosen and any(matches(p, topic) for p in patterns):
            chosen.append(topic)
    return chosen


# --- what the broker has -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerTopics:
    """One look at the broker: its topics, and the end offset of every partition of the topics asked about."""

    topics: frozenset[str]
    ends: dict[str, dict[int, int]]  # topic -> partition -> offset after its last message


def has_news(ends: Mapping[int, int], stored: Mapping[int, int]) -> bool:
    """True when some partition ends past the offset ztfd would read next (a message it has not stored).

    (On Tansu the end offset a broker reports is the first offset of its last batch plus one, never more than the
    true end: a drained topic never looks as if it had news, and the first new batch always does.)"""
    return any(end > stored.get(partition, 0) for partition, end in ends.items())


class TopicScanner:
    """Looks at the broker from a thread of its own, so that a slow or absent broker never stalls the caller (the
    supervisor forks its children from its main thread and must keep heartbeating). ``latest`` is the last
    successful look; ``ends_of`` says which topics' end offsets to fetch next time."""

    def __init__(self, bootstrap_servers: str, options: Mapping[str, Any], every: float) -> None:
        self.bootstrap_servers, self.options = bootstrap_servers, options
        self.every = every
        self.latest: BrokerTopics | None = None
        self.ends_of: frozenset[str] = frozenset()
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="topic-scanner", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        from ztfd.ingest import kafka  # librdkafka where the broker is talked to, not in every supervisor import

        admin = kafka.admin_client(self.bootstrap_servers, self.options, logger=logging.getLogger("ztfd.librdkafka"))
        while not self._stop.is_set():
            try:
                self.latest = kafka.look(admin, self.ends_of)
                self.failures = 0
            except Exception as exc:  # the broker is away: keep the last look, say so now and then
                self.failures += 1
                if self.failures in (1, 10) or self.failures % 100 == 0:
                    log.warning("cannot list the broker's topics (%d tries): %s", self.failures, exc)
            self._stop.wait(self.every)


DRAIN_GRACE = 10.0  # seconds a consumer reads its assigned topic before it may call it drained


class QuietWatch:
    """Whether a consumer of a pattern's topic may exit: its topic drained (it has been reading for a moment and
    holds nothing unstored) and quiet (no message for ``idle_seconds``, counting from the last message it or an
    earlier run stored). Consumers of topics listed by name never exit so."""

    def __init__(self, enabled: bool, idle_seconds: float, last_message_at: float | None) -> None:
        self.enabled = enabled
        self.idle_seconds = idle_seconds
        self.last_message_at = last_message_at if last_message_at is not None else time.time()
        self.reading_since: float | None = None  # monotonic; None while not assigned

    def saw_messages(self) -> None:
        self.last_message_at = time.time()

    def reading(self, yes: bool) -> None:
        if not yes:
            self.reading_since = None
        elif self.reading_since is None:
            self.reading_since = time.monotonic()

    def done(self, holding: bool) -> bool:
        """True when the consumer should exit with ``EXIT_IDLE`` (``holding``: batches not yet stored)."""
        if not self.enabled or holding or self.reading_since is None:
            return False
        if time.monotonic() - self.reading_since < min(DRAIN_GRACE, self.idle_seconds):
            return False
        return time.time() - self.last_message_at >= self.idle_seconds
