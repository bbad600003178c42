"""Metrics: a real Prometheus scrapes a real running ztfd (Tansu, stamps, moto S3) and its series match the store.

Also: the ``metrics.listen`` checks, and the alerting rules of ``etc/ztfd.rules.yml`` through ``promtool``
(``check rules`` and the rule unit tests in ``tests/ztfd.rules.test.yml``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import tools
from tests.conftest import child_env, wait_until, ztfd_command
from ztfd import config, store
from ztfd.embedded.alerce import StampService
from ztfd.embedded.kafka import KafkaBroker
from ztfd.embedded.net import free_port
from ztfd.embedded.s3 import S3Server
from ztfd.embedded.samples import message_stream
from ztfd.store import counters

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "etc" / "ztfd.rules.yml"


@pytest.mark.parametrize("listen", ["9464", "localhost", ":9464", "127.0.0.1:0", "127.0.0.1:70000",
                                    "127.0.0.1:http", "a b:9464"])
def test_a_bad_listen_address_exits_2_naming_the_key(make_config: Callable[..., Path], listen: str) -> None:
    cfg_path = make_config(metrics={"listen": listen})
    result = subprocess.run(ztfd_command(cfg_path, "config"), capture_output=True, text=True, env=child_env(),
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "ztfd: config: metrics.listen must be host:port, e.g. 127.0.0.1:9464 (empty turns metrics off)"]


@pytest.mark.parametrize(("listen", "expected"), [("127.0.0.1:9464", ("127.0.0.1", 9464)),
                                                  ("[::1]:9000", ("::1", 9000)), ("0.0.0.0:80", ("0.0.0.0", 80))])
def test_listen_addresses(listen: str, expected: tuple[str, int]) -> None:
    assert config.listen_address(listen) == expected


def test_a_missing_program_skips_but_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        tools.require("ztfd-no-such-program")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run this test"):
        tools.require("ztfd-no-such-program")


def test_loopback_addresses() -> None:
    from ztfd.reporting.metrics import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.10", "metrics.example.org"))


@pytest.mark.parametrize("command", [["metrics"], ["report", "--watch"]])
def test_metrics_and_reporter_run_alone_and_stop_on_sigterm(make_config: Callable[..., Path],
                                                            command: list[str]) -> None:
    """``ztfd metrics`` (and the reporter) as supervisord or a unit would run them: they heartbeat, serve, and
    exit 0 on SIGTERM."""
    port = free_port()
    cfg_path = make_config(metrics={"listen": f"127.0.0.1:{port}"}, report={"after_quiet": 1.0})
    cfg = config.load(cfg_path)
    child = subprocess.Popen(ztfd_command(cfg_path, *command), env=child_env(ZTFD_PROCESS_NAME="alone"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        role = "metrics" if command == ["metrics"] else "reporter"

        def heartbeat() -> bool:
            if not cfg.db_path.exists():
                return False
            conn = store.connect(cfg.db_path)
            try:
                return conn.execute("SELECT 1 FROM processes WHERE name = 'alone' AND role = ?",
                                    (role,)).fetchone() is not None
            finally:
                conn.close()

        wait_until(heartbeat, 60, f"the {role} to heartbeat")
        if role == "metrics":
            body = wait_until(lambda: _scrape(port), 30, "/metrics to answer")
            assert f'ztfd_process_up{{host="{socket.gethostname()}",name="alone",role="metrics"}} 1.0' in body
        child.send_signal(signal.SIGTERM)
        assert child.wait(30) == 0, child.stderr.read() if child.stderr else ""
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()
    except OSError:
        return None


def test_alerting_rules_pass_promtool() -> None:
    promtool = tools.require("promtool")
    checked = tools.run_tool(promtool, "check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout
    tested = tools.run_tool(promtool, "test", "rules", str(ROOT / "tests" / "ztfd.rules.test.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_example_dashboard_is_json_with_a_panel_for_every_metric() -> None:
    dashboard = json.loads((ROOT / "etc" / "grafana-ztfd.json").read_text(encoding="utf-8"))
    expressions = " ".join(target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", []))
    for name in METRIC_NAMES:
        assert name in expressions, f"no panel shows {name}"
    # a fleet's hosts each serve their own series: a panel sums over hosts, or draws one line per host
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["expr"].startswith(("sum", "max", "min")) or "{{host}}" in target["legendFormat"], target


METRIC_NAMES = (
    "ztfd_alerts_stored_total", "ztfd_alerts_rejected_total", "ztfd_kafka_lag", "ztfd_kafka_gap_alerts_total",
    "ztfd_last_alert_age_seconds", "ztfd_stamp_jobs", "ztfd_stamp_failures_total", "ztfd_sync_pending_files",
    "ztfd_sync_pending_bytes", "ztfd_sync_uploaded_bytes_total", "ztfd_process_up", "ztfd_process_restarts_total",
    "ztfd_heartbeat_age_seconds", "ztfd_disk_free_bytes", "ztfd_disk_free_inodes",
)


# --- the real thing ------------------------------------------------------------------------------------------


class Running:
    """A daemon started by ``ztfd start`` with metrics on, and the way to read its store the slow way."""

    def __init__(self, cfg_path: Path, topic: str, port: int, env: dict[str, str]) -> None:
        self.cfg_path = cfg_path
        self.cfg = config.load(cfg_path)
        self.topic = topic
        self.port = port
        self.env = env

    def conn(self) -> sqlite3.Connection:
        return store.connect(self.cfg.db_path)

    def one(self, sql: str, *args: Any) -> Any:
        conn = self.conn()
        try:
            return conn.execute(sql, args).fetchone()[0]
        finally:
            conn.close()

    def scrape(self) -> str:
        body = _scrape(self.port)
        assert body is not None, "/metrics does not answer"
        return body


@pytest.fixture
def running(kafka: KafkaBroker, stamp_service: StampService, make_config: Callable[..., Path],
            tmp_path: Path) -> Iterator[Running]:
    tag = uuid.uuid4().hex[:8]
    topic = f"metrics-{tag}"
    kafka.create_topic(topic)
    port = free_port()
    with S3Server(log_path=tmp_path / "moto.log") as s3:
        s3.create_bucket("metrics")
        cfg_path = make_config(
            kafka={"bootstrap_servers": kafka.bootstrap, "group_id": f"metrics-{tag}", "topics": [topic]},
            stamps={"enabled": True, "workers": 1, "alerce_stamp_url": stamp_service.url,
                    "alerce_api_url": stamp_service.url, "rate_limit": 0.0, "timeout": 10.0},
            s3={"bucket": "metrics", "endpoint_url": s3.endpoint_url, "region": "us-east-1", "interval": 1.0},
            supervisor={"heartbeat_timeout": 30, "restart_backoff_max": 1, "stop_timeout": 10},
            metrics={"listen": f"127.0.0.1:{port}"},
            report={"after_quiet": 0.0},
        )
        env = child_env(**s3.env())
        run = Running(cfg_path, topic, port, env)
        started = subprocess.run(ztfd_command(cfg_path, "start"), capture_output=True, text=True, env=env,
                                 timeout=60)
        assert started.returncode == 0, started.stderr
        try:
            yield run
        finally:
            subprocess.run(ztfd_command(cfg_path, "stop", "--timeout", "15"), capture_output=True, env=env,
                           timeout=60)


def store_view(run: Running) -> dict[str, Any]:
    """What the metrics should say, counted from the rows themselves."""
    conn = run.conn()
    try:
        jobs = dict.fromkeys(counters.JOB_STATES, 0)
        for row in conn.execute(
            "SELECT CASE WHEN state = 'ready' AND waiting = 'unavailable' THEN 'unavailable' "
            "WHEN state = 'ready' AND waiting = 'retry' THEN 'retry_waiting' ELSE state END AS s, count(*) AS n "
            "FROM jobs GROUP BY s"
        ):
            jobs[row["s"]] = float(row["n"])
        pending = conn.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM manifest WHERE state = 'pending'").fetchone()
        return {
            "stored": float(conn.execute("SELECT count(*) FROM alerts WHERE topic = ?", (run.topic,)).fetchone()[0]),
            "rejected": float(conn.execute("SELECT count(*) FROM rejected WHERE topic = ?",
                                           (run.topic,)).fetchone()[0]),
            "last_alert": conn.execute("SELECT max(received_at) FROM alerts").fetchone()[0],
            "jobs": jobs,
            "pending": (float(pending[0]), float(pending[1])),
            "uploaded_bytes": float(conn.execute(
                "SELECT coalesce(sum(size), 0) FROM manifest WHERE state = 'done'").fetchone()[0]),
            "processes": {row["name"]: (row["role"], float(row["restarts"])) for row in conn.execute(
                "SELECT name, role, restarts FROM processes")},
        }
    finally:
        conn.close()


def settled(run: Running, produced: int) -> dict[str, Any] | None:
    """The store view once every message is stored or rejected, every job finished and every file uploaded."""
    view = store_view(run)
    jobs = view["jobs"]
    open_jobs = jobs["ready"] + jobs["retry_waiting"] + jobs["unavailable"] + jobs["leased"]
    if view["stored"] + view["rejected"] < produced or open_jobs or view["pending"][0] or not jobs["done"]:
        return None
    return view


def matches(prom: tools.PrometheusServer, run: Running, view: dict[str, Any]) -> bool:
    """True once Prometheus' latest samples say what the store says."""
    checks = [
        (prom.values(f'ztfd_alerts_stored_total{{topic="{run.topic}"}}'), {"": view["stored"]}),
        # every series names its host (a fleet's hosts each serve their own), and a sum over hosts is the total
        (prom.values(f'ztfd_alerts_stored_total{{topic="{run.topic}"}}', "host"),
         {socket.gethostname(): view["stored"]}),
        (prom.values('count({__name__=~"ztfd_.+", host=""})'), {}),
        (prom.values(f'sum by (topic) (ztfd_alerts_stored_total{{topic="{run.topic}"}})', "topic"),
         {run.topic: view["stored"]}),
        (prom.values(f'ztfd_alerts_rejected_total{{topic="{run.topic}"}}'), {"": view["rejected"]}),
        (prom.values(f'ztfd_kafka_lag{{topic="{run.topic}"}}'), {"": 0.0}),
        (prom.values(f'ztfd_kafka_gap_alerts_total{{topic="{run.topic}"}}'), {"": 0.0}),
        (prom.values("ztfd_stamp_jobs", "state"), view["jobs"]),
        (prom.values("ztfd_sync_pending_files"), {"": view["pending"][0]}),
        (prom.values("ztfd_sync_pending_bytes"), {"": view["pending"][1]}),
        (prom.values("ztfd_sync_uploaded_bytes_total"), {"": view["uploaded_bytes"]}),
        (prom.values("ztfd_process_restarts_total", "name"), {n: r for n, (_, r) in view["processes"].items()}),
        (prom.values("ztfd_process_up", "name"), dict.fromkeys(view["processes"], 1.0)),
    ]
    return all(got == want for got, want in checks)


