"""Night reports: a real daemon (Tansu, the local stamp service) archives a stream, its reporter writes the
reports once the nights are quiet, ``ztfd report`` writes them on demand, and headless Chromium renders them with
every image loaded and no console error."""

from __future__ import annotations

import html.parser
import os
import shutil
import subprocess
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import tools
from tests.conftest import FAST_KAFKA_OPTIONS, child_env, wait_until, write_config, ztfd_command
from ztfd import config, files, store
from ztfd.embedded.alerce import StampService
from ztfd.embedded.kafka import KafkaBroker
from ztfd.embedded.s3 import S3Server
from ztfd.embedded.samples import message_stream, packets
from ztfd.reporting import lightcurve, night_report

NIGHT = "2021-09-01"  # five sample objects, one of them with two packets
UNKNOWN = "ZTF19aayvyfa"  # the stamp service pretends not to know it: its stamps are missing, and why
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Home:
    cfg_path: Path
    cfg: config.Config
    topic: str

    def conn(self) -> store.sqlite3.Connection:  # type: ignore[name-defined]
        return store.connect(self.cfg.db_path)

    def objects(self, date: str) -> set[str]:
        conn = self.conn()
        try:
            return {r[0] for r in conn.execute("SELECT object_id FROM alerts WHERE date = ?", (date,))}
        finally:
            conn.close()

    def report(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(ztfd_command(self.cfg_path, "report", *args), capture_output=True, text=True,
                              env=child_env(), timeout=120)


def settled(home: Home, produced: int) -> bool:
    conn = home.conn()
    try:
        received = conn.execute("SELECT (SELECT count(*) FROM alerts) + (SELECT count(*) FROM rejected)").fetchone()[0]
        busy = conn.execute("SELECT count(*) FROM jobs WHERE state = 'leased' OR (state = 'ready' "
                            "AND waiting IS NOT 'unavailable')").fetchone()[0]
        waiting = conn.execute("SELECT count(*) FROM jobs WHERE waiting = 'unavailable' AND state = 'ready'")
        return received >= produced and busy == 0 and waiting.fetchone()[0] >= 1
    finally:
        conn.close()


def reports_written(home: Home) -> bool:
    """Every night with alerts has a report from the daemon that saw the night as it is now."""
    conn = home.conn()
    try:
        nights = {r[0] for r in conn.execute("SELECT DISTINCT date FROM alerts")}
        fresh = {r[0] for r in conn.execute(
            "SELECT r.date FROM reports r WHERE r.topic = '' AND r.changed_at >= (SELECT max(last_received_at) "
            "FROM counter_alerts c WHERE c.date = r.date)")}
        return bool(nights) and nights <= fresh
    finally:
        conn.close()


@pytest.fixture(scope="module")
def home(kafka: KafkaBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    """A home filled by a real daemon: every sample object in every message shape, two poison messages."""
    base = tmp_path_factory.mktemp("report")
    topic = f"report-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(topic)
    with StampService() as stamps:
        stamps.unknown_object(object_id=UNKNOWN)
        cfg_path = write_config(base / "home" / "ztfd.toml", {
            "kafka": {"bootstrap_servers": kafka.bootstrap, "group_id": topic, "topics": [topic]},
            "kafka.options": dict(FAST_KAFKA_OPTIONS),
            "stamps": {"enabled": True, "workers": 1, "alerce_stamp_url": stamps.url, "alerce_api_url": stamps.url,
                       "rate_limit": 0.0, "timeout": 10.0},
            "supervisor": {"heartbeat_timeout": 30, "stop_timeout": 10},
            "report": {"after_quiet": 2.0},
        }, base / "home")
        home = Home(cfg_path, config.load(cfg_path), topic)
        messages = list(message_stream(4 * len(packets())))
        kafka.produce(topic, messages)
        kafka.produce(topic, [b"\xff not utf-8", b"{}"])
        started = subprocess.run(ztfd_command(cfg_path, "start"), capture_output=True, text=True, env=child_env(),
                                 timeout=60)
        assert started.returncode == 0, started.stderr
        try:
            wait_until(lambda: settled(home, len(messages) + 2), 120, "the stream stored and its stamps settled")
            wait_until(lambda: reports_written(home), 120, "the reporter to write every night's report")
        finally:
            subprocess.run(ztfd_command(cfg_path, "stop", "--timeout", "15"), capture_output=True, env=child_env(),
                           timeout=60)
    yield home


class Page(html.parser.HTMLParser):
    """What a report page holds: its cards, images, links, scripts and remote resources."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.cards: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.scripts = 0
        self.times: list[str] = []
        self.text: list[str] = []
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "article":
            self.cards.append(str(values.get("id")))
        elif tag == "img":
            self.images.append(str(values["src"]))
        elif tag == "a":
            self.links.append(str(values["href"]))
        elif tag == "time":
            self.times.append(str(values["datetime"]))
        elif tag in ("script", "link", "iframe", "object", "embed"):
            self.scripts += 1

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def local_target(page: Path, href: str) -> Path:
    return (page.parent / urllib.parse.unquote(href)).resolve()


def test_the_reporter_writes_every_night_and_records_its_files(home: Home) -> None:
    conn = home.conn()
    try:
        nights = sorted({r[0] for r in conn.execute("SELECT DISTINCT date FROM alerts")})
        recorded = {r[0] for r in conn.execute("SELECT path FROM manifest WHERE path LIKE 'reports/%'")}
    finally:
        conn.close()
    for date in nights:
        index = home.cfg.reports_dir / date / "index.html"
        assert index.exists(), date
        assert f"reports/{date}/index.html" in recorded
        assert set(Page(index).cards) == home.objects(date)
    lc = {p for p in recorded if "/lc/" in p}
    assert lc and all((home.cfg.home / p).exists() for p in lc)


def test_report_of_a_night_has_a_card_per_object_and_every_link_resolves(home: Home) -> None:
    result = home.report("--date", NIGHT)
    assert result.returncode == 0, result.stderr
    index = home.cfg.reports_dir / NIGHT / "index.html"
    assert str(index) in result.stdout
    page = Page(index)
    objects = home.objects(NIGHT)
    assert set(page.cards) == objects and len(page.cards) == len(objects)
    assert page.scripts == 0
    assert all(not src.startswith(("http:", "https:", "//", "/")) for src in page.images), "a remote or absolute image"
    for src in page.images:
        assert local_target(index, src).is_file(), src
    local = [href for href in page.links if not href.startswith("https://")]
    assert local and all(local_target(index, href).is_file() for href in local)
    for object_id in objects:
        assert f"https://lasair-ztf.lsst.ac.uk/objects/{object_id}/" in page.links
        assert f"https://alerce.online/object/{object_id}" in page.links
    text = " ".join(" ".join(page.text).split())
    conn = home.conn()
    try:
        alerts = conn.execute("SELECT count(*) FROM alerts WHERE date = ?", (NIGHT,)).fetchone()[0]
    finally:
        conn.close()
    assert f"{alerts} alerts" in text and f"{len(objects)} objects" in text
    assert all(f"ztfd object {object_id}" in text for object_id in objects)  # its row in the Parquet dataset
    assert "not yet available" in text and "ALeRCE does not know the object yet" in text
    triplets = [src for src in page.images if src.endswith(".png") and "/images/" in src]
    assert len(triplets) == len(objects) - 1  # all but the object the stamp service does not know
    assert len(page.times) == len(objects) and page.times == sorted(page.times), "cards are not sorted by time"
    assert all(t.startswith(NIGHT) for t in page.times)


def test_a_topic_report_and_pages_of_at_most_n_cards(home: Home) -> None:
    result = home.report("--date", NIGHT, "--topic", home.topic)
    assert result.returncode == 0, result.stderr
    topic_index = home.cfg.reports_dir / NIGHT / home.topic / "index.html"
    page = Page(topic_index)
    assert set(page.cards) == home.objects(NIGHT)
    assert all(local_target(topic_index, src).is_file() for src in page.images)

    conn = home.conn()
    try:
        written = night_report.build(home.cfg, conn, NIGHT, home.topic, per_page=2)
    finally:
        conn.close()
    objects = home.objects(NIGHT)
    assert written.pages == -(-len(objects) // 2) >= 2
    seen: list[str] = []
    for number in range(1, written.pages + 1):
        path = topic_index.parent / night_report.page_name(number)
        cards = Page(path).cards
        assert 1 <= len(cards) <= 2
        seen += cards
        links = Page(path).links
        assert all(night_report.page_name(n) in links for n in range(1, written.pages + 1) if n != number)
    assert sorted(seen) == sorted(objects)


def test_report_files_sync_to_s3_like_any_other(home: Home, tmp_path: Path) -> None:
    assert home.report("--date", NIGHT).returncode == 0
    with S3Server(log_path=tmp_path / "moto.log") as s3:
        s3.create_bucket("mirror")
        cfg_path = write_config(tmp_path / "sync.toml", {
            "kafka": {"group_id": "sync", "topics": [home.topic]},
            "s3": {"bucket": "mirror", "prefix": "ztf/", "endpoint_url": s3.endpoint_url, "region": "us-east-1"},
        }, home.cfg.home)
        synced = subprocess.run(ztfd_command(cfg_path, "sync", "--once"), capture_output=True, text=True,
                                env=child_env(**s3.env()), timeout=120)
        assert synced.returncode == 0, synced.stdout + synced.stderr
        keys = set(s3.objects("mirror"))
    folder = home.cfg.reports_dir / NIGHT
    page = Page(folder / "index.html")
    assert f"ztf/reports/{NIGHT}/index.html" in keys
    # What the page links to is in the mirror at the same relative place, so the page works from S3 too.
    for src in page.images:
        target = local_target(folder / "index.html", src).relative_to(home.cfg.home.resolve())
        assert f"ztf/{target}" in keys, target
    assert not any(key.endswith(night_report.DRAWN_INDEX) for key in keys)


@pytest.mark.parametrize("args", [["--date", "2021-13-01"], ["--date", "yesterday"], ["--watch", "--date", NIGHT],
                                  ["--date", NIGHT, "--topic", ".."], ["--date", NIGHT, "--topic", "a/b"]])
def test_a_bad_date_exits_2(home: Home, args: list[str]) -> None:
    result = home.report(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("ztfd: report")


def test_headless_chromium_renders_the_report_with_every_image(home: Home, tmp_path: Path) -> None:
    assert home.report("--date", NIGHT).returncode == 0
    index = home.cfg.reports_dir / NIGHT / "index.html"
    with tools.Chromium(tmp_path / "chromium", width=1400, height=1050) as browser:
        browser.open(index.as_uri())
        images = browser.images()
        assert len(images) == len(Page(index).images) > 0
        broken = [image["src"] for image in images if not image["ok"] or image["width"] <= 0]
        assert not broken, f"broken images: {broken}"
        assert browser.console_errors() == []
        assert browser.evaluate("document.querySelectorAll('article.card').length") == len(home.objects(NIGHT))
        # Previews are shown at most at their own size, and shrunk smoothly: the header text keeps all its rows.
        shown = browser.evaluate("Array.from(document.querySelectorAll('img.triplet')).map(i => "
                                 "[i.width, i.naturalWidth, getComputedStyle(i).imageRendering])")
        assert shown and all(0 < width <= natural for width, natural, _ in shown), shown
        assert all(rendering == "auto" for width, natural, rendering in shown if width < natural), shown
        shot = browser.screenshot(tmp_path / "report.png")
    assert shot.stat().st_size > 10_000
    with shot.open("rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("SAVE_REPORT_SCREENSHOT"):  # to refresh docs/report.png: SAVE_REPORT_SCREENSHOT=docs/report.png
        shutil.copyfile(shot, ROOT / os.environ["SAVE_REPORT_SCREENSHOT"])


def test_the_browser_check_catches_a_broken_image(home: Home, tmp_path: Path) -> None:
    """The check above can fail: a page with a missing image is caught by both the image and the console check."""
    broken = tmp_path / "broken.html"
    broken.write_text('<!doctype html><html><body><img src="missing.png" alt="x"></body></html>', encoding="utf-8")
    with tools.Chromium(tmp_path / "chromium") as browser:
        browser.open(broken.as_uri())
        assert [image["ok"] for image in browser.images()] == [False]
        assert any("ERR_FILE_NOT_FOUND" in error for error in browser.console_errors())


def test_light_curve_points_from_a_packets_history() -> None:
    ztf = {"objectId": "ZTF21abcdefg",
           "candidate": {"jd": 2459458.7, "fid": 2, "magpsf": 19.5, "sigmapsf": 0.1},
           "prv_candidates": [{"jd": 2459450.7, "fid": 1, "magpsf": 19.9, "sigmapsf": 0.2},
                              {"jd": 2459449.7, "fid": 1, "magpsf": None, "diffmaglim": 20.5}]}
    unit, points, left_out = lightcurve.history_points(ztf)
    assert unit == lightcurve.MAG and left_out == ()
    assert [(round(p.mjd, 1), p.band, p.value) for p in points] == [(59450.2, "g", 19.9), (59458.2, "r", 19.5)]
    lsst = {"diaObjectId": 313637921267122191, "alert": {"diaSourcesList": [
        {"midpointMjdTai": 61001.2, "band": "r", "psfFlux": 5000.0, "psfFluxErr": 40.0},
        {"midpointMjdTai": 61000.1, "band": "g", "psfFlux": 4200.5, "psfFluxErr": 35.0},
        {"midpointMjdTai": 61000.3, "band": "g", "psfFlux": None}]}}
    unit, points, _ = lightcurve.history_points(lsst)
    assert unit == lightcurve.FLUX
    assert [(p.band, p.value) for p in points] == [("g", 4200.5), ("r", 5000.0)]
    assert lightcurve.decode(lightcurve.encode(points)) == points
    assert lightcurve.history_points({"objectId": "ZTF21abcdefg", "rmag": 19.0}) == (lightcurve.FLUX, [], ())
    png = lightcurve.draw("x", unit, points, marks=[61000.5])
    assert png.startswith(b"\x89PNG")


def test_a_nights_images_are_those_on_disk_and_those_the_manifest_still_lists(tmp_path: Path) -> None:
    """A day after an upload the manifest forgets the file (``ztfd prune``): the report finds it on disk; an image
    archived to S3 only is found while the manifest still lists it."""
    conn = store.connect(tmp_path / "state" / "ztfd.sqlite3")
    on_disk = ["images/2026-01-02/ZTF26aaaaaaa/1_science.fits.gz", "images/2026-01-02/ZTF26aaaaaaa/1.png"]
    for path in on_disk:
        files.atomic_write(tmp_path / path, b"x")
    (tmp_path / "images/2026-01-02/ZTF26aaaaaaa/.1.png.1.tmp").write_bytes(b"half")  # a temporary: not an image
    archived = "images/2026-01-02/ZTF26bbbbbbb/2.png"  # in S3 only: its row is all that says so
    with store.transaction(conn):
        store.record_files(conn, [(archived, 1, "0" * 32), (on_disk[0], 1, "0" * 32)])
    assert night_report.image_files_of_night(conn, tmp_path, "2026-01-02") == sorted([*on_disk, archived])
    conn.close()
