"""The *stamp provider* seam: how an alert of a survey gets its stamp files over HTTP.

A provider knows one service: how to find the detection whose stamps to fetch (when the message did not name it),
which requests fetch each stamp, what a served body must look like to be kept, and what the files are called.
The stamp worker knows none of this: it claims a job, asks the provider configured for the alert's survey, and
writes, records and settles what comes back. Adding a provider means a module here and one entry in ``PROVIDERS``.

Politeness (the shared rate limit), timeouts and body caps belong to the worker: a provider makes its requests
only through the ``HttpGet`` it is given, and each call costs one request slot.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

# get(url, params) -> (HTTP status, body); redirects followed, body capped, one rate-limit slot per call.
HttpGet = Callable[[str, dict[str, str] | None], Awaitable[tuple[int, bytes]]]


class NotYetAvailableError(Exception):
    """The service does not have this alert (yet): retry on the slow schedule, it is not a failure."""


class FetchError(Exception):
    """A failed attempt (server error, timeout, connection, bad body): back off and retry."""


@dataclass(frozen=True)
class StampRequest:
    """What a stamp job asks for, read from the alert it refers to."""

    survey: str
    object_id: str
    date: str  # the alert's partition date: the folder under images/
    obs_mjd: float | None  # the alert's observation time, MJD UTC
    detection_id: str | None  # known from the message or an earlier run: no lookup needed


@dataclass(frozen=True)
class Detection:
    """The detection whose stamps are fetched: its survey id (exact text) and time (MJD UTC)."""

    detection_id: str
    mjd: float | None


class StampProvider(Protocol):
    name: str
    survey: str

    async def find_detection(self, get: HttpGet, request: StampRequest) -> Detection:
        """The detection to fetch, when ``request.detection_id`` is None."""
        ...

    async def fetch(self, get: HttpGet, request: StampRequest, detection: Detection, kind: str) -> bytes:
        """The served bytes of one stamp; raise NotYetAvailableError or FetchError."""
        ...

    def check(self, data: bytes) -> Any:
        """The image to preview (a 2-D array) if ``data`` is a stamp worth keeping; ValueError with a reason."""
        ...

    def file_name(self, detection_id: str, kind: str, data: bytes) -> str:
        """The stamp's file name in its object's folder (the suffix may depend on the served bytes)."""
        ...


PROVIDERS: dict[str, Callable[..., StampProvider]] = {}


def register(name: str) -> Callable[[Callable[..., StampProvider]], Callable[..., StampProvider]]:
    """Class decorator: make a provider available under its configuration name."""

    def add(factory: Callable[..., StampProvider]) -> Callable[..., StampProvider]:
        PROVIDERS[name] = factory
        return factory

    return add
