"""An ALeRCE-like stamp service on 127.0.0.1 that serves the real cutouts of the sample packets, with faults.

It answers the routes ztfd uses, the way ALeRCE's and Lasair's services do (see docs/stamps.md). ZTF, from the
real ZTF packets:

- ``GET /get_stamp?oid=&candid=&type=science|template|difference&format=fits`` -> the packet's ``stampData``
  bytes unchanged (gzipped FITS, ``application/fits+gzip``); 404 with a JSON body for an unknown candid; 400 for
  missing or bad parameters (like the Flask service's ``validate=True``).
- ``GET /get_avro?oid=&candid=`` -> the whole alert packet (an Avro container file, ``application/avro``): the
  sample file itself, or for a renamed sample (the bench's distinct ids) the same record under its new ids; 404
  for an unknown candid. The stamp faults apply to it as to ``get_stamp`` (those naming a stamp type excepted).
- ``GET /ztf/v1/objects/<oid>/detections`` -> a JSON list of detections (``candid`` as a string, ``mjd``,
  ``fid``, ``has_stamp`` …): one per packet of the object (``has_stamp`` true) plus the packet's earlier
  detections from ``prv_candidates`` (``has_stamp`` false); 404 for an unknown object.

LSST, from the real Rubin alerts and cutouts of ``ztfd.embedded.lsst_samples``:

- ALeRCE's multisurvey API: ``GET /lightcurve_api/detections?survey_id=lsst&oid=<diaObjectId>`` -> a JSON list
  of ``LsstDetection`` rows (``oid``, ``measurement_id`` = diaSourceId as JSON integers, ``mjd`` = midpointMjdTai,
  TAI, ``has_stamp`` true for the alert's diaSource, false for its earlier ones …), ``[]`` for an unknown object;
  ``GET /stamps_api/stamp?oid=&measurement_id=&stamp_type=cutoutScience|cutoutTemplate|cutoutDifference
  &file_format=fits&survey_id=lsst`` -> gzip of the whole Rubin cutout (3 HDUs), ``application/gzip``; **500**
  (``{"detail": "An error occurred"}``) when it has no such alert, as ALeRCE's handler does; 422 for a missing
  parameter, 400 for another survey.
- Lasair-LSST's ``GET /fits/<diaSourceId>_cutout<Science|Template|Difference>/`` (301 to it without the slash)
  -> the cutout's first HDU only, plain FITS (``image/fits``); **200 with the body** ``None`` when it has none.

Faults are injected at run time (``inject`` and the helpers around it) so that tests, ``ztfd demo`` and
``bin/bench`` can make it slow, wrong or behind, and every request is logged (``requests``) so that tests can
count what a client really did. Run it standalone with ``python -m ztfd.embedded.alerce --port P``.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import logging
import random
import re
import threading
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ztfd.daemon import lifecycle
from ztfd.embedded.avro_samples import ztf_packet_bytes
from ztfd.embedded.lsst_samples import RubinAlert, object_alerts
from ztfd.embedded.net import QuietHTTPServer, free_port
from ztfd.embedded.samples import SamplePacket
from ztfd.embedded.samples import packets as sample_packets
from ztfd.sources import JD_MJD_OFFSET, STAMP_TYPES

log = logging.getLogger(__name__)

STAMP = "stamp"
AVRO = "avro"  # ALeRCE's /get_avro: the whole packet (logged apart, faulted like STAMP)
DETECTIONS = "detections"
LSST_STAMP = "lsst_stamp"  # ALeRCE's multisurvey /stamps_api/stamp
LSST_DETECTIONS = "lsst_detections"  # ALeRCE's multisurvey /lightcurve_api/detections
LASAIR_FITS = "lasair_fits"  # Lasair-LSST's /fits/<diaSourceId>_cutout<Type>/
STAMP_ENDPOINTS = (STAMP, AVRO, LSST_STAMP, LASAIR_FITS)
DETECTION_ENDPOINTS = (DETECTIONS, LSST_DETECTIONS)
# "not_found" is each service's own "I do not have it": ZTF 404, ALeRCE LSST 500, Lasair 200 with "None".
FAULT_KINDS = ("not_found", "server_error", "redirect", "garbage", "truncated", "slow", "unknown_object",
               "empty_detections", "oversized", "empty_body", "bomb", "huge_image")
BOMB_INFLATED_BYTES = 64 * 1024 * 1024  # a "bomb": the stamp followed by zeros, gzipped to about 65 kB
HUGE_IMAGE_SIDE = 4000  # a "huge_image": a valid gzipped FITS of 4000x4000 float32 (64 MB of pixels, ~60 kB)
OVERSIZED_BYTES = 20 * 1024 * 1024  # an "oversized" answer: chunked (no Content-Length), larger than any stamp
DETECTIONS_PREFIX = "/ztf/v1/objects/"
DETECTIONS_SUFFIX = "/detections"
LSST_DETECTIONS_PATH = "/lightcurve_api/detections"
LSST_STAMP_PATH = "/stamps_api/stamp"
LASAIR_FITS_PREFIX = "/fits/"
LSST_STAMP_TYPES = {"cutoutScience": "science", "cutoutTemplate": "template", "cutoutDifference": "difference"}
LASAIR_CUTOUT = re.compile(r"^(\d{1,19})_cutout(Science|Template|Difference)\Z")
ALERCE_LSST_ERROR = b'{"detail":"An error occurred"}'  # ALeRCE's answer to any exception, NoSuchKey included
LASAIR_MISSING = b"None"  # Django's HttpResponse(None): what Lasair serves for a cutout it does not have
FITS_BLOCK, FITS_CARD = 2880, 80
FITS_INTEGER_CARD = re.compile(rb"^(BITPIX|NAXIS\d*) *= *([+-]?\d+)")


@dataclass
class Fault:
    """One injected misbehaviour: applies to matching requests while ``remaining`` is not 0 (None: forever)."""

    kind: str
    remaining: int | None = 1
    endpoint: str | None = None  # STAMP, DETECTIONS or None for the kind's natural endpoint
    candid: int | None = None
    object_id: str | None = None
    stamp_type: str | None = None
    delay: float = 0.0  # for "slow": seconds before answering
    status: int = 503  # for "server_error"
    location: str = ""  # for "redirect": the base URL the request is sent on to (302, the same path and query)
    hits: int = 0

    def matches(self, endpoint: str, object_id: str | None, candid: int | None, stamp_type: str | None) -> bool:
        if self.remaining == 0 or (self.endpoint is not None and self.endpoint != endpoint):
            return False
        if self.candid is not None and self.candid != candid:
            return False
        if self.object_id is not None and self.object_id != object_id:
            return False
        return self.stamp_type is None or self.stamp_type == stamp_type


@dataclass(frozen=True)
class RequestRecord:
    at: float  # time.time() when the request arrived
    endpoint: str  # STAMP, DETECTIONS or "other"
    path: str
    object_id: str | None
    candid: int | None
    stamp_type: str | None
    status: int
    fault: str | None


@dataclass
class _Index:
    by_candid: dict[int, SamplePacket] = field(default_factory=dict)
    detections: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


@dataclass
class _LsstIndex:
    by_source: dict[int, RubinAlert] = field(default_factory=dict)  # diaSourceId -> alert with cutouts
    detections: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # diaObjectId -> LsstDetection rows
    served: dict[tuple[str, int, str], bytes] = field(default_factory=dict)  # (route, id, type) -> body, memoised


def _build_index(packets: Iterable[SamplePacket], include_previous: bool) -> _Index:
    index = _Index()
    for packet in packets:
        index.by_candid[packet.candid] = packet
    stamped = {candid for candid in index.by_candid}
    for packet in index.by_candid.values():
        rows = index.detections.setdefault(packet.object_id, [])
        rows.append(_detection(packet.object_id, packet.candid, packet.mjd, packet.fid, packet.magpsf, True))
        if include_previous:
            rows.extend(_previous_detections(packet, stamped))
    for object_id, rows in index.detections.items():
        unique = {row["candid"]: row for row in sorted(rows, key=lambda r: not r["has_stamp"])}
        index.detections[object_id] = sorted(unique.values(), key=lambda r: r["mjd"], reverse=True)
    return index


def _previous_detections(packet: SamplePacket, stamped: set[int]) -> list[dict[str, Any]]:
    """The packet's earlier detections (``prv_candidates`` with a candid): listed by ALeRCE without stamps."""
    import fastavro

    try:
        with packet.path.open("rb") as handle:
            record = next(iter(fastavro.reader(handle)))
    except (OSError, StopIteration, ValueError):
        return []
    rows = []
    for previous in record.get("prv_candidates") or []:
        candid, jd = previous.get("candid"), previous.get("jd")
        if candid is None or jd is None or int(candid) in stamped:
            continue
        rows.append(_detection(packet.object_id, int(candid), float(jd) - JD_MJD_OFFSET,
                               int(previous.get("fid") or 0), previous.get("magpsf"), False))
    return rows


