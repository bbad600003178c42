"""The Lasair JSON source (format ``lasair``): a message of a Lasair filter topic, ZTF or LSST, as an alert.

Lasair messages guarantee nothing (no candid, no key, nulls, the id only if selected, ``UTC`` absent from
topic_refresh rows), so validation is strict about the little ztfd relies on and keeps the rest verbatim:

- an identifier: ``objectId`` (Lasair-ZTF) or ``diaObjectId`` (Lasair-LSST, an int64 beyond 2^53, kept as its
  exact decimal text), a plain name that cannot leave its folder. It also says the survey;
- time fields: every top-level key that names a JD or MJD (``jd``, ``jdmax``, ``mjdmax``,
  ``lastDiaSourceMjdTai``…, see ``JD_NAME``) must be a number in range or null; ``UTC`` must be a date-time in
  range when present. Time fields nested in objects and lists are converted too when valid, otherwise ignored.
  A field whose name ends in ``MjdTai`` is TAI (Rubin's convention), every other one UTC; in LSST messages the
  ``…MJD`` columns Lasair computes from Rubin's times (``g_latestMJD``, ``latestPairMJD``, ``BBBPeakMJD``…)
  are TAI times too, converted for the file and otherwise left alone (they are derived or model times).

Lasair writes Rubin's NaN values with Python's ``json.dumps``, as bare ``NaN``/``Infinity``/``-Infinity``: they
are accepted (the bytes are kept as sent) and count as missing wherever ztfd derives a value.

The observation time (what dates the alert, see ``ztfd.ingest.nights``): for ZTF the newest time field (Lasair-ZTF
sends ``jdmax``/``mjdmax``-like columns of the latest detection); for LSST the newest
``alert.diaSourcesList[*].midpointMjdTai`` (full and lite output), else ``lastDiaSourceMjdTai`` when the filter
selects it (plain output). Bookkeeping times (``validityStartMjdTai``, ``timeProcessedMjdTai``…) never date it.
In full output the triggering diaSource's ``diaSourceId`` names the detection whose stamps to fetch.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import re
import sys
from typing import Any

import orjson

from ztfd.ingest.nights import is_number
from ztfd.sources import (
    DAY_OBS,
    JD_MJD_OFFSET,
    LSST,
    PLAIN_ID,
    UTC_DATE,
    ZTF,
    Alert,
    InvalidMessageError,
    TimeField,
    register,
)

ID_FIELDS = ("objectId", "diaObjectId")
ZTF_OBJECT_ID = re.compile(r"^ZTF\d{2}[a-z]{7}\Z")
BAND = re.compile(r"^[A-Za-z]{1,8}\Z")
INT64_LIMIT = 2**63  # Rubin's ids are positive int64
# Accepted observation times: 1900-01-01 to 2100-01-01 (anything else is a broken value, not an alert).
MJD_RANGE = (15020.0, 88069.0)
JD_RANGE = (MJD_RANGE[0] + JD_MJD_OFFSET, MJD_RANGE[1] + JD_MJD_OFFSET)
UTC_YEARS = (1900, 2100)
TAI_MINUS_UTC_DAYS = 37 / 86400  # only to compare times of mixed scales before astropy converts them
MAX_NESTING = 8
ORJSON_MAX_BRACKETS = 500  # a message with more brackets may nest deeper than json reads: json parses it

# LSST: where the triggering diaSource's time is (full and lite output), and the plain-output column.
DIA_SOURCES_PATH = ("alert", "diaSourcesList")
OBSERVATION_FIELD = "midpointMjdTai"
PLAIN_OBSERVATION_FIELD = "lastDiaSourceMjdTai"

# Names of JD/MJD fields: Lasair-ZTF's objects columns (jd…, jdmin, jdmax, jdgmax, jdrmax, jdstarthist, jd_g_minus_r)
# and the usual SELECT aliases (mjd, mjdmin, mjdmax, mjd_g…), and Rubin's …MjdTai fields. Deliberately narrow: a
# field named like a time must hold a time, so a loose rule (any name containing "mjd") would reject good alerts
# that select, say, an "mjd_span" of days.
JD_NAME = re.compile(r"^m?jd(min|max|[ugrizy]max|[ugrizy]min|starthist|endhist|_[ugrizy]_minus_[ugrizy]|_[ugrizy])?\Z",
                     re.IGNORECASE)
TAI_NAME = re.compile(r"mjdtai\Z", re.IGNORECASE)
# Lasair-LSST's derived and model times (objects.u_latestMJD…, latestPairMJD, absMagMJD, BBBPeakMJD): MJD, TAI.
LSST_MJD_NAME = re.compile(r"[a-z_]MJD\Z")


def is_ztf_object_id(object_id: str) -> bool:
    """A ZTF object name (``ZTF`` + 2 digits + 7 letters): the alerts ALeRCE's ZTF stamp service knows."""
    return bool(ZTF_OBJECT_ID.match(object_id))


