"""What a decoded alert packet says, whichever encoding brought it: ZTF's and Rubin's packets as ztfd alerts.

- **ZTF** (ZTF's own packets, Fink's ZTF stream): ``objectId`` names the object, ``candid`` the detection, the
  observation time is ``candidate.jd`` (JD, UTC) and the alert is filed under its UTC date. The cutouts are
  ``cutoutScience/Template/Difference = {fileName, stampData}``, ``stampData`` gzipped FITS, kept byte for byte as
  ``.fits.gz`` (the bytes ALeRCE's ``get_stamp`` serves).
- **Rubin** (Rubin's own stream in Confluent wire format, Fink's LSST stream): ``diaSourceId`` names the
  detection, ``diaObject.diaObjectId`` the object (``ssSource.ssObjectId`` for a solar-system source; an alert
  naming neither is filed under its diaSourceId); Fink writes absent ids as 0 or None, both mean absent. The
  observation time is ``diaSource.midpointMjdTai`` (MJD, TAI) and the alert is filed under its dayObs. The cutouts
  are top-level ``bytes`` of raw FITS, kept as ``.fits``.

The shape decides (``diaSource`` or ``diaSourceId``: Rubin; ``objectId`` and ``candid``: ZTF), not the topic. A
cutout that is null is recorded as such; one whose bytes are not what its survey sends (gzip holding FITS for ZTF,
FITS blocks for Rubin) is not written as a stamp and the reason is recorded in the alert's view. Either way the
alert is kept.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

from ztfd.sources import DAY_OBS, LSST, STAMP_TYPES, UTC_DATE, ZTF, Alert, Cutout, InvalidMessageError, TimeField

FITS_START = b"SIMPLE  ="
FITS_BLOCK = 2880
GZIP_MAGIC = b"\x1f\x8b"
ZTF_SUFFIX = ".fits.gz"
RUBIN_SUFFIX = ".fits"
CUTOUT_FIELDS = {kind: f"cutout{kind.capitalize()}" for kind in STAMP_TYPES}
NULL_IN_PACKET = "null in the packet"
# Observation times outside 1900-2100 are broken values, not alerts (as for Lasair's time fields).
JD_RANGE = (2415020.5, 2488069.5)
MJD_RANGE = (15020.0, 88069.0)


def alert_of(record: dict[str, Any], raw: bytes) -> Alert:
    """The alert a decoded packet describes, by its shape; ``InvalidMessageError`` if it is neither kind."""
    if "diaSource" in record or "diaSourceId" in record:
        return rubin_alert(record, raw)
    if "objectId" in record and "candid" in record:
        return ztf_alert(record, raw)
    names = ", ".join(list(record)[:8])
    raise InvalidMessageError(f"neither a ZTF packet (objectId, candid) nor a Rubin alert (diaSourceId): {names}")


# --- ZTF ----------------------------------------------------------------------------------------------------------


def ztf_alert(record: dict[str, Any], raw: bytes) -> Alert:
    object_id = record.get("objectId")
    if not isinstance(object_id, str) or not object_id:
        raise InvalidMessageError("ZTF packet without an objectId")
    candidate = _nested(record, "candidate")
    candid = _detection_id(record, candidate, "candid", f"ZTF packet of {object_id[:40]} without a candid")
    times = _observed(candidate, "jd", "candidate.jd", "jd", "utc", JD_RANGE)
    cutouts = tuple(_ztf_cutout(kind, record.get(CUTOUT_FIELDS[kind])) for kind in STAMP_TYPES)
    view = dict(record)
    for cutout in cutouts:
        carried = record.get(CUTOUT_FIELDS[cutout.kind])
        described = _described(cutout, candid)
        view[CUTOUT_FIELDS[cutout.kind]] = (
            {**carried, "stampData": described} if isinstance(carried, dict) else described)
    return Alert(raw=raw, survey=ZTF, object_id=object_id, detection_id=candid, times=times,
                 observation_key=times[0].key if times else None, date_rule=UTC_DATE, cutouts=cutouts,
                 view=view, suffix=".avro", body=view)


def _ztf_cutout(kind: str, carried: Any) -> Cutout:
    if carried is None:
        return Cutout(kind, None, ZTF_SUFFIX, NULL_IN_PACKET)
    data = carried.get("stampData") if isinstance(carried, dict) else None
    if data is None:
        return Cutout(kind, None, ZTF_SUFFIX, NULL_IN_PACKET)
    problem = gzipped_fits_problem(data) if isinstance(data, bytes) else "stampData is not bytes"
    return Cutout(kind, None if problem else data, ZTF_SUFFIX, problem)


def gzipped_fits_problem(data: bytes) -> str | None:
    """Why ``data`` is not a gzipped FITS file, or None. Only the start is inflated: the stamp worker that draws
    the preview reads the whole image."""
    if not data.startswith(GZIP_MAGIC):
        return f"invalid: not gzip (starts with {data[:8]!r})"
    try:
        start = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, len(FITS_START))
    except zlib.error as exc:
        return f"invalid: gzip does not inflate ({exc})"
    if not start.startswith(FITS_START):
        return f"invalid: gzip of something that is not FITS (starts with {start[:8]!r})"
    return None


# --- Rubin ----------------------------------------------------------------------------------------------------------


def rubin_alert(record: dict[str, Any], raw: bytes) -> Alert:
    source = _nested(record, "diaSource")
    dia_source_id = _detection_id(record, source, "diaSourceId", "Rubin alert without a diaSourceId")
    object_id = (_identifier(_field(record, "diaObject", "diaObjectId"))
                 or _identifier(_field(record, "ssSource", "ssObjectId")) or dia_source_id)
    times = _observed(source, "midpointMjdTai", "diaSource.midpointMjdTai", "mjd", "tai", MJD_RANGE)
    cutouts = tuple(_rubin_cutout(kind, record.get(CUTOUT_FIELDS[kind])) for kind in STAMP_TYPES)
    view = dict(record)
    for cutout in cutouts:
        view[CUTOUT_FIELDS[cutout.kind]] = _described(cutout, dia_source_id)
    band = source.get("band")
    return Alert(raw=raw, survey=LSST, object_id=object_id, detection_id=dia_source_id, times=times,
                 observation_key=times[0].key if times else None, date_rule=DAY_OBS,
                 cutouts=cutouts, view=view, suffix=".avro", body=view,
                 band=band if isinstance(band, str) and len(band) == 1 else None)


def _rubin_cutout(kind: str, data: Any) -> Cutout:
    if data is None:
        return Cutout(kind, None, RUBIN_SUFFIX, NULL_IN_PACKET)
    problem = fits_problem(data) if isinstance(data, bytes) else "invalid: not bytes"
    return Cutout(kind, None if problem else data, RUBIN_SUFFIX, problem)


def fits_problem(data: bytes) -> str | None:
    """Why ``data`` is not a (raw) FITS file, or None."""
    if not data.startswith(FITS_START):
        return f"invalid: not FITS (starts with {data[:8]!r})"
    if len(data) % FITS_BLOCK:
        return f"invalid: FITS of {len(data)} bytes, not whole {FITS_BLOCK}-byte blocks"
    return None


# --- shared -------------------------------------------------------------------------------------------------------


def _nested(record: dict[str, Any], name: str) -> dict[str, Any]:
    """The record's nested record ``name`` (``candidate``, ``diaSource``); empty when it is absent or not a record."""
    inner = record.get(name)
    return inner if isinstance(inner, dict) else {}


