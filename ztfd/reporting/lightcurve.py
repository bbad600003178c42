"""Light curves for night reports: points from what ztfd already has, drawn with matplotlib's Agg backend.

Points come from two places, never from a new request: the detections a stamp provider fetched to choose an
alert's candid (kept per object in the store, ``ztfd.store.report.save_detections``), or the history a message
carries: a ZTF Avro packet's ``candidate`` + ``prv_candidates`` (its JSON view for packets kept as ``.avro``), a
Rubin packet's ``diaSource`` + ``prvDiaSources``, Lasair-LSST's ``diaSourcesList`` (lite and full output).
ZTF points are PSF magnitudes (drawn with the axis inverted), Rubin's are PSF fluxes in nJy. Upper limits come
from the message only: ZTF's non-detections in ``prv_candidates`` (``diffmaglim``, no ``magpsf``) and Lasair-LSST's
``diaNondetectionLimitsList`` (``diaNoise``, the difference image's noise in nJy).

The title sits above the axes and the legend to their right, both outside the data area, so neither covers a
point whatever the object id's length (``layout`` returns where each went, for the test that says so).

A message is not trusted to have the types it should: a field of an unexpected type (``prv_candidates: 5``,
``fid: [1]``, a string for a magnitude) is left out of the curve and named in ``History.left_out``, which the
report's card shows; nothing here raises on a message's content.
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
# Rubin's packets name the history prvDiaSources; some re-publishers prevDiaSources.
HISTORY_KEYS = ("diaSourcesList", "diaSources", "prvDiaSources", "prevDiaSources")
LSST_LIMITS_KEY = "diaNondetectionLimitsList"


MAX_LEFT_OUT = 5  # fields a card names at most


class Point(NamedTuple):
    mjd: float
    band: str
    value: float  # a magnitude or a flux
    error: float | None


class History(NamedTuple):
    """The light curve a message carries, and the fields of an unexpected type left out of it."""

    unit: str
    points: list[Point]
    left_out: tuple[str, ...] = ()


def ordered(points: Iterable[Point]) -> list[Point]:
    """Points by time (a point without an error bar sorts before its twin with one: None never meets a float)."""
    return sorted(points, key=lambda p: (p.mjd, p.band, p.value, -1.0 if p.error is None else p.error))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer past a float's range
        return None
    return number if number == number and abs(number) != float("inf") else None


def _kind(value: Any) -> str:
    """A JSON type name for a note on the card."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object", type(None): "null"}.get(type(value), "a value")


class _Notes:
    """Fields of an unexpected type, once each, in the order met."""

    def __init__(self) -> None:
        self.found: dict[str, None] = {}

    def add(self, field: str, value: Any) -> None:
        self.found.setdefault(f"{field} ({_kind(value)})", None)

    def as_tuple(self) -> tuple[str, ...]:
        return tuple(self.found)[:MAX_LEFT_OUT]


def _ztf_point(row: dict[str, Any], mjd: float | None, notes: _Notes) -> Point | None:
    """A row's magnitude, or None: a non-detection (null magpsf) quietly, a value of the wrong type noted."""
    mag, fid, sigma = row.get("magpsf"), row.get("fid"), row.get("sigmapsf")
    if mag is None or mjd is None:
        return None
    band = ZTF_BANDS.get(fid) if isinstance(fid, int) and not isinstance(fid, bool) else None
    for name, value, ok in (("magpsf", mag, _number(mag) is not None), ("fid", fid, band is not None)):
        if not ok:
            notes.add(name, value)
            return None
    if _number(sigma) is None:
        notes.add("sigmapsf", sigma)  # drawn without its error bar
    return Point(mjd, band, _number(mag), _number(sigma))  # type: ignore[arg-type]


def alerce_points(body: bytes) -> list[Point]:
    """The magnitudes in ALeRCE's ZTF detections answer (the body the stamp fetcher already has)."""
    try:
        rows = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return []
    if isinstance(rows, dict):
        rows = rows.get("items") or rows.get("detections") or []
    if not isinstance(rows, list):
        return []
    points = (_ztf_point(row, _number(row.get("mjd")), _Notes()) for row in rows if isinstance(row, dict))
    return ordered(p for p in points if p is not None)


