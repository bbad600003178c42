"""The preview: astropy's ZScale limits, a PNG any decoder reads, and the layout a person glances at."""

from __future__ import annotations

import io

import numpy as np
import pytest
from astropy.visualization import ZScaleInterval
from PIL import Image

from ztfd.embedded.samples import packets
from ztfd.stamps import preview

ZTF_PACKETS = [p for p in packets() if p.object_id.startswith("ZTF")]


def decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.mode == "L"
        return np.asarray(image).copy()


def assert_same_limits(values: np.ndarray) -> None:
    """Equal up to rounding: 1e-9 of the limits' span or of their magnitude, whichever is larger (a constant image
    has a span of 0, and astropy's polyfit then lands a few ulps either side of the value)."""
    expected = ZScaleInterval().get_limits(values)
    got = preview.zscale_limits(values)
    tolerance = 1e-9 * max(abs(expected[1] - expected[0]), abs(expected[0]), abs(expected[1]), 1e-12)
    assert abs(got[0] - expected[0]) <= tolerance and abs(got[1] - expected[1]) <= tolerance, (got, expected)


@pytest.mark.parametrize("packet", ZTF_PACKETS, ids=lambda p: p.object_id)
def test_zscale_limits_are_astropys_on_every_sample_cutout(packet):
    for kind in preview.STAMP_TYPES:
        image = preview.stamp_array(packet.cutouts[kind])
        assert_same_limits(image[np.isfinite(image)])


