"""``ztfd report``: a night's alerts as static HTML pages, one card per object, for a person with a browser.

``<home>/reports/<date>/index.html`` (a topic's own report: ``reports/<date>/<topic>/index.html``), then
``page-2.html`` … with at most ``CARDS_PER_PAGE`` cards each. A card shows the object's preview triplet (at its
own size: its text stays sharp), its light curve (``ztfd.reporting.lightcurve``, drawn into ``lc/<objectId>.png``
beside the pages) from whatever the alert carries, the objectId linked to its Lasair and ALeRCE pages, the time of
the observation and the field it came from, the columns of its latest message of the night (time fields named by
what they are: first detection, last detection, filter run), and links to its alert (the JSON, also the JSON view
of an Avro packet), the packet as received, and its stamps. Counts at the top: alerts, objects, rejected messages,
stamps there and missing (and why). A night without alerts, or a topic without any, is refused (``ReportError``)
before anything is written.

The cards come from a ``Night``: this host's store and disk (``HostNight``, ``gather``), or in fleet mode the
fleet's alerts and stamps in the bucket (``reporting.fleet_night.FleetNight``); both make them with ``new_card``,
``choose_stamps`` and ``night_counts``, and the pages are rendered the same way.

The pages are self-contained: inline CSS, no script, no remote resource; every file is linked by a path relative
to the page, so they read the same from the disk and from the S3 mirror. Every file written is recorded in the
manifest, so the report syncs like the rest. The daemon's ``reporter`` (``ztfd report --watch``) rewrites a
night's report once the night has been quiet for ``report.after_quiet`` seconds.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import json
import logging
import os
import re
import sqlite3
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ztfd import config, files, store
from ztfd.daemon import lifecycle
from ztfd.daemon.heartbeat import Heartbeat
from ztfd.reporting import lightcurve
from ztfd.sources import LSST, STAMP_TYPES, ZTF
from ztfd.store import report as night
from ztfd.store.alerts import StoredAlert, alerts_on
from ztfd.store.stamps import stamp_records_on
from ztfd.store.states import Role

log = logging.getLogger(__name__)

CARDS_PER_PAGE = 200
MAX_COLUMNS = 14
WATCH_INTERVAL = 30.0
RETRY_BACKOFF = lifecycle.Backoff(WATCH_INTERVAL, 3600.0)  # a night whose report failed for a reason that may pass
LOOKBACK_DAYS = 7  # the daemon rewrites reports of nights busy this recently; older ones with `ztfd report`
REPORTER_NICENESS = 10
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}\Z")
ZTF_OBJECT = re.compile(r"^ZTF\d{2}[a-z]{7}\Z")
ID_COLUMNS = ("objectId", "diaObjectId")
LINKS = {
    ZTF: (("Lasair", "https://lasair-ztf.lsst.ac.uk/objects/{id}/"), ("ALeRCE", "https://alerce.online/object/{id}")),
    LSST: (("Lasair", "https://lasair-lsst.lsst.ac.uk/objects/{id}/"),
           ("ALeRCE", "https://lsst.alerce.online/object/{id}?survey=lsst")),
}
# What a time column means, for the people reading a card: Lasair's columns (ZTF and LSST) and a packet's own.
TIME_MEANINGS = {
    "mjdmin": "first detection", "jdmin": "first detection", "firstDiaSourceMjdTai": "first detection",
    "mjdmax": "last detection", "jdmax": "last detection", "lastDiaSourceMjdTai": "last detection",
    "UTC": "filter run", "candidate.jd": "observation", "diaSource.midpointMjdTai": "observation",
}
NESTED_COLUMNS = ("candidate", "diaSource")  # a packet's detection: its scalars are shown as candidate.<field>
MJD_EPOCH = dt.datetime(1858, 11, 17, tzinfo=dt.UTC)
DRAWN_INDEX = ".drawn.json"  # hidden (never synced): which points each light curve was drawn from
LIGHT_CURVE_STYLE = "3"  # part of each drawing's digest: a new layout redraws the light curves of older reports


class ReportError(Exception):
    """A report that cannot be made as asked (a bad date); ``str()`` is one line."""


@dataclass
class Card:
    object_id: str
    survey: str
    topics: set[str]
    alerts: int
    when: float  # MJD of the card's alert, or its receive time as MJD
    columns: list[tuple[str, str]] = field(default_factory=list)
    alert_file: str | None = None  # the file as received (a packet's .avro, or the JSON alert)
    view_file: str | None = None  # the readable JSON of a packet kept as .avro
    dated_by: str | None = None  # the message field ``when`` came from (None: the receive time)
    preview: str | None = None  # path relative to home
    stamps: list[tuple[str, str]] = field(default_factory=list)  # (type, path relative to home)
    missing: str | None = None  # why there is no preview
    light_curve: str | None = None  # path relative to home
    mjds: list[float] = field(default_factory=list)  # observation times of the night's alerts
    history: lightcurve.History = field(default_factory=lambda: lightcurve.History(lightcurve.MAG, []))
    curve_note: str | None = None  # what the light curve leaves out, or why there is none
    limits: list[lightcurve.Point] = field(default_factory=list)  # its upper limits (non-detections)


@dataclass(frozen=True)
class Written:
    index: Path
    pages: int
    cards: int
    files: list[str]  # relative to home


# --- gathering ---------------------------------------------------------------------------------------------------


def mjd_of(timestamp: float) -> float:
    return timestamp / 86400.0 + 40587.0


def iso_of_mjd(mjd: float) -> str:
    return (MJD_EPOCH + dt.timedelta(days=mjd)).strftime("%Y-%m-%d %H:%M:%S UTC")


def survey_of(object_id: str, meta: dict[str, Any]) -> str:
    if meta.get("survey") in (ZTF, LSST):
        return str(meta["survey"])
    return ZTF if ZTF_OBJECT.match(object_id) else LSST


def view_path(path: str) -> str:
    """The readable JSON of an alert file: itself, or the ``.json`` view beside a packet kept as received."""
    return path if path.endswith(".json") else str(Path(path).with_suffix(".json"))


def _read_alert(home: Path, path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The message and ztfd's metadata of an alert (a packet's from its JSON view); empty when it is gone."""
    return read_alert(lambda view: (home / view).read_bytes(), path)


