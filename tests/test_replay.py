"""``ztfd replay --date`` with and without a running daemon fetcher, against the local stamp service."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

from tests.avro_support import rubin_alerts
from tests.conftest import child_env, ztfd_command
from tests.stamp_support import (
    add_alerts,
    all_final,
    jobs,
    stamps_config,
    start_fetcher,
    stop_fetcher,
    utc_date,
    wait_until,
)
from ztfd import config, files, store
from ztfd.embedded.alerce import DETECTIONS, STAMP
from ztfd.embedded.samples import packets
from ztfd.sources import STAMP_TYPES
from ztfd.stamps.fetcher import preview_path, stamp_path
from ztfd.stamps.providers.packet import PREVIEW_JOB
from ztfd.stamps.replay import plan as replay_plan
from ztfd.store.alerts import NewAlert, insert_alerts
from ztfd.store.processes import process, processes

DATE = "2021-09-01"
ON_DATE = [p for p in packets() if utc_date(p.mjd) == DATE]  # 6 alerts, ZTF21abvawaj twice


def replay(config_path: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ztfd_command(config_path, "replay", *args), env=child_env(), capture_output=True,
                          text=True, timeout=timeout)


def triplet_paths(cfg: config.Config, packet) -> list[Path]:
    paths = [stamp_path(cfg.images_dir, DATE, packet.object_id, packet.candid, k) for k in packet.cutouts]
    return [*paths, preview_path(cfg.images_dir, DATE, packet.object_id, packet.candid)]


def assert_all_on_disk(cfg: config.Config) -> None:
    for packet in ON_DATE:
        for kind, served in packet.cutouts.items():
            assert stamp_path(cfg.images_dir, DATE, packet.object_id, packet.candid, kind).read_bytes() == served
        assert preview_path(cfg.images_dir, DATE, packet.object_id, packet.candid).stat().st_size > 0


def test_replay_without_daemon_fetches_then_restores_only_what_is_missing(make_config, stamp_service):
    assert len(ON_DATE) == 6
    cfg_path = stamps_config(make_config, stamp_service.url)
    cfg = config.load(cfg_path)
    conn = store.connect(cfg.db_path)
    add_alerts(conn, packets(), queue=False)  # stored alerts of several dates; no stamp job ever ran

    first = replay(cfg_path, "--date", DATE, "--workers", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "the daemon is not running" in first.stdout
    assert "6 alerts, 0 complete on disk, 6 to fetch" in first.stdout
    assert "done 6 (fetched 6, already complete 0), failed 0" in first.stdout
    assert_all_on_disk(cfg)
    assert len(list(cfg.images_dir.iterdir())) == 1  # only that date
    assert {job["result"]["worker"] for job in jobs(conn)} <= {"replay:0", "replay:1"}
    assert processes(conn) == []  # replay workers are not daemons

    # Lose a stamp, a preview, and corrupt another stamp: the next replay restores exactly those.
    victim, other = ON_DATE[0], ON_DATE[1]
    triplet_paths(cfg, victim)[1].unlink()
    triplet_paths(cfg, victim)[3].unlink()
    broken = triplet_paths(cfg, other)[0]
    broken.write_bytes(broken.read_bytes()[:100])
    untouched = triplet_paths(cfg, ON_DATE[2])[0].stat().st_ino
    stamp_service.reset_log()
    second = replay(cfg_path, "--date", DATE)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "6 alerts, 4 complete on disk, 2 to fetch" in second.stdout
    assert_all_on_disk(cfg)
    # The candid chosen before is reused (no detections request), and only the two lost stamps are fetched.
    assert stamp_service.count(DETECTIONS) == 0
    assert sorted((r.candid, r.stamp_type) for r in stamp_service.requests(STAMP)) == sorted(
        [(victim.candid, "template"), (other.candid, "science")])
    assert triplet_paths(cfg, ON_DATE[2])[0].stat().st_ino == untouched

    third = replay(cfg_path, "--date", DATE)
    assert third.returncode == 0 and "0 to fetch" in third.stdout

    # The stamp records gone (what chose each candid), the files all there: the jobs find everything on disk and
    # request no stamp; replay says so instead of counting them as fetched.
    conn.execute("DELETE FROM stamps")
    conn.commit()
    stamp_service.reset_log()
    fourth = replay(cfg_path, "--date", DATE)
    assert fourth.returncode == 0, fourth.stdout + fourth.stderr
    assert "6 to fetch" in fourth.stdout and stamp_service.count(STAMP) == 0
    assert "done 6 (fetched 0, already complete 6), failed 0" in fourth.stdout


def test_replay_force_refetches_everything(make_config, stamp_service):
    cfg_path = stamps_config(make_config, stamp_service.url)
    cfg = config.load(cfg_path)
    conn = store.connect(cfg.db_path)
    add_alerts(conn, ON_DATE, queue=False)
    assert replay(cfg_path, "--date", DATE).returncode == 0
    before = {path: path.stat().st_ino for packet in ON_DATE for path in triplet_paths(cfg, packet)}
    stamp_service.reset_log()
    forced = replay(cfg_path, "--date", DATE, "--force", "--topic", "t")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert "all 6 to fetch again (--force)" in forced.stdout and "done 6 (fetched 6," in forced.stdout
    assert stamp_service.count(STAMP) == 3 * len(ON_DATE)
    assert all(path.stat().st_ino != inode for path, inode in before.items())  # each file replaced (renamed over)
    assert_all_on_disk(cfg)
    other_topic = replay(cfg_path, "--date", DATE, "--topic", "elsewhere")
    assert other_topic.returncode == 0 and "no stored alerts" in other_topic.stdout


def test_replay_while_the_daemon_runs_queues_and_waits(make_config, stamp_service, tmp_path):
    cfg_path = stamps_config(make_config, stamp_service.url)
    cfg = config.load(cfg_path)
    conn = store.connect(cfg.db_path)
    add_alerts(conn, ON_DATE, queue=False)
    daemon = start_fetcher(cfg_path, "fetcher-daemon", tmp_path / "daemon.log")
    try:
        wait_until(lambda: process(conn, "fetcher-daemon"),
                   what="the daemon fetcher's heartbeat")
        result = replay(cfg_path, "--date", DATE, "--workers", "3")
        assert result.returncode == 0, result.stdout + result.stderr
        assert daemon.poll() is None
    finally:
        assert stop_fetcher(daemon) == 0
    assert "the daemon is running (1 fetchers)" in result.stdout
    assert "done 6 (fetched 6, already complete 0), failed 0" in result.stdout
    assert Counter(job["result"]["worker"] for job in jobs(conn)) == {"fetcher-daemon": 6}
    assert_all_on_disk(cfg)


def test_replay_exits_non_zero_when_a_stamp_fails_and_reports_unavailable(make_config, stamp_service):
    failing, unknown = ON_DATE[0], ON_DATE[1]
    stamp_service.garbage(None, candid=failing.candid)
    stamp_service.unknown_object(unknown.object_id)
    cfg_path = stamps_config(make_config, stamp_service.url, max_attempts=2, unavailable_retry_base=3600.0,
                             unavailable_retry_max=3600.0)
    cfg = config.load(cfg_path)
    conn = store.connect(cfg.db_path)
    add_alerts(conn, ON_DATE, queue=False)
    result = replay(cfg_path, "--date", DATE)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "done 4 (fetched 4, already complete 0), failed 1, not yet available 1" in result.stdout
    assert f"failed {failing.object_id}: science stamp: not gzip" in result.stdout
    states = Counter(job["state"] for job in jobs(conn))
    assert states == {"done": 4, "failed": 1, "ready": 1}  # the unavailable one stays queued for the daemon
    assert not all_final(conn)


def test_replay_shows_why_it_waits(make_config):
    """The stamp service refuses connections: while replay waits it shows the last error of that cause and the
    service it asked, then fails the jobs once their attempts are spent."""
    from ztfd.embedded.net import free_port

    url = f"http://127.0.0.1:{free_port()}"
    cfg_path = stamps_config(make_config, url, max_attempts=3, retry_base=4.0, retry_max=4.0)
    conn = store.connect(config.load(cfg_path).db_path)
    add_alerts(conn, ON_DATE[:2], queue=False)
    result = replay(cfg_path, "--date", DATE, "--workers", "1", timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    waiting = [line for line in result.stdout.splitlines() if "stamp service failed, retrying" in line]
    assert waiting, result.stdout
    assert url in waiting[0] and ("Connect" in waiting[0] or "connect" in waiting[0]), waiting[0]
    assert "done 0 (fetched 0, already complete 0), failed 2" in result.stdout


def test_replay_rejects_a_bad_date(make_config, stamp_service):
    cfg_path = stamps_config(make_config, stamp_service.url)
    for bad in ("2021-9-1", "yesterday", "2021-02-30"):
        result = replay(cfg_path, "--date", bad)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and "--date" in result.stderr and "YYYY-MM-DD" in result.stderr


def test_replay_fetches_itself_when_the_daemon_fetchers_die(make_config, stamp_service, tmp_path):
    from tests.stamp_support import FAST_STAMPS

    stamp_service.latency = 30.0  # the daemon's fetcher holds its jobs when it dies
    cfg_path = make_config(stamps={**FAST_STAMPS, "alerce_stamp_url": stamp_service.url,
                                   "alerce_api_url": stamp_service.url, "lease_seconds": 1.5, "timeout": 60.0},
                           supervisor={"heartbeat_timeout": 2.0})
    cfg = config.load(cfg_path)
    conn = store.connect(cfg.db_path)
    add_alerts(conn, ON_DATE, queue=False)
    daemon = start_fetcher(cfg_path, "fetcher-daemon", tmp_path / "daemon.log")
    try:
        wait_until(lambda: process(conn, "fetcher-daemon"),
                   what="the daemon fetcher's heartbeat")
        waiting = subprocess.Popen(ztfd_command(cfg_path, "replay", "--date", DATE, "--workers", "2"),
                                   env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: stamp_service.arrivals() >= 1, what="the daemon fetching the replay's jobs")
    finally:
        daemon.kill()
        daemon.wait(10)
    stamp_service.latency = 0.0
    out, err = waiting.communicate(timeout=90)  # before: waited forever on a dead daemon
    assert waiting.returncode == 0, out + err
    assert "the daemon is running (1 fetchers)" in out
    assert "no daemon fetcher alive for 2 s: fetching the rest with 2 worker processes" in out
    assert "done 6 (fetched 6, already complete 0), failed 0" in out
    assert_all_on_disk(cfg)


def test_replay_plans_a_preview_only_for_a_rubin_packet_whose_stamps_are_on_disk(make_config) -> None:
    """A Rubin packet's cutouts are written as the packet carried them (``.fits``): replay finds them under those
    names and asks only for the preview; with one gone, the LSST provider fetches them."""
    cfg = config.load(make_config(stamps={"previews": True}))
    record = rubin_alerts(1)[0]
    source_id, object_id = str(record["diaSourceId"]), str(record["diaObject"]["diaObjectId"])
    date = "2026-03-05"
    conn = store.connect(cfg.db_path)
    with store.transaction(conn):
        [alert_id] = insert_alerts(conn, "rubin", [NewAlert(0, 0, 0, object_id, date, 61104.2,
                                                            f"data/{date}/rubin/{object_id}_p0-o0.avro", "lsst",
                                                            source_id)], 0.0)
    folder = cfg.images_dir / date / object_id
    for kind, field in zip(STAMP_TYPES, ("cutoutScience", "cutoutTemplate", "cutoutDifference"), strict=True):
        files.atomic_write(folder / f"{source_id}_{kind}.fits", record[field])
    count, planned = replay_plan(conn, cfg, date, None, False)
    assert (count, [(j.alert_id, j.kind) for j in planned]) == (1, [(alert_id, PREVIEW_JOB)])
    (folder / f"{source_id}.png").write_bytes(b"a preview")
    assert replay_plan(conn, cfg, date, None, False)[1] == []  # complete: nothing to do
    (folder / f"{source_id}_template.fits").unlink()
    assert [j.kind for j in replay_plan(conn, cfg, date, None, False)[1]] == ["stamps"]
    conn.close()