def _detection(
    object_id: str, candid: int, mjd: float, fid: int, magpsf: float | None, has_stamp: bool
) -> dict[str, Any]:
    return {
        "tid": "ztf", "oid": object_id, "candid": str(candid), "mjd": mjd, "fid": fid, "pid": candid // 1000,
        "magpsf": magpsf, "has_stamp": has_stamp, "parent_candid": None, "corrected": False, "dubious": False,
    }


def _build_lsst_index(alerts: Iterable[RubinAlert], include_previous: bool) -> _LsstIndex:
    index = _LsstIndex()
    for alert in alerts:
        index.by_source[alert.dia_source_id] = alert
    for alert in index.by_source.values():
        if alert.dia_object_id is None:
            continue  # a solar-system source: ALeRCE lists detections by diaObject
        rows = index.detections.setdefault(alert.dia_object_id, [])
        rows.append(_lsst_detection(alert.record["diaSource"], alert.dia_object_id, alert.dia_source_id,
                                    alert.mjd_tai, True))
        if include_previous:
            rows.extend(
                _lsst_detection(row, alert.dia_object_id, int(row["diaSourceId"]), float(row["midpointMjdTai"]), False)
                for row in alert.record.get("prvDiaSources") or []
                if row.get("diaSourceId") and int(row["diaSourceId"]) not in index.by_source
            )
    for object_id, rows in index.detections.items():
        unique = {row["measurement_id"]: row for row in sorted(rows, key=lambda r: not r["has_stamp"])}
        index.detections[object_id] = sorted(unique.values(), key=lambda r: r["mjd"], reverse=True)
    return index


