"""An ALeRCE-like stamp service on 127.0.0.1 that serves the real cutouts of the sample packets, with faults.

It answers the two routes ztfd uses, the way ALeRCE's services do (see README "Stamps"):

- ``GET /get_stamp?oid=&candid=&type=science|template|difference&format=fits`` -> the packet's ``stampData``
  bytes unchanged (gzipped FITS, ``application/fits+gzip``); 404 with a JSON body for an unknown candid; 400 for
  missing or bad parameters (like the Flask service's ``validate=True``).
- ``GET /ztf/v1/objects/<oid>/detections`` -> a JSON list of detections (``candid`` as a string, ``mjd``,
  ``fid``, ``has_stamp`` …): one per packet of the object (``has_stamp`` true) plus the packet's earlier
  detections from ``prv_candidates`` (``has_stamp`` false); 404 for an unknown object.

Faults are injected at run time (``inject`` and the helpers around it) so that tests, ``ztfd demo`` and
``bin/bench`` can make it slow, wrong or behind, and every request is logged (``requests``) so that tests can
count what a client really did. Run it standalone with ``python -m ztfd.embedded.alerce --port P``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ztfd import lifecycle
from ztfd.embedded.net import free_port
from ztfd.embedded.samples import SamplePacket
from ztfd.embedded.samples import packets as sample_packets
from ztfd.sources import JD_MJD_OFFSET, STAMP_TYPES

log = logging.getLogger(__name__)

STAMP = "stamp"
DETECTIONS = "detections"
FAULT_KINDS = ("not_found", "server_error", "garbage", "truncated", "slow", "unknown_object", "empty_detections",
               "oversized")
OVERSIZED_BYTES = 20 * 1024 * 1024  # an "oversized" answer: chunked (no Content-Length), larger than any stamp
DETECTIONS_PREFIX = "/ztf/v1/objects/"
DETECTIONS_SUFFIX = "/detections"


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
    ) -> None:
        self.latency = latency
        self.error_rate = 0.0  # share of stamp requests answered 503 at random (see also ``inject``)
        self.host = host
        self.port = port or free_port()
        self._index = _build_index(sample_packets() if packets is None else packets, include_previous)
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
        self._server = ThreadingHTTPServer((self.host, self.port), handler)
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
        elif kind != "slow":
            match.setdefault("endpoint", STAMP)
        fault = Fault(kind=kind, remaining=times, **match)
        with self._lock:
            self._faults.append(fault)
        return fault

    def not_found_then_available(self, times: int, candid: int | None = None) -> Fault:
        """Answer 404 to the next ``times`` stamp requests (of ``candid``), then serve normally."""
        return self.inject("not_found", times, candid=candid)

    def server_errors(self, times: int | None = 1, status: int = 503, candid: int | None = None) -> Fault:
        return self.inject("server_error", times, status=status, candid=candid)

    def garbage(self, times: int | None = 1, candid: int | None = None) -> Fault:
        return self.inject("garbage", times, candid=candid)

    def truncated(self, times: int | None = 1, candid: int | None = None) -> Fault:
        return self.inject("truncated", times, candid=candid)

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
            if endpoint == STAMP and self.error_rate and self._random.random() < self.error_rate:
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
        elif parts.path.startswith(DETECTIONS_PREFIX) and parts.path.endswith(DETECTIONS_SUFFIX):
            object_id = parts.path[len(DETECTIONS_PREFIX):-len(DETECTIONS_SUFFIX)]
            self._get_detections(arrived, object_id)
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
        service._wait(service.latency)
        fault = service._take_fault(STAMP, object_id, candid, stamp_type)
        packet = service._index.by_candid.get(candid)  # type: ignore[arg-type]
        if fault is not None and fault.kind == "slow":
            service._wait(fault.delay)
        kind = fault.kind if fault is not None else None
        if kind == "not_found" or packet is None:
            self._respond(arrived, STAMP, 404, _json({"message": "AVRO not found"}), "application/json",
                          fault=kind, **context)
        elif kind == "server_error":
            self._respond(arrived, STAMP, fault.status, b"<html><body>Service Unavailable</body></html>",  # type: ignore[union-attr]
                          "text/html", fault=kind, **context)
        elif kind == "oversized":
            self._respond_chunked(arrived, STAMP, packet.cutouts[stamp_type], fault=kind, **context)  # type: ignore[index]
        else:
            data = packet.cutouts[stamp_type]  # type: ignore[index]
            if kind == "garbage":
                data = b"<html>oops, not a stamp</html>" + bytes(64)
            elif kind == "truncated":
                data = data[: len(data) // 2]
            name = f"{packet.object_id}_{candid}_{stamp_type}.fits.gz"
            headers = {"Content-Disposition": f'attachment; filename="{name}"'}
            self._respond(arrived, STAMP, 200, data, "application/fits+gzip", fault=kind, headers=headers, **context)

    def _get_detections(self, arrived: float, object_id: str) -> None:
        service = self.service
        service._wait(service.latency)
        fault = service._take_fault(DETECTIONS, object_id, None, None)
        if fault is not None and fault.kind == "slow":
            service._wait(fault.delay)
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


    def _respond_chunked(self, arrived: float, endpoint: str, data: bytes, fault: str | None = None,
                         object_id: str | None = None, candid: int | None = None,
                         stamp_type: str | None = None) -> None:
        """A 200 without Content-Length (chunked) repeating ``data`` to OVERSIZED_BYTES: a body to be capped."""
        self.service._record(RequestRecord(arrived, endpoint, self.path, object_id, candid, stamp_type, 200, fault))
        self.close_connection = True
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/fits+gzip")
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