@functools.lru_cache(maxsize=4096)
def time_kind(key: str, survey: str = ZTF) -> tuple[str, str] | None:
    """(kind, scale) when ``key`` names a JD or MJD field, else None.

    Cached: a topic's messages carry the same few dozen keys, and two regular expressions per key of every
    message were a tenth of the consumer's time."""
    if TAI_NAME.search(key):
        return "mjd", "tai"
    if JD_NAME.match(key):
        return ("mjd" if key[0] in "mM" else "jd"), "utc"
    if survey == LSST and LSST_MJD_NAME.search(key):
        return "mjd", "tai"
    return None


@register("lasair")
class LasairSource:
    """Lasair's JSON messages, ZTF and LSST alike (the survey follows from the id field)."""

    format = "lasair"

    def __init__(self, **_settings: Any) -> None:
        """Nothing to set: the consumer applies ``kafka.max_message_bytes`` before decoding."""

    def decode(self, value: bytes | None, key: bytes | None = None) -> Alert:
        """Check one Kafka message value (Lasair sends no key); ``InvalidMessageError`` with a one-line reason.
        (The consumer applies ``kafka.max_message_bytes`` first.)

        Parsed by orjson (``_parse``); a message it refuses, or that fails a check, is judged again as json
        parses it, so that the reason is the same whichever parser ran (orjson reads an integer beyond 64 bits
        as a float, json as the integer the reason names)."""
        try:
            return _alert(value, _parse(value))
        except InvalidMessageError:
            return _alert(value, _parse_slowly(value))


def _alert(value: bytes | None, body: dict[str, Any]) -> Alert:
    name, object_id = _object_id(body)
    survey = LSST if name == "diaObjectId" else ZTF
    times = _time_fields(body, survey)
    utc_field = _utc_field(body)
    if survey == LSST:
        observation_key, detection_id, band = _lsst_observation(times, body)
    else:
        observation_key, detection_id, band = _newest(times), None, None
    return Alert(
        raw=value,  # type: ignore[arg-type]  # not empty: _parse checked it
        survey=survey,
        object_id=object_id,
        detection_id=detection_id,
        times=times,
        observation_key=observation_key,
        date_rule=DAY_OBS if survey == LSST else UTC_DATE,
        utc_field=utc_field,
        band=band,
    )  # no ``body``: nothing reads it, and a full-output message parsed is ~70 kB of objects per alert


def _parse(raw: bytes | None) -> dict[str, Any]:
    """The message's JSON object. orjson first: it parses a Lasair-ZTF row ~4x faster than json (the parse was a
    fifth of the consumer's main thread on ``bin/bench ingest``). What it refuses (Lasair-LSST's bare NaN, integers
    beyond 64 bits, lone surrogates, invalid JSON) goes through json, which accepts the first three and words the
    reason for the rest; both give the same values for what both accept."""
    if not raw:
        raise InvalidMessageError("empty message")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidMessageError("orjson refuses it") from None  # decode() asks json, which words the reason
    if len(raw) > 2 * ORJSON_MAX_BRACKETS and raw.count(b"[") + raw.count(b"{") > ORJSON_MAX_BRACKETS:
        # orjson reads 1,023 levels deep, json refuses from ~990 (Python's recursion limit): one that may nest
        # that deep is judged by json alone, so that the same messages are refused as before.
        raise InvalidMessageError("judged by json")
    if not isinstance(body, dict):
        raise InvalidMessageError(f"not a JSON object but a JSON {_json_type(body)}")
    return body


