"""Light curves for night reports: points from what ztfd already has, drawn with matplotlib's Agg backend.

Points come from two places, never from a new request: the detections a stamp provider fetched to choose an
alert's candid (kept per object in the store, ``ztfd.store.report.save_detections``), or the history a packet
carries (a ZTF Avro packet's ``candidate`` + ``prv_candidates``, a Lasair-LSST or Rubin alert's ``diaSources``).
ZTF points are PSF magnitudes (drawn with the axis inverted), Rubin's are PSF fluxes in nJy.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from ztfd.sources import JD_MJD_OFFSET

MAG = "mag"
FLUX = "flux"
ZTF_BANDS = {1: "g", 2: "r", 3: "i"}
# Rubin band codes as ALeRCE's LSST API gives them; Lasair and Rubin name the band ("g").
LSST_BAND_CODES = {6: "u", 1: "g", 2: "r", 3: "i", 4: "z", 5: "y"}
COLOURS = {"u": "#6a3d9a", "g": "#1b9e4b", "r": "#d62728", "i": "#b8860b", "z": "#555555", "y": "#8c564b"}
HISTORY_KEYS = ("diaSourcesList", "diaSources", "prvDiaSources")


class Point(NamedTuple):
    mjd: float
    band: str
    value: float  # a magnitude or a flux
    error: float | None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if number == number and abs(number) != float("inf") else None


def _ztf_point(row: dict[str, Any], mjd: float | None) -> Point | None:
    mag = _number(row.get("magpsf"))
    band = ZTF_BANDS.get(row.get("fid"))  # type: ignore[arg-type]
    if mjd is None or mag is None or band is None:
        return None
    return Point(mjd, band, mag, _number(row.get("sigmapsf")))


def alerce_points(body: bytes) -> list[Point]:
    """The magnitudes in ALeRCE's ZTF detections answer (the body the stamp fetcher already has)."""
    try:
        rows = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return []
    if isinstance(rows, dict):
        rows = rows.get("items") or rows.get("detections") or []
    points = (_ztf_point(row, _number(row.get("mjd"))) for row in rows if isinstance(row, dict))
    return sorted(p for p in points if p is not None)


def _lsst_band(value: Any) -> str | None:
    if isinstance(value, str) and value in COLOURS:
        return value
    return LSST_BAND_CODES.get(value) if isinstance(value, int) else None


def _dia_sources(message: Any, depth: int = 0) -> Iterator[dict[str, Any]]:
    """Every diaSource-like record in a message (Lasair-LSST nests them under ``alert``)."""
    if depth > 4 or not isinstance(message, dict):
        return
    for key, value in message.items():
        if key in HISTORY_KEYS and isinstance(value, list):
            yield from (row for row in value if isinstance(row, dict))
        elif key == "diaSource" and isinstance(value, dict):
            yield value
        elif isinstance(value, dict):
            yield from _dia_sources(value, depth + 1)


def history_points(message: dict[str, Any]) -> tuple[str, list[Point]]:
    """The light curve a packet carries, as (unit, points); no points when it carries none."""
    if isinstance(message.get("candidate"), dict):
        rows = [message["candidate"], *(r for r in message.get("prv_candidates") or [] if isinstance(r, dict))]
        found = {_ztf_point(r, None if _number(r.get("jd")) is None else r["jd"] - JD_MJD_OFFSET) for r in rows}
        return MAG, sorted(p for p in found if p is not None)
    points = set()
    for row in _dia_sources(message):
        mjd, flux, band = _number(row.get("midpointMjdTai")), _number(row.get("psfFlux")), _lsst_band(row.get("band"))
        if mjd is not None and flux is not None and band is not None:
            points.add(Point(mjd, band, flux, _number(row.get("psfFluxErr"))))
    return FLUX, sorted(points)


def encode(points: Iterable[Point]) -> str:
    """Compact JSON for the store: [[mjd, band, value, error], …], rounded to what a plot can show."""
    return json.dumps([[round(p.mjd, 5), p.band, round(p.value, 4), None if p.error is None else round(p.error, 4)]
                       for p in points], separators=(",", ":"))


def decode(text: str) -> list[Point]:
    return [Point(float(m), str(b), float(v), None if e is None else float(e)) for m, b, v, e in json.loads(text)]


def draw(object_id: str, unit: str, points: list[Point], marks: Iterable[float] = ()) -> bytes:
    """A small PNG: one series per band with error bars, the alert times of the night as vertical lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.4, 2.2), dpi=100, facecolor="white")
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0.19, 0.2, 0.78, 0.7))
    for mark in marks:
        axes.axvline(mark, color="#9aa3b5", linewidth=1, linestyle=":", zorder=0)
    for band in sorted({p.band for p in points}, key=lambda b: "ugrizy".find(b)):
        mine = [p for p in points if p.band == band]
        axes.errorbar([p.mjd for p in mine], [p.value for p in mine],
                      yerr=[p.error or 0.0 for p in mine], fmt="o", markersize=4, linewidth=0.9, capsize=0,
                      color=COLOURS.get(band, "#333333"), label=band)
    if unit == MAG:
        axes.invert_yaxis()
    axes.set_xlabel("MJD", fontsize=8, labelpad=1)
    axes.set_ylabel("magnitude" if unit == MAG else "flux (nJy)", fontsize=8, labelpad=2)
    axes.tick_params(labelsize=7, length=2.5, pad=1.5)
    axes.ticklabel_format(axis="x", useOffset=False, style="plain")
    axes.xaxis.get_major_locator().set_params(nbins=5)
    axes.legend(fontsize=8, loc="best", frameon=True, framealpha=0.8, handletextpad=0.1, borderaxespad=0.3,
                borderpad=0.3, markerscale=1.2)
    axes.set_title(f"{object_id}  ({len(points)} points; dotted: this night's alerts)", fontsize=7, loc="left",
                   color="#5b6475")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
