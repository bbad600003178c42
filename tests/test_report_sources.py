"""Night reports of every source, through the real broker and the real CLI: ZTF's Avro packets, Rubin's packets
(Fink's re-publication of real Rubin alerts), Lasair-LSST in full, lite and plain output, Lasair-ZTF rows. Each card
draws the light curve its alert carries, links a readable alert (the JSON view of a packet) and the packet, names
each time field by what it is; the previews are shown at their own size; nonsense (a night without alerts, an
unknown topic) is refused before anything is written."""

from __future__ import annotations

import json
import logging
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import tools
from tests.avro_support import fink_lsst, produce_keyed
from tests.conftest import FAST_KAFKA_OPTIONS, child_env, write_config, ztfd_command
from tests.stamp_support import FAST_STAMPS, fetch_until_final
from tests.test_avro_streams import consume_all
from tests.test_consumer import Consumers
from tests.test_report import Page, local_target
from ztfd import config, store
from ztfd.embedded import avro_samples, lsst_samples
from ztfd.embedded.alerce import StampService
from ztfd.embedded.kafka import KafkaBroker
from ztfd.embedded.samples import message_stream, packets
from ztfd.reporting import lightcurve, night_report
from ztfd.store.manifest import manifest_files

ALERCE_LSST = "https://lsst.alerce.online/object/{}?survey=lsst"


