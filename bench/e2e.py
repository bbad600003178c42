"""End to end: alerts produced at a steady rate into a running ``ztfd start``; latency of each stage.

Each message is about its own synthetic object (the sample cutouts under a distinct objectId and candid) and
carries ``bench_produced_at``, the producer's clock when it was sent. The store then says when its alert file
was written (the manifest's ``recorded_at`` of the file), when its stamp triplet was on disk (the latest
``recorded_at`` of its three FITS files), and when the alert file was in S3 (``uploaded_at``).

The store's WAL file is sampled throughout (``WalSampler``): its peak size is reported against the store's
``journal_size_limit`` (``ztfd.store.db.WAL_SIZE_LIMIT``), the bound it should stay near under a steady load.

``--soak`` runs the same load for 10 minutes and reports each role's RSS growth (median of the last minute
against the median of the second minute, after warm-up).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from pathlib import Path

from bench.common import Results, Row, RssSampler, Sampler, Settings, wait_until
from bench.stamps import synthetic_packets
from ztfd import store
from ztfd.embedded.demo import FAST_KAFKA_OPTIONS, LOCAL_AWS_ENV, Daemon, write_config
from ztfd.store import jobs
from ztfd.store.alerts import count_alerts, iter_alerts
from ztfd.store.db import WAL_SIZE_LIMIT
from ztfd.store.manifest import ManifestFile, count_pending, manifest_files

TOPIC = "lasair_bench-e2e"
PROBE = "ZTF00probe"  # the first message: produced and stored before the measured stream
RATE = 200.0
LATENCY = 0.05
SOAK_SECONDS = 600.0
SOAK_OBJECTS = 20_000  # cycled during the soak: stamps after the first pass are already on disk


def run(settings: Settings, results: Results) -> None:
    count = settings.size(2000, 400)
    if settings.soak:
        count = int(RATE * SOAK_SECONDS)
    work = settings.workdir / "e2e"
    latencies, growth, wal_peak = _run(count, work, settings, results)
    results.raw["e2e"] = {"alerts": count, "rate": RATE, "latency_s": {k: _summary(v) for k, v in latencies.items()},
                          "rss_growth_mb": growth, "wal_peak_bytes": wal_peak}
    file_p99 = _pct(latencies["alert file"], 99)
    results.add(
        Row("e2e", "produce -> alert file p50", _pct(latencies["alert file"], 50), "s",
            f"{count:,} alerts at {RATE:.0f}/s"),
        Row("e2e", "produce -> alert file p99", file_p99, "s", "", "<= 0.5 s",
            file_p99 is not None and file_p99 <= 0.5),
        Row("e2e", "produce -> stamp triplet p50", _pct(latencies["stamp triplet"], 50), "s", "50 ms/request"),
        Row("e2e", "produce -> stamp triplet p99", _pct(latencies["stamp triplet"], 99), "s", ""),
        Row("e2e", "produce -> object in S3 p50", _pct(latencies["object in S3"], 50), "s", "sync interval 1 s"),
        Row("e2e", "produce -> object in S3 p99", _pct(latencies["object in S3"], 99), "s", ""),
        Row("e2e", "store WAL peak size", round(wal_peak / 2**20, 1), "MB",
            f"journal_size_limit {WAL_SIZE_LIMIT // 2**20} MB", f"<= {WAL_SIZE_LIMIT // 2**20} MB",
            wal_peak <= WAL_SIZE_LIMIT),
    )
    if growth:
        for role, mb in sorted(growth.items()):
            results.add(Row("memory", f"RSS growth {role} (soak)", mb, "MB", "last minute vs second minute",
                            "<= 10 MB", mb <= 10))
    else:
        results.notes.append("memory growth: not measured in a default run; `bin/bench --soak` runs the end-to-end "
                             "load for 10 minutes and reports it")


def _run(count: int, work: Path, settings: Settings,
         results: Results) -> tuple[dict[str, list[float]], dict[str, float], int]:
    from ztfd.embedded import alerce, kafka, s3

    objects = min(count, SOAK_OBJECTS)
    packets = synthetic_packets(objects)
    home = work / "home"
    work.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(kafka.KafkaBroker(log_path=work / "tansu.log"))
        s3_server = stack.enter_context(s3.S3Server(proxy=False))
        stamps = stack.enter_context(alerce.StampService(packets=packets, latency=LATENCY, include_previous=False))
        import boto3

        boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1",
                     aws_access_key_id=LOCAL_AWS_ENV["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=LOCAL_AWS_ENV["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket="bench-e2e")
        broker.create_topic(TOPIC)
        config_path = write_config(home / "ztfd.toml", home, {
            "kafka": {"bootstrap_servers": broker.bootstrap, "group_id": "bench-e2e", "topics": [TOPIC]},
            "kafka.options": dict(FAST_KAFKA_OPTIONS),
            "stamps": {"enabled": True, "workers": 4, "previews": True, "alerce_stamp_url": stamps.url,
                       "alerce_api_url": stamps.url, "rate_limit": 0.0, "timeout": 30.0},
            "s3": {"bucket": "bench-e2e", "endpoint_url": s3_server.endpoint_url, "region": "us-east-1",
                   "interval": 1.0},
        })
        daemon = Daemon(config_path, work / "daemon").start()
        sampler = stack.enter_context(RssSampler(interval=1.0 if settings.soak else 0.2))
        wal = stack.enter_context(WalSampler(home / "state" / "ztfd.sqlite3-wal"))
        for popen in daemon.processes:
            sampler.watch(popen.pid)
        stack.callback(daemon.stop)
        conn = store.connect(home / "state" / "ztfd.sqlite3")
        stack.callback(conn.close)
        _wait_for_consumer(conn, daemon)
        produced = _produce(broker.bootstrap, packets, count, settings)
        wait_until(lambda: _finished(conn, count), timeout=300 + count / 50, interval=0.5,
                   what="every alert stored, fetched and uploaded")
        latencies = _latencies(conn, produced)
    results.note_rss(sampler)
    growth = _growth(sampler) if settings.soak else {}
    return latencies, growth, wal.peak


class WalSampler(Sampler):
    """The largest size the store's WAL file reached, sampled in a thread every ``interval`` seconds."""

    def __init__(self, path: Path, interval: float = 0.1) -> None:
        super().__init__(interval)
        self.path = path
        self.peak = 0

    def sample(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.peak = max(self.peak, self.path.stat().st_size)


def _wait_for_consumer(conn: sqlite3.Connection, daemon: Daemon) -> None:
    """Produce only once the consumer reads (a probe message is stored), so the group join is not latency."""
    from ztfd.embedded.kafka import produce

    produce(daemon_bootstrap(daemon), TOPIC, [json.dumps({"objectId": PROBE, "UTC": "2021-09-01 00:00:00"})])

    def probe_stored() -> bool:
        if daemon.exited():
            raise RuntimeError(f"the daemon exited: {daemon.exited()}; see {daemon.log_dir}")
        return count_alerts(conn, PROBE) > 0

    wait_until(probe_stored, timeout=120, what="the probe alert to be stored")


def daemon_bootstrap(daemon: Daemon) -> str:
    from ztfd import config

    return config.load(daemon.config_path).kafka.bootstrap_servers


def _produce(bootstrap: str, packets: list, count: int, settings: Settings) -> dict[str, float]:
    """Produce ``count`` messages at a steady ``RATE``; returns objectId -> produce time (first time it was sent)."""
    from confluent_kafka import Producer

    from ztfd.embedded.samples import lasair_message

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "enable.idempotence": False})
    produced: dict[str, float] = {}
    start = time.time()
    stop = threading.Event()
    for index in range(count):
        due = start + index / RATE
        delay = due - time.time()
        if delay > 0:
            stop.wait(delay)
        packet = packets[index % len(packets)]
        message = lasair_message(packet, "sn")
        message["seq"] = index
        message["bench_produced_at"] = time.time()
        produced.setdefault(packet.object_id, message["bench_produced_at"])
        producer.produce(TOPIC, value=json.dumps(message).encode())
        producer.poll(0)
        if settings.soak and index and index % int(RATE * 60) == 0:
            print(f"  soak: {index:,} produced, {time.time() - start:.0f}s", flush=True)
    producer.flush(60)
    return produced