def read_alert(read: Callable[[str], bytes], path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The message and ztfd's metadata of the alert file ``path``, its JSON view read by ``read(view path)``;
    empty when it cannot be read."""
    try:
        document = json.loads(read(view_path(path)))
    except (OSError, ValueError):
        return {}, {}
    if not isinstance(document, dict):
        return {}, {}
    message, meta = document.get("message"), document.get("ztfd")
    return (message if isinstance(message, dict) else {}), (meta if isinstance(meta, dict) else {})


def _format(value: Any) -> str | None:
    if value is None or isinstance(value, dict | list):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1e6 else f"{value:.6g}"
    return str(value)


def _scalars(message: dict[str, Any]) -> list[tuple[str, Any]]:
    """The message's top-level fields, then those of a packet's detection (``candidate.magpsf``)."""
    found = [(key, value) for key, value in message.items() if key not in ID_COLUMNS]
    for nested in NESTED_COLUMNS:
        if isinstance(message.get(nested), dict):
            found += [(f"{nested}.{key}", value) for key, value in message[nested].items()]
    return found


def columns_of(message: dict[str, Any], times_utc: dict[str, str]) -> list[tuple[str, str]]:
    """The columns a person reads: scalars only, the identifier left out, each time field as UTC under what it
    means ("first detection (mjdmin, jdmin)": two fields of the same meaning and instant shown once)."""
    found: list[tuple[str, str]] = []
    time_rows: dict[tuple[str, str], int] = {}  # (meaning, UTC text) -> its row
    for key, value in _scalars(message):
        if key in times_utc:
            text = times_utc[key].replace("T", " ").replace("Z", " UTC")
            meaning = TIME_MEANINGS.get(key, "time")
            row = time_rows.get((meaning, text))
            if row is not None:
                label, shown = found[row]
                found[row] = (label[:-1] + f", {key})", shown)
                continue
            time_rows[(meaning, text)] = len(found)
            found.append((f"{meaning} ({key})", text))
        elif key in TIME_MEANINGS and isinstance(value, str):  # Lasair's UTC: already a UTC time, no zone given
            found.append((f"{TIME_MEANINGS[key]} ({key})", f"{value[:60]} UTC"))
        elif (text := _format(value)) is not None:
            found.append((key, text if len(text) <= 60 else text[:57] + "…"))
        if len(found) == MAX_COLUMNS:
            break
    return found


def missing_reason(outcome: night.StampOutcome | None, survey: str, previews_on: bool) -> str:
    if outcome is None:
        return "no stamp job (stamps off, or not a ZTF alert)" if survey == ZTF else "no stamp job for this survey"
    reason = f": {outcome.reason}" if outcome.reason else ""
    if outcome.state == "failed":
        return f"failed{reason}"
    if outcome.state == "leased":
        return "being fetched"
    if outcome.state == "ready" and outcome.waiting == "unavailable":
        return f"not yet available{reason}"
    if outcome.state == "ready" and outcome.waiting == "retry":
        return f"retrying{reason}"
    if outcome.state == "done":
        return "fetched, no preview" + ("" if previews_on else " (stamps.previews is off)")
    return "queued"


def short_reason(text: str) -> str:
    """A missing-stamps reason without the per-alert detail, for the counts at the top."""
    head, _, _ = text.partition(":")
    return head


def gather(cfg: config.Config, conn: sqlite3.Connection, date: str, topic: str | None) -> tuple[list[Card], dict]:
    """The night's cards, sorted by time, and the counts for the top of the page."""
    alerts = alerts_on(conn, date, topic)
    by_object: dict[str, list[StoredAlert]] = {}
    for alert in alerts:  # in id order: the last of each object is its newest
        by_object.setdefault(alert.object_id, []).append(alert)
    outcomes = stamp_outcomes(conn, date, topic, by_object)
    images: dict[str, list[str]] = {}
    for path in image_files_of_night(conn, cfg.home, date):
        images.setdefault(path.split("/")[2], []).append(path)
    cards = []
    for object_id, seen in by_object.items():
        # Lasair resends an object whenever a selected column changes, and topic_refresh rows carry fewer
        # columns: the card shows every column of the night's messages, the newest value of each.
        message: dict[str, Any] = {}
        times_utc: dict[str, str] = {}
        meta: dict[str, Any] = {}
        for alert in seen:
            one, meta = _read_alert(cfg.home, alert.path)
            message.update(one)
            times_utc.update(meta.get("times_utc") or {})
        newest = seen[-1]
        survey = survey_of(object_id, meta)
        card = new_card(object_id, survey, [a.topic for a in seen], newest.obs_mjd, newest.received_at,
                        newest.path, message, times_utc, meta.get("dated_by"),
                        [a.obs_mjd for a in seen if a.obs_mjd is not None])
        outcome = outcomes.get(object_id)
        choose_stamps(card, images.get(object_id, []), outcome.candid if outcome is not None else None)
        if card.preview is None:
            card.missing = missing_reason(outcome, survey, cfg.stamps.previews)
        cards.append(card)
    return night_counts(cards, [a.topic for a in alerts], night.night_rejected(conn, date, topic))


def new_card(object_id: str, survey: str, topics: list[str], obs_mjd: float | None, received_at: float, path: str,
             message: dict[str, Any], times_utc: dict[str, str], dated_by: str | None, mjds: list[float]) -> Card:
    """An object's card from its alerts of the night (``topics``: one per alert) and the columns of their messages;
    ``obs_mjd``, ``received_at``, ``path`` and ``dated_by`` are its newest alert's."""
    when = obs_mjd if obs_mjd is not None else mjd_of(received_at)
    view = view_path(path)
    return Card(object_id, survey, set(topics), len(topics), when, columns_of(message, times_utc), path,
                view if view != path else None, dated_by=dated_by if obs_mjd is not None else None,
                mjds=sorted(set(mjds)), history=lightcurve.history_points(message),
                limits=lightcurve.history_limits(message))


def night_counts(cards: list[Card], topics: list[str], rejected: int,
                 note: str | None = None) -> tuple[list[Card], dict[str, Any]]:
    """The cards sorted by time, and the counts at the top of the page (``topics``: one per alert of the night;
    ``note``: where the night's alerts came from, shown under the counts when it is not this host's store)."""
    cards.sort(key=lambda c: (c.when, c.object_id))
    missing = Counter(short_reason(c.missing) for c in cards if c.missing)
    counts = {"alerts": len(topics), "objects": len(cards), "rejected": rejected,
              "with_stamps": sum(1 for c in cards if c.preview), "missing": dict(missing.most_common()),
              "topics": dict(Counter(topics).most_common()), "note": note}
    return cards, counts


def stamp_outcomes(conn: sqlite3.Connection, date: str, topic: str | None,
                    by_object: dict[str, list[StoredAlert]]) -> dict[str, night.StampOutcome]:
    """object_id -> what became of its stamps: its newest stamp record (done) if any, else its latest job."""
    records = stamp_records_on(conn, date, topic)
    jobs = night.jobs_on(conn, date)
    outcomes = {}
    for object_id, seen in by_object.items():
        done = [records[a.id] for a in seen if a.id in records]
        if done:
            newest = max(done, key=lambda r: r.done_at)
            outcomes[object_id] = night.StampOutcome("done", None, None, newest.detection_id, newest.done_at)
            continue
        waiting = [jobs[a.id] for a in seen if a.id in jobs]
        if waiting:
            outcomes[object_id] = max(waiting, key=lambda o: o.updated_at)
    return outcomes


def image_files_of_night(conn: sqlite3.Connection, home: Path, date: str) -> list[str]:
    """Every image file of the night: those on disk, and those the manifest still lists (archived to S3 only,
    until it forgets them a day later; a day after its upload it forgets a file on disk too)."""
    found = set(night.night_images(conn, date))
    folder = home / "images" / date
    for parent, _dirs, names in os.walk(folder):
        found.update(f"images/{date}/{Path(parent).relative_to(folder).as_posix()}/{name}" for name in names
                     if not files.is_temporary(name))
    return sorted(path.replace("/./", "/") for path in found)


def choose_stamps(card: Card, paths: list[str], candid: str | None) -> None:
    """The preview and stamps of ``candid`` (the one the stamp job chose), else of the newest candid with a
    preview; without any preview, the stamps of ``candid``."""
    previews = [p for p in paths if p.endswith(".png")]
    chosen = None
    if candid:
        chosen = next((p for p in previews if p.rsplit("/", 1)[1] == f"{candid}.png"), None)
    if chosen is None and previews:
        chosen = previews[-1]
    if chosen is not None:
        card.preview = chosen
        candid = chosen.rsplit("/", 1)[1][: -len(".png")]
    if candid:
        for kind in STAMP_TYPES:
            stamp = next((p for p in paths if p.rsplit("/", 1)[1].startswith(f"{candid}_{kind}.")), None)
            if stamp:
                card.stamps.append((kind, stamp))


# --- light curves ------------------------------------------------------------------------------------------------


def _night_end(date: str, survey: str) -> float:
    """The last MJD that belongs to the night: its UTC day for ZTF, dayObs (TAI − 12 h) for Rubin."""
    start = (dt.datetime.strptime(date, "%Y-%m-%d").replace(tzinfo=dt.UTC) - MJD_EPOCH).total_seconds() / 86400.0
    return start + (1.5 if survey == LSST else 1.0)


def _light_curves(cfg: config.Config, conn: sqlite3.Connection, date: str, cards: list[Card], folder: Path,
                  beat: Callable[[], None]) -> list[str]:
    """Draw each card's light curve (only what changed since the last report) and return every file's path."""
    kept = {survey: night.load_detections(conn, survey, [c.object_id for c in cards if c.survey == survey])
            for survey in {c.survey for c in cards}}
    index_path = folder / "lc" / DRAWN_INDEX
    try:
        drawn: dict[str, str] = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        drawn = {}
    written = []
    for number, card in enumerate(cards):
        if number % 50 == 0:
            beat()
        stored = kept[card.survey].get(card.object_id)
        unit, points = stored if stored else card.history[:2]
        if not stored and card.history.left_out:
            card.curve_note = f"left out of the light curve (unexpected type): {', '.join(card.history.left_out)}"
        end = _night_end(date, card.survey)
        points = [p for p in points if p.mjd <= end]
        if not points:
            continue
        limits = [p for p in card.limits if p.mjd <= end] if unit == card.history[0] else []
        target = folder / "lc" / f"{card.object_id}.png"
        digest = hashlib.sha256(lightcurve.encode(points).encode() + lightcurve.encode(limits).encode()
                                + repr(card.mjds).encode() + LIGHT_CURVE_STYLE.encode()).hexdigest()[:16]
        if drawn.get(card.object_id) != digest or not target.exists():
            try:
                image = lightcurve.draw(card.object_id, unit, points, card.mjds, limits)
            except Exception as exc:  # one object's odd values must not cost the night its report
                log.warning("report %s: the light curve of %s cannot be drawn: %s", date, card.object_id, exc)
                card.curve_note = f"the light curve could not be drawn ({type(exc).__name__})"
                continue
            files.atomic_write(target, image)
            drawn[card.object_id] = digest
        card.light_curve = files.relative_to_home(cfg.home, target)
        written.append(card.light_curve)
    if written:
        files.atomic_write(index_path, json.dumps(drawn, sort_keys=True).encode())
    return written


# --- the pages ---------------------------------------------------------------------------------------------------

STYLE = """
:root { color-scheme: light; --ink: #1d2330; --muted: #5b6475; --line: #d9dde5; --bg: #f4f5f8; --accent: #1f5fbf; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 "DejaVu Sans", "Helvetica Neue", Arial, sans-serif; color: var(--ink);
       background: var(--bg); }
header { padding: 16px 24px 8px; background: #fff; border-bottom: 1px solid var(--line); }
h1 { margin: 0 0 6px; font-size: 22px; }
.counts { display: flex; flex-wrap: wrap; gap: 8px 22px; margin: 8px 0; }
.counts b { font-size: 18px; }
.missing, .topics { color: var(--muted); margin: 4px 0; }
.note { color: #8a4b00; margin: 4px 0; }
nav { margin: 8px 0; }
nav a, nav span { display: inline-block; padding: 2px 8px; margin-right: 4px; border: 1px solid var(--line);
                  border-radius: 4px; text-decoration: none; color: var(--accent); background: #fff; }
nav span { color: var(--ink); background: var(--bg); font-weight: bold; }
main { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(100%, 860px), 1fr)); gap: 16px;
       padding: 16px 24px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 12px 14px; }
.card h2 { margin: 0; font-size: 17px; display: flex; align-items: baseline; gap: 12px; flex-wrap: wrap; }
.card h2 a { color: var(--accent); text-decoration: none; }
.card .links a { font-size: 13px; font-weight: normal; }
.meta { color: var(--muted); margin: 2px 0 8px; font-size: 13px; }
/* Never enlarged (its stamps are enlarged already) and shrunk smoothly: a nearest-neighbour shrink drops whole
   rows of the preview's thin header text (its second line lost its top). */
.triplet { width: auto; max-width: 100%; height: auto; display: block; border-radius: 3px; }
.nostamps { padding: 28px 12px; text-align: center; color: var(--muted); background: var(--bg);
            border: 1px dashed var(--line); border-radius: 3px; }
.below { display: flex; gap: 12px; margin-top: 8px; align-items: flex-start; }
.lc { width: 340px; height: auto; flex: none; border: 1px solid var(--line); border-radius: 3px; }
.nolc { width: 340px; flex: none; color: var(--muted); font-size: 12px; padding: 8px; }
.curve { width: 340px; flex: none; } .curve .lc { display: block; }
.lcnote { margin: 4px 0 0; color: #8a4b00; font-size: 12px; }
table { border-collapse: collapse; font-size: 12px; flex: 1; }
td { padding: 1px 6px 1px 0; vertical-align: top; }
td:first-child { color: var(--muted); white-space: nowrap; }
.files { font-size: 12px; margin-top: 6px; color: var(--muted); }
.files a { color: var(--accent); }
footer { padding: 8px 24px 24px; color: var(--muted); }
"""


def _href(page_dir: Path, home: Path, relative: str) -> str:
    """A URL from a page to a file under home, relative, each segment escaped."""
    target = os.path.relpath(home / relative, page_dir)
    return html.escape("/".join(urllib.parse.quote(part) for part in target.split(os.sep)))


def _card_html(card: Card, page_dir: Path, home: Path) -> str:
    e = html.escape
    oid = e(card.object_id)
    links = " ".join(f'<a href="{e(url.format(id=urllib.parse.quote(card.object_id)))}">{name}</a>'
                     for name, url in LINKS.get(card.survey, ()))
    first = LINKS.get(card.survey, ((None, None),))[0][1]
    title = f'<a href="{e(first.format(id=urllib.parse.quote(card.object_id)))}">{oid}</a>' if first else oid
    seen = f"{card.alerts} alerts" if card.alerts > 1 else "1 alert"
    when = iso_of_mjd(card.when)
    stamp_time = f'<time datetime="{when[:10]}T{when[11:19]}Z">{e(when)}</time>'
    what = f"observed {stamp_time} ({e(card.dated_by)})" if card.dated_by else f"received {stamp_time}"
    meta = f"{what} · {seen} · {e(', '.join(sorted(card.topics)))}"
    if card.preview:
        stamp = (f'<img class="triplet" src="{_href(page_dir, home, card.preview)}" '
                 f'alt="science, template and difference stamps of {oid}" loading="lazy">')
    else:
        stamp = f'<div class="nostamps">no stamps: {e(card.missing or "missing")}</div>'
    if card.light_curve:
        curve = (f'<img class="lc" src="{_href(page_dir, home, card.light_curve)}" alt="light curve of {oid}" '
                 f'loading="lazy">')
        if card.curve_note:
            curve = f'<div class="curve">{curve}<p class="lcnote">{e(card.curve_note)}</p></div>'
    elif card.curve_note:
        curve = f'<div class="nolc">no light curve: {e(card.curve_note)}</div>'
    else:
        curve = '<div class="nolc">no light curve: no detections kept and none in the message</div>'
    rows = "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in card.columns)
    file_links = []
    if card.alert_file:
        readable = card.view_file or card.alert_file
        file_links.append(f'<a href="{_href(page_dir, home, readable)}">alert (JSON)</a>')
        if card.view_file:
            packet = Path(card.alert_file).suffix.lstrip(".") or "packet"
            file_links.append(f'<a href="{_href(page_dir, home, card.alert_file)}">packet ({e(packet)})</a>')
    file_links += [f'<a href="{_href(page_dir, home, path)}">{e(kind)}</a>' for kind, path in card.stamps]
    return (f'<article class="card" id="{oid}"><h2>{title}<span class="links">{links}</span></h2>'
            f'<p class="meta">{meta}</p>{stamp}<div class="below">{curve}<table>{rows}</table></div>'
            f'<p class="files">files: {" · ".join(file_links)}</p>'
            f'<p class="archive">every alert of it, with its stamps: <code>ztfd object {oid}</code></p></article>')


def page_name(number: int) -> str:
    return "index.html" if number == 1 else f"page-{number}.html"


def _nav(pages: int, current: int) -> str:
    if pages <= 1:
        return ""
    items = [f"<span>{n}</span>" if n == current else f'<a href="{page_name(n)}">{n}</a>' for n in range(1, pages + 1)]
    return f'<nav aria-label="pages">page {"".join(items)}</nav>'


def _header(date: str, topic: str | None, counts: dict[str, Any], first: int, last: int) -> str:
    e = html.escape
    what = f"{e(date)} · {e(topic)}" if topic else e(date)
    missing = sum(counts["missing"].values())
    parts = [f"<span><b>{counts['alerts']}</b> alerts</span>", f"<span><b>{counts['objects']}</b> objects</span>",
             f"<span><b>{counts['rejected']}</b> rejected</span>",
             f"<span><b>{counts['with_stamps']}</b> with stamps</span>",
             f"<span><b>{missing}</b> without</span>"]
    why = "; ".join(f"{e(reason)} {n}" for reason, n in counts["missing"].items())
    topics = ", ".join(f"{e(t)} ({n} alerts)" for t, n in counts["topics"].items())
    shown = f"objects {first}–{last} of {counts['objects']}" if counts["objects"] else "no alerts stored"
    return (f"<h1>ztfd night report {what}</h1><div class=\"counts\">{''.join(parts)}</div>"
            + (f'<p class="note">{e(counts["note"])}</p>' if counts.get("note") else "")
            + (f'<p class="missing">stamps missing: {why}</p>' if why else "")
            + (f'<p class="topics">topics: {topics}</p>' if topics and not topic else "")
            + f'<p class="missing">{shown}, sorted by time (UTC)</p>')


def render_pages(date: str, topic: str | None, cards: list[Card], counts: dict[str, Any], page_dir: Path,
                 home: Path, per_page: int = CARDS_PER_PAGE) -> list[tuple[str, bytes]]:
    """Each page's file name and bytes."""
    pages = max(1, -(-len(cards) // per_page))
    made = []
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    for number in range(1, pages + 1):
        chunk = cards[(number - 1) * per_page:number * per_page]
        first = (number - 1) * per_page + 1 if chunk else 0
        nav = _nav(pages, number)
        body = "".join(_card_html(card, page_dir, home) for card in chunk)
        title = html.escape(f"ztfd {date}" + (f" {topic}" if topic else "")
                            + (f" (page {number})" if number > 1 else ""))
        document = (
            f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>'
            f"<style>{STYLE}</style></head><body><header>"
            f"{_header(date, topic, counts, first, first + len(chunk) - 1 if chunk else 0)}{nav}</header>"
            f"<main>{body}</main><footer>{nav}<p>written by ztfd {generated}</p></footer></body></html>\n"
        )
        made.append((page_name(number), document.encode()))
    return made


# --- one report, and the daemon's loop ---------------------------------------------------------------------------


def _listed(items: Iterable[str], most: int = 10) -> str:
    shown = list(items)
    return ", ".join(shown[-most:]) + (f" (and {len(shown) - most} older)" if len(shown) > most else "")


def refuse_empty(conn: sqlite3.Connection, date: str, topic: str | None) -> None:
    """A ``ReportError`` naming what exists when the topic has no alerts at all, or the night none (of it)."""
    if topic is not None and topic not in (known := night.topics_with_alerts(conn)):
        raise ReportError(f"no alerts of topic {topic}; topics with alerts: {_listed(known) or 'none'}")
    nights = night.nights_with_alerts(conn, topic)
    if date not in nights:
        of = f" of topic {topic}" if topic else ""
        raise ReportError(f"no alerts{of} on {date}; nights with alerts{of}: {_listed(nights) or 'none yet'}")


def latest_night(conn: sqlite3.Connection, topic: str | None = None) -> str | None:
    """The newest night with alerts (``ztfd report --date last``)."""
    nights = night.nights_with_alerts(conn, topic)
    return max(nights) if nights else None


class Night(Protocol):
    """Where a report's cards come from: this host's store (``HostNight``), or in fleet mode the fleet's data in the
    bucket (``reporting.fleet_night.FleetNight``). ``due`` lists the nights (date, what they were read as) whose
    report is due; ``reported`` remembers that one was written from that. A report that fails with one of
    ``transient`` (the bucket away) is tried again later (``Retries``), not only when the night changes.
    ``check_uploads``: in a fleet, put back the writer's reports another host's late upload replaced."""

    transient: tuple[type[Exception], ...]

    def gather(self, date: str, topic: str | None) -> tuple[list[Card], dict[str, Any]]: ...

    def due(self, now: float) -> list[tuple[str, Any]]: ...

    def reported(self, date: str, version: Any) -> None: ...

    def check_uploads(self, now: float) -> None: ...


class HostNight:
    """The alerts this host stored itself (one host; a fleet without the archive: ``note`` says so on the page)."""

    transient: tuple[type[Exception], ...] = ()

    def __init__(self, cfg: config.Config, conn: sqlite3.Connection, note: str | None = None) -> None:
        self.cfg, self.conn, self.note = cfg, conn, note

    def gather(self, date: str, topic: str | None) -> tuple[list[Card], dict[str, Any]]:
        refuse_empty(self.conn, date, topic)
        cards, counts = gather(self.cfg, self.conn, date, topic)
        return cards, {**counts, "note": self.note}

    def due(self, now: float) -> list[tuple[str, Any]]:
        return night.reports_due(self.conn, now - self.cfg.report.after_quiet, now - LOOKBACK_DAYS * 86400)

    def reported(self, date: str, version: Any) -> None:
        """Nothing to keep: ``build`` marks the report in the store."""

    def check_uploads(self, now: float) -> None:
        """Nothing to check: no other host writes this host's reports."""


HOST_ONLY = ("this host's alerts only: the fleet's alerts are read from its Parquet dataset in the bucket, and "
             "archive.enabled is off")


def night_of(cfg: config.Config, conn: sqlite3.Connection) -> Night:
    """The fleet's night in fleet mode with the archive on; else this host's (logged, and noted on the page, in a
    fleet without the archive)."""
    if not cfg.kafka.group_mode:
        return HostNight(cfg, conn)
    if not cfg.archive.enabled:
        log.warning("the night reports cover this host's alerts only: archive.enabled is off, and the fleet's "
                    "alerts are read from its Parquet dataset in the bucket")
        return HostNight(cfg, conn, HOST_ONLY)
    from ztfd.reporting.fleet_night import FleetNight

    return FleetNight(cfg, conn)


def report_dir(cfg: config.Config, date: str, topic: str | None) -> Path:
    return cfg.reports_dir / date / topic if topic else cfg.reports_dir / date


def build(cfg: config.Config, conn: sqlite3.Connection, date: str, topic: str | None = None,
          beat: Callable[[], None] = lambda: None, per_page: int = CARDS_PER_PAGE,
          source: Night | None = None) -> Written:
    """Write the report of ``date`` (optionally of one topic) from ``source`` (``night_of``: this host's store, or
    the fleet's bucket), record its files in the manifest, remember it."""
    if not DATE.match(date):
        raise ReportError(f"--date must be YYYY-MM-DD, not {date!r}")
    try:
        dt.date.fromisoformat(date)
    except ValueError:
        raise ReportError(f"--date {date} is not a date") from None
    if topic is not None and (not config.KAFKA_TOPIC.match(topic) or topic in (".", "..")):
        raise ReportError(f"--topic {topic!r} is not a topic name")
    changed_at = night.night_changed_at(conn, date) or 0.0
    folder = report_dir(cfg, date, topic)
    cards, counts = (source or night_of(cfg, conn)).gather(date, topic)
    if not counts["alerts"] and (folder / page_name(1)).exists():
        raise ReportError(f"the store holds no alert of {date}{f' ({topic})' if topic else ''}: the report written "
                          f"earlier ({folder / page_name(1)}) is kept, not replaced by an empty one")
    beat()
    written = _light_curves(cfg, conn, date, cards, folder, beat)
    for name, data in render_pages(date, topic, cards, counts, folder, cfg.home, per_page):
        files.atomic_write(folder / name, data)
        written.append(files.relative_to_home(cfg.home, folder / name))
    _record(cfg.home, conn, written)
    pages = max(1, -(-len(cards) // per_page))
    with store.transaction(conn):
        night.mark_report(conn, date, topic, changed_at, pages)
    log.info("report %s%s: %d alerts, %d objects, %d pages in %s", date, f" ({topic})" if topic else "",
             counts["alerts"], len(cards), pages, folder)
    return Written(folder / "index.html", pages, len(cards), written)


def _record(home: Path, conn: sqlite3.Connection, paths: Iterable[str]) -> None:
    rows = []
    for path in paths:
        data = (home / path).read_bytes()
        rows.append((path, len(data), files.md5_hex(data)))
    for start in range(0, len(rows), 500):
        with store.transaction(conn):
            store.record_files(conn, rows[start:start + 500])


class Retries:
    """Nights whose last report failed for a reason that may pass (``Night.transient``: the bucket away, a file of
    it unreadable). Each is tried again after a delay that doubles from ``WATCH_INTERVAL`` to an hour
    (``RETRY_BACKOFF``), at once when its files change: a reason that never passes (a type conflict between files)
    costs a read of the night an hour, not every round. Logged as a warning when its reason changes."""

    def __init__(self, backoff: lifecycle.Backoff = RETRY_BACKOFF,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backoff, self.clock = backoff, clock
        self._failed: dict[str, tuple[Any, int, float, str]] = {}  # date -> (version, attempts, next try, reason)

    def waiting(self, date: str, version: Any) -> bool:
        said = self._failed.get(date)
        return said is not None and said[0] == version and self.clock() < said[2]

    def failed(self, date: str, version: Any, exc: BaseException) -> float:
        """Note a failure; the seconds until the night is tried again."""
        said = self._failed.get(date)
        attempts = said[1] + 1 if said is not None and said[0] == version else 1
        delay = self.backoff.delay(attempts)
        reason = str(exc)
        if said is None or said[3] != reason:
            log.warning("report %s failed: %s (tried again in %.0f s, then less often while it fails, up to every "
                        "%.0f s)", date, reason, delay, self.backoff.cap)
        else:
            log.debug("report %s failed again (%d times): %s; next try in %.0f s", date, attempts, reason, delay)
        self._failed[date] = (version, attempts, self.clock() + delay, reason)
        return delay

    def succeeded(self, date: str) -> None:
        if self._failed.pop(date, None) is not None:
            log.info("report %s written after failures", date)


def watch(cfg: config.Config, name: str, stop: lifecycle.Stop) -> int:
    """The daemon's reporter: every ``WATCH_INTERVAL`` s, rewrite the reports of nights quiet for
    ``report.after_quiet`` s that changed since their last report; heartbeat throughout. In fleet mode only on the
    host that holds partition 0 (``reporting.fleet.ReportTurn``), from the fleet's data in the bucket (``night_of``)."""
    conn = store.connect(cfg.db_path, create=False)
    source = night_of(cfg, conn)
    turn = None
    if cfg.kafka.group_mode:
        from ztfd.reporting.fleet import ReportTurn

        turn = ReportTurn(cfg)
    heartbeat = Heartbeat(name, Role.REPORTER)
    failed: dict[str, Any] = {}  # date -> the version a report failed on: tried again only after a new one
    retries = Retries()

    def beat() -> None:
        heartbeat.beat_if_due(conn)

    try:
        while not stop.is_set():
            beat()
            mine = turn is None or turn.mine()
            due = _due(source, time.time()) if mine else []
            if mine and turn is not None:
                _check_uploads(source, time.time())
            # (another host writes them: asked again next round, partitions move)
            for date, changed in due:
                if stop.is_set():
                    break
                if failed.get(date) == changed or retries.waiting(date, changed):
                    continue
                try:
                    build(cfg, conn, date, beat=beat, source=source)
                    source.reported(date, changed)
                    retries.succeeded(date)
                except source.transient as exc:
                    retries.failed(date, changed, exc)
                except (OSError, sqlite3.Error, ReportError) as exc:
                    log.error("report %s failed: %s (tried again when the night changes)", date, exc)
                    failed[date] = changed
                except Exception:  # one night's bad data must not stop the reports of the others
                    log.exception("report %s failed (tried again when the night changes)", date)
                    failed[date] = changed
            deadline = time.monotonic() + min(WATCH_INTERVAL, max(1.0, cfg.report.after_quiet / 4))
            while time.monotonic() < deadline and not stop.wait(min(heartbeat.interval, deadline - time.monotonic())):
                beat()
    finally:
        conn.close()
    return 0


def _check_uploads(source: Night, now: float) -> None:
    try:
        source.check_uploads(now)
    except Exception as exc:  # the bucket away, refused: asked again next round
        log.warning("cannot check this host's night reports in the bucket: %s", exc)


def _due(source: Night, now: float) -> list[tuple[str, Any]]:
    try:
        return source.due(now)
    except OSError as exc:  # the bucket away (fleet mode): asked again next round
        log.warning("cannot tell which night reports are due: %s", exc)
        return []


def run_watch(cfg: config.Config, name: str) -> int:
    """``ztfd report --watch`` (the supervisor's ``reporter``): ``watch`` until SIGTERM, at a low CPU priority."""
    os.nice(REPORTER_NICENESS)  # reports can wait; storing alerts and fetching stamps cannot
    with lifecycle.stop_on_signals() as stop:
        return watch(cfg, name, stop)