@dataclass
class Sources:
    cfg_path: Path
    cfg: config.Config
    topics: dict[str, str]  # what -> topic

    def report(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(ztfd_command(self.cfg_path, "report", *args), capture_output=True, text=True,
                              env=child_env(), timeout=120)

    def nights(self, topic: str) -> dict[str, int]:
        conn = store.connect(self.cfg.db_path)
        try:
            return dict(conn.execute("SELECT date, count(*) FROM alerts WHERE topic = ? GROUP BY date", (topic,)))
        finally:
            conn.close()

    def topic_report(self, what: str) -> tuple[Path, Page]:
        """The report of ``what``'s busiest night, for that topic alone."""
        topic = self.topics[what]
        nights = self.nights(topic)
        date = max(nights, key=lambda d: (nights[d], d))
        result = self.report("--date", date, "--topic", topic)
        assert result.returncode == 0, result.stderr
        index = self.cfg.reports_dir / date / topic / "index.html"
        return index, Page(index)


@pytest.fixture(scope="module")
def sources(kafka: KafkaBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sources]:
    base = tmp_path_factory.mktemp("report-sources")
    suffix = uuid.uuid4().hex[:8]
    topics = {"ztf-avro": f"ztf_packets_{suffix}", "rubin": f"fink_lsst_{suffix}",
              "lasair-lsst": f"lasair_lsst_{suffix}", "lasair-ztf": f"lasair_ztf_{suffix}"}
    for topic in topics.values():
        kafka.create_topic(topic)
    kafka.produce(topics["ztf-avro"], [p.path.read_bytes() for p in packets()])
    schema, records = fink_lsst()
    produce_keyed(kafka.bootstrap, topics["rubin"], [avro_samples.fink_message(schema, r) for r in records])
    kafka.produce(topics["lasair-lsst"], lsst_samples.message_stream(15))
    kafka.produce(topics["lasair-ztf"], [json.dumps(m) for m in message_stream(2 * len(packets()))])
    with StampService() as stamps:
        cfg_path = write_config(base / "home" / "ztfd.toml", {
            "kafka": {"bootstrap_servers": kafka.bootstrap, "group_id": f"g{suffix}", "topics": list(topics.values())},
            "kafka.formats": {topics["ztf-avro"]: "ztf-avro", topics["rubin"]: "fink"},
            "kafka.options": dict(FAST_KAFKA_OPTIONS),
            "stamps": {**FAST_STAMPS, "alerce_stamp_url": stamps.url, "alerce_api_url": stamps.url,
                       "lsst_provider": "alerce", "alerce_lsst_url": stamps.url, "lasair_lsst_url": stamps.url},
        }, base / "home")
        running = Consumers()
        try:
            consume_all(running, cfg_path, topics["ztf-avro"], alerts=len(packets()))
            consume_all(running, cfg_path, topics["rubin"], alerts=len(records) - 2)  # 2 solar-system sources
            consume_all(running, cfg_path, topics["lasair-lsst"], alerts=15)
            consume_all(running, cfg_path, topics["lasair-ztf"], alerts=2 * len(packets()))
        finally:
            running.stop_all()
        conn = store.connect(base / "home" / "state" / "ztfd.sqlite3")
        try:
            fetch_until_final(cfg_path, conn, base / "fetch.log", "every stamp job final", timeout=90)
        finally:
            conn.close()
    yield Sources(cfg_path, config.load(cfg_path), topics)


def card_texts(index: Path) -> dict[str, str]:
    """object id -> the text of its card."""
    found: dict[str, str] = {}
    current = None
    for line in index.read_text(encoding="utf-8").split("<article")[1:]:
        current = line.split('id="', 1)[1].split('"', 1)[0]
        found[current] = " ".join(line.replace("<", " <").split())
    return found


@pytest.mark.parametrize("what", ["ztf-avro", "rubin", "lasair-lsst"])
def test_every_card_draws_the_light_curve_its_alert_carries(sources: Sources, what: str) -> None:
    index, page = sources.topic_report(what)
    cards = card_texts(index)
    assert cards and not [oid for oid, text in cards.items() if "no light curve" in text], cards.keys()
    curves = [src for src in page.images if src.split("/")[-2:-1] == ["lc"]]
    assert len(curves) == len(cards)
    assert all(local_target(index, src).stat().st_size > 0 for src in curves)


def test_a_packet_card_links_its_json_view_and_the_packet(sources: Sources) -> None:
    index, page = sources.topic_report("ztf-avro")
    views = [h for h in page.links if h.endswith(".json")]
    raw = [h for h in page.links if h.endswith(".avro")]
    assert len(views) == len(raw) == len(page.cards)
    for href in views:
        document = json.loads(local_target(index, href).read_bytes())
        assert document["message"]["candidate"]["magpsf"] > 0  # readable: the packet's JSON view
    assert all(local_target(index, href).read_bytes()[:4] == b"Obj\x01" for href in raw)
    text = " ".join(card_texts(index).values())
    assert "alert (JSON)" in text and "packet (avro)" in text
    assert "observation (candidate.jd)" in text and "observed" in text


def test_upper_limits_come_from_the_alert() -> None:
    """A real ZTF packet's JSON view: its detections and its non-detections (diffmaglim, no magpsf)."""
    import fastavro

    with_limits = 0
    for packet in packets():
        with packet.path.open("rb") as handle:
            record = next(iter(fastavro.reader(handle)))
        unit, points, _ = lightcurve.history_points(record)
        limits = lightcurve.history_limits(record)
        assert unit == lightcurve.MAG and points
        undetected = [r for r in record["prv_candidates"] or [] if r.get("magpsf") is None and r.get("diffmaglim")]
        assert len(limits) == len({(r["jd"], r["fid"], r["diffmaglim"]) for r in undetected})
        with_limits += bool(limits)
    assert with_limits, "the samples have packets with non-detections"
    full = json.loads(lsst_samples.lasair_fixture_message("full"))
    full["alert"]["diaNondetectionLimitsList"] = [{"midpointMjdTai": 61000.5, "band": "g", "diaNoise": 120.0}]
    assert lightcurve.history_limits(full) == [lightcurve.Point(61000.5, "g", 120.0, None)]


def test_a_light_curves_title_and_legend_stay_off_the_data() -> None:
    """Whatever the object id (Rubin's have 18 digits) and however many bands: the legend and the title lie
    outside the axes and inside the image."""
    points = [lightcurve.Point(61000 + i / 3, band, 1000.0 + i, 10.0) for i, band in enumerate("ugrizy" * 3)]
    limits = [lightcurve.Point(60999.0, "g", 300.0, None)]
    found = lightcurve.layout("313637921267122191", lightcurve.FLUX, points, [61001.0], limits)
    x0, y0, x1, y1 = found["figure"]
    axes = found["axes"]

    def overlaps(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    for name in ("legend", "text0", "text1"):
        box = found[name]
        assert not overlaps(box, axes), f"the {name} covers the data"
        assert x0 <= box[0] and box[2] <= x1 and y0 <= box[1] and box[3] <= y1, f"the {name} is cut off"


def test_time_fields_are_named_by_what_they_are_and_duplicates_shown_once() -> None:
    message = {"objectId": "ZTF21abvawaj", "mjdmin": 59448.1, "jdmin": 2459448.6, "mjdmax": 59458.2,
               "jdmax": 2459458.7, "rmag": 19.1, "UTC": "2021-09-01 05:30:47"}
    times = {"mjdmin": "2021-08-22T02:24:00.000Z", "jdmin": "2021-08-22T02:24:00.000Z",
             "mjdmax": "2021-09-01T04:48:00.000Z", "jdmax": "2021-09-01T04:48:00.000Z"}
    columns = dict(night_report.columns_of(message, times))
    assert columns == {"first detection (mjdmin, jdmin)": "2021-08-22 02:24:00.000 UTC",
                       "last detection (mjdmax, jdmax)": "2021-09-01 04:48:00.000 UTC",
                       "rmag": "19.1", "filter run (UTC)": "2021-09-01 05:30:47 UTC"}


def test_lasair_cards_label_their_times_and_lsst_cards_link_alerce(sources: Sources) -> None:
    index, page = sources.topic_report("lasair-ztf")
    text = " ".join(card_texts(index).values())
    # The stream mixes the SN-like rows (mjdmin, mjdmax) with rows of jdmin, jdmax: the same instants, one row.
    assert "first detection (mjdmin, jdmin)" in text and "last detection (mjdmax, jdmax)" in text
    assert "filter run (UTC)" in text and " mjdmin " not in text and " jdmin " not in text
    for what in ("lasair-lsst", "rubin"):
        _index, page = sources.topic_report(what)
        assert all(ALERCE_LSST.format(oid) in page.links for oid in page.cards), page.links


def test_previews_are_shown_at_their_own_size(sources: Sources, tmp_path: Path) -> None:
    """An 812-px preview is not scaled down (its title text stays sharp), nor drawn pixelated."""
    index, page = sources.topic_report("ztf-avro")
    assert any(src.endswith(".png") and "/images/" in src for src in page.images)
    with tools.Chromium(tmp_path / "chromium", width=1400, height=1000) as browser:
        browser.open(index.as_uri())
        browser.images()
        shown = browser.evaluate(
            "JSON.stringify([...document.querySelectorAll('img.triplet')].map(i => [i.naturalWidth, "
            "i.getBoundingClientRect().width, getComputedStyle(i).imageRendering]))")
        assert browser.console_errors() == []
    triplets = json.loads(shown)
    assert triplets
    for natural, width, rendering in triplets:
        assert natural > 0 and abs(width - natural) < 1, (natural, width)
        assert rendering != "pixelated"


def reports_recorded(cfg: config.Config) -> list[str]:
    conn = store.connect(cfg.db_path)
    try:
        return [f.path for f in manifest_files(conn, "reports/")]
    finally:
        conn.close()


def test_report_refuses_nonsense_and_writes_nothing(sources: Sources) -> None:
    listing = sources.report()
    assert listing.returncode == 0, listing.stderr
    every: dict[str, int] = {}
    for topic in sources.topics.values():
        for date, alerts in sources.nights(topic).items():
            every[date] = every.get(date, 0) + alerts
    assert listing.stdout.splitlines() == [f"{date}  {every[date]} alerts" for date in sorted(every)]

    before = sorted(p for p in sources.cfg.reports_dir.rglob("*")) if sources.cfg.reports_dir.exists() else []
    recorded = reports_recorded(sources.cfg)
    empty = sources.report("--date", "1999-01-01")
    assert empty.returncode == 2
    assert empty.stderr.strip().splitlines() == [
        f"ztfd: report: no alerts on 1999-01-01; nights with alerts: {', '.join(sorted(every))}"]
    typo = sources.report("--date", max(every), "--topic", "lasair_2SN-likecandidatez")
    assert typo.returncode == 2 and len(typo.stderr.strip().splitlines()) == 1
    assert all(topic in typo.stderr for topic in sources.topics.values())
    other = sources.topics["rubin"]
    assert min(every) not in sources.nights(other)
    wrong_night = sources.report("--date", min(every), "--topic", other)
    assert wrong_night.returncode == 2 and f"nights with alerts of topic {other}: " in wrong_night.stderr
    after = sorted(p for p in sources.cfg.reports_dir.rglob("*")) if sources.cfg.reports_dir.exists() else []
    assert after == before and reports_recorded(sources.cfg) == recorded, "a refused report wrote something"

    latest = sources.report("--date", "last")
    assert latest.returncode == 0, latest.stderr
    assert str(sources.cfg.reports_dir / max(every) / "index.html") in latest.stdout


def test_the_store_lists_nights_from_its_counters(tmp_path: Path) -> None:
    from ztfd.store import report as nights
    from ztfd.store.alerts import NewAlert, insert_alerts

    conn = store.connect(tmp_path / "ztfd.sqlite3")
    try:
        with store.transaction(conn):
            insert_alerts(conn, "a", [NewAlert(0, 0, 0, "ZTF21aaaaaaa", "2021-01-02", None, "data/x.json"),
                                      NewAlert(0, 0, 1, "ZTF21aaaaaab", "2021-01-01", None, "data/y.json")], 1.0)
            insert_alerts(conn, "b", [NewAlert(0, 0, 0, "ZTF21aaaaaac", "2021-01-02", None, "data/z.json")], 1.0)
        assert nights.nights_with_alerts(conn) == {"2021-01-01": 1, "2021-01-02": 2}
        assert nights.nights_with_alerts(conn, "b") == {"2021-01-02": 1}
        assert nights.topics_with_alerts(conn) == ["a", "b"]
        assert night_report.latest_night(conn) == "2021-01-02"
    finally:
        conn.close()


def test_the_fleets_gatherer_makes_the_cards_of_the_hosts_store_from_its_dataset(sources: Sources,
                                                                                   tmp_path: Path) -> None:
    """The gatherer of fleet mode, run by another host (an empty store and home) on this home's dataset: the same
    cards as the home's own report (columns and UTC times, light curves' points, alert files, previews and stamps
    by their paths), every alert counted, and for an object without a preview only what the dataset says."""
    import dataclasses
    import shutil
    import time

    from pyarrow import fs

    from ztfd.reporting.fleet_night import FROM_THE_FLEET_HERE, NO_PREVIEW, NOT_IN_DATASET, FleetNight

    archived = subprocess.run(ztfd_command(sources.cfg_path, "archive", "--once"), capture_output=True, text=True,
                              env=child_env(), timeout=300)
    assert archived.returncode == 0, archived.stderr
    other = dataclasses.replace(sources.cfg, home=tmp_path / "other")
    here = store.connect(sources.cfg.db_path)
    there = store.connect(other.db_path)
    try:
        fleet = FleetNight(other, there, filesystem=fs.LocalFileSystem(), root=str(sources.cfg.home))
        compared = 0
        for what, topic in sources.topics.items():
            for date in sources.nights(topic):
                cards, counts = fleet.gather(date, topic)
                own_cards, own_counts = night_report.HostNight(sources.cfg, here).gather(date, topic)
                assert counts["note"] == FROM_THE_FLEET_HERE and own_counts["note"] is None
                assert (counts["alerts"], counts["objects"], counts["topics"]) == \
                    (own_counts["alerts"], own_counts["objects"], own_counts["topics"]), (what, date)
                for card, own in zip(cards, own_cards, strict=True):
                    assert (card.object_id, card.survey, card.topics, card.alerts, card.columns, card.alert_file,
                            card.view_file, card.dated_by, card.preview, card.stamps, card.history) == \
                        (own.object_id, own.survey, own.topics, own.alerts, own.columns, own.alert_file,
                         own.view_file, own.dated_by, own.preview, own.stamps, own.history), (what, card.object_id)
                    assert abs(card.when - own.when) < 1e-6
                    if card.preview is None:
                        assert card.missing in (NO_PREVIEW, NOT_IN_DATASET)
                    compared += 1
                # run by the host that stored them, the reasons for missing previews are its stamp jobs', as on one host
                mine, _ = FleetNight(sources.cfg, here, filesystem=fs.LocalFileSystem(),
                                     root=str(sources.cfg.home)).gather(date, topic)
                assert [c.missing for c in mine] == [c.missing for c in own_cards]
        assert compared >= len(packets())

        # Without the stamps dataset (and on a host without the object's files), a card says no more than that.
        bare = tmp_path / "bare"
        shutil.copytree(sources.cfg.home / "archive" / "alerts", bare / "archive" / "alerts")
        topic = sources.topics["ztf-avro"]
        cards, _ = FleetNight(other, there, filesystem=fs.LocalFileSystem(), root=str(bare)).gather(
            max(sources.nights(topic)), topic)
        assert cards and {(c.preview, c.missing, tuple(c.stamps)) for c in cards} == {(None, NOT_IN_DATASET, ())}

        # Due once its files are quiet, not again after its report until they change.
        quiet = time.time() + sources.cfg.report.after_quiet + 60
        due = dict(fleet.due(quiet))
        assert set(due) == {d for t in sources.topics.values() for d in sources.nights(t)}
        assert not fleet.due(time.time())  # just written: not quiet yet
        some = sorted(due)[0]
        fleet.reported(some, due[some])
        assert some not in dict(fleet.due(quiet))
        with pytest.raises(night_report.ReportError, match="no alert of 1999-01-01"):
            fleet.gather("1999-01-01", None)
    finally:
        here.close()
        there.close()


def test_a_fleet_without_the_archive_reports_its_hosts_alerts_and_says_so(sources: Sources) -> None:
    """Fleet mode reads the fleet's night from the archive in the bucket; without the archive, a host's report falls
    back to its own alerts, with a note under the counts (and a log line)."""
    import dataclasses
    import html

    from ztfd.reporting.fleet_night import FleetNight

    group = dataclasses.replace(sources.cfg, kafka=dataclasses.replace(sources.cfg.kafka, assignment="group"),
                                s3=dataclasses.replace(sources.cfg.s3, bucket="b", region="us-east-1"))
    conn = store.connect(sources.cfg.db_path)
    try:
        assert isinstance(night_report.night_of(sources.cfg, conn), night_report.HostNight)
        assert isinstance(night_report.night_of(
            dataclasses.replace(group, archive=dataclasses.replace(group.archive, enabled=True)), conn), FleetNight)
        fallback = night_report.night_of(group, conn)
        topic = sources.topics["lasair-ztf"]
        date = max(sources.nights(topic))
        cards, counts = fallback.gather(date, topic)
        assert counts["note"] == night_report.HOST_ONLY
        [(_, page)] = night_report.render_pages(date, topic, cards, counts, sources.cfg.reports_dir / date,
                                                sources.cfg.home)
        assert html.escape(night_report.HOST_ONLY) in page.decode()
        _, own = night_report.HostNight(sources.cfg, conn).gather(date, topic)
        [(_, plain)] = night_report.render_pages(date, topic, cards, own, sources.cfg.reports_dir / date,
                                                 sources.cfg.home)
        assert 'class="note"' not in plain.decode()  # one host: the page as before
    finally:
        conn.close()


def test_a_night_whose_report_keeps_failing_is_tried_less_and_less_often_and_logged_once_per_reason(
        caplog: pytest.LogCaptureFixture) -> None:
    """A reason that never passes (two files of the night disagree on a column's type) must not cost a listing and a
    read of the night every round: the delay doubles from the watch interval up to an hour."""
    caplog.set_level(logging.DEBUG, logger=night_report.__name__)
    now = [0.0]
    retries = night_report.Retries(clock=lambda: now[0])

    def warnings() -> int:
        return sum(r.levelno == logging.WARNING and "2026-01-01 failed" in r.getMessage() for r in caplog.records)

    conflict = OSError("type conflict in night=2026-01-01")
    delays = [retries.failed("2026-01-01", "v1", conflict) for _ in range(9)]
    assert delays == [30.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 3600.0, 3600.0]
    assert warnings() == 1
    assert retries.waiting("2026-01-01", "v1")
    assert not retries.waiting("2026-01-01", "v2")  # its files changed: tried at once
    assert not retries.waiting("2026-01-02", "v1")  # another night is not held back
    now[0] += 3600.0
    assert not retries.waiting("2026-01-01", "v1")
    retries.failed("2026-01-01", "v1", OSError("the bucket is away"))  # a new reason: said again
    assert warnings() == 2
    retries.succeeded("2026-01-01")
    assert not retries.waiting("2026-01-01", "v1")
    assert retries.failed("2026-01-01", "v1", conflict) == 30.0  # written since: starts over
