"""The preview PNG of a stamp triplet: science, template and difference side by side, for a person to glance at.

Each stamp is stretched with the IRAF/astropy ZScale (robust to the bright cores and NaN edges of ZTF cutouts),
shown with north-up FITS orientation (row 0 at the bottom), enlarged without smoothing so pixels stay visible,
titled, under a header with the objectId, candid and the UTC time of the detection.

Two renderers draw that same layout (``stamps.preview_renderer``):

- ``fast`` (the default) composes the image as a numpy array, draws its text with Pillow (a matplotlib
  dependency) in matplotlib's bundled DejaVu Sans and has Pillow write the PNG (``png_bytes``).
  ``zscale_limits`` is astropy's ZScale algorithm with the line fit in closed form: the same limits in a third
  of the time, kept because astropy's own ``ZScaleInterval`` misses the bench's goal (see beside it).
- ``matplotlib`` draws a matplotlib figure with the Agg backend: ~40-80 ms. Previews may cost at most a quarter
  of the fetch rate, and an unthrottled pool fetches a triplet for ~4 ms of CPU, so this renderer only keeps up
  when ALeRCE's rate limit is the bottleneck (the default 10 requests/s is 2.5 triplets/s). matplotlib's Agg
  renderer driven directly is no way out: ~5.6 ms, as it draws text glyph by glyph.
"""

from __future__ import annotations

import datetime as dt
import functools
import gzip
import importlib.util
import io
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ztfd.sources import STAMP_TYPES

SCALE = 4  # 63x63 cutouts become 252x252 panels
PAD = 14
HEADER = 52
TITLE = 24
BACKGROUND = 255  # a grey-level canvas: the stamps are grey, and it encodes 3x faster than RGB
INK = 20
MUTED = 90
MJD_EPOCH = dt.datetime(1858, 11, 17, tzinfo=dt.UTC)
# ZScaleInterval's defaults in astropy.
ZSCALE_SAMPLES = 1000
ZSCALE_CONTRAST = 0.25
ZSCALE_MAX_REJECT = 0.5
ZSCALE_MIN_PIXELS = 5
ZSCALE_KREJ = 2.5
ZSCALE_ITERATIONS = 5


def stamp_array(data: bytes) -> np.ndarray:
    """The image of one gzipped FITS cutout as float32 (raises on anything that is not one)."""
    from astropy.io import fits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every ZTF cutout triggers a harmless VerifyWarning (SIMPLE card)
        with fits.open(io.BytesIO(gzip.decompress(data)), ignore_missing_simple=True) as hdus:
            image = hdus[0].data
            if image is None or image.ndim != 2:
                raise ValueError("FITS has no 2-D image in its primary HDU")
            return np.asarray(image, dtype=np.float32)


