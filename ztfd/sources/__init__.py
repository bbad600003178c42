"""The *source* seam: how one Kafka message of a topic becomes an alert.

A source knows one message format (``kafka.formats`` names it per topic): how to check the bytes, which survey
the alert belongs to, its identity, its observation time and time scale, which rule dates it, which bytes to keep
and the cutouts it carries, if any. The consumer knows none of this: it asks ``source_for(format).decode`` and
stores what comes back. Adding a format means adding a module here and one entry in ``SOURCES``.

Contract names (README "Configuration"): ``lasair`` (Lasair JSON, ZTF and LSST), ``ztf-avro``, ``fink``,
``confluent-avro``, ``avro``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

# The three stamps of an alert, in the order previews show them.
STAMP_TYPES = ("science", "template", "difference")
# MJD = JD - JD_MJD_OFFSET (the Modified Julian Date starts at 1858-11-17T00:00).
JD_MJD_OFFSET = 2400000.5

ZTF = "ztf"
LSST = "lsst"
# How an alert's partition date is chosen (written into the alert file as ``date_rule``).
UTC_DATE = "utc"  # ZTF: the UTC date of the observation
DAY_OBS = "dayobs"  # Rubin: the TAI date of the observation minus 12 h (see ztfd.nights)


class InvalidMessageError(ValueError):
    """A message that cannot be stored as an alert; ``str()`` is the reason kept beside its raw bytes."""


@dataclass(frozen=True)
class TimeField:
    """A time-like field found in a message: where (a dotted path), its value, JD or MJD, and its scale."""

    key: str
    value: float
    kind: str  # "jd" or "mjd"
    scale: str  # "utc" or "tai"


@dataclass(frozen=True)
class Cutout:
    """A stamp carried inside the message: the bytes exactly as carried, or None when the packet's field is null."""

    kind: str  # one of STAMP_TYPES
    data: bytes | None
    suffix: str  # ".fits.gz" (ZTF's gzipped stampData) or ".fits" (Rubin's raw FITS)


@dataclass
class Alert:
    """What a source makes of one message. The consumer adds the Kafka identity and writes the files."""

    raw: bytes  # kept byte for byte
    survey: str  # ZTF or LSST
    object_id: str  # exact decimal text for 64-bit ids
    detection_id: str | None  # ZTF candid / LSST diaSourceId when the message names it (exact text)
    times: list[TimeField]  # every time field found, converted for the file
    observation_key: str | None  # which of ``times`` is the observation time: the one that dates the alert
    date_rule: str  # UTC_DATE or DAY_OBS
    utc_field: Any = None  # Lasair's ``UTC`` (a datetime) when present: a fallback date, never the observation
    cutouts: tuple[Cutout, ...] = ()
    view: dict[str, Any] | None = None  # a rendering for people when ``raw`` is not JSON (Avro), cutouts left out
    suffix: str = ".json"  # of the alert file that keeps ``raw``
    body: dict[str, Any] | None = None  # the decoded message, for the columns reports show
    # Filled by ``convert_times`` a batch at a time: ISO 8601 UTC per time field, the observation time (MJD UTC).
    times_utc: dict[str, str] = field(default_factory=dict)
    obs_mjd: float | None = None
    obs_iso: str | None = None


class Source(Protocol):
    """One message format."""

    format: str

    def decode(self, value: bytes | None, key: bytes | None) -> Alert:
        """Check and decode one message; raise ``InvalidMessageError`` with a one-line reason."""
        ...


SOURCES: dict[str, Callable[..., Source]] = {}


def register(name: str) -> Callable[[Callable[..., Source]], Callable[..., Source]]:
    """Class decorator: make a source available under its contract name."""

    def add(factory: Callable[..., Source]) -> Callable[..., Source]:
        SOURCES[name] = factory
        return factory

    return add
