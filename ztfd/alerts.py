"""What an alert is to ztfd: a validated Lasair message, its times, its partition date and its file.

Lasair messages guarantee nothing (no candid, no key, nulls, ``objectId`` only if selected, ``UTC`` absent from
topic_refresh rows), so validation is strict about the little ztfd relies on and keeps the rest verbatim:
- an identifier: ``objectId`` (ZTF) or ``diaObjectId`` (Lasair-LSST, an int64), a plain name that cannot leave
  its folder;
- time fields: every top-level key that names a JD or MJD (``jd``, ``jdmax``, ``mjdmax``,
  ``lastDiaSourceMjdTai``…, see ``JD_NAME``) must be a number in range or null; ``UTC`` must be a date-time when
  present. Time fields nested in objects and lists are converted too when valid, and otherwise ignored.

Times are converted with astropy a batch at a time (one ``Time`` per kind of field, not one per value). A field
whose name ends in ``Tai`` is TAI (Rubin's ``midpointMjdTai`` convention), every other one UTC.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ztfd.sources import JD_MJD_OFFSET

ID_FIELDS = ("objectId", "diaObjectId")
PLAIN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ZTF_OBJECT_ID = re.compile(r"^ZTF\d{2}[a-z]{7}$")
# Accepted observation times: 1900-01-01 to 2100-01-01 (anything else is a broken value, not an alert).
MJD_RANGE = (15020.0, 88069.0)
JD_RANGE = (MJD_RANGE[0] + JD_MJD_OFFSET, MJD_RANGE[1] + JD_MJD_OFFSET)
MAX_REASON = 300
MAX_NESTING = 8


class InvalidMessageError(ValueError):
    """A message that cannot be stored as an alert; ``str()`` is the reason kept beside its raw bytes."""


@dataclass(frozen=True)
class TimeField:
    key: str
    value: float
    kind: str  # "jd" or "mjd"
    scale: str  # "utc" or "tai"


@dataclass
class Message:
    """A validated message: its raw bytes (kept verbatim), the parsed object, id and time fields."""

    raw: bytes
    body: dict[str, Any]
    object_id: str
    times: list[TimeField]
    utc_field: dt.datetime | None
    # Filled by ``convert_times``: ISO 8601 UTC string per time field, and the newest time as MJD UTC.
    times_utc: dict[str, str] = field(default_factory=dict)
    newest_mjd: float | None = None
    newest_iso: str | None = None

    @property
    def is_ztf(self) -> bool:
        return bool(ZTF_OBJECT_ID.match(self.object_id))

    def partition_date(self, received_at: dt.datetime) -> str:
        """The UTC date of the newest observation time; else of the ``UTC`` field; else of ``received_at``
        (the consumer passes the Kafka timestamp when there is one, which a redelivery keeps)."""
        if self.newest_iso is not None:
            return self.newest_iso[:10]
        if self.utc_field is not None:
            return self.utc_field.date().isoformat()
        return received_at.astimezone(dt.UTC).date().isoformat()


# Names of JD/MJD fields: Lasair-ZTF's objects columns (jd…, jdmin, jdmax, jdgmax, jdrmax, jdstarthist, jd_g_minus_r)
# and the usual SELECT aliases (mjd, mjdmin, mjdmax, mjd_g…), and Rubin's …MjdTai fields. Deliberately narrow: a
# field named like a time must hold a time, so a loose rule (any name containing "mjd") would reject good alerts
# that select, say, an "mjd_span" of days.
JD_NAME = re.compile(r"^m?jd(min|max|[ugrizy]max|[ugrizy]min|starthist|endhist|_[ugrizy]_minus_[ugrizy]|_[ugrizy])?$",
                     re.IGNORECASE)
TAI_NAME = re.compile(r"mjdtai$", re.IGNORECASE)


@functools.lru_cache(maxsize=4096)
def time_kind(key: str) -> tuple[str, str] | None:
    """(kind, scale) when ``key`` names a JD or MJD field, else None.

    Cached: a topic's messages carry the same few dozen keys, and two regular expressions per key of every
    message were a tenth of the consumer's time."""
    if TAI_NAME.search(key):
        return "mjd", "tai"
    if JD_NAME.match(key):
        return ("mjd" if key[0] in "mM" else "jd"), "utc"
    return None


def _reject_constant(name: str) -> float:
    raise InvalidMessageError(f"not valid JSON: {name} is not a JSON number")


