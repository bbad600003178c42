"""Light curves for night reports: points from what ztfd already has, drawn with matplotlib's Agg backend.

Points come from two places, never from a new request: the detections a stamp provider fetched to choose an
alert's candid (kept per object in the store, ``ztfd.store.report.save_detections``), or the history a packet
carries (a ZTF Avro packet's ``candidate`` + ``prv_candidates``, a Lasair-LSST or Rubin alert's ``diaSources``).
ZTF points are PSF magnitudes (drawn with the axis inverted), Rubin's are PSF fluxes in nJy.

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
HISTORY_KEYS = ("diaSourcesList", "diaSources", "prvDiaSources")


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


def history_points(message: dict[str, Any]) -> History:
    """The light curve a packet carries; no points when it carries none."""
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
