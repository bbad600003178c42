"""The ends of a topic's partitions as its running consumer last heard them, kept where ``ztfd status`` reads them.

A consumer's fetches bring each partition's high watermark back for free (librdkafka caches it). Status used to
ask the broker for the same figures itself: a new Kafka client per ``ztfd status``, whose import and round trips
were most of the command's time. So a consumer keeps what it heard as the status fact ``kafka_ends:<topic>``
(JSON: partition -> end), rewritten with its heartbeat, and status and the metrics take the lag from it while it
is fresh. In a fleet (``assignment = "group"``) it keeps the partitions it holds, so the lag it gives is this
host's share: the hosts' figures add up to the fleet's. It is not kept while the consumer has a broker error (the
ends it holds may be old), so status then asks the broker itself, which says whether it answers.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable

from ztfd import store
from ztfd.daemon.heartbeat import HEARTBEAT_INTERVAL
from ztfd.store.status_facts import statuses_with_prefix

log = logging.getLogger(__name__)

STATUS_PREFIX = "kafka_ends:"
# Older than three heartbeats: the consumer is gone or stuck, and its figures are not the broker's any more.
FRESH_FOR = 3 * HEARTBEAT_INTERVAL


def record(conn: sqlite3.Connection, topic: str, partitions: Iterable[int],
           cached_end: Callable[[int], int | None], held: bool = False) -> bool:
    """Keep the cached end of each of ``partitions`` (all of the topic's, or with ``held`` the ones this host holds
    in a fleet, perhaps none); False, keeping nothing, when any is not known yet (librdkafka has not fetched from
    it)."""
    ends: dict[str, int] = {}
    for partition in sorted(partitions):
        end = cached_end(partition)
        if end is None or end < 0:
            return False
        ends[str(partition)] = end
    if not ends and not held:
        return False
    try:
        store.set_status(conn, STATUS_PREFIX + topic, json.dumps(ends))
    except sqlite3.Error as exc:  # a locked or full store: status asks the broker instead
        log.debug("could not keep the ends of %s: %s", topic, exc)
        return False
    return True


def forget(conn: sqlite3.Connection, topic: str) -> None:
    """The figures may be old (a broker error): status must not take them."""
    try:
        store.set_status(conn, STATUS_PREFIX + topic, None)
    except sqlite3.Error as exc:
        log.debug("could not forget the ends of %s: %s", topic, exc)


def fresh(conn: sqlite3.Connection, now: float | None = None) -> dict[str, tuple[dict[int, int], float]]:
    """Per topic, the ends its consumer kept less than ``FRESH_FOR`` seconds ago, and when it kept them."""
    now = time.time() if now is None else now
    found: dict[str, tuple[dict[int, int], float]] = {}
    for topic, (value, at) in statuses_with_prefix(conn, STATUS_PREFIX).items():
        if now - at > FRESH_FOR:
            continue
        try:
            ends = {int(p): int(end) for p, end in json.loads(value).items()}
        except (ValueError, TypeError, AttributeError):
            continue
        found[topic] = (ends, at)
    return found
