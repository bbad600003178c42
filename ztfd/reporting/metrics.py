"""``ztfd metrics``: Prometheus' text format at ``/metrics``, computed from the store at each scrape.

The supervisor runs it as its ``metrics`` child when ``metrics.listen`` is set. A scrape reads only the small
counter tables the store's triggers keep (``ztfd.store.counters``), the ``processes`` rows and ``statvfs`` of home,
so it costs the same after a year as on the first day. The one figure the store cannot give, the Kafka lag, is
asked of the broker every ``LAG_INTERVAL`` seconds by the main loop (as ``ztfd status`` does: a throwaway consumer
that never joins the group) and served from that cache.

Every series carries a ``host`` label (this machine's name): in a fleet (docs/fleet.md) each host serves its own
``/metrics`` and the dashboard sums over hosts.

The HTTP server is waitress (``prometheus_client``'s WSGI app on it): a connection waits for its request without
a thread (one event loop holds them all), idle ones are closed after ``IDLE_TIMEOUT`` seconds, at most
``MAX_CONNECTIONS`` are open at once and ``SERVER_THREADS`` threads answer. A port scanner or a client that
connects and says nothing costs neither a thread nor, for long, a socket.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ztfd import config, store
from ztfd.daemon import lifecycle
from ztfd.daemon.heartbeat import Heartbeat
from ztfd.daemon.procs import pid_alive
from ztfd.ingest import seen_ends
from ztfd.reporting import status
from ztfd.store import counters
from ztfd.store.processes import ProcessRow, processes
from ztfd.store.states import ProcessState, Role

log = logging.getLogger(__name__)

LAG_INTERVAL = 15.0
KAFKA_TIMEOUT = 3.0
SERVER_THREADS = 2  # a scrape takes milliseconds; Prometheus scrapes one at a time
IDLE_TIMEOUT = 10  # seconds a connection may stay without a request in progress
MAX_CONNECTIONS = 64


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class KafkaView:
    """The last answer of the broker per topic: lag in messages (None: unknown) and whether it answered."""

    lag: dict[str, int | None] = field(default_factory=dict)
    up: dict[str, bool] = field(default_factory=dict)
    client_error: str | None = None  # why no Kafka client could be built (the lag is then unknown)


def read_kafka(cfg: config.Config, offsets: dict[str, dict[int, store.StoredOffset]],
               seen: dict[str, tuple[dict[int, int], float]]) -> KafkaView:
    """Every topic's high watermarks minus the stored offsets (``ztfd status``'s way: from what the running
    consumers heard, ``seen``, else asked of the broker)."""
    topics: list[dict[str, Any]] = [
        {"topic": topic, "lag": None,
         "partitions": {str(p): {"next_offset": o.next_offset} for p, o in offsets.get(topic, {}).items()}}
        for topic in cfg.kafka.topics
    ]
    client_error = status.add_lag(cfg, topics, seen, KAFKA_TIMEOUT)
    return KafkaView(lag={t["topic"]: t.get("lag") for t in topics},
                     up={t["topic"]: t.get("broker") == "ok" for t in topics}, client_error=client_error)


# Per-topic families: name (``_total`` is added to counters) -> (kind, help).
TOPIC_METRICS: dict[str, tuple[type[Metric], str]] = {
    "ztfd_alerts_stored": (CounterMetricFamily, "Alerts stored (accepted messages), per topic."),
    "ztfd_alerts_rejected": (CounterMetricFamily, "Messages rejected (kept with their reason), per topic."),
    "ztfd_kafka_gap_alerts": (CounterMetricFamily, "Alerts lost upstream (offsets the broker no longer had)."),
    "ztfd_last_alert_age_seconds": (GaugeMetricFamily, "Seconds since the topic's last alert was stored."),
    "ztfd_kafka_lag": (GaugeMetricFamily, "Messages in the topic after ztfd's stored offsets."),
    "ztfd_kafka_up": (GaugeMetricFamily, "1 when the broker answered the last lag query for the topic."),
}


class StoreCollector(Collector):
    """Every ztfd metric (docs/metrics.md), read afresh at each scrape."""

    def __init__(self, cfg: config.Config, conn: sqlite3.Connection, lock: threading.Lock) -> None:
        self.cfg = cfg
        self.conn = conn
        self.lock = lock
        self.kafka = KafkaView()
        self.host = socket.gethostname()

    def collect(self) -> Iterator[Metric]:
        """Every family, each sample labelled with this ``host``."""
        for family in self._families():
            family.samples = [sample._replace(labels={**sample.labels, "host": self.host})
                              for sample in family.samples]
            yield family

    def _families(self) -> Iterator[Metric]:
        now = time.time()
        with self.lock:
            topics = counters.topic_totals(self.conn)
            gaps = counters.gap_alerts(self.conn)
            jobs = counters.job_states(self.conn)
            failures = counters.stamp_failures(self.conn)
            files = counters.files_by_state(self.conn)
            uploaded = counters.uploaded(self.conn)
            rows = processes(self.conn)
        names = sorted(set(self.cfg.kafka.topics) | set(topics))
        empty = counters.TopicTotals(0, 0, None)

        per_topic = {name: kind(name, text, labels=["topic"]) for name, (kind, text) in TOPIC_METRICS.items()}
        for topic in names:
            totals = topics.get(topic, empty)
            values: dict[str, float | None] = {
                "ztfd_alerts_stored": totals.stored,
                "ztfd_alerts_rejected": totals.rejected,
                "ztfd_kafka_gap_alerts": gaps.get(topic, 0),
                "ztfd_last_alert_age_seconds": None if totals.last_alert_at is None
                else max(0.0, now - totals.last_alert_at),
                "ztfd_kafka_lag": self.kafka.lag.get(topic),
                "ztfd_kafka_up": None if topic not in self.kafka.up else float(self.kafka.up[topic]),
            }
            for name, value in values.items():
                if value is not None:  # unknown: no sample (an absent series), not a made-up 0
                    per_topic[name].add_metric([topic], value)
        yield from per_topic.values()

        state = GaugeMetricFamily("ztfd_stamp_jobs", "Stamp jobs by state (done and failed: every job that ended so).",
                                  labels=["state"])
        for name, count in jobs.items():
            state.add_metric([name], count)
        yield state
        failed = CounterMetricFamily("ztfd_stamp_failures", "Failed stamp attempts, by class of reason.",
                                     labels=["reason"])
        for reason, count in failures.items():
            failed.add_metric([reason], count)
        yield failed

        pending = files.get("pending", counters.FileTotals(0, 0))
        yield GaugeMetricFamily("ztfd_sync_pending_files", "Files recorded and not yet uploaded to S3.",
                                value=pending.files)
        yield GaugeMetricFamily("ztfd_sync_pending_bytes", "Bytes of the files not yet uploaded to S3.",
                                value=pending.bytes)
        yield CounterMetricFamily("ztfd_sync_uploaded_bytes", "Bytes uploaded to S3 and verified.",
                                  value=uploaded.bytes)
        yield CounterMetricFamily("ztfd_sync_uploaded_files", "Files uploaded to S3 and verified.",
                                  value=uploaded.files)

        yield from self._processes(rows, now)
        yield from self._disk()

    def _processes(self, rows: list[ProcessRow], now: float) -> Iterator[Metric]:
        up = GaugeMetricFamily("ztfd_process_up", "1 while the process runs and heartbeats in time.",
                               labels=["name", "role"])
        restarts = CounterMetricFamily("ztfd_process_restarts", "Restarts by the supervisor since `ztfd start`.",
                                       labels=["name", "role"])
        beat = GaugeMetricFamily("ztfd_heartbeat_age_seconds", "Seconds since the process last heartbeated.",
                                 labels=["name"])
        for row in rows:
            fresh = row.heartbeat_at is not None and now - row.heartbeat_at <= self.cfg.supervisor.heartbeat_timeout
            alive = row.pid is not None and pid_alive(row.pid) and row.state == ProcessState.RUNNING
            up.add_metric([row.name, row.role], 1 if alive and fresh else 0)
            restarts.add_metric([row.name, row.role], row.restarts)
            if row.heartbeat_at is not None:
                beat.add_metric([row.name], max(0.0, now - row.heartbeat_at))
        yield from (up, restarts, beat)

    def _disk(self) -> Iterator[Metric]:
        try:
            fs = os.statvfs(self.cfg.home)
        except OSError as exc:
            log.warning("cannot read the file system of %s: %s", self.cfg.home, exc)
            return
        yield GaugeMetricFamily("ztfd_disk_free_bytes", "Bytes free for ztfd on the file system of home.",
                                value=fs.f_bavail * fs.f_frsize)
        yield GaugeMetricFamily("ztfd_disk_size_bytes", "Size in bytes of the file system of home.",
                                value=fs.f_blocks * fs.f_frsize)
        yield GaugeMetricFamily("ztfd_disk_free_inodes", "Inodes (files) free on the file system of home.",
                                value=fs.f_favail)
        yield GaugeMetricFamily("ztfd_disk_inodes", "Inodes (files) of the file system of home in all.",
                                value=fs.f_files)


def run(cfg: config.Config, name: str) -> int:
    """Serve ``/metrics`` on ``metrics.listen`` until SIGTERM; heartbeat as role ``metrics``."""
    if not cfg.metrics.listen:
        log.error("metrics.listen is empty: nothing to serve")
        return 2
    host, port = config.listen_address(cfg.metrics.listen)
    if not is_loopback(host):
        log.warning("metrics listen on %s, which other machines can reach (metrics.listen; 127.0.0.1 keeps it local)",
                    cfg.metrics.listen)
    with lifecycle.stop_on_signals() as stop:
        return _serve(cfg, name, host, port, stop)


def start_server(registry: CollectorRegistry, host: str, port: int) -> Any:
    """The bounded HTTP server of ``registry`` (see the module's docstring), running on a thread of its own."""
    from prometheus_client import make_wsgi_app
    from waitress.server import create_server

    server = create_server(make_wsgi_app(registry), host=host, port=port, threads=SERVER_THREADS,
                           channel_timeout=IDLE_TIMEOUT, cleanup_interval=1, connection_limit=MAX_CONNECTIONS,
                           ident="ztfd-metrics", expose_tracebacks=False)
    threading.Thread(target=server.run, name="metrics-http", daemon=True).start()
    return server


def stop_server(server: Any) -> None:
    from waitress import wasyncore

    server.task_dispatcher.shutdown()
    wasyncore.close_all(server._map)  # the event loop ends once its map is empty


def _serve(cfg: config.Config, name: str, host: str, port: int, stop: lifecycle.Stop) -> int:
    conn = store.connect(cfg.db_path)
    lock = threading.Lock()
    collector = StoreCollector(cfg, conn, lock)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    try:
        server = start_server(registry, host, port)
    except OSError as exc:
        log.error("cannot listen on %s (metrics.listen): %s", cfg.metrics.listen, exc)
        conn.close()
        return 1
    log.info("metrics at http://%s/metrics", cfg.metrics.listen)
    next_lag = 0.0
    heartbeat = Heartbeat(name, Role.METRICS)
    try:
        while not stop.is_set():
            with lock:
                heartbeat.beat(conn)
            if time.monotonic() >= next_lag:
                with lock:
                    offsets = {topic: store.stored_offsets(conn, topic) for topic in cfg.kafka.topics}
                    seen = seen_ends.fresh(conn)
                kafka = read_kafka(cfg, offsets, seen)  # outside the lock: the broker may take seconds
                if kafka.client_error and kafka.client_error != collector.kafka.client_error:
                    log.error("metrics: no Kafka client, serving the store's metrics without the lag: %s",
                              kafka.client_error)
                collector.kafka = kafka
                next_lag = time.monotonic() + LAG_INTERVAL
            stop.wait(heartbeat.interval)
    except sqlite3.Error as exc:
        log.error("metrics: store error: %s", exc)
        return 1
    finally:
        stop_server(server)
        conn.close()
    log.info("metrics stopped")
    return 0
