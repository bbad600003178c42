"""The *source* seam: how one Kafka message of a topic becomes an alert.

A source knows one message format (``kafka.formats`` names it per topic): how to check the bytes, which survey
the alert belongs to, its identity, its observation time and time scale, which rule dates it, which bytes to keep
and the cutouts it carries, if any. The consumer knows none of this: it asks ``source_for(format).decode`` and
stores what comes back. Adding a format means adding a module here and one entry in ``SOURCES`` (the
``register`` decorator; every module of this package is imported by ``source_for``, so nothing else changes).

What the consumer does with an ``Alert`` (its whole contract with a source):
- names it: ``object_id`` must be a ``PLAIN_ID`` (it becomes a folder and file name), else the message is
  rejected;
- dates it: ``ztfd.ingest.nights.convert_times`` (one astropy call per kind of time field for a batch) returns
  each alert's ``ObservedTimes`` (every time field in UTC, the observation time: the field ``observation_key``
  names), and ``ztfd.ingest.nights.date_of`` applies the alert's ``date_rule`` to it, else to ``utc_field``, else
  to the Kafka timestamp;
- writes ``alert_files``: the file keeping ``raw`` (``raw`` embedded in JSON when ``suffix`` is ``.json``; else
  ``raw`` verbatim and a ``.json`` companion with ``view``), then every cutout under
  ``images/<date>/<object_id>/<detection_id>_<kind><suffix>`` (the names stamp providers use), all in the same
  batch and the same store transaction;
- queues a stamp job when ``stamps.<survey>_provider`` names a provider for ``survey`` that ``serves`` the alert.
Whatever a source raises for one message (``InvalidMessageError`` or anything else) rejects that message only.

Contract names (docs/configuration.md, docs/sources.md): ``lasair`` (Lasair JSON, ZTF and LSST), ``ztf-avro``, ``fink``,
``confluent-avro``, ``avro``.
"""

from __future__ import annotations

import importlib
import json
import math
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import orjson

# The three stamps of an alert, in the order previews show them.
STAMP_TYPES = ("science", "template", "difference")
# MJD = JD - JD_MJD_OFFSET (the Modified Julian Date starts at 1858-11-17T00:00).
JD_MJD_OFFSET = 2400000.5

ZTF = "ztf"
LSST = "lsst"
# How an alert's partition date is chosen (written into the alert file as ``date_rule``).
UTC_DATE = "utc"  # ZTF: the UTC date of the observation
DAY_OBS = "dayobs"  # Rubin: the TAI date of the observation minus 12 h (see ztfd.ingest.nights)
DEFAULT_FORMAT = "lasair"
# What an alert's object id (and a detection id) must look like: it becomes a folder and a file name.
PLAIN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
MAX_REASON = 300  # characters of a rejection reason kept


class InvalidMessageError(ValueError):
    """A message that cannot be stored as an alert; ``str()`` is the reason kept beside its raw bytes."""


class SourceUnavailableError(Exception):
    """The message cannot be judged now, through no fault of its own (its schema registry is unreachable): the
    consumer stops without storing its batch, so that its restart reads the same messages again."""


class TimeField(NamedTuple):
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
    problem: str | None = None  # why ``data`` is None: "null in the packet" or what is wrong with the bytes

    @property
    def carried(self) -> bool:
        return self.data is not None


class Alert(NamedTuple):
    """What a source makes of one message, built once by the source and never changed: the consumer adds the
    Kafka identity, dates it (``ztfd.ingest.nights`` returns the converted times beside it) and writes the files.
    A NamedTuple, like the other records made for every message (see ``ztfd.ingest.batch.Incoming``)."""

    raw: bytes  # kept byte for byte
    survey: str  # ZTF or LSST
    object_id: str  # exact decimal text for 64-bit ids
    detection_id: str | None  # ZTF candid / LSST diaSourceId when the message names it (exact text)
    times: list[TimeField]  # every time field found, converted for the file
    observation_key: str | None  # which of ``times`` is the observation time: the one that dates the alert
    date_rule: str  # UTC_DATE or DAY_OBS
    utc_field: Any = None  # Lasair's ``UTC`` (a datetime) when present: a fallback date, never the observation
    cutouts: tuple[Cutout, ...] = ()
    # A rendering for people when ``raw`` is not JSON (Avro), cutouts left out; or its JSON (``view_json``) already
    # rendered, as a decode worker sends it back (``ztfd.ingest.decodepool``).
    view: dict[str, Any] | bytes | None = None
    suffix: str = ".json"  # of the alert file that keeps ``raw``
    body: dict[str, Any] | None = None  # the decoded message, for the columns reports show
    band: str | None = None  # the observation's band (LSST: the triggering diaSource's), for the preview