def _field(record: dict[str, Any], name: str, key: str) -> Any:
    return _nested(record, name).get(key)


def _detection_id(record: dict[str, Any], inner: dict[str, Any], key: str, missing: str) -> str:
    """The detection's id ``key``, at the top of the record or else in its nested record ``inner``;
    ``InvalidMessageError(missing)`` when neither has one."""
    found = _identifier(record.get(key)) or _identifier(inner.get(key))
    if found is None:
        raise InvalidMessageError(missing)
    return found


def _observed(inner: dict[str, Any], field: str, key: str, kind: str, scale: str,
              bounds: tuple[float, float]) -> list[TimeField]:
    """The observation time ``inner[field]`` as the alert's one time field ``key``; none when it is absent."""
    value = inner.get(field)
    return [] if value is None else [_time(key, value, kind, scale, bounds)]


def _identifier(value: Any) -> str | None:
    """An id as exact decimal text (or a name); None for absent: null, 0 (Fink's absent ids) or empty."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value) if value != 0 else None
    if isinstance(value, str):
        return value or None
    raise InvalidMessageError(f"an identifier of type {type(value).__name__}")


def _time(key: str, value: Any, kind: str, scale: str, bounds: tuple[float, float]) -> TimeField:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidMessageError(f"{key} is not a number")
    if not bounds[0] <= value <= bounds[1]:
        raise InvalidMessageError(f"{key} = {value!r} is out of range for a {kind.upper()} ({bounds[0]}..{bounds[1]})")
    return TimeField(key, float(value), kind, scale)


def _described(cutout: Cutout, detection_id: str) -> dict[str, Any] | None:
    """What the view shows in place of a cutout's bytes: their size and the stamp file, or why there is none."""
    if cutout.data is not None:
        return {"bytes": len(cutout.data), "file": f"{detection_id}_{cutout.kind}{cutout.suffix}"}
    if cutout.problem == NULL_IN_PACKET:
        return None
    return {"problem": cutout.problem}

