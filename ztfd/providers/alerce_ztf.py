"""ALeRCE's ZTF stamps (``stamps.ztf_provider = "alerce"``): the three cutouts of a ZTF alert's detection.

- Lasair messages carry no candid, so the detection comes from ALeRCE's detections list
  (``GET {alerce_api_url}/ztf/v1/objects/<oid>/detections``): the one with stamps whose MJD is closest to the
  alert's observation time, within ``stamps.match_tolerance`` seconds; the newest with stamps when the alert has
  no time. An object ALeRCE does not know yet, nothing near the alert's time, or a 404 for a listed candid means
  *not yet available* (``NotYetAvailableError``), not a failure.
- each stamp is ``GET {alerce_stamp_url}/get_stamp?oid=&candid=&type=&format=fits``: the alert packet's gzipped
  FITS, kept byte for byte as ``<candid>_<type>.fits.gz`` if it is gzip and holds a 2-D image within the caps
  (``stamps.max_stamp_bytes`` decompressed, ``stamps.max_stamp_side`` pixels a side; see ``ztfd.stampimage``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ztfd.config import StampsConfig
from ztfd.providers import Detection, FetchError, HttpGet, NotYetAvailableError, StampRequest, register
from ztfd.sources import ZTF, Alert
from ztfd.sources.lasair import is_ztf_object_id
from ztfd.stampimage import GZIP_MAGIC, StampLimits, read_image

DETECTIONS_PATH = "/ztf/v1/objects/{oid}/detections"
STAMP_PATH = "/get_stamp"


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
        raise FetchError(f"detections: not JSON ({exc.__class__.__name__})") from None
    if isinstance(rows, dict) and isinstance(rows.get("items"), list):  # a paginated shape, should ALeRCE use one
        rows = rows["items"]
    if not isinstance(rows, list):
        raise FetchError("detections: not a JSON list")
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


@register("alerce")
class AlerceZtf:
    """ALeRCE's ZTF services: the detections list and ``get_stamp``."""

    name = "alerce"
    survey = ZTF
    service = "ALeRCE"

    def __init__(self, settings: StampsConfig) -> None:
        self.api_url = settings.alerce_api_url.rstrip("/")
        self.stamp_url = settings.alerce_stamp_url.rstrip("/")
        self.tolerance = settings.match_tolerance
        self.limits = StampLimits(settings.max_stamp_bytes, settings.max_stamp_side)

    def serves(self, alert: Alert) -> bool:
        """ZTF objects (``ZTF`` + 2 digits + 7 letters) only: ALeRCE knows no other names."""
        return is_ztf_object_id(alert.object_id)

    async def find_detection(self, get: HttpGet, request: StampRequest) -> Detection:
        status, body = await get(self.api_url + DETECTIONS_PATH.format(oid=request.object_id), None)
        if status == 404:
            raise NotYetAvailableError("ALeRCE does not know the object yet (detections: 404)")
        if status != 200:
            raise FetchError(f"detections: HTTP {status}")
        chosen = choose_candid(parse_detections(body), request.obs_mjd, self.tolerance)
        return Detection(str(chosen.candid), chosen.mjd)

    async def fetch(self, get: HttpGet, request: StampRequest, detection: Detection, kind: str) -> bytes:
        params = {"oid": request.object_id, "candid": detection.detection_id, "type": kind, "format": "fits"}
        status, body = await get(self.stamp_url + STAMP_PATH, params)
        if status == 404:
            raise NotYetAvailableError(f"{kind} stamp of listed candid {detection.detection_id}: HTTP 404")
        if status != 200:
            raise FetchError(f"{kind} stamp: HTTP {status}")
        return body

    def check(self, data: bytes) -> Any:
        if not data.startswith(GZIP_MAGIC):
            raise ValueError(f"not gzip (starts with {data[:8]!r})")
        return read_image(data, self.limits)

    def file_name(self, detection_id: str, kind: str) -> str:
        return f"{detection_id}_{kind}.fits.gz"
