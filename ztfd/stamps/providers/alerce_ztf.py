"""ALeRCE's ZTF stamps (``stamps.ztf_provider = "alerce"``): the three cutouts of a ZTF alert's detection.

- Lasair messages carry no candid, so the detection comes from ALeRCE's detections list
  (``GET {alerce_api_url}/ztf/v1/objects/<oid>/detections``): the one with stamps whose MJD is closest to the
  alert's observation time, within ``stamps.match_tolerance`` seconds; the newest with stamps when the alert has
  no time. An object ALeRCE does not know yet, nothing near the alert's time, or a 404 for a listed candid means
  *not yet available* (``NotYetAvailableError``), not a failure.
  One detections response serves every job of the object: the fetcher keeps it in the store for
  ``stamps.detections_fresh`` seconds for the whole pool (``ztfd.store.detection_lists``), and concurrent jobs of
  one fetcher share one request (both off when that is 0).
- ``stamps.ztf_request = "get_avro"`` (the default): ``GET {alerce_stamp_url}/get_avro?oid=&candid=`` serves the
  whole alert packet, whose three cutouts are the stamps (one request instead of three), and the packet is kept
  beside them as ``<candid>.avro`` (decoded within the bounds of ``ztfd.sources.avro_bounds``, on a thread of its
  own within ``stamps.step_timeout``: never on the worker's event loop).
  ``"get_stamp"``: ``GET {alerce_stamp_url}/get_stamp?oid=&candid=&type=&format=fits`` per stamp.
  Either way a stamp is the packet's gzipped FITS, kept byte for byte as ``<candid>_<type>.fits.gz`` if it is
  gzip and holds a 2-D image within the caps (``stamps.max_stamp_bytes`` decompressed, ``stamps.max_stamp_side``
  pixels a side; see ``ztfd.stamps.stampimage``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from ztfd.config import StampsConfig
from ztfd.reporting.lightcurve import MAG, alerce_points
from ztfd.sources import ZTF, Alert, InvalidMessageError
from ztfd.sources.avro import ContainerReader
from ztfd.sources.lasair import is_ztf_object_id
from ztfd.sources.packets import CUTOUT_FIELDS
from ztfd.stamps.providers import (
    Bundle,
    Detection,
    DetectionsCache,
    FetchError,
    HttpGet,
    NotYetAvailableError,
    StampRequest,
    register,
)
from ztfd.stamps.stampimage import StampLimits, read_gzipped_image
from ztfd.store.states import FailureClass

DETECTIONS_PATH = "/ztf/v1/objects/{oid}/detections"
STAMP_PATH = "/get_stamp"
AVRO_PATH = "/get_avro"
T = TypeVar("T")


@dataclass(frozen=True)
class Listed:
    """One row of ALeRCE's detections list."""

    candid: int
    mjd: float
    has_stamp: bool


def parse_detections(body: bytes) -> list[Listed]:
    """ALeRCE's detections JSON as ``Listed`` rows; rows without a usable candid or mjd are skipped."""
    try:
        rows = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FetchError(f"detections: not JSON ({exc.__class__.__name__})", FailureClass.BAD_BODY) from None
    if isinstance(rows, dict) and isinstance(rows.get("items"), list):  # a paginated shape, should ALeRCE use one
        rows = rows["items"]
    if not isinstance(rows, list):
        raise FetchError("detections: not a JSON list", FailureClass.BAD_BODY)
    found = []
    for row in rows:
        if not isinstance(row, dict):
            continue
        try:
            found.append(Listed(int(row["candid"]), float(row["mjd"]), bool(row.get("has_stamp"))))
        except (KeyError, TypeError, ValueError):
            continue
    return found


def choose_candid(detections: Iterable[Listed], obs_mjd: float | None, tolerance_seconds: float) -> Listed:
    """The detection whose stamps belong to the alert, or ``NotYetAvailableError``.

    ALeRCE's own client takes the *oldest* detection with stamps, which is the wrong one for a new alert.
    """
    stamped = [d for d in detections if d.has_stamp]
    if not stamped:
        raise NotYetAvailableError("ALeRCE lists no detection with stamps for this object")
    if obs_mjd is None:
        return max(stamped, key=lambda d: (d.mjd, d.candid))
    nearest = min(stamped, key=lambda d: (abs(d.mjd - obs_mjd), -d.candid))
    if abs(nearest.mjd - obs_mjd) * 86400.0 <= tolerance_seconds:
        return nearest
    raise NotYetAvailableError(
        f"no detection with stamps within {tolerance_seconds:g}s of MJD {obs_mjd:.5f} "
        f"(nearest MJD {nearest.mjd:.5f})"
    )


async def off_the_loop(timeout: float, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a daemon thread of its own, awaited for at most ``timeout`` seconds (``TimeoutError``). A
    call that outlasts it is left behind: it holds neither the loop nor the process's exit."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if done.done():  # abandoned after its timeout
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def call() -> None:
        try:
            result, error = fn(*args), None
        except Exception as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=call, name="get_avro-decode", daemon=True).start()
    return await asyncio.wait_for(done, timeout)


def packet_stamps(reader: ContainerReader, body: bytes, candid: str, kinds: list[str]) -> dict[str, bytes]:
    """The stamps of ``kinds`` a ``get_avro`` answer carries, by kind (within the bounds of
    ``ztfd.sources.avro_bounds``); ``FetchError`` when it is not the one packet of ``candid``."""
    try:
        records = reader.read(body)
    except InvalidMessageError as exc:
        raise FetchError(f"get_avro: {exc}", FailureClass.BAD_BODY) from None
    if len(records) != 1 or str(records[0].get("candid")) != candid:
        served = [r.get("candid") for r in records][:3]
        raise FetchError(f"get_avro served candid {served} for {candid}", FailureClass.BAD_BODY)
    stamps = {}
    for kind in kinds:
        cutout = records[0].get(CUTOUT_FIELDS[kind])
        if isinstance(cutout, dict) and isinstance(cutout.get("stampData"), bytes):
            stamps[kind] = cutout["stampData"]
    return stamps