class Source(Protocol):
    """One message format."""

    format: str
    # Optional: ``decodes_alone = False`` keeps its decoding in the consumer (it uses the store); ``pooled_by_default
    # = True`` lets ``kafka.decode_workers = "auto"`` spread it over the cores (ztfd.ingest.decodepool).

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


def source_for(name: str, **settings: Any) -> Source:
    """A new source of format ``name`` (``kafka.formats``; ``lasair`` by default). ``settings`` are the consumer's
    (``max_message_bytes``; for the Avro formats the topic's ``schema_file``, the ``registry_url``, the store's
    ``schema_cache`` and the ``registry_timeout``); a source takes what it needs and ignores the rest."""
    load_all()
    try:
        factory = SOURCES[name]
    except KeyError:
        raise KeyError(f"no source for format {name!r} (known: {', '.join(sorted(SOURCES))})") from None
    return factory(**settings)


def load_all() -> None:
    """Import every module of this package, so that each registers its sources."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


# --- what the consumer does with every alert, whatever its source ------------------------------------------------


def file_stem(object_id: str, partition: int, offset: int, generation: int) -> str:
    """Stable under redelivery: the same Kafka message always gets the same name."""
    prefix = f"g{generation}-" if generation else ""
    return f"{object_id}_{prefix}p{partition}-o{offset}"


def alert_files(alert: Alert, folder: str, stem: str, images: str, metadata: dict[str, Any]) -> list[tuple[str, bytes]]:
    """Every file of one alert as (path, bytes): the one keeping ``raw`` first (in ``folder``), then its cutouts
    (in ``images``, the object's stamp folder).

    ``raw`` is never re-serialised: large integers and float digits stay exactly as sent.
    """
    meta = _metadata_json(metadata)
    if alert.suffix == ".json":
        files = [(f"{folder}/{stem}.json", b"".join((b'{"message": ', alert.raw, b', "ztfd": ', meta, b"}\n")))]
    else:
        files = [(f"{folder}/{stem}{alert.suffix}", alert.raw),
                 (f"{folder}/{stem}.json",
                  b"".join((b'{"message": ', rendered_view(alert.view), b', "ztfd": ', meta, b"}\n")))]
    if alert.cutouts:  # most messages carry none: no generator made for nothing (once per alert)
        named = alert.detection_id or stem
        files.extend((f"{images}/{named}_{cutout.kind}{cutout.suffix}", cutout.data)
                     for cutout in alert.cutouts if cutout.data is not None)
    return files


def _metadata_json(metadata: dict[str, Any]) -> bytes:
    """ztfd's part of an alert file. orjson, not json: with json.dumps it was a tenth of the consumer's main thread
    (bin/bench ingest on tmpfs, where that thread is the limit); the same JSON, without spaces, non-ASCII as UTF-8.
    What orjson refuses (a lone surrogate in a nested field's name, as a hostile message may send) goes through
    json, which escapes it."""
    try:
        return orjson.dumps(metadata)
    except orjson.JSONEncodeError:
        return json.dumps(metadata).encode()


def rendered_view(view: Any) -> bytes:
    """The view's JSON: rendered now, or as a decode worker rendered it."""
    return view if isinstance(view, bytes) else view_json(view)


def view_json(view: Any) -> bytes:
    """A view as strict JSON that ``jq`` reads: NaN and infinities become null, stray bytes their size, Avro's
    logical types (dates, times, decimals, UUIDs) their text. It never raises: what cannot be rendered (nesting
    deeper than Python recurses) becomes a one-line note. The same view always gives the same bytes (a redelivered
    message rewrites its file with them).

    orjson, not json: rendering the decoded record is the only pass over it, in C (json.dumps was 0.5 ms of a ZTF
    packet's 1.1 ms in the consumer, orjson 0.02 ms; see docs/performance.md). It writes NaN as null itself. What
    it refuses (integers beyond 64 bits, a lone surrogate, nesting past 255) goes through json, which escapes it,
    walking for NaN only then."""
    try:
        return orjson.dumps(view, default=_unencodable)
    except orjson.JSONEncodeError:
        pass
    try:
        return json.dumps(view, allow_nan=False, default=_unencodable).encode()
    except ValueError:
        try:
            return json.dumps(_finite(view), allow_nan=False, default=_unencodable).encode()
        except (ValueError, RecursionError) as exc:
            return json.dumps({"ztfd_view_error": f"{exc.__class__.__name__}: {str(exc)[:200]}"}).encode()
    except RecursionError:
        return json.dumps({"ztfd_view_error": "nested too deeply to render"}).encode()


def _unencodable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"bytes": len(value)}
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
