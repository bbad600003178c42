"""The image of a stamp, read within bounds: a served body must never cost more memory than a stamp can need.

ZTF cutouts are 63×63 float32 (about 20 KB unzipped), Rubin's 30 to 102 pixels a side. A hostile or broken
service could send a gzip bomb (16 MiB that inflate to 16 GiB) or a valid FITS of 4000×4000 (64 kB zipped,
64 MB of pixels, seconds of preview). So:

- gzip is inflated as a stream with ``zlib.decompressobj`` and ``max_length``: never more than
  ``max_bytes`` (+ one step) of output exist, whatever the input claims;
- the primary header's dimensions are checked as soon as its ``END`` card has been inflated, before the pixels
  are inflated or handed to astropy.

Anything beyond a cap raises ``StampTooLargeError`` (a ``ValueError``: the fetcher counts it as a failed attempt
with its reason).
"""

from __future__ import annotations

import io
import re
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

GZIP_MAGIC = b"\x1f\x8b"
FITS_CARD = 80
INFLATE_STEP = 64 * 1024  # output per zlib call: the header check runs early, the overshoot stays small
# A fixed-format FITS integer card ("NAXIS1  =                   63 / ...").
INTEGER_CARD = re.compile(rb"^(BITPIX|NAXIS\d*)\s*=\s*([+-]?\d+)")


class StampTooLargeError(ValueError):
    """A stamp beyond the configured caps (``stamps.max_stamp_bytes``, ``stamps.max_stamp_side``)."""


@dataclass(frozen=True)
class StampLimits:
    max_bytes: int = 8 * 1024 * 1024  # decompressed FITS
    max_side: int = 512  # pixels per side of the primary image


def read_image(data: bytes, limits: StampLimits) -> Any:
    """The 2-D image (float32 array) of a FITS stamp, gzipped or plain; ``ValueError`` saying why not."""
    if data.startswith(GZIP_MAGIC):
        fits_bytes = inflate(data, limits)
    else:
        if len(data) > limits.max_bytes:
            raise StampTooLargeError(f"FITS of {len(data)} bytes exceeds {limits.max_bytes} (stamps.max_stamp_bytes)")
        header = HeaderCheck(limits)
        header.feed(data)
        header.finish()
        fits_bytes = data
    return _image(fits_bytes)


def read_gzipped_image(data: bytes, limits: StampLimits) -> Any:
    """``read_image`` of a stamp that must be gzipped (as ALeRCE serves them)."""
    if not data.startswith(GZIP_MAGIC):
        raise ValueError(f"not gzip (starts with {data[:8]!r})")
    return read_image(data, limits)


def inflate(data: bytes, limits: StampLimits) -> bytes:
    """The gzip stream ``data`` inflated, at most ``limits.max_bytes`` of it, the header checked on the way."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip wrapper
    out = bytearray()
    header = HeaderCheck(limits)
    pending = data
    try:
        while not inflater.eof:
            piece = inflater.decompress(pending, min(INFLATE_STEP, limits.max_bytes + 1 - len(out)))
            pending = inflater.unconsumed_tail
            out += piece
            if len(out) > limits.max_bytes:
                raise StampTooLargeError(
                    f"gzip inflates to more than {limits.max_bytes} bytes (stamps.max_stamp_bytes)")
            header.feed(out)
            if not piece and not pending and not inflater.eof:
                raise ValueError("bad gzip: truncated")
    except zlib.error as exc:
        raise ValueError(f"bad gzip: {exc}") from None
    if inflater.unused_data.strip(b"\0"):
        raise ValueError("bad gzip: data after the end of the stream")
    header.finish()
    return bytes(out)


class HeaderCheck:
    """Reads the primary header's cards as they arrive and checks the image's size at its END card."""

    def __init__(self, limits: StampLimits) -> None:
        self.limits = limits
        self.position = 0  # the next card to read
        self.values: dict[str, int] = {}
        self.done = False

    def feed(self, fits: bytes | bytearray) -> None:
        """Read the cards of ``fits`` (everything so far) not read yet; raise once the image is too large."""
        while not self.done and self.position + FITS_CARD <= len(fits):
            card = bytes(fits[self.position:self.position + FITS_CARD])
            self.position += FITS_CARD
            if card.rstrip() == b"END":
                self._check_dimensions()
                self.done = True
            elif match := INTEGER_CARD.match(card):
                self.values.setdefault(match.group(1).decode(), int(match.group(2)))

    def finish(self) -> None:
        """All bytes are in: a header without END is not FITS."""
        if not self.done:
            raise ValueError("not FITS: no END card in the primary header")

    def _check_dimensions(self) -> None:
        values, limits = self.values, self.limits
        if values.get("NAXIS") != 2:
            raise ValueError("FITS has no 2-D image in its primary HDU")
        width, height = values.get("NAXIS1", 0), values.get("NAXIS2", 0)
        if max(width, height) > limits.max_side:
            raise StampTooLargeError(
                f"image of {width}×{height} pixels exceeds {limits.max_side} per side (stamps.max_stamp_side)")
        size = width * height * abs(values.get("BITPIX", 8)) // 8
        if size > limits.max_bytes:
            raise StampTooLargeError(f"image of {size} bytes exceeds {limits.max_bytes} (stamps.max_stamp_bytes)")


def _image(fits_bytes: bytes) -> Any:
    import numpy as np
    from astropy.io import fits

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # every ZTF cutout triggers a harmless VerifyWarning (SIMPLE card)
            with fits.open(io.BytesIO(fits_bytes), ignore_missing_simple=True) as hdus:
                image = hdus[0].data
                shape = None if image is None else image.ndim
                pixels = None if shape != 2 else np.asarray(image, dtype=np.float32)
    except Exception as exc:  # astropy raises many kinds for a non-FITS payload
        raise ValueError(f"not FITS: {exc.__class__.__name__}: {exc}") from None
    if pixels is None:
        raise ValueError("FITS has no 2-D image in its primary HDU")
    return pixels
