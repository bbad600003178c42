"""ALeRCE's LSST stamps (``stamps.lsst_provider = "alerce"``): the three Rubin cutouts of an LSST alert.

- The detection is the triggering diaSource. Lasair's full output names it (``Alert.detection_id``); otherwise it
  comes from ALeRCE's multisurvey detections (``GET {alerce_lsst_url}/lightcurve_api/detections?survey_id=lsst
  &oid=<diaObjectId>``): the ``measurement_id`` (= diaSourceId) with ``has_stamp`` whose ``mjd`` is closest to the
  alert's observation time, within ``stamps.match_tolerance`` seconds. ALeRCE copies Rubin's ``midpointMjdTai``
  into ``mjd`` unconverted, so it is **TAI**: converted to UTC with astropy before comparing. An object ALeRCE
  does not know answers ``[]``: not yet available.
- Each stamp is ``GET {alerce_lsst_url}/stamps_api/stamp?oid=&measurement_id=&stamp_type=cutoutScience|
  cutoutTemplate|cutoutDifference&file_format=fits&survey_id=lsst``: gzip of Rubin's three-HDU cutout (image,
  variance, PSF), kept byte for byte as ``<diaSourceId>_<type>.fits.gz``. ALeRCE answers **500** when it has not
  stored the alert (its handler does not catch S3's NoSuchKey), so a 500 is *not yet available*, with the slow
  backoff and the give-up; any other 5xx is a failed attempt.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

from ztfd.config import StampsConfig
from ztfd.sources import LSST
from ztfd.stamps.providers import Detection, FetchError, HttpGet, NotYetAvailableError, StampRequest, register
from ztfd.stamps.providers.alerce_ztf import Listed, choose_candid
from ztfd.stamps.stampimage import GZIP_MAGIC, StampLimits, read_image
from ztfd.store.states import FailureClass

DETECTIONS_PATH = "/lightcurve_api/detections"
STAMP_PATH = "/stamps_api/stamp"
CUTOUT_NAMES = {"science": "cutoutScience", "template": "cutoutTemplate", "difference": "cutoutDifference"}
NOT_STORED = 500  # ALeRCE's answer for an alert it has no stamps of
INT64_LIMIT = 2**63


def parse_detections(body: bytes) -> list[Listed]:
    """ALeRCE's LSST detections as ``Listed`` rows (``candid`` = measurement_id, ``mjd`` converted to UTC).

    Rows without a usable id, time or ``has_stamp`` are skipped: ids must be JSON integers (Python's json keeps
    them exact; a float could not hold a Rubin id)."""
    try:
        rows = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FetchError(f"detections: not JSON ({exc.__class__.__name__})", FailureClass.BAD_BODY) from None
    if not isinstance(rows, list):
        raise FetchError("detections: not a JSON list", FailureClass.BAD_BODY)
    usable = []
    for row in rows:
        if not isinstance(row, dict):
            continue
        source_id, mjd = row.get("measurement_id"), row.get("mjd")
        if (isinstance(source_id, int) and not isinstance(source_id, bool) and 0 < source_id < INT64_LIMIT
                and isinstance(mjd, int | float) and not isinstance(mjd, bool) and 15020 < mjd < 88069):
            usable.append((source_id, float(mjd), row.get("has_stamp") is True))
    if not usable:
        return []
    from astropy.time import Time

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ERFA "dubious year"; the leap-second table's age
        utc = Time([mjd for _, mjd, _ in usable], format="mjd", scale="tai").utc.mjd
    return [Listed(source_id, float(mjd), stamped) for (source_id, _, stamped), mjd in zip(usable, utc, strict=True)]


@register("alerce")
class AlerceLsst:
    """ALeRCE's multisurvey API for Rubin: detections and stamps."""

    name = "alerce"
    survey = LSST
    detection_label = "diaSourceId"
    service = "ALeRCE"

    def __init__(self, settings: StampsConfig) -> None:
        self.url = settings.alerce_lsst_url.rstrip("/")
        self.tolerance = settings.match_tolerance
        self.limits = StampLimits(settings.max_stamp_bytes, settings.max_stamp_side)

    def serves(self, alert: Any) -> bool:
        """Every Lasair-LSST alert: it names its diaObject (Lasair sends none without one)."""
        return True

    async def find_detection(self, get: HttpGet, request: StampRequest) -> Detection:
        status, body = await get(self.url + DETECTIONS_PATH, {"survey_id": "lsst", "oid": request.object_id})
        if status != 200:
            raise FetchError(f"LSST detections: HTTP {status}", FailureClass.HTTP)
        chosen = choose_candid(parse_detections(body), request.obs_mjd, self.tolerance)
        return Detection(str(chosen.candid), chosen.mjd)

    async def fetch(self, get: HttpGet, request: StampRequest, detection: Detection, kind: str) -> bytes:
        params = {"oid": request.object_id, "measurement_id": detection.detection_id,
                  "stamp_type": CUTOUT_NAMES[kind], "file_format": "fits", "survey_id": "lsst"}
        status, body = await get(self.url + STAMP_PATH, params)
        if status == NOT_STORED:
            raise NotYetAvailableError(f"{kind} stamp of diaSource {detection.detection_id}: HTTP 500 (not stored)")
        if status != 200:
            raise FetchError(f"{kind} stamp: HTTP {status}", FailureClass.HTTP)
        return body

    def check(self, data: bytes) -> Any:
        if not data.startswith(GZIP_MAGIC):
            raise ValueError(f"not gzip (starts with {data[:8]!r})")
        return read_image(data, self.limits)

    def file_name(self, detection_id: str, kind: str) -> str:
        return f"{detection_id}_{kind}.fits.gz"