def _lsst_detection(source: dict[str, Any], object_id: int, source_id: int, mjd_tai: float,
                    has_stamp: bool) -> dict[str, Any]:
    """One ``LsstDetection`` as ALeRCE's multisurvey API lists it: ``mjd`` is ``midpointMjdTai`` copied, TAI."""
    bands = {"u": 0, "g": 1, "r": 2, "i": 3, "z": 4, "y": 5}  # ALeRCE's ingestion codes (do not trust "u")
    return {
        "oid": object_id, "measurement_id": source_id, "mjd": mjd_tai, "has_stamp": has_stamp,
        "band": bands.get(source.get("band") or "", -1), "visit": source.get("visit"),
        "detector": source.get("detector"), "diaObjectId": object_id, "parentDiaSourceId": None,
        "ssObjectId": None, "psfFlux": source.get("psfFlux"), "psfFluxErr": source.get("psfFluxErr"),
        "scienceFlux": source.get("scienceFlux"), "scienceFluxErr": source.get("scienceFluxErr"),
        "ra": source.get("ra"), "dec": source.get("dec"), "reliability": source.get("reliability"),
        "timeProcessedMjdTai": source.get("timeProcessedMjdTai"),
    }


def first_hdu(fits: bytes) -> bytes:
    """The primary header and data of a FITS file, nothing after: what Lasair-LSST keeps of a Rubin cutout
    (its ``trim_fits``), so the variance and PSF HDUs are dropped."""
    values: dict[str, int] = {}
    for start in range(0, len(fits) - FITS_CARD + 1, FITS_CARD):
        card = fits[start:start + FITS_CARD]
        if card.rstrip() == b"END":
            header = -(-(start + FITS_CARD) // FITS_BLOCK) * FITS_BLOCK
            pixels = 1
            for axis in range(1, values.get("NAXIS", 0) + 1):
                pixels *= values.get(f"NAXIS{axis}", 0)
            size = pixels * abs(values.get("BITPIX", 8)) // 8 if values.get("NAXIS") else 0
            return fits[:header + -(-size // FITS_BLOCK) * FITS_BLOCK]
        match = FITS_INTEGER_CARD.match(card)
        if match:
            values.setdefault(match.group(1).decode(), int(match.group(2)))
    raise ValueError("not FITS: no END card")


class StampService:
    """The service: ``start()``/``stop()`` or a ``with`` block; ``url`` serves as both ALeRCE base URLs."""

    def __init__(
        self,
        packets: Iterable[SamplePacket] | None = None,
        latency: float = 0.0,
        port: int | None = None,
        host: str = "127.0.0.1",
        include_previous: bool = True,
        seed: int = 0,
        lsst_alerts: Iterable[RubinAlert] | None = None,
    ) -> None:
        self.latency = latency
        self.error_rate = 0.0  # share of stamp requests answered 503 at random (see also ``inject``)
        self.host = host
        self.port = port or free_port()
        self._index = _build_index(sample_packets() if packets is None else packets, include_previous)
        self._lsst = _build_lsst_index(object_alerts() if lsst_alerts is None else lsst_alerts, include_previous)
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._log: list[RequestRecord] = []
        self._arrived = 0  # requests received, including those still being answered
        self._random = random.Random(seed)
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> StampService:
        handler = type("Handler", (_Handler,), {"service": self})
        self._server = QuietHTTPServer((self.host, self.port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._stopping.clear()
        self._thread = threading.Thread(target=self._server.serve_forever, name="stamp-service", daemon=True)
        self._thread.start()
        log.info("stamp service listening on %s (%d candids)", self.url, len(self._index.by_candid))
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()  # wakes requests held by latency or "slow" faults
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)
        self._server = self._thread = None

    def __enter__(self) -> StampService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what it serves --------------------------------------------------------------------------------------

    @property
    def candids(self) -> list[int]:
        return sorted(self._index.by_candid)

    def packet(self, candid: int) -> SamplePacket:
        return self._index.by_candid[candid]

    def detections(self, object_id: str) -> list[dict[str, Any]]:
        return [dict(row) for row in self._index.detections.get(object_id, [])]

    @property
    def dia_source_ids(self) -> list[int]:
        """The LSST alerts it has cutouts of."""
        return sorted(self._lsst.by_source)

    def lsst_alert(self, dia_source_id: int) -> RubinAlert:
        return self._lsst.by_source[dia_source_id]

    def lsst_detections(self, dia_object_id: int) -> list[dict[str, Any]]:
        return [dict(row) for row in self._lsst.detections.get(dia_object_id, [])]

    def alerce_lsst_stamp(self, dia_source_id: int, kind: str) -> bytes:
        """The body ALeRCE's multisurvey stamp route serves for this cutout: gzip of the whole Rubin FITS."""
        return self._served(LSST_STAMP, dia_source_id, kind)

    def lasair_lsst_stamp(self, dia_source_id: int, kind: str) -> bytes:
        """The body Lasair-LSST's /fits/ route serves for this cutout: its first HDU, plain FITS."""
        return self._served(LASAIR_FITS, dia_source_id, kind)

    def _served(self, route: str, dia_source_id: int, kind: str) -> bytes:
        key = (route, dia_source_id, kind)
        body = self._lsst.served.get(key)
        if body is None:  # made once per cutout (gzip without a timestamp: the same bytes every time)
            fits = self._lsst.by_source[dia_source_id].cutouts[kind]
            body = gzip.compress(fits, mtime=0) if route == LSST_STAMP else first_hdu(fits)
            self._lsst.served[key] = body
        return body

    # --- faults ----------------------------------------------------------------------------------------------

    def inject(self, kind: str, times: int | None = 1, **match: Any) -> Fault:
        """Add a fault of ``kind`` (one of FAULT_KINDS) for the next ``times`` matching requests (None: all).

        ``match`` narrows it: ``candid``, ``object_id``, ``stamp_type``, ``endpoint``; ``delay`` for "slow",
        ``status`` for "server_error". Faults are checked in the order they were added; one applies per request.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {', '.join(FAULT_KINDS)}")
        if kind in ("unknown_object", "empty_detections"):
            match.setdefault("endpoint", DETECTIONS)
        elif kind == "empty_body":
            match.setdefault("endpoint", LASAIR_FITS)
        elif kind != "slow":
            match.setdefault("endpoint", STAMP)
        fault = Fault(kind=kind, remaining=times, **match)
        with self._lock:
            self._faults.append(fault)
        return fault

    def not_found_then_available(self, times: int, candid: int | None = None, endpoint: str = STAMP) -> Fault:
        """Answer "not there" to the next ``times`` stamp requests (of ``candid``), then serve normally: ZTF's
        404, ALeRCE LSST's 500, Lasair's 200 with ``None`` (``endpoint`` STAMP, LSST_STAMP, LASAIR_FITS)."""
        return self.inject("not_found", times, candid=candid, endpoint=endpoint)

    def server_errors(self, times: int | None = 1, status: int = 503, candid: int | None = None,
                      endpoint: str = STAMP) -> Fault:
        return self.inject("server_error", times, status=status, candid=candid, endpoint=endpoint)

    def redirect(self, location: str, times: int | None = 1, candid: int | None = None,
                 endpoint: str = STAMP) -> Fault:
        """Answer 302 to ``location`` + the request's path and query (another service, another host)."""
        return self.inject("redirect", times, location=location.rstrip("/"), candid=candid, endpoint=endpoint)

    def garbage(self, times: int | None = 1, candid: int | None = None, endpoint: str = STAMP) -> Fault:
        return self.inject("garbage", times, candid=candid, endpoint=endpoint)

    def truncated(self, times: int | None = 1, candid: int | None = None, endpoint: str = STAMP) -> Fault:
        return self.inject("truncated", times, candid=candid, endpoint=endpoint)

    def slow(
        self, delay: float, times: int | None = 1, candid: int | None = None, endpoint: str | None = STAMP
    ) -> Fault:
        """Hold the next ``times`` matching responses for ``delay`` seconds (e.g. longer than the client timeout)."""
        return self.inject("slow", times, delay=delay, candid=candid, endpoint=endpoint)

    def unknown_object(self, object_id: str | None = None, times: int | None = None, empty: bool = False) -> Fault:
        """Pretend not to know the object yet: detections answer 404 (or ``[]`` with ``empty``)."""
        return self.inject("empty_detections" if empty else "unknown_object", times, object_id=object_id)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self.error_rate = 0.0

    def _take_fault(
        self, endpoint: str, object_id: str | None, candid: int | None, stamp_type: str | None
    ) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(endpoint, object_id, candid, stamp_type):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                    fault.hits += 1
                    return fault
            if endpoint in STAMP_ENDPOINTS and self.error_rate and self._random.random() < self.error_rate:
                return Fault("server_error", remaining=None, status=503)
        return None

    # --- request log -----------------------------------------------------------------------------------------

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._log.append(record)

    def requests(self, endpoint: str | None = None) -> list[RequestRecord]:
        with self._lock:
            return [r for r in self._log if endpoint is None or r.endpoint == endpoint]

    def count(self, endpoint: str | None = None, status: int | None = None, candid: int | None = None) -> int:
        return sum(
            1 for r in self.requests(endpoint)
            if (status is None or r.status == status) and (candid is None or r.candid == candid)
        )

    def arrivals(self) -> int:
        """Requests received so far, including those still held by latency or a "slow" fault."""
        with self._lock:
            return self._arrived

    def reset_log(self) -> None:
        with self._lock:
            self._log.clear()
            self._arrived = 0

    def _wait(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)


class _Handler(BaseHTTPRequestHandler):
    service: StampService
    protocol_version = "HTTP/1.1"  # keep-alive, as a real server behind a proxy would
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    server_version = "ztfd-stamp-service/1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        arrived = time.time()
        with self.service._lock:
            self.service._arrived += 1
        parts = urlsplit(self.path)
        if parts.path == "/get_stamp":
            self._get_stamp(arrived, parts.query)
        elif parts.path == "/get_avro":
            self._get_avro(arrived, parts.query)
        elif parts.path.startswith(DETECTIONS_PREFIX) and parts.path.endswith(DETECTIONS_SUFFIX):
            object_id = parts.path[len(DETECTIONS_PREFIX):-len(DETECTIONS_SUFFIX)]
            self._get_detections(arrived, object_id)
        elif parts.path == LSST_DETECTIONS_PATH:
            self._get_lsst_detections(arrived, parts.query)
        elif parts.path == LSST_STAMP_PATH:
            self._get_lsst_stamp(arrived, parts.query)
        elif parts.path.startswith(LASAIR_FITS_PREFIX):
            self._get_lasair_fits(arrived, parts.path, parts.query)
        else:
            self._respond(arrived, "other", 404, _json({"detail": "Not Found"}), "application/json")

    def _get_stamp(self, arrived: float, query: str) -> None:
        service = self.service
        params = {key: values[-1] for key, values in parse_qs(query).items()}
        object_id, stamp_type = params.get("oid"), params.get("type")
        try:
            candid = int(params["candid"])
        except (KeyError, ValueError):
            candid = None
        context = {"object_id": object_id, "candid": candid, "stamp_type": stamp_type}
        problems = []
        if candid is None:
            problems.append("candid: required integer")
        if stamp_type not in STAMP_TYPES:
            problems.append(f"type: one of {', '.join(STAMP_TYPES)}")
        if params.get("format") != "fits":
            problems.append("format: only fits is served here")
        if problems:
            body = _json({"errors": problems, "message": "Input payload validation failed"})
            self._respond(arrived, STAMP, 400, body, "application/json", **context)
            return
        fault = self._faulted(STAMP, object_id, candid, stamp_type)
        packet = service._index.by_candid.get(candid)  # type: ignore[arg-type]
        kind = fault.kind if fault is not None else None
        if kind == "redirect":
            self._redirect(arrived, STAMP, fault, context)  # type: ignore[arg-type]
        elif kind == "not_found" or packet is None:
            self._respond(arrived, STAMP, 404, _json({"message": "AVRO not found"}), "application/json",
                          fault=kind, **context)
        elif kind == "server_error":
            self._respond(arrived, STAMP, fault.status, b"<html><body>Service Unavailable</body></html>",  # type: ignore[union-attr]
                          "text/html", fault=kind, **context)
        elif kind == "oversized":
            self._respond_chunked(arrived, STAMP, packet.cutouts[stamp_type], fault=kind, **context)  # type: ignore[index]
        else:
            data = _damaged(packet.cutouts[stamp_type], kind)  # type: ignore[index]
            name = f"{packet.object_id}_{candid}_{stamp_type}.fits.gz"
            headers = {"Content-Disposition": f'attachment; filename="{name}"'}
            self._respond(arrived, STAMP, 200, data, "application/fits+gzip", fault=kind, headers=headers, **context)

    def _get_avro(self, arrived: float, query: str) -> None:
        service = self.service
        params = {key: values[-1] for key, values in parse_qs(query).items()}
        object_id = params.get("oid")
        try:
            candid: int | None = int(params["candid"])
        except (KeyError, ValueError):
            candid = None
        context = {"object_id": object_id, "candid": candid}
        if candid is None or not object_id:
            body = _json({"errors": ["oid and candid: required"], "message": "Input payload validation failed"})
            self._respond(arrived, AVRO, 400, body, "application/json", **context)
            return
        fault = self._faulted(STAMP, object_id, candid, None)
        kind = fault.kind if fault is not None else None
        packet = service._index.by_candid.get(candid)
        if kind == "redirect":
            self._redirect(arrived, AVRO, fault, context)  # type: ignore[arg-type]
        elif kind == "not_found" or packet is None:
            self._respond(arrived, AVRO, 404, _json({"message": "AVRO not found"}), "application/json",
                          fault=kind, **context)
        elif kind == "server_error":
            self._respond(arrived, AVRO, fault.status, b"<html><body>Service Unavailable</body></html>",  # type: ignore[union-attr]
                          "text/html", fault=kind, **context)
        else:
            data = ztf_packet_bytes(packet)
            data = data if kind in (None, "bomb", "huge_image", "oversized") else _damaged(data, kind)
            headers = {"Content-Disposition": f'attachment; filename="{candid}.avro"'}
            self._respond(arrived, AVRO, 200, data, "application/avro", fault=kind, headers=headers, **context)

    def _get_detections(self, arrived: float, object_id: str) -> None:
        service = self.service
        fault = self._faulted(DETECTIONS, object_id, None, None)
        kind = fault.kind if fault is not None else None
        rows = service._index.detections.get(object_id)
        if kind == "server_error":
            self._respond(arrived, DETECTIONS, fault.status, b"Service Unavailable", "text/plain",  # type: ignore[union-attr]
                          fault=kind, object_id=object_id)
        elif kind == "unknown_object" or rows is None:
            self._respond(arrived, DETECTIONS, 404, _json({"detail": "Object ID not found"}), "application/json",
                          fault=kind, object_id=object_id)
        elif kind == "garbage":
            self._respond(arrived, DETECTIONS, 200, b"[{not json", "application/json", fault=kind, object_id=object_id)
        else:
            body = _json([] if kind == "empty_detections" else rows)
            self._respond(arrived, DETECTIONS, 200, body, "application/json", fault=kind, object_id=object_id)

    def _faulted(self, endpoint: str, object_id: str | None, candid: int | None,
                 stamp_type: str | None) -> Fault | None:
        """After the service's latency, the fault for this request (a "slow" one already waited out)."""
        service = self.service
        service._wait(service.latency)
        fault = service._take_fault(endpoint, object_id, candid, stamp_type)
        if fault is not None and fault.kind == "slow":
            service._wait(fault.delay)
        return fault

    def _get_lsst_detections(self, arrived: float, query: str) -> None:
        params = parse_qs(query)
        object_ids = params.get("oid", [])
        context: dict[str, Any] = {"object_id": object_ids[0] if object_ids else None}
        if not params.get("survey_id") or not object_ids:
            body = _json({"detail": [{"type": "missing", "loc": ["query", "survey_id" if object_ids else "oid"]}]})
            self._respond(arrived, LSST_DETECTIONS, 422, body, "application/json", **context)
            return
        if params["survey_id"][-1] != "lsst":
            self._respond(arrived, LSST_DETECTIONS, 400, _json({"detail": "Incorrect survey identifier"}),
                          "application/json", **context)
            return
        fault = self._faulted(LSST_DETECTIONS, context["object_id"], None, None)
        kind = fault.kind if isinstance(fault, Fault) else None
        if kind == "server_error":
            self._respond(arrived, LSST_DETECTIONS, fault.status, ALERCE_LSST_ERROR, "application/json",  # type: ignore[union-attr]
                          fault=kind, **context)
        elif kind == "garbage":
            self._respond(arrived, LSST_DETECTIONS, 200, b"[{not json", "application/json", fault=kind, **context)
        else:
            rows: list[dict[str, Any]] = []
            if kind not in ("unknown_object", "empty_detections"):
                for object_id in object_ids:  # an unknown or malformed oid matches nothing: []
                    rows.extend(self.service._lsst.detections.get(int(object_id), []) if object_id.isdigit() else [])
            self._respond(arrived, LSST_DETECTIONS, 200, _json(rows), "application/json", fault=kind, **context)

    def _get_lsst_stamp(self, arrived: float, query: str) -> None:
        service = self.service
        params = {key: values[-1] for key, values in parse_qs(query).items()}
        missing = [name for name in ("oid", "measurement_id", "stamp_type", "file_format", "survey_id")
                   if not params.get(name)]
        object_id, stamp_type = params.get("oid"), LSST_STAMP_TYPES.get(params.get("stamp_type", ""))
        source_id = int(params["measurement_id"]) if params.get("measurement_id", "").isdigit() else None
        context: dict[str, Any] = {"object_id": object_id, "candid": source_id, "stamp_type": stamp_type}
        if missing:
            body = _json({"detail": [{"type": "missing", "loc": ["query", name]} for name in missing]})
            self._respond(arrived, LSST_STAMP, 422, body, "application/json", **context)
            return
        if params["survey_id"] != "lsst":
            body = _json({"detail": f"Incorrect survey identifier {params['survey_id']}"})
            self._respond(arrived, LSST_STAMP, 400, body, "application/json", **context)
            return
        fault = self._faulted(LSST_STAMP, object_id, source_id, stamp_type)
        kind = fault.kind if isinstance(fault, Fault) else None
        alert = service._lsst.by_source.get(source_id) if source_id is not None else None
        known = (alert is not None and str(alert.dia_object_id) == object_id and stamp_type is not None
                 and params["file_format"] == "fits")
        if kind == "server_error":  # a proxy's answer, before ALeRCE's own
            self._respond(arrived, LSST_STAMP, fault.status, b"<html><body>Bad Gateway</body></html>",  # type: ignore[union-attr]
                          "text/html", fault=kind, **context)
        elif kind == "not_found" or not known:  # ALeRCE's handler does not catch S3's NoSuchKey: a 500
            self._respond(arrived, LSST_STAMP, 500, ALERCE_LSST_ERROR, "application/json", fault=kind, **context)
        elif kind == "oversized":
            body = service.alerce_lsst_stamp(source_id, stamp_type)  # type: ignore[arg-type]
            self._respond_chunked(arrived, LSST_STAMP, body, "application/gzip", fault=kind, **context)
        else:
            compressed = params.get("is_compressed", "true").lower() != "false"
            data = (service.alerce_lsst_stamp(source_id, stamp_type) if compressed  # type: ignore[arg-type]
                    else alert.cutouts[stamp_type])  # type: ignore[union-attr,index]
            self._respond(arrived, LSST_STAMP, 200, _damaged(data, kind),
                          "application/gzip" if compressed else "application/fits", fault=kind, **context)

    def _get_lasair_fits(self, arrived: float, path: str, query: str) -> None:
        service = self.service
        name = path[len(LASAIR_FITS_PREFIX):]
        match = LASAIR_CUTOUT.match(name.rstrip("/"))
        source_id = int(match.group(1)) if match else None
        stamp_type = match.group(2).lower() if match else None
        context: dict[str, Any] = {"candid": source_id, "stamp_type": stamp_type}
        if match and not name.endswith("/"):  # Django's APPEND_SLASH: the URLs Lasair lists have no slash
            location = path + "/" + (f"?{query}" if query else "")
            self._respond(arrived, LASAIR_FITS, 301, b"", "text/html; charset=utf-8",
                          headers={"Location": location}, **context)
            return
        if match is None or name.count("/") != 1:
            self._respond(arrived, LASAIR_FITS, 404, b"<h1>Not Found</h1>", "text/html", **context)
            return
        fault = self._faulted(LASAIR_FITS, None, source_id, stamp_type)
        kind = fault.kind if isinstance(fault, Fault) else None
        have = source_id in service._lsst.by_source
        if kind == "server_error":
            self._respond(arrived, LASAIR_FITS, fault.status, b"<html><body>Bad Gateway</body></html>",  # type: ignore[union-attr]
                          "text/html", fault=kind, **context)
        elif kind in ("not_found", "empty_body") or not have:  # Lasair answers 200 all the same
            body = b"" if kind == "empty_body" else LASAIR_MISSING
            self._respond(arrived, LASAIR_FITS, 200, body, "text/html; charset=utf-8", fault=kind, **context)
        elif kind == "oversized":
            body = service.lasair_lsst_stamp(source_id, stamp_type)  # type: ignore[arg-type]
            self._respond_chunked(arrived, LASAIR_FITS, body, "image/fits", fault=kind, **context)
        else:
            data = service.lasair_lsst_stamp(source_id, stamp_type)  # type: ignore[arg-type]
            headers = {"Content-Disposition": f'attachment; filename="{name.rstrip("/")}.fits"'}
            self._respond(arrived, LASAIR_FITS, 200, _damaged(data, kind), "image/fits", fault=kind,
                          headers=headers, **context)

    def _redirect(self, arrived: float, endpoint: str, fault: Fault, context: dict[str, Any]) -> None:
        self._respond(arrived, endpoint, 302, b"", "text/plain", fault="redirect",
                      headers={"Location": fault.location + self.path}, **context)

    def _respond(
        self,
        arrived: float,
        endpoint: str,
        status: int,
        body: bytes,
        content_type: str,
        fault: str | None = None,
        headers: dict[str, str] | None = None,
        object_id: str | None = None,
        candid: int | None = None,
        stamp_type: str | None = None,
    ) -> None:
        record = RequestRecord(arrived, endpoint, self.path, object_id, candid, stamp_type, status, fault)
        self.service._record(record)
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (its timeout); nothing to do


    def _respond_chunked(self, arrived: float, endpoint: str, data: bytes, content_type: str = "application/fits+gzip",
                         fault: str | None = None, object_id: str | None = None, candid: int | None = None,
                         stamp_type: str | None = None) -> None:
        """A 200 without Content-Length (chunked) repeating ``data`` to OVERSIZED_BYTES: a body to be capped."""
        self.service._record(RequestRecord(arrived, endpoint, self.path, object_id, candid, stamp_type, 200, fault))
        self.close_connection = True
        try:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            block = (data * (1 + (1 << 20) // max(len(data), 1)))[: 1 << 20]
            for _ in range(OVERSIZED_BYTES // len(block) + 1):
                self.wfile.write(f"{len(block):x}\r\n".encode() + block + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading at its cap


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _damaged(data: bytes, fault: str | None) -> bytes:
    """A served body as a "garbage", "truncated", "bomb" or "huge_image" fault makes it (or unchanged)."""
    if fault == "garbage":
        return b"<html>oops, not a stamp</html>" + bytes(64)
    if fault == "truncated":
        return data[: len(data) // 2]
    if fault == "bomb":
        return _bomb(data)
    if fault == "huge_image":
        return _huge_image()
    return data


@functools.lru_cache(maxsize=8)
def _bomb(stamp: bytes) -> bytes:
    return _gzipped(gzip.decompress(stamp), BOMB_INFLATED_BYTES)


def _gzipped(head: bytes, zeros: int) -> bytes:
    """gzip of ``head`` followed by ``zeros`` zero bytes, compressed a block at a time (never all in memory)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [packer.compress(head)]
    block = bytes(1 << 20)
    for start in range(0, zeros, len(block)):
        parts.append(packer.compress(block[: zeros - start]))
    parts.append(packer.flush())
    return b"".join(parts)


@functools.lru_cache(maxsize=1)
def _huge_image() -> bytes:
    side = HUGE_IMAGE_SIDE
    cards = ["SIMPLE  =                    T", "BITPIX  =                  -32", "NAXIS   =                    2",
             f"NAXIS1  = {side:20d}", f"NAXIS2  = {side:20d}", "END"]
    header = "".join(card.ljust(80) for card in cards).encode()
    header += b" " * (-len(header) % 2880)
    pixels = side * side * 4
    return _gzipped(header, pixels + (-pixels % 2880))


def main(argv: list[str] | None = None) -> int:
    """Run the service in the foreground until SIGINT/SIGTERM (for ``ztfd demo``, ``bin/bench``, a terminal)."""
    parser = argparse.ArgumentParser(prog="python -m ztfd.embedded.alerce", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every answer")
    parser.add_argument("--error-rate", type=float, default=0.0, help="share of stamp requests answered 503")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = StampService(latency=args.latency, port=args.port or None)
    service.error_rate = args.error_rate
    with lifecycle.stop_on_signals() as stop, service:
        print(service.url, flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