def _finished(conn: sqlite3.Connection, count: int) -> bool:
    stored = count_alerts(conn) - count_alerts(conn, PROBE)
    open_jobs = jobs.counts(conn).unfinished
    pending = count_pending(conn)
    return stored >= count and open_jobs == 0 and pending == 0


def _latencies(conn: sqlite3.Connection, produced: dict[str, float]) -> dict[str, list[float]]:
    """Per object (its first alert): produce -> alert file, -> stamp triplet, -> alert file in S3."""
    files = {row.path: row for row in manifest_files(conn)}
    first_alert: dict[str, ManifestFile] = {}
    for alert in iter_alerts(conn):  # oldest first: the first alert of each object
        if alert.object_id not in first_alert and alert.path in files:
            first_alert[alert.object_id] = files[alert.path]
    triplet: dict[str, float] = {}
    for path, row in files.items():
        if path.startswith("images/") and path.endswith(".fits.gz"):
            object_id = Path(path).parent.name
            triplet[object_id] = max(triplet.get(object_id, 0.0), row.recorded_at)
    result: dict[str, list[float]] = {"alert file": [], "stamp triplet": [], "object in S3": []}
    for object_id, sent in produced.items():
        row = first_alert.get(object_id)
        if row is None:
            continue
        result["alert file"].append(row.recorded_at - sent)
        if row.uploaded_at is not None:
            result["object in S3"].append(row.uploaded_at - sent)
        if object_id in triplet:
            result["stamp triplet"].append(triplet[object_id] - sent)
    return result


def _pct(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def _summary(values: list[float]) -> dict[str, float | None]:
    return {"count": len(values), "p50": _pct(values, 50), "p99": _pct(values, 99), "max": max(values, default=None)}


def _growth(sampler: RssSampler) -> dict[str, float]:
    import statistics

    growth = {}
    for role, series in sampler.samples.items():
        t0 = series[0][0]
        second = [rss for t, rss in series if 60 <= t - t0 < 120]
        last = [rss for t, rss in series if t >= series[-1][0] - 60]
        if second and last:
            growth[role] = statistics.median(last) - statistics.median(second)
    return growth
