"""The *stamp provider* seam: how an alert of a survey gets its stamp files over HTTP.

A provider knows one service: how to find the detection whose stamps to fetch (when the message did not name it),
which requests fetch each stamp, what a served body must look like to be kept, and what the files are called.
The stamp fetcher knows none of this: it claims a job, asks the provider configured for the alert's survey, and
writes, records and settles what comes back. Adding a provider means a module here and one entry in ``PROVIDERS``
(the ``register`` decorator; every module of this package is imported by ``load_all``). Which provider serves a
survey is configuration: ``stamps.<survey>_provider`` names it (``ztf_provider = "alerce"``; ``none``: no stamps),
so names are per survey (``PROVIDERS[(survey, name)]``: ALeRCE can serve ZTF and LSST under "alerce"). A provider
is made once per process as ``PROVIDERS[(survey, name)](settings)`` with the ``[stamps]`` settings.

What the consumer and the fetcher do with a provider (its whole contract):
- ``serves(alert)``: the consumer queues a stamp job only for alerts the provider can have stamps of;
- ``find_detection`` when the job knows no detection yet (one lookup request); a detection id must be a plain
  name (letters, digits, ``_``, ``-``): it becomes part of file names; the light curve it may carry is kept;
- ``fetch`` once per stamp kind missing on disk (``STAMP_TYPES``), the three at once;
- ``check`` every fetched body and every file found on disk (an invalid file is fetched again); a ``ValueError``
  from it is a failed attempt with its reason. Bounds (``ztfd.stamps.stampimage``) are the provider's to apply;
- files go to ``images/<date>/<object_id>/<file_name(detection_id, kind)>``, the preview beside them as
  ``<detection_id>.png``.

A provider whose service serves several stamps in one request (ALeRCE's ``get_avro``) may also offer
``fetch_together(get, request, detection, kinds) -> Bundle``: the fetcher then takes one rate-limit slot for all the
missing stamps of a job instead of one each, and writes the bundle's ``extras`` beside the stamps.

Politeness (the shared rate limit), timeouts and body caps belong to the fetcher: a provider makes its requests
only through the ``HttpGet`` it is given, and each call costs one request slot.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from ztfd.store.states import FailureClass

# get(url, params) -> (HTTP status, body); redirects followed, body capped, one rate-limit slot per call.
HttpGet = Callable[[str, dict[str, str] | None], Awaitable[tuple[int, bytes]]]


class NotYetAvailableError(Exception):
    """The service does not have this alert (yet): retry on the slow schedule, it is not a failure."""


class FetchError(Exception):
    """A failed attempt (server error, timeout, connection, bad body): back off and retry. ``kind`` is its class,
    what ``ztfd_stamp_failures_total{reason}`` counts: chosen where the failure is known, never read from the
    message."""

    def __init__(self, message: str, kind: FailureClass = FailureClass.OTHER) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class StampRequest:
    """What a stamp job asks for, read from the alert it refers to."""

    survey: str
    object_id: str
    date: str  # the alert's partition date: the folder under images/
    obs_mjd: float | None  # the alert's observation time, MJD UTC
    detection_id: str | None  # known from the message or an earlier run: no lookup needed
    detection_mjd: float | None = None  # that detection's time, when known (else the alert's is shown)
    band: str | None = None  # the detection's band when the message says it (LSST), for the preview


@dataclass(frozen=True)
class Detection:
    """The detection whose stamps are fetched: its survey id (exact text) and time (MJD UTC), and the object's
    light curve when the lookup answered with one (``ztfd.reporting.lightcurve`` points; the fetcher keeps it for night
    reports, so that they cost no request of their own)."""

    detection_id: str
    mjd: float | None
    light_curve: tuple[Any, ...] = ()
    light_curve_unit: str = "mag"  # ztfd.reporting.lightcurve.MAG or FLUX


@dataclass(frozen=True)
class Bundle:
    """Several stamps served by one request (ALeRCE's ``get_avro``: the whole alert packet), and files to keep
    beside them in the detection's folder (file name -> bytes: the packet itself)."""

    stamps: dict[str, bytes]
    extras: dict[str, bytes] = field(default_factory=dict)


class DetectionsCache(Protocol):
    """Detections lists the pool keeps for a short time (the fetcher's, in the store): a provider that looks
    detections up may use it when the fetcher gives it one (its ``cache`` attribute)."""

    async def get(self, object_id: str) -> bytes | None: ...

    async def put(self, object_id: str, body: bytes) -> None: ...


class StampProvider(Protocol):
    name: str  # the configuration name (also the name of its pool-wide rate limit)
    survey: str
    service: str  # who serves the stamps, for people ("ALeRCE")
    detection_label: str  # what the survey calls a detection id, for the preview ("candid", "diaSourceId")

    def serves(self, alert: Any) -> bool:
        """True when this provider can have stamps of ``alert`` (a ``ztfd.sources.Alert`` of its survey)."""
        ...

    async def find_detection(self, get: HttpGet, request: StampRequest) -> Detection:
        """The detection to fetch, when ``request.detection_id`` is None."""
        ...

    async def fetch(self, get: HttpGet, request: StampRequest, detection: Detection, kind: str) -> bytes:
        """The served bytes of one stamp; raise NotYetAvailableError or FetchError."""
        ...

    def check(self, data: bytes) -> Any:
        """The image to preview (a 2-D array) if ``data`` is a stamp worth keeping; ValueError with a reason."""
        ...

    def file_name(self, detection_id: str, kind: str) -> str:
        """The stamp's file name in its object's folder (fixed per provider: files on disk are looked up by it)."""
        ...


PROVIDERS: dict[tuple[str, str], Callable[..., StampProvider]] = {}
NO_PROVIDER = ("none", "")


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a provider available under its configuration name, for the survey it declares."""

    def add(factory: type) -> type:
        PROVIDERS[(factory.survey, name)] = factory  # type: ignore[attr-defined]
        return factory

    return add


PROVIDER_SUFFIX = "_provider"
log = logging.getLogger(__name__)


def load_all() -> None:
    """Import every module of this package, so that each registers its providers."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def names_for(survey: str) -> list[str]:
    """The provider names registered for ``survey``."""
    load_all()
    return sorted(name for provider_survey, name in PROVIDERS if provider_survey == survey)


def configured_surveys(settings: Any) -> dict[str, str]:
    """survey -> provider name, for every ``stamps.<survey>_provider`` that names one."""
    named = {f.name.removesuffix(PROVIDER_SUFFIX): getattr(settings, f.name) for f in fields(settings)
             if f.name.endswith(PROVIDER_SUFFIX)}
    return {survey: name for survey, name in named.items() if name not in NO_PROVIDER}


def providers_for(settings: Any) -> dict[str, StampProvider]:
    """survey -> its provider, made from the ``[stamps]`` settings (once per process). A name with no provider
    registered for its survey (yet) is left out: that survey's alerts get no stamp jobs."""
    load_all()
    made = {}
    for survey, name in configured_surveys(settings).items():
        factory = PROVIDERS.get((survey, name))
        if factory is None:
            log.info("no %s stamp provider %r (stamps.%s_provider): %s alerts get no stamps", survey, name, survey,
                     survey)
            continue
        made[survey] = factory(settings)
    return made


def service_url(settings: Any, survey: str | None) -> str | None:
    """The stamp service a survey's jobs ask, as an operator would look it up when they fail (``ztfd status``,
    ``ztfd replay``); None when the survey has no provider."""
    name = configured_surveys(settings).get(str(survey or "ztf"))
    if name is None:
        return None
    if survey == "lsst":
        return settings.lasair_lsst_url if name == "lasair" else settings.alerce_lsst_url
    api, stamp = settings.alerce_api_url, settings.alerce_stamp_url
    return api if api == stamp else f"{api} (detections) / {stamp} (stamps)"