def _lsst_band(value: Any) -> str | None:
    if isinstance(value, str) and value in COLOURS:
        return value
    return LSST_BAND_CODES.get(value) if isinstance(value, int) else None


def _rows(value: Any, field: str, notes: _Notes) -> list[dict[str, Any]]:
    """The objects of a history list (null: none); anything else is noted and left out."""
    if value is None:
        return []
    if not isinstance(value, list):
        notes.add(field, value)
        return []
    rows = []
    for row in value:
        if isinstance(row, dict):
            rows.append(row)
        elif row is not None:
            notes.add(f"{field}[]", row)
    return rows


def _dia_sources(message: Any, notes: _Notes, depth: int = 0) -> Iterator[dict[str, Any]]:
    """Every diaSource-like record in a message (Lasair-LSST nests them under ``alert``)."""
    if depth > 4 or not isinstance(message, dict):
        return
    for key, value in message.items():
        if key in HISTORY_KEYS:
            yield from _rows(value, key, notes)
        elif key == "diaSource" and isinstance(value, dict):
            yield value
        elif isinstance(value, dict):
            yield from _dia_sources(value, notes, depth + 1)


def _jd_mjd(row: dict[str, Any]) -> float | None:
    jd = _number(row.get("jd"))
    return None if jd is None else jd - JD_MJD_OFFSET


def history_points(message: dict[str, Any]) -> History:
    """The light curve a message carries; no points when it carries none."""
    notes = _Notes()
    if isinstance(message.get("candidate"), dict):
        rows = [message["candidate"], *_rows(message.get("prv_candidates"), "prv_candidates", notes)]
        found = set()
        for row in rows:
            jd = _number(row.get("jd"))
            if jd is None and row.get("jd") is not None:
                notes.add("jd", row.get("jd"))
            found.add(_ztf_point(row, None if jd is None else jd - JD_MJD_OFFSET, notes))
        return History(MAG, ordered(p for p in found if p is not None), notes.as_tuple())
    points = set()
    for row in _dia_sources(message, notes):
        values = {name: row.get(name) for name in ("midpointMjdTai", "psfFlux", "band")}
        if values["psfFlux"] is None:
            continue  # no flux measured
        mjd, flux, band = _number(values["midpointMjdTai"]), _number(values["psfFlux"]), _lsst_band(values["band"])
        for name, parsed in (("midpointMjdTai", mjd), ("psfFlux", flux), ("band", band)):
            if parsed is None:
                notes.add(name, values[name])
        if mjd is not None and flux is not None and band is not None:
            points.add(Point(mjd, band, flux, _number(row.get("psfFluxErr"))))
    return History(FLUX, ordered(points), notes.as_tuple())


def history_limits(message: dict[str, Any]) -> list[Point]:
    """The upper limits a message carries (non-detections): ZTF's limiting magnitudes, Lasair-LSST's noise."""
    found = set()
    if isinstance(message.get("candidate"), dict):
        for row in _rows(message.get("prv_candidates"), "prv_candidates", _Notes()):
            if _number(row.get("magpsf")) is not None:
                continue
            fid = row.get("fid")
            band = ZTF_BANDS.get(fid) if isinstance(fid, int) and not isinstance(fid, bool) else None
            mjd, limit = _jd_mjd(row), _number(row.get("diffmaglim"))
            if mjd is not None and limit is not None and band is not None:
                found.add(Point(mjd, band, limit, None))
        return ordered(found)
    alert = message.get("alert") if isinstance(message.get("alert"), dict) else message
    for row in _rows(alert.get(LSST_LIMITS_KEY), LSST_LIMITS_KEY, _Notes()):
        mjd, noise, band = _number(row.get("midpointMjdTai")), _number(row.get("diaNoise")), _lsst_band(row.get("band"))
        if mjd is not None and noise is not None and band is not None:
            found.add(Point(mjd, band, noise, None))
    return ordered(found)


