"""One GET of a stamp service as the fetcher makes it: at its rate-limit slot, the body capped at
``MAX_BODY_BYTES``, timeouts and connection problems turned into ``FetchError`` with their class."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ztfd.daemon.localtrouble import is_local
from ztfd.stamps.providers import FetchError
from ztfd.store.states import FailureClass

MAX_BODY_BYTES = 16 * 1024 * 1024  # a ZTF cutout is ~15 kB; anything near this is not a stamp
MAX_REDIRECTS = 3  # followed only on the same host and port (see same_origin_redirect)
REDIRECTS = (301, 302, 303, 307, 308)


async def capped_get(session: Any, url: str, params: dict[str, str] | None, slot: float, timeout: float,
                     ) -> tuple[int, bytes]:
    """One GET at its rate-limit slot, with the configured timeout; connection problems are FetchErrors (or
    local trouble: out of file descriptors)."""
    import aiohttp

    delay = slot - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    try:
        for _hop in range(MAX_REDIRECTS + 1):
            async with session.get(url, params=params, allow_redirects=False) as response:
                if response.status in REDIRECTS and "Location" in response.headers:
                    url, params = same_origin_redirect(response.url, response.headers["Location"]), None
                    continue
                length = response.content_length
                if length is not None and length > MAX_BODY_BYTES:
                    raise FetchError(f"HTTP {response.status}: body of {length} bytes is too large",
                                     FailureClass.BAD_BODY)
                return response.status, await _read_capped(response)
        raise FetchError(f"more than {MAX_REDIRECTS} redirects", FailureClass.HTTP)
    except TimeoutError:
        raise FetchError(f"timed out after {timeout:g}s", FailureClass.TIMEOUT) from None
    except aiohttp.ClientError as exc:
        if is_local(exc):
            raise
        raise FetchError(f"{exc.__class__.__name__}: {exc}", FailureClass.CONNECTION) from None


def same_origin_redirect(current: Any, location: str) -> str:
    """The URL a redirect leads to, when it stays on the service's host and port (or only moves it from http to
    https); a redirect elsewhere is a ``FetchError``: a stamp service's answer must not send ztfd to any host."""
    from yarl import URL

    target = current.join(URL(location))
    upgrade = (current.scheme, target.scheme) == ("http", "https") and target.is_default_port()
    same = target.scheme == current.scheme and target.port == current.port
    if target.host != current.host or not (same or upgrade):
        raise FetchError(f"redirected to another host ({target.scheme}://{target.host}:{target.port}): not followed",
                         FailureClass.HTTP)
    return str(target)


async def _read_capped(response: Any) -> bytes:
    """The body, read to at most ``MAX_BODY_BYTES`` (+1 to tell "too large"): a chunked answer has no
    Content-Length to check first, and an endless one must not fill the fetcher's memory."""
    chunks: list[bytes] = []
    size = 0
    while size <= MAX_BODY_BYTES:
        chunk = await response.content.read(MAX_BODY_BYTES + 1 - size)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
    raise FetchError(f"HTTP {response.status}: body larger than {MAX_BODY_BYTES} bytes", FailureClass.BAD_BODY)
