"""The real Rubin alerts shipped in ``ztfd/samples/lsst/`` and Lasair-LSST messages built from them.

Two kinds of real samples (provenance in ``ztfd/samples/lsst/PROVENANCE.md``):

- 7 Rubin alerts with their three cutouts (Fink's Data Transfer file, history trimmed): the local stamp service
  serves these cutouts on ALeRCE's and Lasair's LSST routes, and tests compare what ztfd saved against them;
- one Rubin alert in Lasair's own JSON (full and lite light curves, the ``objects`` row), bare ``NaN`` included.

Messages follow Lasair-LSST's three output modes (facts: Lasair's ``dispose_query_results``): the filter's SELECT
columns, then ``UTC`` (the filter's run time), then ``alert`` in lite and full output; serialised with Python's
``json.dumps`` as Lasair does, so NaN values are written bare. Rubin leaves many diaObject values NaN (Lasair's
sample sends 59 of them as bare ``NaN``); Fink's Spark files hold the same fields as null, so a full message built
from a Fink alert gives back NaN for exactly those fields (``nan_fields``).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

MODES = ("plain", "lite", "full")
CUTOUT_FIELDS = {"science": "cutoutScience", "template": "cutoutTemplate", "difference": "cutoutDifference"}
FINK_FILE = "fink_lsst_part-2-918301_compact.avro"
LASAIR_FULL = "lasair_lsst_313637921267122191.json"
LASAIR_LITE = "lasair_lsst_313637921267122191_lite.json"
LASAIR_OBJECT = "lasair_lsst_313637921267122191_object.json"
LITE_SOURCE_FIELDS = ("psfFlux", "psfFluxErr", "midpointMjdTai", "band", "reliability")
LITE_FORCED_FIELDS = ("psfFlux", "psfFluxErr", "midpointMjdTai", "band")
MJD_EPOCH = dt.datetime(1858, 11, 17, tzinfo=dt.UTC)
TAI_MINUS_UTC = dt.timedelta(seconds=37)
FILTER_RUN_DELAY = dt.timedelta(minutes=4)  # Lasair's filters run minutes after the observation


@dataclass(frozen=True)
class RubinAlert:
    """One real Rubin alert: its ids, its triggering diaSource, its history and its cutouts (raw FITS)."""

    dia_source_id: int
    dia_object_id: int | None  # None for a solar-system source (no diaObject)
    mjd_tai: float  # diaSource.midpointMjdTai
    band: str
    visit: int
    record: dict[str, Any]  # the whole record (Fink's flattened Rubin schema), cutouts included
    cutouts: dict[str, bytes]  # stamp type -> FITS bytes as Rubin produced them (3 HDUs, not gzipped)

    @property
    def dia_sources(self) -> list[dict[str, Any]]:
        """The diaSource and its previous ones, newest first (as Lasair's ``diaSourcesList``)."""
        rows = [self.record["diaSource"], *(self.record.get("prvDiaSources") or [])]
        return sorted(rows, key=lambda row: row["midpointMjdTai"], reverse=True)

    @property
    def forced_sources(self) -> list[dict[str, Any]]:
        return sorted(self.record.get("prvDiaForcedSources") or [], key=lambda r: r["midpointMjdTai"], reverse=True)

    @property
    def utc(self) -> dt.datetime:
        """The observation time in UTC (TAI minus the 37 leap seconds of the sample's era)."""
        return MJD_EPOCH + dt.timedelta(days=self.mjd_tai) - TAI_MINUS_UTC


def samples_dir() -> Path:
    return Path(str(resources.files("ztfd") / "samples" / "lsst"))


@functools.cache
def rubin_alerts() -> tuple[RubinAlert, ...]:
    """All 7 alerts of the Fink sample, sorted by diaSourceId."""
    import fastavro

    with (samples_dir() / FINK_FILE).open("rb") as handle:
        records = list(fastavro.reader(handle))
    found = []
    for record in records:
        source = record["diaSource"]
        object_id = (record.get("diaObject") or {}).get("diaObjectId")
        found.append(RubinAlert(
            dia_source_id=int(record["diaSourceId"]),
            dia_object_id=int(object_id) if object_id else None,  # Fink writes absent ids as 0 or None
            mjd_tai=float(source["midpointMjdTai"]),
            band=str(source["band"]),
            visit=int(source["visit"]),
            record=record,
            cutouts={kind: bytes(record[name]) for kind, name in CUTOUT_FIELDS.items()},
        ))
    return tuple(sorted(found, key=lambda a: a.dia_source_id))


def object_alerts() -> tuple[RubinAlert, ...]:
    """The alerts with a diaObject: the only ones Lasair sends on (and ALeRCE lists by object)."""
    return tuple(a for a in rubin_alerts() if a.dia_object_id is not None)


def _lasair_row(row: dict[str, Any], nan: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A Rubin record as Lasair stores and sends it: ``dec`` renamed ``decl``, the ``nan`` fields' nulls NaN."""
    return {("decl" if key == "dec" else key): (math.nan if value is None and key in nan else value)
            for key, value in row.items()}


@functools.cache
def nan_fields() -> frozenset[str]:
    """The diaObject fields Lasair's real full-output sample sends as bare NaN."""
    alert = json.loads((samples_dir() / LASAIR_FULL).read_text())
    return frozenset(key for key, value in alert["diaObject"].items() if isinstance(value, float) and math.isnan(value))


def _run_time(observed: dt.datetime) -> str:
    return (observed + FILTER_RUN_DELAY).strftime("%Y-%m-%d %H:%M:%S")


def message(alert: RubinAlert, mode: str, **extra: Any) -> dict[str, Any]:
    """A Lasair-LSST message about ``alert`` in output ``mode`` (plain, lite or full); ``extra`` columns are
    selected columns of the filter's own (e.g. a sequence number), placed before ``UTC``."""
    sources = alert.dia_sources
    times = [row["midpointMjdTai"] for row in sources]
    out: dict[str, Any] = {
        "diaObjectId": alert.dia_object_id,
        "ra": alert.record["diaObject"]["ra"],
        "decl": alert.record["diaObject"]["dec"],
        "lastDiaSourceMjdTai": max(times),  # what Lasair's objects table computes
        "firstDiaSourceMjdTai": min(times),
        "nDiaSources": alert.record["diaObject"].get("nDiaSources"),
        **extra,
        "UTC": _run_time(alert.utc),
    }
    if mode == "plain":
        return out
    if mode == "lite":
        out["alert"] = {
            "diaSourcesList": [{key: row.get(key) for key in LITE_SOURCE_FIELDS} for row in sources],
            "diaForcedSourcesList": [{key: row.get(key) for key in LITE_FORCED_FIELDS} for row in alert.forced_sources],
        }
        return out
    if mode == "full":
        out["alert"] = {
            "diaObject": _lasair_row(alert.record["diaObject"], nan_fields()),
            "diaSourcesList": [_lasair_row(row) for row in sources],
            "diaForcedSourcesList": [_lasair_row(row) for row in alert.forced_sources],
            "diaNondetectionLimitsList": [],
        }
        return out
    raise ValueError(f"unknown Lasair output mode {mode!r}; expected one of {', '.join(MODES)}")


def lasair_fixture_message(mode: str, utc: str = "2025-11-04 05:16:48", **extra: Any) -> bytes:
    """A message of Lasair's own real sample (diaObjectId 313637921267122191) in ``mode``, serialised as Lasair
    does (``json.dumps``: bare ``NaN``). Plain output selects the whole ``objects`` row."""
    folder = samples_dir()
    row = json.loads((folder / LASAIR_OBJECT).read_text())
    if mode == "plain":
        return json.dumps({**row, **extra, "UTC": utc}).encode()
    selected = {"diaObjectId": row["diaObjectId"], "ra": row["ra"], "decl": row["decl"], **extra, "UTC": utc}
    if mode == "lite":
        return json.dumps({**selected, "alert": json.loads((folder / LASAIR_LITE).read_text())}).encode()
    if mode == "full":
        alert = json.loads((folder / LASAIR_FULL).read_text())
        alert.pop("annotations", None)  # Lasair removes them before sending
        return json.dumps({**selected, "alert": alert}).encode()
    raise ValueError(f"unknown Lasair output mode {mode!r}; expected one of {', '.join(MODES)}")


def message_stream(count: int, modes: tuple[str, ...] = MODES) -> list[bytes]:
    """``count`` Lasair-LSST messages cycling through the sample alerts with cutouts and ``modes``, each with a
    ``seq`` column that tells them apart."""
    alerts = object_alerts()
    return [
        json.dumps(message(alerts[seq % len(alerts)], modes[(seq // len(alerts)) % len(modes)], seq=seq)).encode()
        for seq in range(count)
    ]