@register("alerce")
class AlerceZtf:
    """ALeRCE's ZTF services: the detections list and ``get_stamp``."""

    name = "alerce"
    survey = ZTF
    service = "ALeRCE"
    detection_label = "candid"

    cache: DetectionsCache | None = None  # the pool's detections lists, set by the fetcher

    def __init__(self, settings: StampsConfig) -> None:
        self.api_url = settings.alerce_api_url.rstrip("/")
        self.stamp_url = settings.alerce_stamp_url.rstrip("/")
        self.tolerance = settings.match_tolerance
        self.limits = StampLimits(settings.max_stamp_bytes, settings.max_stamp_side)
        self.packets = ContainerReader()
        self.step_timeout = settings.step_timeout
        self._lookups: dict[str, asyncio.Future[tuple[bytes, bool]]] = {}  # object id -> its look in flight
        if settings.ztf_request.lower() == "get_avro":  # the fetcher then takes one slot for all three stamps
            self.fetch_together = self.fetch_packet

    def serves(self, alert: Alert) -> bool:
        """ZTF objects (``ZTF`` + 2 digits + 7 letters) only: ALeRCE knows no other names."""
        return is_ztf_object_id(alert.object_id)

    async def find_detection(self, get: HttpGet, request: StampRequest) -> Detection:
        """The detection nearest the alert's time, from the object's detections list: the pool's copy when one
        is fresh (a catch-up queues several alerts per object), else one request, shared by this fetcher's jobs of
        the same object. A kept list without a match may predate the alert: then it is fetched again, once."""
        body, kept = await self._detections(get, request.object_id, use_kept=True)
        try:
            chosen = choose_candid(parse_detections(body), request.obs_mjd, self.tolerance)
        except NotYetAvailableError:
            if not kept:
                raise
            body, _ = await self._detections(get, request.object_id, use_kept=False)
            chosen = choose_candid(parse_detections(body), request.obs_mjd, self.tolerance)
        return Detection(str(chosen.candid), chosen.mjd, tuple(alerce_points(body)), MAG)

    async def _detections(self, get: HttpGet, object_id: str, use_kept: bool) -> tuple[bytes, bool]:
        """The object's detections body, and whether it is the pool's kept copy. Concurrent jobs of the object in
        this fetcher share one look (the kept copy, else one request)."""
        if self.cache is None or not use_kept:
            return await self._fetch_detections(get, object_id), False
        lookup = self._lookups.get(object_id)
        if lookup is None:
            lookup = asyncio.ensure_future(self._kept_or_fetched(get, object_id))
            self._lookups[object_id] = lookup
            lookup.add_done_callback(lambda _done: self._lookups.pop(object_id, None))
        return await asyncio.shield(lookup)

    async def _kept_or_fetched(self, get: HttpGet, object_id: str) -> tuple[bytes, bool]:
        assert self.cache is not None
        kept = await self.cache.get(object_id)
        if kept is not None:
            return kept, True
        return await self._fetch_detections(get, object_id), False

    async def _fetch_detections(self, get: HttpGet, object_id: str) -> bytes:
        status, body = await get(self.api_url + DETECTIONS_PATH.format(oid=object_id), None)
        if status == 404:
            raise NotYetAvailableError("ALeRCE does not know the object yet (detections: 404)")
        if status != 200:
            raise FetchError(f"detections: HTTP {status}", FailureClass.HTTP)
        if self.cache is not None:
            await self.cache.put(object_id, body)
        return body

    async def fetch_packet(self, get: HttpGet, request: StampRequest, detection: Detection,
                           kinds: list[str]) -> Bundle:
        """``get_avro``: the whole alert packet in one request; its cutouts are the stamps (the same bytes
        ``get_stamp`` serves), and the packet is kept beside them as ``<candid>.avro``."""
        candid = detection.detection_id
        status, body = await get(self.stamp_url + AVRO_PATH, {"oid": request.object_id, "candid": candid})
        if status == 404:
            raise NotYetAvailableError(f"packet of listed candid {candid}: HTTP 404")
        if status != 200:
            raise FetchError(f"get_avro: HTTP {status}", FailureClass.HTTP)
        # Decoding a packet is CPU work on bytes from outside: off the event loop, within the step timeout.
        try:
            stamps = await off_the_loop(self.step_timeout, packet_stamps, self.packets, body, candid, kinds)
        except TimeoutError:
            raise FetchError(f"get_avro: the packet took more than {self.step_timeout:g}s to decode "
                             "(stamps.step_timeout)", FailureClass.TIMEOUT) from None
        return Bundle(stamps, {f"{candid}.avro": body})

    async def fetch(self, get: HttpGet, request: StampRequest, detection: Detection, kind: str) -> bytes:
        params = {"oid": request.object_id, "candid": detection.detection_id, "type": kind, "format": "fits"}
        status, body = await get(self.stamp_url + STAMP_PATH, params)
        if status == 404:
            raise NotYetAvailableError(f"{kind} stamp of listed candid {detection.detection_id}: HTTP 404")
        if status != 200:
            raise FetchError(f"{kind} stamp: HTTP {status}", FailureClass.HTTP)
        return body

    def check(self, data: bytes) -> Any:
        return read_gzipped_image(data, self.limits)

    def file_name(self, detection_id: str, kind: str) -> str:
        return f"{detection_id}_{kind}.fits.gz"
