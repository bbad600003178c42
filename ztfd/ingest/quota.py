"""Lasair-LSST's byte quota made visible: the bytes a topic receives per Lasair day, and a warning near the limit.

Lasair-LSST stops producing a filter's messages for the rest of its day, without a word, once they pass the
filter's byte quota (``byte_quota``, 100 MB by default, counted as the length of each JSON message). A consumer
counts what it receives the same way, per Lasair day (``store.quota.nid_of`` of the message's Kafka timestamp,
the time Lasair produced it), in the batch's own transaction, and warns once per topic and day, in its log and
in ``ztfd status``, when an LSST topic passes ``WARN_SHARE`` of ``kafka.lasair_byte_quota``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable

from ztfd.sources import LSST
from ztfd.store.quota import DayBytes, nid_of

log = logging.getLogger(__name__)

WARN_SHARE = 0.9


def near_quota(day: DayBytes, quota: int) -> bool:
    """True when an LSST topic's day has passed the warning share of the quota (0: no quota known)."""
    return quota > 0 and day.survey == LSST and day.bytes >= WARN_SHARE * quota


class QuotaWatch:
    """One consumer's view of its topic's Lasair days."""

    def __init__(self, topic: str, quota: int) -> None:
        self.topic = topic
        self.quota = quota
        self.warned: set[int] = set()

    @staticmethod
    def count(messages: Iterable[tuple[dt.datetime, int, str | None]]) -> list[tuple[int, str | None, int, int]]:
        """(nid, survey, bytes, messages) of a batch, from each message's (produced at, size, survey or None)."""
        days: dict[int, list] = {}
        for moment, size, survey in messages:
            day = days.setdefault(nid_of(moment), [None, 0, 0])
            day[0] = survey or day[0]
            day[1] += size
            day[2] += 1
        return [(nid, survey, size, count) for nid, (survey, size, count) in sorted(days.items())]

    def check(self, totals: Iterable[DayBytes]) -> None:
        """Log a warning the first time a day passes the warning share (again after a restart: once per process)."""
        for day in totals:
            if near_quota(day, self.quota) and day.nid not in self.warned:
                self.warned.add(day.nid)
                log.warning("%s received %d bytes on Lasair day %s, %.0f%% of kafka.lasair_byte_quota (%d): Lasair "
                            "stops sending this filter's messages for the rest of the day (until 20:00 UTC) once "
                            "they pass its byte quota", self.topic, day.bytes, day.day,
                            100.0 * day.bytes / self.quota, self.quota)
