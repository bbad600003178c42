"""Stamps that came inside the alert packet (ZTF's packets, Fink, Rubin): nothing to fetch, only a preview to draw.

The consumer writes such an alert's cutouts beside its file in the same batch (``sources.alert_files``) and queues
a job of kind ``preview`` for it. The worker runs that job with this provider in place of the survey's: it finds
the three stamps on disk under the names the consumer gave them, checks them like fetched ones and draws the
preview. It never makes a request; a stamp missing from disk (deleted by hand) is a failed attempt, not a fetch.
"""

from __future__ import annotations

from typing import Any

from ztfd.config import StampsConfig
from ztfd.sources import LSST, STAMP_TYPES
from ztfd.sources.packets import RUBIN_SUFFIX, ZTF_SUFFIX
from ztfd.stamps.providers import Detection, FetchError, HttpGet, StampRequest
from ztfd.stamps.stampimage import StampLimits, read_image
from ztfd.store.states import FailureClass, JobKind

PREVIEW_JOB = JobKind.PREVIEW  # ``jobs.kind`` of such a job


def carries_stamps(alert: Any) -> bool:
    """True when the alert's packet carried all three stamps, valid enough to have been written with it."""
    return len(alert.cutouts) == len(STAMP_TYPES) and all(cutout.data is not None for cutout in alert.cutouts)


class PacketStamps:
    """The stamps of one survey's packets, as the consumer wrote them."""

    name = "packet"  # no requests: its rate limit is never taken
    service = "the alert packet"

    def __init__(self, settings: StampsConfig, survey: str) -> None:
        self.survey = survey
        self.suffix = RUBIN_SUFFIX if survey == LSST else ZTF_SUFFIX
        self.detection_label = "diaSourceId" if survey == LSST else "candid"
        self.limits = StampLimits(settings.max_stamp_bytes, settings.max_stamp_side)

    def serves(self, alert: Any) -> bool:
        return carries_stamps(alert)

    async def find_detection(self, get: HttpGet, request: StampRequest) -> Detection:
        raise FetchError("a preview job names its detection (the packet's); none was stored", FailureClass.BAD_JOB)

    async def fetch(self, get: HttpGet, request: StampRequest, detection: Detection, kind: str) -> bytes:
        raise FetchError(f"{kind} stamp is not on disk, and the alert packet is the only place it came from")

    def check(self, data: bytes) -> Any:
        return read_image(data, self.limits)

    def file_name(self, detection_id: str, kind: str) -> str:
        return f"{detection_id}_{kind}{self.suffix}"