def parse(raw: bytes | None, max_bytes: int) -> Message:
    """Validate one Kafka message value; raise ``InvalidMessageError`` with a one-line reason."""
    if not raw:
        raise InvalidMessageError("empty message")
    if len(raw) > max_bytes:
        raise InvalidMessageError(f"message of {len(raw)} bytes exceeds kafka.max_message_bytes ({max_bytes})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessageError(f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise InvalidMessageError(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise InvalidMessageError("not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidMessageError(f"not a JSON object but a JSON {_json_type(body)}")
    return Message(raw, body, _object_id(body), _time_fields(body), _utc_field(body))


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _object_id(body: dict[str, Any]) -> str:
    for name in ID_FIELDS:
        if name not in body or body[name] is None:
            continue
        value = body[name]
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise InvalidMessageError(f"{name} must be a string or an integer, not a JSON {_json_type(value)}")
        text = str(value)
        if not PLAIN_ID.match(text):
            shown = json.dumps(text[:80])
            raise InvalidMessageError(f"{name} {shown} is not a plain identifier (letters, digits, _ and - only)")
        return text
    raise InvalidMessageError("no objectId (nor diaObjectId) in the message")


def _time_fields(body: dict[str, Any]) -> list[TimeField]:
    """Top-level time fields are checked strictly; nested ones (Lasair-LSST's ``alert.diaSourcesList[…]``)
    are converted when they hold a valid time and otherwise left alone, being the alert's history, not its
    identity."""
    found = []
    for key, value in body.items():
        kind_scale = time_kind(key)
        if kind_scale is None or value is None:
            continue
        kind, scale = kind_scale
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidMessageError(f"time field {key} must be a number, not a JSON {_json_type(value)}")
        low, high = JD_RANGE if kind == "jd" else MJD_RANGE
        if not low <= value <= high:
            raise InvalidMessageError(
                f"time field {key} = {value!r} is out of range for a {kind.upper()} ({low}..{high})"
            )
        found.append(TimeField(key, float(value), kind, scale))
    for key, value in body.items():
        if isinstance(value, dict | list):
            found.extend(_nested_time_fields(key, value))
    return found


def _nested_time_fields(path: str, value: Any, depth: int = 0) -> list[TimeField]:
    if depth > MAX_NESTING:
        return []
    found: list[TimeField] = []
    children = value.items() if isinstance(value, dict) else ((f"[{i}]", v) for i, v in enumerate(value))
    for key, child in children:
        child_path = f"{path}{key}" if key.startswith("[") else f"{path}.{key}"
        if isinstance(child, dict | list):
            found.extend(_nested_time_fields(child_path, child, depth + 1))
            continue
        kind_scale = time_kind(key) if isinstance(value, dict) else None
        if kind_scale is None or isinstance(child, bool) or not isinstance(child, int | float):
            continue
        low, high = JD_RANGE if kind_scale[0] == "jd" else MJD_RANGE
        if low <= child <= high:
            found.append(TimeField(child_path, float(child), *kind_scale))
    return found


def _utc_field(body: dict[str, Any]) -> dt.datetime | None:
    value = body.get("UTC")
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidMessageError(f"UTC must be a date-time string, not a JSON {_json_type(value)}")
    try:
        parsed = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidMessageError(f"UTC {json.dumps(value[:40])} is not a date-time") from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.UTC).replace(tzinfo=None)
    return parsed


def convert_times(messages: Sequence[Message]) -> None:
    """Fill ``times_utc``, ``newest_mjd`` and ``newest_iso`` for a batch, one astropy call per kind of field."""
    groups: dict[tuple[str, str], list[tuple[Message, TimeField]]] = defaultdict(list)
    for message in messages:
        for time_field in message.times:
            groups[(time_field.kind, time_field.scale)].append((message, time_field))
    if not groups:
        return
    from astropy.time import Time

    for (kind, scale), members in groups.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ERFA "dubious year" for future dates; leap-second table age
            utc = Time([tf.value for _, tf in members], format=kind, scale=scale).utc
            isots = utc.isot
            mjds = utc.mjd
        for (message, time_field), iso, mjd in zip(members, isots, mjds, strict=True):
            message.times_utc[time_field.key] = f"{iso}Z"
            if message.newest_mjd is None or mjd > message.newest_mjd:
                message.newest_mjd = float(mjd)
                message.newest_iso = str(iso)


def iso_utc(moment: dt.datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a ``Z``: how ztfd writes every time it adds."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def file_name(object_id: str, partition: int, offset: int, generation: int) -> str:
    """Stable under redelivery: the same Kafka message always gets the same name."""
    prefix = f"g{generation}-" if generation else ""
    return f"{object_id}_{prefix}p{partition}-o{offset}.json"


def document(message: Message, metadata: dict[str, Any]) -> bytes:
    """The alert file: the message exactly as received under ``message``, ztfd's additions under ``ztfd``."""
    return b'{"message": ' + message.raw + b', "ztfd": ' + json.dumps(metadata).encode() + b"}\n"
