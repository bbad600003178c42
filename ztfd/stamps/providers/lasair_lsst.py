"""Lasair-LSST's cutouts (``stamps.lsst_provider = "lasair"``): the first HDU of each Rubin cutout, plain FITS.

- The detection is needed by id: Lasair's full output names it; otherwise ALeRCE's multisurvey detections choose
  it, exactly as for the ``alerce`` provider (Lasair's own object API needs a token and is throttled).
- Each stamp is ``GET {lasair_lsst_url}/fits/<diaSourceId>_cutout<Science|Template|Difference>/`` (redirects
  followed: the URLs Lasair lists lack the slash and Django redirects them). Lasair keeps only the cutouts of
  each alert's newest diaSource, trimmed to the image HDU, uncompressed: kept byte for byte as
  ``<diaSourceId>_<type>.fits``.
- Lasair answers 200 whatever happens: a cutout it does not have is the body ``None``, a database error an empty
  body. Any body that is not FITS (does not start with ``SIMPLE  =``) is therefore *not yet available*, not a
  failure; a FITS body that does not hold a 2-D image within the caps is a failed attempt.
"""

from __future__ import annotations

from typing import Any

from ztfd.config import StampsConfig
from ztfd.sources import LSST
from ztfd.stamps.providers import Detection, FetchError, HttpGet, NotYetAvailableError, StampRequest, register
from ztfd.stamps.providers.alerce_lsst import AlerceLsst
from ztfd.stamps.stampimage import StampLimits, read_image
from ztfd.store.states import FailureClass

FITS_MAGIC = b"SIMPLE  ="
CUTOUT_TYPES = {"science": "Science", "template": "Template", "difference": "Difference"}


@register("lasair")
class LasairLsst:
    """Lasair-LSST's ``/fits/`` pages, with ALeRCE's detections when the message did not name the diaSource."""

    name = "lasair"
    survey = LSST
    detection_label = "diaSourceId"
    service = "Lasair"

    def __init__(self, settings: StampsConfig) -> None:
        self.url = settings.lasair_lsst_url.rstrip("/")
        self.lookup = AlerceLsst(settings)
        self.limits = StampLimits(settings.max_stamp_bytes, settings.max_stamp_side)

    def serves(self, alert: Any) -> bool:
        """Every Lasair-LSST alert: it names its diaObject (Lasair sends none without one)."""
        return True

    async def find_detection(self, get: HttpGet, request: StampRequest) -> Detection:
        return await self.lookup.find_detection(get, request)

    async def fetch(self, get: HttpGet, request: StampRequest, detection: Detection, kind: str) -> bytes:
        url = f"{self.url}/fits/{detection.detection_id}_cutout{CUTOUT_TYPES[kind]}/"
        status, body = await get(url, None)
        if status in (200, 404) and not body.startswith(FITS_MAGIC):
            shown = repr(body[:16]) if body else "empty"
            raise NotYetAvailableError(f"Lasair has no {kind} cutout of diaSource {detection.detection_id} "
                                       f"(HTTP {status}, body {shown})")
        if status != 200:
            raise FetchError(f"{kind} cutout: HTTP {status}", FailureClass.HTTP)
        return body

    def check(self, data: bytes) -> Any:
        if not data.startswith(FITS_MAGIC):
            raise ValueError(f"not FITS (starts with {data[:8]!r})")
        return read_image(data, self.limits)

    def file_name(self, detection_id: str, kind: str) -> str:
        return f"{detection_id}_{kind}.fits"
