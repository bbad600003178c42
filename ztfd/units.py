"""Quantities as people read them in ztfd's output (status, sync summaries, logs), and moments as the datasets
keep them.

Sizes are decimal, as disks and S3 count them: 1 kB = 1000 bytes, 1 MB = 1000 kB (never 1024).
"""

from __future__ import annotations

import datetime as dt

SIZE_UNITS = ("B", "kB", "MB", "GB", "TB", "PB")


def human_bytes(size: float | None) -> str:
    """``812`` -> ``812 B``, ``212_000`` -> ``212.0 kB``, ``1.8e12`` -> ``1.8 TB``; None -> ``-``."""
    if size is None:
        return "-"
    value = float(size)
    for unit in SIZE_UNITS:
        if abs(value) < 1000 or unit == SIZE_UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


UNIX_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def unix_micros(moment: dt.datetime) -> int:
    """``moment`` as Unix microseconds, a naive one taken as UTC (S3 listings and some filesystems give them so)."""
    moment = moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    return (moment - UNIX_EPOCH) // dt.timedelta(microseconds=1)