@pytest.mark.parametrize("size", [1, 3, 7, 60, 999, 1001, 3969, 20_000])
def test_zscale_limits_are_astropys_on_awkward_inputs(size):
    rng = np.random.default_rng(size)
    noise = rng.normal(100.0, 5.0, size).astype(np.float32)
    noise[: size // 50] = 1e5  # saturated cores: the rejection has work to do
    assert_same_limits(noise)
    assert_same_limits(np.sort(noise))
    assert_same_limits(np.full(size, 3.0, dtype=np.float32))


def test_stretch_is_zscale_saturated_cores_white_and_the_background_spread_out():
    """ZScale, not min-max: a few saturated pixels must not squash the sky into black."""
    rng = np.random.default_rng(7)
    image = rng.normal(100.0, 5.0, (63, 63)).astype(np.float32)
    image[30:33, 30:33] = 1e5  # a saturated core
    image[0, :5] = np.nan  # a NaN edge
    stretched = preview.stretch(image)
    assert (stretched[30:33, 30:33] == 255).all()
    assert (stretched[0, :5] == 0).all()
    sky = stretched[1:30].astype(int)
    assert 64 <= np.median(sky) <= 192  # the sky sits mid-grey ...
    # ... over a good part of the grey levels (a min-max stretch would put all of it within 2 levels of black)
    assert np.percentile(sky, 95) - np.percentile(sky, 5) >= 48


def test_stretch_maps_nans_and_flat_images_to_black():
    assert not preview.stretch(np.full((5, 5), np.nan, dtype=np.float32)).any()
    assert not preview.stretch(np.full((5, 5), 7.0, dtype=np.float32)).any()
    image = np.arange(25, dtype=np.float32).reshape(5, 5)
    image[0, 0] = np.nan
    stretched = preview.stretch(image)
    assert stretched.dtype == np.uint8 and stretched[0, 0] == 0 and stretched.max() == 255


def test_png_bytes_decode_to_the_same_pixels():
    rng = np.random.default_rng(1)
    for shape in [(1, 1), (1, 9), (7, 1), (50, 33)]:
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        assert np.array_equal(decode(preview.png_bytes(pixels)), pixels)


def test_render_shows_each_stamp_enlarged_under_its_title_and_a_header():
    packet = ZTF_PACKETS[0]
    images = {kind: preview.stamp_array(packet.cutouts[kind]) for kind in preview.STAMP_TYPES}
    pixels = decode(preview.render(packet.object_id, packet.candid, packet.mjd, images))
    panel = 63 * preview.SCALE
    assert pixels.shape == (preview.HEADER + preview.TITLE + panel + preview.PAD, 3 * panel + 4 * preview.PAD)
    top = preview.HEADER + preview.TITLE
    for index, kind in enumerate(preview.STAMP_TYPES):
        left = preview.PAD + index * (panel + preview.PAD)
        expected = np.flipud(preview.stretch(images[kind])).repeat(preview.SCALE, 0).repeat(preview.SCALE, 1)
        assert np.array_equal(pixels[top:top + panel, left:left + panel], expected), kind
        title = pixels[preview.HEADER:top, left:left + panel]
        assert (title < preview.BACKGROUND).any(), f"no title over {kind}"
    header = pixels[: preview.HEADER]
    assert (header == preview.INK).any() and (header == preview.MUTED).any()  # both lines of the header
    # A different alert changes the header and nothing of the static canvas.
    other = decode(preview.render("ZTF99zzzzzzz", 1, None, images))
    assert not np.array_equal(other[: preview.HEADER], header)
    assert np.array_equal(other[preview.HEADER:], pixels[preview.HEADER:])


def test_the_matplotlib_renderer_draws_the_same_stamps_with_the_agg_backend():
    packet = ZTF_PACKETS[1]
    images = {kind: preview.stamp_array(packet.cutouts[kind]) for kind in preview.STAMP_TYPES}
    figure = preview.matplotlib_figure(packet.object_id, packet.candid, packet.mjd, images)
    assert type(figure.canvas).__name__ == "FigureCanvasAgg"
    texts = [t.get_text() for t in figure.texts]
    assert texts == [f"{packet.object_id}   candid {packet.candid}", preview._when(packet.mjd)]
    for ax, kind in zip(figure.axes, preview.STAMP_TYPES, strict=True):
        assert ax.get_title() == kind
        (shown,) = ax.get_images()
        assert np.array_equal(shown.get_array(), preview.stretch(images[kind]))
        assert shown.origin == "lower"  # north up: FITS row 0 at the bottom
    png = preview.RENDERERS["matplotlib"](packet.object_id, packet.candid, packet.mjd, images)
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.size == (810, 345)
        grey = np.asarray(image.convert("L"))
    assert len(np.unique(grey)) > 100  # the stamps were drawn, not a blank canvas


def ink_rows(pixels: np.ndarray) -> np.ndarray:
    """The rows with any dark pixel (text ink: darker than the grey of the muted line's anti-aliased edge)."""
    return np.flatnonzero((pixels < 200).any(axis=1))


def test_both_header_lines_lie_whole_inside_the_header_band():
    """The preview of a real alert (the one in docs/report.png): each header line's ink is a run of rows of its
    own, clear of the canvas's top, of the other line and of the panel titles below the band."""
    (packet,) = [p for p in ZTF_PACKETS if p.object_id == "ZTF18aaqzpsv"][:1]
    images = {kind: preview.stamp_array(packet.cutouts[kind]) for kind in preview.STAMP_TYPES}
    pixels = decode(preview.render(packet.object_id, packet.candid, packet.mjd, images))
    rows = ink_rows(pixels[: preview.HEADER])
    runs = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1)
    assert len(runs) == 2, f"expected two lines of ink, found rows {rows}"
    title, when = runs
    assert title[0] > 0 and when[-1] < preview.HEADER - 1  # neither touches the band's edges
    assert when[0] - title[-1] > 1  # a blank row between them
    # The second line is as tall as digits and brackets are at its size: all of it is drawn, none is cut off.
    assert when[-1] - when[0] + 1 >= 12


def test_the_matplotlib_header_lines_lie_inside_the_figure_above_the_panels():
    (packet,) = [p for p in ZTF_PACKETS if p.object_id == "ZTF18aaqzpsv"][:1]
    images = {kind: preview.stamp_array(packet.cutouts[kind]) for kind in preview.STAMP_TYPES}
    figure = preview.matplotlib_figure(packet.object_id, packet.candid, packet.mjd, images)
    renderer = figure.canvas.get_renderer()
    canvas = figure.bbox
    title, when = (text.get_window_extent(renderer) for text in figure.texts)
    panel_titles_top = max(ax.title.get_window_extent(renderer).y1 for ax in figure.axes)
    for line in (title, when):
        assert canvas.x0 <= line.x0 and line.x1 <= canvas.x1 and canvas.y0 <= line.y0 and line.y1 <= canvas.y1
    assert title.y0 > when.y1  # the two lines do not overlap (display y grows upwards)
    assert when.y0 > panel_titles_top  # nor does the second line overlap the panels' titles