def test_prometheus_scrapes_a_running_ztfd_and_its_series_match_the_store(
        running: Running, kafka: KafkaBroker, tmp_path: Path) -> None:
    messages = list(message_stream(24))
    kafka.produce(running.topic, messages)
    kafka.produce(running.topic, [b"{not json", b"[1, 2]"])
    produced = len(messages) + 2
    view = wait_until(lambda: settled(running, produced), 120, "alerts stored, stamps fetched, files uploaded")
    assert view["rejected"] == 2 and view["uploaded_bytes"] > 0
    roles = {role for role, _ in view["processes"].values()}
    assert roles == {"supervisor", "consumer", "fetcher", "syncer", "metrics"}

    body = running.scrape()
    linted = tools.run_tool(tools.require("promtool"), "check", "metrics", stdin=body.encode())
    assert linted.returncode == 0, linted.stdout + linted.stderr

    with tools.prometheus_server(tmp_path / "prometheus", [f"127.0.0.1:{running.port}"]) as prom:
        wait_until(lambda: prom.values('up{job="ztfd"}') == {"": 1.0}, 60, "Prometheus to scrape ztfd")
        wait_until(lambda: matches(prom, running, store_view(running)), 60, "Prometheus' series to match the store")
        view = store_view(running)
        for metric, when, age in prom.samples(f'ztfd_last_alert_age_seconds{{topic="{running.topic}"}}'):
            assert metric["topic"] == running.topic
            assert abs((when - age) - view["last_alert"]) < 5, "the age does not point at the last alert"
        for metric, _when, age in prom.samples("ztfd_heartbeat_age_seconds"):
            assert 0 <= age <= running.cfg.supervisor.heartbeat_timeout, metric
        fs = os.statvfs(running.cfg.home)
        (free,) = prom.values("ztfd_disk_free_bytes").values()
        (inodes,) = prom.values("ztfd_disk_free_inodes").values()
        assert 0 < free <= fs.f_blocks * fs.f_frsize and 0 < inodes <= fs.f_files
        assert set(prom.values("ztfd_stamp_failures_total", "reason")) == set(counters.FAILURE_REASONS)

        # A fetcher killed with -9: the supervisor restarts it, and Prometheus sees the restart.
        fetcher_pid = running.one("SELECT pid FROM processes WHERE name = 'fetcher:1'")
        os.kill(fetcher_pid, signal.SIGKILL)
        wait_until(lambda: prom.values('ztfd_process_restarts_total{name="fetcher:1"}') == {"": 1.0}, 60,
                   "the restart to show in Prometheus")
        assert running.one("SELECT restarts FROM processes WHERE name = 'fetcher:1'") == 1
        wait_until(lambda: prom.values('ztfd_process_up{name="fetcher:1"}') == {"": 1.0}, 60, "the fetcher back up")