def encode(points: Iterable[Point]) -> str:
    """Compact JSON for the store: [[mjd, band, value, error], …], rounded to what a plot can show."""
    return json.dumps([[round(p.mjd, 5), p.band, round(p.value, 4), None if p.error is None else round(p.error, 4)]
                       for p in points], separators=(",", ":"))


def decode(text: str) -> list[Point]:
    return [Point(float(m), str(b), float(v), None if e is None else float(e)) for m, b, v, e in json.loads(text)]


def _figure(object_id: str, unit: str, points: list[Point], marks: Iterable[float], limits: list[Point]) -> Any:
    """The light curve's matplotlib figure (Agg): the axes on the left, the legend in a column to their right,
    the title above them; nothing drawn over the data area but the data."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.4, 2.2), dpi=100, facecolor="white")
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0.17, 0.2, 0.63, 0.64))
    for mark in marks:
        axes.axvline(mark, color="#9aa3b5", linewidth=1, linestyle=":", zorder=0)
    for band in sorted({p.band for p in points} | {p.band for p in limits}, key=lambda b: "ugrizy".find(b)):
        mine = [p for p in points if p.band == band]
        colour = COLOURS.get(band, "#333333")
        if mine:
            axes.errorbar([p.mjd for p in mine], [p.value for p in mine],
                          yerr=[p.error or 0.0 for p in mine], fmt="o", markersize=4, linewidth=0.9, capsize=0,
                          color=colour, label=band)
        bounds = [p for p in limits if p.band == band]
        if bounds:
            # Fainter than the limit for magnitudes (down on the inverted axis), below the noise for fluxes.
            axes.plot([p.mjd for p in bounds], [p.value for p in bounds], linestyle="none", marker="v",
                      markersize=4, markerfacecolor="none", markeredgecolor=colour, alpha=0.7,
                      label=f"{band} limit")
    if unit == MAG:
        axes.invert_yaxis()
    axes.set_xlabel("MJD", fontsize=8, labelpad=1)
    axes.set_ylabel("magnitude" if unit == MAG else "flux (nJy)", fontsize=8, labelpad=2)
    axes.tick_params(labelsize=7, length=2.5, pad=1.5)
    axes.ticklabel_format(axis="x", useOffset=False, style="plain")
    axes.xaxis.get_major_locator().set_params(nbins=4)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False,
                handletextpad=0.2, markerscale=1.1)
    counted = _count(len(points), "point") + (f", {_count(len(limits), 'limit')}" if limits else "")
    figure.text(0.02, 0.97, object_id, fontsize=8, color="#1d2330", va="top", ha="left")
    figure.text(0.02, 0.90, f"{counted}; dotted: this night's alerts", fontsize=6.5, color="#5b6475", va="top",
                ha="left")
    return figure


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'s' * (number != 1)}"


def layout(object_id: str, unit: str, points: list[Point], marks: Iterable[float] = (),
           limits: Iterable[Point] = ()) -> dict[str, tuple[float, float, float, float]]:
    """Where the axes, legend and texts land in pixels (x0, y0, x1, y1): what a test checks for overlaps."""
    figure = _figure(object_id, unit, points, marks, list(limits))
    renderer = figure.canvas.get_renderer()
    axes = figure.axes[0]
    found = {"figure": tuple(figure.bbox.extents), "axes": tuple(axes.bbox.extents),
             "legend": tuple(axes.get_legend().get_window_extent(renderer).extents)}
    for number, text in enumerate(figure.texts):
        found[f"text{number}"] = tuple(text.get_window_extent(renderer).extents)
    return found


def draw(object_id: str, unit: str, points: list[Point], marks: Iterable[float] = (),
         limits: Iterable[Point] = ()) -> bytes:
    """A small PNG: one series per band with error bars, upper limits as open triangles, the alert times of the
    night as vertical lines."""
    buffer = io.BytesIO()
    _figure(object_id, unit, points, marks, list(limits)).savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
