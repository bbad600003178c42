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


async def capped_get(session: Any, url: str, params: dict[str, str] | None, slot: float, timeout: float,
                     ) -> tuple[int, bytes]:
    """One GET at its rate-limit slot, with the configured timeout; connection problems are FetchErrors (or
    local trouble: out of file descriptors)."""
    import aiohttp

    delay = slot - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    try:
        async with session.get(url, params=params) as response:
            length = response.content_length
            if length is not None and length > MAX_BODY_BYTES:
                raise FetchError(f"HTTP {response.status}: body of {length} bytes is too large",
                                 FailureClass.BAD_BODY)
            return response.status, await _read_capped(response)
    except TimeoutError:
        raise FetchError(f"timed out after {timeout:g}s", FailureClass.TIMEOUT) from None
    except aiohttp.ClientError as exc:
        if is_local(exc):
            raise
        raise FetchError(f"{exc.__class__.__name__}: {exc}", FailureClass.CONNECTION) from None


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