def _parse_slowly(raw: bytes | None) -> dict[str, Any]:
    if not raw:
        raise InvalidMessageError("empty message")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessageError(f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        body = json.loads(text)  # bare NaN, Infinity and -Infinity become floats (what Lasair writes)
    except json.JSONDecodeError as exc:
        raise InvalidMessageError(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise InvalidMessageError("not valid JSON: nested too deeply") from None
    except ValueError:  # Python refuses to convert integers of more digits than its int-string limit
        raise InvalidMessageError(
            f"not valid JSON: an integer of more than {sys.get_int_max_str_digits()} digits") from None
    if not isinstance(body, dict):
        raise InvalidMessageError(f"not a JSON object but a JSON {_json_type(body)}")
    return body


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _shown(value: Any) -> str:
    """A value for a reason: short, whatever it is (a 4,000-digit integer, a megabyte of text)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**40:
        return f"an integer of {len(str(abs(value)))} digits"
    text = json.dumps(value) if isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _object_id(body: dict[str, Any]) -> tuple[str, str]:
    """(the field it came from, the id as text): exact digits for Rubin's int64 ids."""
    for name in ID_FIELDS:
        if name not in body or body[name] is None:
            continue
        value = body[name]
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise InvalidMessageError(f"{name} must be a string or an integer, not a JSON {_json_type(value)}")
        if isinstance(value, int) and name == "diaObjectId" and not 0 < value < INT64_LIMIT:
            raise InvalidMessageError(f"{name} {_shown(value)} is not a positive 64-bit integer")
        text = str(value)
        if not PLAIN_ID.match(text):
            raise InvalidMessageError(
                f"{name} {_shown(value)} is not a plain identifier (letters, digits, _ and - only)")
        return name, text
    raise InvalidMessageError("no objectId (nor diaObjectId) in the message")


def _time_fields(body: dict[str, Any], survey: str) -> list[TimeField]:
    """Top-level time fields are checked strictly (they may date the alert); nested ones (Lasair-LSST's
    ``alert.diaSourcesList[…]``) and LSST's derived ``…MJD`` columns are converted when they hold a valid time
    and otherwise left alone. NaN and ±Infinity count as missing, like null."""
    found = []
    for key, kind, scale, lenient in _top_time_keys(tuple(body), survey):
        value = body[key]
        if value is None or (type(value) is float and not math.isfinite(value)):
            continue
        low, high = JD_RANGE if kind == "jd" else MJD_RANGE
        if lenient:
            if is_number(value) and low <= value <= high:
                found.append(TimeField(key, float(value), kind, scale))
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidMessageError(f"time field {key} must be a number, not a JSON {_json_type(value)}")
        if not low <= value <= high:
            raise InvalidMessageError(
                f"time field {key} = {_shown(value)} is out of range for a {kind.upper()} ({low}..{high})"
            )
        found.append(TimeField(key, float(value), kind, scale))
    kinds = set(map(type, body.values()))
    if dict in kinds or list in kinds:
        for key, value in body.items():
            if isinstance(value, dict | list):
                found.extend(_nested_time_fields(key, value, survey))
    return found


@functools.lru_cache(maxsize=1024)
def _top_time_keys(keys: tuple[str, ...], survey: str) -> tuple[tuple[str, str, str, bool], ...]:
    """The time-named top-level keys of a message of this shape: (key, kind, scale, lenient). A topic's messages
    share a few shapes, so the names are looked at once per shape, not once per message (two regular
    expressions a time field were the largest cost of decoding a Lasair-ZTF message). Lenient: LSST's derived
    ``…MJD`` columns, converted only when they hold a valid time."""
    return tuple((key, *kind_scale, survey == LSST and not TAI_NAME.search(key) and not JD_NAME.match(key))
                 for key in keys if (kind_scale := time_kind(key, survey)) is not None)


def _nested_time_fields(path: str, value: Any, survey: str, depth: int = 0) -> list[TimeField]:
    """Valid time fields inside objects and lists.

    Written for speed: a Lasair-LSST full-output message holds over a thousand nested values (eleven diaSources
    of a hundred fields each), and a walk that asked every one whether it is a time cost as much as parsing the
    JSON. Objects of one shape (the same keys in the same order) share the list of their time-named keys
    (``_time_keys``), the types of an object's values are gathered in one pass at C speed, and only an object
    that holds containers has its values looked at one by one."""
    if depth > MAX_NESTING:
        return []
    found: list[TimeField] = []
    if isinstance(value, dict):
        for key, kind_scale in _time_keys(tuple(value), survey):
            child = value[key]
            if type(child) is float or type(child) is int:  # not bool (a subclass of int), NaN fails the range
                low, high = JD_RANGE if kind_scale[0] == "jd" else MJD_RANGE
                if low <= child <= high:
                    found.append(TimeField(f"{path}.{key}", float(child), *kind_scale))
        kinds = set(map(type, value.values()))
        if dict in kinds or list in kinds:
            for key, child in value.items():
                if type(child) is dict or type(child) is list:
                    found.extend(_nested_time_fields(f"{path}.{key}", child, survey, depth + 1))
    else:
        for index, child in enumerate(value):
            if type(child) is dict or type(child) is list:
                found.extend(_nested_time_fields(f"{path}[{index}]", child, survey, depth + 1))
    return found


@functools.lru_cache(maxsize=1024)
def _time_keys(keys: tuple[str, ...], survey: str) -> tuple[tuple[str, tuple[str, str]], ...]:
    """The time-named keys of an object of this shape, with their kind and scale."""
    return tuple((key, kind_scale) for key in keys if (kind_scale := time_kind(key, survey)) is not None)


def _as_utc_mjd(time_field: TimeField) -> float:
    """Roughly the UTC MJD of a field, to compare fields of mixed kinds before astropy converts them."""
    mjd = time_field.value - JD_MJD_OFFSET if time_field.kind == "jd" else time_field.value
    return mjd - TAI_MINUS_UTC_DAYS if time_field.scale == "tai" else mjd


def _newest(times: list[TimeField]) -> str | None:
    """ZTF: the newest time field dates the alert (Lasair-ZTF's ``jdmax``/``mjdmax`` are the latest detection)."""
    return max(times, key=_as_utc_mjd).key if times else None


def _lsst_observation(times: list[TimeField], body: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    """The triggering diaSource: the newest of ``alert.diaSourcesList`` (Lasair sorts it newest first, but the
    times decide), as (its time field's key, its ``diaSourceId`` (full output), its band); else the plain column
    with neither id nor band."""
    sources: Any = body
    for step in DIA_SOURCES_PATH:
        sources = sources.get(step) if isinstance(sources, dict) else None
    newest: tuple[float, int, dict[str, Any]] | None = None
    if isinstance(sources, list):
        low, high = MJD_RANGE
        for index, source in enumerate(sources):
            when = source.get(OBSERVATION_FIELD) if isinstance(source, dict) else None
            if is_number(when) and low <= when <= high and (newest is None or when > newest[0]):
                newest = (when, index, source)
    if newest is not None:
        _, index, source = newest
        band = source.get("band")
        return (f"{'.'.join(DIA_SOURCES_PATH)}[{index}].{OBSERVATION_FIELD}", _dia_source_id(source.get("diaSourceId")),
                band if isinstance(band, str) and BAND.match(band) else None)
    if any(tf.key == PLAIN_OBSERVATION_FIELD for tf in times):
        return PLAIN_OBSERVATION_FIELD, None, None
    return None, None, None


def _dia_source_id(value: Any) -> str | None:
    """A diaSourceId as exact text, or None when the message has no usable one (lite output has none)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < INT64_LIMIT:
        return None
    return str(value)


def _utc_field(body: dict[str, Any]) -> dt.datetime | None:
    value = body.get("UTC")
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidMessageError(f"UTC must be a date-time string, not a JSON {_json_type(value)}")
    try:
        parsed = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        if parsed.tzinfo is not None:
            parsed = parsed.astimezone(dt.UTC).replace(tzinfo=None)
    except ValueError:
        raise InvalidMessageError(f"UTC {_shown(value[:40])} is not a date-time") from None
    except OverflowError:  # an offset that moves year 1 or 9999 out of what a datetime holds
        raise InvalidMessageError(f"UTC {_shown(value[:40])} is out of range") from None
    if not UTC_YEARS[0] <= parsed.year < UTC_YEARS[1]:
        raise InvalidMessageError(f"UTC {_shown(value[:40])} is out of range ({UTC_YEARS[0]}..{UTC_YEARS[1]})")
    return parsed
