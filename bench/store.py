"""Store: its size per alert and the time of ``ztfd status --json`` and of replay planning, at a year's scale.

The store is filled through the store's own functions, as the daemon fills it, night by night: the consumer's
transaction (alerts, their stamp jobs, the alert files' manifest rows), the fetchers' claims and completions
(stamp records, four image files per alert), the syncer's verified uploads; then ``ztfd prune`` as it would run
a day later (it forgets the done jobs and the manifest rows of the uploaded files). Bulk, but through the real
schema: big transactions, thousands of rows per statement.

Figures (each cold, after ``sync; echo 3 > /proc/sys/vm/drop_caches`` when run as root, and warm):
- bytes per alert at steady state (pages in use after the prune, WAL checkpointed) and per table;
- ``ztfd status --json``, the whole command against a live local broker (the Kafka lag included), and the
  store's part alone (``status.collect`` without the lag);
- replay planning for one night (``replay.plan``: the night's alerts, their stamp records, the file checks);
- ``ztfd status --json`` again with a large upload backlog (``PENDING_BACKLOG`` files pending, each failed once: S3
  down for days, or no bucket), against the issue's goal of the same cost whatever the backlog (0.3 s warm, 0.5 s
  cold; it took 1.07 s warm and 2.1 s cold at 300,000 pending files when failing uploads were counted row by row):
  with the topic's real consumer running (status takes the lag from what its fetches heard), and with none (status
  asks the broker).
The baseline is the issue's measurement of the layout before (#12 item 7 and 8): 2.5 KB per alert with its
stamps, ``status --json`` 0.64 s at 300,000 alerts with stamps off and 30-40 s at a year, replay's candid lookup
1 s then and ~90 s at a year; the size before the prune is measured in the same run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.common import Results, Row, Settings
from ztfd import config, store
from ztfd.daemon import housekeeping
from ztfd.embedded.demo import FAST_KAFKA_OPTIONS, EmbeddedServices, child_env, write_config, ztfd_argv
from ztfd.ingest import seen_ends
from ztfd.reporting import status
from ztfd.stamps import replay
from ztfd.store import jobs, manifest
from ztfd.store.alerts import NewAlert, insert_alerts
from ztfd.store.db import StoreSize, store_size

TOPIC = "lasair_2SN-likecandidates"
YEAR_ALERTS = 18_000_000
GOAL_BYTES = 400
GOAL_STATUS = 0.5
GOAL_REPLAY = 2.0
PENDING_BACKLOG = 300_000
GOAL_BACKLOG_WARM, GOAL_BACKLOG_COLD = 0.3, 0.5
IMAGE_FILES = (("_science.fits.gz", 15_400), ("_template.fits.gz", 15_400), ("_difference.fits.gz", 15_400),
               (".png", 9_000))
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def run(settings: Settings, results: Results) -> None:
    total = settings.size(2_000_000, 20_000)
    per_night = settings.size(50_000, 5_000)
    work = settings.workdir / "store"
    with EmbeddedServices(work / "services", s3=False, stamps=False) as services:
        services.kafka.create_topic(TOPIC)
        services.kafka.produce(TOPIC, [json.dumps({"objectId": "ZTF24aaaaaaa"})])
        cfg_path = write_config(work / "home" / "ztfd.toml", work / "home", {
            "kafka": {"bootstrap_servers": services.kafka.bootstrap, "group_id": "bench", "topics": [TOPIC]},
            "kafka.options": FAST_KAFKA_OPTIONS, "stamps": {"previews": True},
        })
        cfg = config.load(cfg_path)
        started = time.monotonic()
        nights = fill(cfg, total, per_night)
        print(f"  filled {total:,} alerts over {len(nights)} nights in {time.monotonic() - started:.0f}s", flush=True)
        conn = store.connect(cfg.db_path)
        before = store_size(conn)
        pruned = housekeeping.prune(conn, cfg, now=time.time() + housekeeping.DONE_JOBS_KEEP + 3600)
        after = store_size(conn)
        conn.close()
        night = nights[len(nights) // 2]
        timings = {
            "status": _cold_and_warm(lambda: _status_command(cfg_path)),
            "status_store": _cold_and_warm(lambda: status.collect(cfg, lag=False)),
            "replay_plan": _cold_and_warm(lambda: _plan(cfg, night, per_night)),
        }
        backlog = settings.size(PENDING_BACKLOG, 20_000)
        add_failing_backlog(cfg, backlog)
        timings["status_backlog"] = _cold_and_warm(lambda: _status_command(cfg_path))
        timings["status_backlog_store"] = _cold_and_warm(lambda: status.collect(cfg, lag=False))
        with _running_consumer(cfg, cfg_path):
            timings["status_backlog_daemon"] = _cold_and_warm(lambda: _status_command(cfg_path, "consumer"))
    results.raw["store"] = {"alerts": total, "nights": len(nights), "per_night": per_night,
                            "pruned_done_jobs": pruned.done_jobs, "pruned_uploaded_files": pruned.uploaded_files,
                            "before": dataclasses.asdict(before), "after": dataclasses.asdict(after),
                            "timings": timings, "pending_backlog": backlog}
    _rows(results, total, per_night, before, after, timings)
    _backlog_rows(results, backlog, timings)


def add_failing_backlog(cfg: config.Config, files: int) -> None:
    """``files`` new files recorded and each upload failed once, as with S3 down for days."""
    conn = store.connect(cfg.db_path)
    try:
        rows = [(f"images/2030-01-01/ZTF30{n:07d}/{n}.png", 9_000, _md5(str(n))) for n in range(files)]
        with store.transaction(conn):
            store.record_files(conn, rows)
        manifest.mark_uploaded(conn, [], [manifest.FailedUpload(manifest.FileRecord(path, size, md5),
                                                                "Could not connect to the endpoint URL")
                                          for path, size, md5 in rows])
        if manifest.count_failing(conn) < files:
            raise RuntimeError("the backlog's failed uploads are not counted")
    finally:
        conn.close()


def _backlog_rows(results: Results, backlog: int, timings: dict[str, dict[str, float | None]]) -> None:
    """The issue's goal (0.3 s warm, 0.5 s cold) on a running daemon, the usual case of a backlog (S3 down, no
    bucket). With no daemon, status asks the broker itself (librdkafka's import and a round trip, cold from disk
    after the cache drop): that row's goal is the issue's other words, the same cost with the backlog as without."""
    for key, name in (("status_backlog_daemon", f"ztfd status --json, {backlog:,} files pending, daemon running"),
                      ("status_backlog", f"ztfd status --json, {backlog:,} files pending, no daemon (asks Kafka)"),
                      ("status_backlog_store", f"ztfd status, {backlog:,} files pending: the store's part")):
        found = timings[key]
        cold, warm = found["cold"], found["warm"]
        without = timings.get(key.replace("_backlog", ""), {}).get("warm")  # no daemon-running row before the backlog
        detail = (f"cold {_seconds(cold)}, warm {_seconds(warm)}, warm without the backlog {_seconds(without)}; "
                  "issue: 1.07 s warm, 2.1 s cold at 300,000")
        if key == "status_backlog":
            same = warm is not None and without is not None and warm <= 1.2 * without + 0.05
            results.add(Row("store", name, warm, "s", detail, "warm <= 1.2x without the backlog", same))
            continue
        ok = (warm is not None and warm <= GOAL_BACKLOG_WARM) and (cold is None or cold <= GOAL_BACKLOG_COLD)
        results.add(Row("store", name, warm, "s", detail,
                        f"<= {GOAL_BACKLOG_WARM:g} s warm, <= {GOAL_BACKLOG_COLD:g} s cold", ok))


def fill(cfg: config.Config, total: int, per_night: int) -> list[str]:
    """``total`` alerts, ``per_night`` a night, each with its three stamps and preview fetched and every file
    uploaded; returns the nights' dates."""
    rng = random.Random(12)
    conn = store.connect(cfg.db_path)
    owner = jobs.new_owner()
    dates = []
    offset = 0
    try:
        for night in range(-(-total // per_night)):
            date = time.strftime("%Y-%m-%d", time.gmtime(1_704_067_200 + night * 86_400))
            dates.append(date)
            count = min(per_night, total - offset)
            received = 1_704_067_200.0 + night * 86_400 + 3 * 3600
            rows = []
            for index in range(count):
                object_id = "ZTF24" + "".join(rng.choice(LETTERS) for _ in range(7))
                partition, kafka_offset = offset % 4, offset // 4
                rows.append(NewAlert(partition, 0, kafka_offset, object_id, date, 60310.0 + night + index / count / 3,
                                     f"data/{date}/{TOPIC}/{object_id}_p{partition}-o{kafka_offset}.json"))
                offset += 1
            with store.transaction(conn):  # the consumer's batches, as one
                ids = insert_alerts(conn, TOPIC, rows, received)
                jobs.enqueue(conn, [jobs.NewStampJob(a, jobs.detection_key(r.object_id, r.obs_mjd, r.date))
                                    for a, r in zip(ids, rows, strict=True) if a is not None], now=received)
                store.record_files(conn, [(r.path, 1_900 + len(r.object_id), _md5(r.path)) for r in rows])
            _fetch_all(conn, owner)
            uploaded = [manifest.UploadedFile(f.path, f.md5, f.size, f.md5, f'"{f.md5}"')
                        for f in manifest.iter_pending(conn)]
            manifest.mark_uploaded(conn, uploaded, [])
            if night % 10 == 9:
                print(f"  {offset:,} alerts stored, fetched and uploaded", flush=True)
    finally:
        conn.close()
    return dates


def _fetch_all(conn: sqlite3.Connection, owner: str) -> None:
    """What the fetchers do, in claims of 5,000: the detection chosen, four files recorded, the job done."""
    while claimed := jobs.claim(conn, owner, 600, limit=5000):
        with store.transaction(conn):
            files = []
            for job in claimed:
                candid = str(2_600_000_000_000_000_000 + job.alert.id)
                result = jobs.StampResult(candid, job.alert.obs_mjd, ("science", "template", "difference"), True,
                                          "fetcher:1")
                jobs.complete(conn, job.id, owner, result)
                folder = f"images/{job.alert.date}/{job.alert.object_id}/{candid}"
                files += [(folder + suffix, size, _md5(folder + suffix)) for suffix, size in IMAGE_FILES]
            store.record_files(conn, files)


def _md5(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def _status_command(cfg_path: Path, lag_from: str = "broker") -> None:
    result = subprocess.run(ztfd_argv(cfg_path, "status", "--json"), capture_output=True, text=True,
                            env=child_env(), timeout=600)
    if result.returncode not in (0, 3):
        raise RuntimeError(f"ztfd status failed: {result.stderr[-500:]}")
    topic = json.loads(result.stdout)["topics"][0]
    if topic["alerts_total"] == 0 or topic["lag_from"] != lag_from:
        raise RuntimeError(f"ztfd status: {topic['alerts_total']} alerts, lag from {topic['lag_from']}, "
                           f"not {lag_from}")


@contextlib.contextmanager
def _running_consumer(cfg: config.Config, cfg_path: Path) -> Iterator[None]:
    """The topic's real consumer, running until the block ends, once it keeps the ends its fetches heard
    (``ztfd.ingest.seen_ends``): status of a running daemon. The broker's topic holds one message where the store
    holds the bench's offsets, so the consumer takes it for a recreated topic and reads it: one alert more."""
    consumer = subprocess.Popen(ztfd_argv(cfg_path, "consume", "--topic", TOPIC), env=child_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not _ends_kept(cfg):
            if time.monotonic() > deadline or consumer.poll() is not None:
                raise RuntimeError("the consumer kept no ends within 60 s")
            time.sleep(0.2)
        yield
    finally:
        consumer.terminate()
        consumer.wait(30)


def _ends_kept(cfg: config.Config) -> bool:
    conn = store.connect(cfg.db_path)
    try:
        return TOPIC in seen_ends.fresh(conn)
    finally:
        conn.close()


def _plan(cfg: config.Config, date: str, per_night: int) -> None:
    conn = store.connect(cfg.db_path)
    try:
        count, _to_fetch = replay.plan(conn, cfg, date, None, False)
    finally:
        conn.close()
    if count != per_night:
        raise RuntimeError(f"replay planned {count} alerts for {date}, expected {per_night}")


def _drop_caches() -> bool:
    """Empty the page cache (root only): the next read of the store comes from the disk."""
    if os.geteuid() != 0:
        return False
    os.sync()
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as handle:
        handle.write("3\n")
        return True
    return False


def _cold_and_warm(measure: Callable[[], object]) -> dict[str, float | None]:
    cold = None
    if _drop_caches():
        started = time.perf_counter()
        measure()
        cold = time.perf_counter() - started
    warm = []
    for _ in range(3):
        started = time.perf_counter()
        measure()
        warm.append(time.perf_counter() - started)
    return {"cold": cold, "warm": sorted(warm)[1]}


def _rows(results: Results, total: int, per_night: int, before: StoreSize, after: StoreSize,
          timings: dict[str, dict[str, float | None]]) -> None:
    per_alert = after.used_bytes / total
    year_gb = per_alert * YEAR_ALERTS / 1e9
    results.add(
        Row("store", "bytes per alert at steady state", per_alert, "B",
            f"{total:,} alerts with stamps, after the prune; {year_gb:.1f} GB at 18 M alerts",
            f"<= {GOAL_BYTES} B", per_alert <= GOAL_BYTES),
        Row("store", "bytes per alert before the prune", before.used_bytes / total, "B",
            "done jobs and uploaded files' manifest rows still kept; issue's layout: ~2,500 B"),
    )
    biggest = sorted(after.tables.items(), key=lambda item: -item[1])[:6]
    results.add(Row("store", "of which (B/alert)", None, "",
                    ", ".join(f"{name} {size / total:.0f}" for name, size in biggest)))
    for key, name, goal, baseline in (
            ("status", "ztfd status --json (command, lag included)", GOAL_STATUS,
             "issue: 0.64 s at 300k stamps off, 30-40 s at a year"),
            ("status_store", "ztfd status: the store's part", GOAL_STATUS, ""),
            ("replay_plan", f"replay --date planning ({per_night:,} alerts)", GOAL_REPLAY,
             "issue: 1 s then, ~90 s at a year")):
        found = timings[key]
        worst = max(t for t in (found["cold"], found["warm"]) if t is not None)
        detail = f"cold {_seconds(found['cold'])}, warm {_seconds(found['warm'])}"
        results.add(Row("store", name, worst, "s", f"{detail}; {baseline}".strip("; "), f"<= {goal:g} s",
                        worst <= goal))


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"
