"""A politeness limit shared by every process of the pool, kept in the store.

Each request takes the next free *slot* of a named limit: slots are ``1 / rate`` seconds apart, and the row in
``rate_limits`` holds the start of the first slot nobody has taken yet. Taking slots is one short
write transaction (``store.ratelimits.take_slots``), so every fetcher process (and ``ztfd replay``'s) draws from the
same sequence: across the whole pool no two requests start less than ``1 / rate`` apart, whatever the number of
workers. There is no burst allowance: after an idle spell the first request goes at once, the next ones are
spaced. A slot taken by a process that then dies is simply unused; nothing needs cleaning up.

In fleet mode (``kafka.assignment = "group"``) the limit is the whole fleet's: each host takes ``rate / N``, N the
live members (holding partitions or not, this host always among them), a count its consumers keep in the store
(``FLEET_MEMBERS``, from the fleet topic: ``ztfd.ingest.fleet``), so that a stamp service sees one polite client, not
N of them. The shares add up to ``rate`` only if every host that fetches is counted by all the others, so a host
whose count does not stand takes no share at all: its fetchers wait (``fleet_share`` is None).

- At start-up: a consumer counts first ``RECOUNT_AFTER`` s after the rebalance its joining causes, when the members
  already there count again and so count it too (a whole rate before that, as it once was, made N hosts started
  together N times as fast; rate / partitions still overshoots whoever counted already).
- A stop says ``left`` in the fleet topic and clears the count: the others stop counting this host at once.
- A count older than ``COUNT_STANDS_FOR`` (this host's consumers stopped counting: all exited idle, restarting in a
  loop, cut from the broker) no longer stands: the others drop a member ``LIVE_FOR`` s after its last word, and it
  must stop first.
"""

from __future__ import annotations

import sqlite3
import time

from ztfd.store.ratelimits import take_slots
from ztfd.store.status_facts import FLEET_MEMBERS, get_status

# Seconds a host's count of the fleet stands: one count late (``fleet.COUNT_EVERY``, 30 s) still stands, and it stops
# standing a count before the others drop a silent member (``fleet.LIVE_FOR``, 90 s), whose clocks may be a little
# apart (tests/test_fleet.py checks the order).
COUNT_STANDS_FOR = 60.0


def reserve(conn: sqlite3.Connection, name: str, rate: float, count: int = 1, now: float | None = None) -> list[float]:
    """Take ``count`` consecutive slots of limit ``name`` (``rate`` per second) and return their start times.

    The caller waits until each time before sending the request it reserved; ``rate <= 0`` means no limit
    (every slot is ``now``, the store is not touched).
    """
    now = time.time() if now is None else now
    if rate <= 0 or count <= 0:
        return [now] * max(count, 0)
    interval = 1.0 / rate
    first = take_slots(conn, name, now, count * interval)
    return [first + index * interval for index in range(count)]


def fleet_share(conn: sqlite3.Connection, rate: float, now: float | None = None) -> float | None:
    """This host's share of a fleet-wide ``rate``: divided by the live members its consumers counted last; None
    while that count does not stand (not counted yet, cleared by a stop, or older than ``COUNT_STANDS_FOR``): the
    other hosts may be taking the whole rate between them."""
    now = time.time() if now is None else now
    fact = get_status(conn, FLEET_MEMBERS)
    if fact is None or fact[0] is None or now - fact[1] > COUNT_STANDS_FOR:
        return None
    try:
        members = int(fact[0])
    except ValueError:
        return None
    return rate / max(1, members)


def reserve_share(conn: sqlite3.Connection, name: str, rate: float, count: int = 1) -> list[float] | None:
    """``reserve`` at this host's share of the fleet's ``rate``; None (nothing reserved) while it has none."""
    share = fleet_share(conn, rate)
    return None if share is None else reserve(conn, name, share, count)