# Hand-written, where the library misses the goal. ``bin/bench stamps``, previews on / off (goal >= 0.75x), both
# runs on the same shared 2-core machine under load from other test suites: with astropy's
# ``ZScaleInterval().get_limits`` 0.42x (75 / 177 triplets/s); with this copy 0.76x (79 / 104 triplets/s). Per
# preview, astropy's ZScale costs ~1.8 ms of CPU more for the three stamps (6.1 against 4.2 ms a preview, Pillow's
# PNG in both). The limits are astropy's to rounding on every sample cutout (tests/test_preview.py).
def zscale_limits(values: np.ndarray) -> tuple[float, float]:
    """The display limits of astropy's ``ZScaleInterval()`` (IRAF's zscale, default parameters) for finite values.

    Same steps as astropy: sort up to 1,000 evenly spaced samples, fit a line to them against their rank while
    rejecting samples beyond 2.5 sigma (the rejected mask grown by 1% of the samples), at most 5 rounds; then
    divide the slope by the contrast (0.25) and centre the limits on the median. Only the fit differs: the
    least-squares line through the kept samples in closed form instead of ``np.polyfit`` (the same line to
    rounding; ``tests/test_preview.py`` compares both on every sample cutout).
    """
    stride = max(1, int(values.size / ZSCALE_SAMPLES))
    samples = np.sort(values[::stride][:ZSCALE_SAMPLES])
    count = samples.size
    low, high = float(samples[0]), float(samples[-1])
    ranks = np.arange(count, dtype=np.float64)
    sorted_values = samples.astype(np.float64)
    min_kept = max(ZSCALE_MIN_PIXELS, int(count * ZSCALE_MAX_REJECT))
    grow = np.ones(max(1, int(count * 0.01)), dtype=bool)
    rejected = np.zeros(count, dtype=bool)
    kept, kept_before = count, count + 1
    slope = 0.0
    for _ in range(ZSCALE_ITERATIONS):
        if kept >= kept_before or kept < min_kept:
            break
        keep = ~rejected
        x, y = ranks[keep], sorted_values[keep]
        x_mean, y_mean = x.mean(), y.mean()
        dx = x - x_mean
        slope = float(dx @ (y - y_mean) / (dx @ dx))
        residuals = sorted_values - (y_mean + slope * (ranks - x_mean))
        threshold = ZSCALE_KREJ * residuals[keep].std()
        rejected |= (residuals < -threshold) | (residuals > threshold)
        rejected = np.convolve(rejected, grow, mode="same")
        kept_before, kept = kept, count - int(np.count_nonzero(rejected))
    if kept >= min_kept:
        slope /= ZSCALE_CONTRAST
        centre = (count - 1) // 2
        median = float(np.median(samples))
        low = max(low, median - (centre - 1) * slope)
        high = min(high, median + (count - centre) * slope)
    return low, high


def stretch(image: np.ndarray) -> np.ndarray:
    """ZScale the image to 0..255 (uint8); NaNs and a flat image come out black."""
    finite = np.isfinite(image)
    values = image[finite]
    if not values.size:
        return np.zeros(image.shape, dtype=np.uint8)
    low, high = zscale_limits(values)
    if not high > low:
        low, high = float(values.min()), float(values.max())
    if not high > low:
        return np.zeros(image.shape, dtype=np.uint8)
    scaled = np.clip((np.where(finite, image, low) - low) * (255.0 / (high - low)), 0.0, 255.0)
    return (scaled + 0.5).astype(np.uint8)


def mjd_to_utc(mjd: float) -> str:
    """MJD (UTC) as ``YYYY-MM-DD HH:MM:SS UTC``; plain arithmetic, as ZTF times are UTC already."""
    moment = MJD_EPOCH + dt.timedelta(days=mjd)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


@functools.cache
def _font(size: int) -> Any:
    from PIL import ImageFont

    spec = importlib.util.find_spec("matplotlib")  # find the bundled font without importing matplotlib
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.exists():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default()


