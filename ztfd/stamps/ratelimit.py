"""A politeness limit shared by every process of the pool, kept in the store.

Each request takes the next free *slot* of a named limit: slots are ``1 / rate`` seconds apart, and the row in
``rate_limits`` holds the start of the first slot nobody has taken yet. Taking slots is one short
write transaction (``store.ratelimits.take_slots``), so every fetcher process (and ``ztfd replay``'s) draws from the
same sequence: across the whole pool no two requests start less than ``1 / rate`` apart, whatever the number of
workers. There is no burst allowance: after an idle spell the first request goes at once, the next ones are
spaced. A slot taken by a process that then dies is simply unused; nothing needs cleaning up.

In fleet mode (``kafka.assignment = "group"``) the limit is the whole fleet's: each host takes ``rate / N`` for the
N members that hold partitions, a count its consumers keep in the store (``FLEET_MEMBERS``, from the fleet topic:
``ztfd.ingest.fleet``), so that a stamp service sees one polite client, not N of them.
"""

from __future__ import annotations

import sqlite3
import time

from ztfd.store.ratelimits import take_slots
from ztfd.store.status_facts import FLEET_MEMBERS, get_status


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


def fleet_share(conn: sqlite3.Connection, rate: float) -> float:
    """This host's share of a fleet-wide ``rate``: divided by the live members its consumers counted last (the
    whole rate before they counted)."""
    fact = get_status(conn, FLEET_MEMBERS)
    try:
        members = int(fact[0]) if fact is not None and fact[0] is not None else 1
    except ValueError:
        members = 1
    return rate / max(1, members)


def reserve_share(conn: sqlite3.Connection, name: str, rate: float, count: int = 1) -> list[float]:
    """``reserve`` at this host's share of the fleet's ``rate``."""
    return reserve(conn, name, fleet_share(conn, rate), count)
