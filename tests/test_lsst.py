"""Lasair-LSST end to end through the real broker (Tansu): the real samples in plain, lite and full output, dayObs
folders, exact 64-bit ids, the byte quota, both LSST stamp providers through faults and a killed worker, replay."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FAST_KAFKA_OPTIONS, child_env, wait_until, write_config, ztfd_command
from tests.stamp_support import FAST_STAMPS, all_final, jobs, start_fetcher, stop_fetcher
from tests.test_replay import replay as run_replay
from ztfd import store
from ztfd.embedded import lsst_samples
from ztfd.embedded.alerce import LASAIR_FITS, LSST_DETECTIONS, LSST_STAMP, StampService
from ztfd.embedded.kafka import KafkaBroker
from ztfd.store import jobs as store_jobs
from ztfd.store.alerts import count_alerts, iter_alerts
from ztfd.store.manifest import manifest_files
from ztfd.store.rejected import latest_rejected, rejected_counts

FIXTURE_OBJECT = "313637921267122191"  # Lasair's own sample: dayObs 2025-11-03, newest diaSource below
FIXTURE_SOURCE = "313673107864813598"
FINK_DAY = "2026-03-05"  # dayObs of every Fink sample alert (visits 20260305000xx), observed 2026-03-06 UTC
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tai_mjd(utc_iso: str) -> float:
    from astropy.time import Time

    return float(Time(utc_iso, scale="utc").tai.mjd)


def plain(object_id: int, mjd_tai: float | None, utc: str = "2025-11-04 13:20:00", **extra: Any) -> bytes:
    body: dict[str, Any] = {"diaObjectId": object_id, "ra": 9.05, "decl": -44.1}
    if mjd_tai is not None:
        body["lastDiaSourceMjdTai"] = mjd_tai
    return json.dumps({**body, **extra, "UTC": utc}).encode()


HOSTILE = [  # issue 12 item 1 and its kin: each rejected with a reason, the stream goes on
    (b'{"objectId": "ZTF21abcdefh", "x": 1' + b"0" * 5000 + b"}", "an integer of more than"),
    (b'{"diaObjectId": 1' + b"0" * 5000 + b"}", "an integer of more than"),
    (b'{"objectId": "ZTF21abcdefh", "UTC": "0001-01-01T00:00:00+01:00"}', "is out of range"),
    (b'{"diaObjectId": 313637921267122191, "UTC": "9999-12-31T23:59:59-01:00"}', "is out of range"),
    (b'{"diaObjectId": 313637921267122191, "lastDiaSourceMjdTai": nan}', "not valid JSON"),
    (b'{"diaObjectId": 0}', "not a positive 64-bit integer"),
    (b'{"diaObjectId": 3.1e17}', "must be a string or an integer"),
    (b'{"diaObjectId": 313637921267122191, "a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested too deeply"),
]


@dataclass
class Ingested:
    home: Path
    topic: str
    config: Path
    produced: list[bytes]  # the good messages, in order
    files: dict[int, dict[str, Any]]  # seq -> the alert file (parsed), for the good messages
    raw_files: dict[int, Path]


def status_json(config: Path) -> dict[str, Any]:
    result = subprocess.run(ztfd_command(config, "status", "--json"), capture_output=True, text=True,
                            env=child_env(), timeout=60)
    return json.loads(result.stdout)


def consume(config: Path, topic: str, log_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(ztfd_command(config, "consume", "--topic", topic), env=child_env(),
                            stdout=log_path.open("ab"), stderr=subprocess.STDOUT)


def received(db: Path) -> int:
    """Messages stored or rejected so far (0 before the consumer made the store)."""
    if not db.exists():
        return 0
    conn = store.connect(db)
    try:
        return count_alerts(conn) + sum(rejected_counts(conn).values())
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


@pytest.fixture(scope="module")
def ingested(kafka: KafkaBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ingested]:
    """One Lasair-LSST topic of every shape, consumed once by a real ``ztfd consume``."""
    home = tmp_path_factory.mktemp("lsst-ingest")
    topic = f"lasair_1LSST-{uuid.uuid4().hex[:8]}"
    good: list[bytes] = []
    for mode in lsst_samples.MODES:  # Lasair's own real sample, bare NaN and all
        good.append(lsst_samples.lasair_fixture_message(mode, seq=len(good)))
    for mode in lsst_samples.MODES:
        for alert in lsst_samples.object_alerts():
            good.append(json.dumps(lsst_samples.message(alert, mode, seq=len(good))).encode())
    # One Chilean night across 00:00 UTC (03:00 and 23:00 UTC are 00:00 and 20:00 in Chile), and the next day.
    good.append(plain(313637921267122191, tai_mjd("2025-11-04T03:00:00"), seq=len(good)))
    good.append(plain(313637921267122191, tai_mjd("2025-11-03T23:00:00"), seq=len(good)))
    good.append(plain(313637921267122191, tai_mjd("2025-11-04T13:00:00"), seq=len(good)))
    # Lasair's documented plain row (no time selected): dated by its UTC, as Rubin dates: 11:40 UTC is 2026-01-28.
    good.append(plain(169760235333878021, None, utc="2026-01-29 11:40:14", seq=len(good)))
    stream: list[bytes] = []
    for index, message in enumerate(good):
        stream.append(message)
        if index < len(HOSTILE):
            stream.append(HOSTILE[index][0])
    kafka.create_topic(topic)
    kafka.produce(topic, stream)
    config = write_config(home / "ztfd.toml", {
        "kafka": {"bootstrap_servers": kafka.bootstrap, "group_id": f"lsst-{uuid.uuid4().hex[:8]}",
                  "topics": [topic], "lasair_byte_quota": 20_000},
        "kafka.options": dict(FAST_KAFKA_OPTIONS),
        "stamps": {"enabled": True, "lsst_provider": "alerce"},
    }, home)
    db = home / "state" / "ztfd.sqlite3"
    proc = consume(config, topic, home / "consume.log")
    try:
        wait_until(lambda: received(db) >= len(stream), 90, "every message stored or rejected")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    files, raw_files = {}, {}
    for path in (home / "data").rglob("*.json"):
        parsed = json.loads(path.read_bytes())  # Python's json reads the bare NaN Lasair sends
        files[parsed["message"]["seq"]] = parsed
        raw_files[parsed["message"]["seq"]] = path
    yield Ingested(home, topic, config, good, files, raw_files)


def test_every_good_message_is_stored_once_and_every_hostile_one_rejected_with_its_reason(ingested: Ingested):
    assert sorted(ingested.files) == list(range(len(ingested.produced)))
    for seq, message in enumerate(ingested.produced):
        assert message in ingested.raw_files[seq].read_bytes()  # byte for byte, NaN included
    conn = store.connect(ingested.home / "state" / "ztfd.sqlite3")
    reasons = [row.reason for row in sorted(latest_rejected(conn, None, 100), key=lambda r: r.kafka_offset)]
    assert len(reasons) == len(HOSTILE)
    for reason, (_, expected) in zip(reasons, HOSTILE, strict=True):
        assert expected in reason


def test_all_three_output_modes_are_dated_by_day_obs_of_the_newest_dia_source(ingested: Ingested):
    fixture = [ingested.files[seq]["ztfd"] for seq in range(3)]
    assert [meta["date"] for meta in fixture] == ["2025-11-03"] * 3
    assert [meta["dated_by"] for meta in fixture] == [
        "lastDiaSourceMjdTai", "alert.diaSourcesList[0].midpointMjdTai", "alert.diaSourcesList[0].midpointMjdTai"]
    assert {meta["date_rule"] for meta in fixture} == {"dayobs"} and {m["survey"] for m in fixture} == {"lsst"}
    # Processing times are converted for the file, never used for the date (validityStartMjdTai is 2026-02-12).
    assert fixture[2]["times_utc"]["alert.diaObject.validityStartMjdTai"].startswith("2026-02-12")
    assert fixture[2]["detection_id"] == FIXTURE_SOURCE and "detection_id" not in fixture[1]
    for seq in range(3, 18):
        meta = ingested.files[seq]["ztfd"]
        assert meta["date"] == FINK_DAY and meta["date_rule"] == "dayobs"
        assert ingested.raw_files[seq].parent.parent.name == FINK_DAY


def test_one_chilean_night_is_one_folder(ingested: Ingested):
    night = [ingested.files[seq]["ztfd"] for seq in (18, 19, 20)]
    assert [meta["date"] for meta in night] == ["2025-11-03", "2025-11-03", "2025-11-04"]
    assert ingested.raw_files[18].parent == ingested.raw_files[19].parent
    assert night[0]["times_utc"]["lastDiaSourceMjdTai"].startswith("2025-11-04T03:00:00")
    undated = ingested.files[21]["ztfd"]
    assert (undated["date"], undated["dated_by"]) == ("2026-01-28", "UTC")


def test_ids_beyond_2_to_the_53_are_exact_in_names_metadata_and_store(ingested: Ingested):
    conn = store.connect(ingested.home / "state" / "ztfd.sqlite3")
    stored = {alert.path: alert for alert in iter_alerts(conn)}
    for seq in range(3, 18):
        alert = lsst_samples.object_alerts()[(seq - 3) % 5]
        path, meta = ingested.raw_files[seq], ingested.files[seq]["ztfd"]
        exact = str(alert.dia_object_id)
        assert alert.dia_object_id > 2**53  # beyond what a float64 holds for every integer
        assert path.name.startswith(f"{exact}_p0-o") and meta["object_id"] == exact
        row = stored[path.relative_to(ingested.home).as_posix()]
        assert (row.object_id, row.survey) == (exact, "lsst")  # TEXT in the store, never a number
        if seq >= 13:  # full output names the triggering diaSource, and its band
            assert meta["detection_id"] == row.detection_id == str(alert.dia_source_id)
            assert row.band == "i"
    inexact = [a.dia_object_id for a in lsst_samples.object_alerts() if int(float(a.dia_object_id)) != a.dia_object_id]
    assert inexact, "some sample ids change when read as a float: those prove the ids never were"
    # One stamp job per object and observation time, whichever output mode brought it first.
    assert len(store_jobs.list_jobs(conn)) == 1 + 5 + 3 + 1


def test_status_shows_the_survey_and_the_lasair_day_near_its_quota(ingested: Ingested):
    report = status_json(ingested.config)
    (topic,) = report["topics"]
    assert topic["survey"] == "lsst"
    day = topic["lasair_day"]
    received = sum(len(m) for m in ingested.produced) + sum(len(m) for m, _ in HOSTILE)
    assert day["bytes"] == received and day["quota"] == 20_000 and day["warning"] is True
    log = (ingested.home / "logs" / "ztfd.log").read_text()
    assert "of kafka.lasair_byte_quota (20000)" in log
    assert log.count("of kafka.lasair_byte_quota") == 1  # once per day
    table = subprocess.run(ztfd_command(ingested.config, "status"), capture_output=True, text=True, env=child_env(),
                           timeout=60).stdout
    assert f"WARNING {ingested.topic}" in table and " lsst " in table


# --- stamps ---------------------------------------------------------------------------------------------------


def stamps_home(kafka: KafkaBroker, service: StampService, tmp_path: Path, provider: str,
                messages: list[bytes]) -> tuple[Path, Path, sqlite3.Connection]:
    """A topic with ``messages`` consumed into a new home whose LSST stamps come from ``provider``."""
    home = tmp_path / "home"
    topic = f"lasair_1LSST-{uuid.uuid4().hex[:8]}"
    config = write_config(home / "ztfd.toml", {
        "kafka": {"bootstrap_servers": kafka.bootstrap, "group_id": f"lsst-{uuid.uuid4().hex[:8]}", "topics": [topic]},
        "kafka.options": dict(FAST_KAFKA_OPTIONS),
        "stamps": {**FAST_STAMPS, "lsst_provider": provider, "alerce_lsst_url": service.url,
                   "lasair_lsst_url": service.url, "lease_seconds": 3.0, "max_attempts": 5},
    }, home)
    kafka.create_topic(topic)
    kafka.produce(topic, messages)
    db = home / "state" / "ztfd.sqlite3"
    proc = consume(config, topic, tmp_path / "consume.log")
    try:
        wait_until(lambda: received(db) >= len(messages), 90, "the alerts stored")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    return home, config, store.connect(db)


def stamp_messages() -> list[bytes]:
    """Full output for three alerts (the diaSourceId is in the message), lite and plain for the other two (the
    provider asks ALeRCE's detections)."""
    alerts = lsst_samples.object_alerts()
    modes = ("full", "full", "full", "lite", "plain")
    return [json.dumps(lsst_samples.message(alert, mode)).encode() for alert, mode in zip(alerts, modes, strict=True)]


@pytest.mark.parametrize("provider", ["alerce", "lasair"])
def test_lsst_stamps_are_the_served_bytes_through_faults_and_a_killed_worker(
    kafka: KafkaBroker, stamp_service: StampService, tmp_path: Path, provider: str
):
    route = LSST_STAMP if provider == "alerce" else LASAIR_FITS
    messages = stamp_messages()
    if provider == "alerce":  # one alert whose stamps ALeRCE's proxy never serves: failed, shown in status
        messages.append(lsst_samples.lasair_fixture_message("full"))
        stamp_service.server_errors(None, status=502, candid=int(FIXTURE_SOURCE), endpoint=LSST_STAMP)
    home, config, conn = stamps_home(kafka, stamp_service, tmp_path, provider, messages)
    alerts = lsst_samples.object_alerts()
    # A worker killed with -9 while every request it made hangs: its jobs come back when their leases run out.
    stamp_service.latency = 60.0
    first = start_fetcher(config, "fetcher-1", tmp_path / "first.log")
    wait_until(lambda: stamp_service.arrivals() >= 4, what="the first worker's requests in flight")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    stamp_service.latency = 0.0
    # Then faults, each on its own alert (a job's attempt reports its most telling problem): 5xx (failed attempts),
    # the service's "not there" (ALeRCE's 500, Lasair's None body: not yet available) and Lasair's empty body.
    stamp_service.server_errors(2, status=503, endpoint=route, candid=alerts[1].dia_source_id)
    stamp_service.not_found_then_available(3, endpoint=route, candid=alerts[2].dia_source_id)
    if provider == "lasair":
        stamp_service.inject("empty_body", 2, candid=alerts[3].dia_source_id)
    second = start_fetcher(config, "fetcher-2", tmp_path / "second.log")
    try:
        wait_until(lambda: all_final(conn), timeout=120, what="every stamp job final")
    finally:
        assert stop_fetcher(second) == 0
    suffix = ".fits.gz" if provider == "alerce" else ".fits"
    done = {job["payload"]["object_id"]: job for job in jobs(conn) if job["state"] == "done"}
    manifest = {row.path for row in manifest_files(conn)}
    named = {row.object_id: row.detection_id for row in iter_alerts(conn)}
    for index, alert in enumerate(alerts):
        job = done[str(alert.dia_object_id)]
        assert job["result"]["candid"] == str(alert.dia_source_id)  # exact, and the triggering diaSource
        assert named[str(alert.dia_object_id)] == (str(alert.dia_source_id) if index < 3 else None)  # full output
        folder = home / "images" / FINK_DAY / str(alert.dia_object_id)
        for kind in ("science", "template", "difference"):
            served = (stamp_service.alerce_lsst_stamp if provider == "alerce" else stamp_service.lasair_lsst_stamp)(
                alert.dia_source_id, kind)
            path = folder / f"{alert.dia_source_id}_{kind}{suffix}"
            assert path.read_bytes() == served
            assert path.relative_to(home).as_posix() in manifest
        assert (folder / f"{alert.dia_source_id}.png").read_bytes().startswith(PNG_MAGIC)
    # The diaSourceId came from the message in full output: detections were asked only for the lite and plain ones.
    asked = {r.object_id for r in stamp_service.requests(LSST_DETECTIONS)}
    assert asked == {str(alerts[3].dia_object_id), str(alerts[4].dia_object_id)}
    assert [name for name in (home / "images").rglob("*") if name.name.startswith(".")] == []
    # Each fault was taken for what it is: 5xx a failed attempt, the service's "not there" not yet available.
    log = (home / "logs" / "ztfd.log").read_text()
    assert "HTTP 503; retrying" in log
    not_there = ["HTTP 500 (not stored)"] if provider == "alerce" else ["body b'None'", "body empty"]
    for words in not_there:
        assert any("not yet available" in line and words in line for line in log.splitlines()), words
    report = status_json(config)
    if provider == "alerce":
        (failure,) = report["failures"]
        assert (failure["object_id"], failure["date"]) == (FIXTURE_OBJECT, "2025-11-03")  # exact beyond 2**53
        assert "HTTP 502" in failure["reason"]
        assert report["queue"]["done"] == 5 and report["queue"]["failed"] == 1
    else:
        assert report["queue"]["done"] == 5 and report["failures"] == []
    if provider == "alerce":
        replay_restores_an_lsst_date(home, config, stamp_service, alerts[1])


def replay_restores_an_lsst_date(home: Path, config: Path, service: StampService,
                                 alert: lsst_samples.RubinAlert) -> None:
    """``ztfd replay --date <dayObs>`` refetches a lost LSST stamp with the diaSourceId chosen before."""
    lost = home / "images" / FINK_DAY / str(alert.dia_object_id) / f"{alert.dia_source_id}_template.fits.gz"
    lost.unlink()
    service.clear_faults()
    service.reset_log()
    result = run_replay(config, "--date", FINK_DAY, "--workers", "1", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 alerts, 4 complete on disk, 1 to fetch" in result.stdout
    assert lost.read_bytes() == service.alerce_lsst_stamp(alert.dia_source_id, "template")
    assert service.count(LSST_DETECTIONS) == 0  # the detection chosen before is reused
    assert [r.stamp_type for r in service.requests(LSST_STAMP)] == ["template"]