@functools.cache
def _blank(panel: int) -> np.ndarray:
    """The canvas with everything that never changes (background, the three titles), drawn once per process."""
    from PIL import Image, ImageDraw

    width = panel * len(STAMP_TYPES) + PAD * (len(STAMP_TYPES) + 1)
    canvas = Image.new("L", (width, HEADER + TITLE + panel + PAD), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for index, kind in enumerate(STAMP_TYPES):
        x = PAD + index * (panel + PAD)
        title_width = draw.textlength(kind, font=_font(15))
        draw.text((x + (panel - title_width) / 2, HEADER), kind, font=_font(15), fill=INK)
    pixels = np.asarray(canvas).copy()
    pixels.flags.writeable = False  # shared by every render: each one copies it
    return pixels


def _header(width: int, object_id: str, candid: int | str, mjd: float | None, band: str | None = None,
            label: str = "candid") -> np.ndarray:
    """The header band: object id and detection id (ZTF's candid, Rubin's diaSourceId), then the band and the
    UTC time of the detection; shrunk to fit a narrow canvas (Rubin's 30-pixel cutouts)."""
    from PIL import Image, ImageDraw

    header = Image.new("L", (width, HEADER), BACKGROUND)
    draw = ImageDraw.Draw(header)
    for (size, top, colour), text in zip(((18, 8, INK), (14, 30, MUTED)),
                                         (_title(object_id, candid, label), _when(mjd, band)), strict=True):
        while size > 9 and draw.textlength(text, font=_font(size)) > width - 2 * PAD:
            size -= 1
        draw.text((PAD, top), text, font=_font(size), fill=colour)
    return np.asarray(header)


def _title(object_id: str, candid: int | str, label: str = "candid") -> str:
    return f"{object_id}   {label} {candid}"


def _when(mjd: float | None, band: str | None = None) -> str:
    when = mjd_to_utc(mjd) + f"   (MJD {mjd:.5f})" if mjd is not None else "time unknown"
    return f"band {band}   {when}" if band else when


def render(object_id: str, candid: int | str, mjd: float | None, images: Mapping[str, np.ndarray],
           band: str | None = None, label: str = "candid") -> bytes:
    """The PNG bytes of the preview of one triplet (``images`` maps stamp type to its ``stamp_array``)."""
    panels = [np.flipud(stretch(images[kind])) for kind in STAMP_TYPES]  # FITS row 0 is the bottom
    panel = SCALE * max(max(p.shape) for p in panels)
    canvas = _blank(panel).copy()
    canvas[:HEADER] = _header(canvas.shape[1], object_id, candid, mjd, band, label)
    for index, pixels in enumerate(panels):
        top, left = HEADER + TITLE, PAD + index * (panel + PAD)
        height, width = pixels.shape[0] * SCALE, pixels.shape[1] * SCALE
        # Enlarged by repetition: one stamp pixel becomes a SCALE x SCALE block.
        canvas[top:top + height, left:left + width].reshape(pixels.shape[0], SCALE, pixels.shape[1], SCALE)[:] = (
            pixels[:, None, :, None])
    return png_bytes(canvas)


def render_matplotlib(object_id: str, candid: int | str, mjd: float | None, images: Mapping[str, np.ndarray],
                      band: str | None = None, label: str = "candid") -> bytes:
    """``render``'s layout as a matplotlib figure drawn by the Agg backend."""
    out = io.BytesIO()
    matplotlib_figure(object_id, candid, mjd, images, band, label).savefig(out, format="png", facecolor="white")
    return out.getvalue()


def matplotlib_figure(object_id: str, candid: int | str, mjd: float | None, images: Mapping[str, np.ndarray],
                      band: str | None = None, label: str = "candid") -> Any:
    """The preview as a ``Figure`` on an Agg canvas: a new one each time, without pyplot, so that no state is
    kept between previews."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.1, 3.45), dpi=100, facecolor="white")
    FigureCanvasAgg(figure)
    figure.text(0.017, 0.94, _title(object_id, candid, label), fontsize=13, color=f"{INK / 255:.3f}")
    figure.text(0.017, 0.87, _when(mjd, band), fontsize=10, color=f"{MUTED / 255:.3f}")
    axes = figure.subplots(1, len(STAMP_TYPES), gridspec_kw={"left": 0.017, "right": 0.983, "bottom": 0.04,
                                                             "top": 0.74, "wspace": 0.06})
    for ax, kind in zip(axes, STAMP_TYPES, strict=True):
        ax.imshow(stretch(images[kind]), cmap="gray", vmin=0, vmax=255, origin="lower", interpolation="nearest")
        ax.set_title(kind, fontsize=11)
        ax.set_axis_off()
    return figure


RENDERERS = {"fast": render, "matplotlib": render_matplotlib}


def png_bytes(pixels: np.ndarray) -> bytes:
    """A grey-level 8-bit image (a 2-D uint8 array) as PNG, written by Pillow.

    Fastest deflate level and zlib's run-length strategy: the canvas is made of enlarged pixels and flat
    background, which runs compress well, for the same size as the default level.
    """
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
    return out.getvalue()


def warm_up(renderer: str = "fast") -> None:
    """Load what the first preview would (Pillow and the fonts, or matplotlib) ahead of time."""
    from PIL import Image, ImageDraw, PngImagePlugin  # noqa: F401

    for size in (14, 15, 18):
        _font(size)
    if renderer == "matplotlib":
        import matplotlib.backends.backend_agg
        import matplotlib.figure  # noqa: F401
