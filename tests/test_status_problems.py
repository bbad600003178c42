"""``ztfd status`` says why: a real daemon with its broker down, or with its stamp service and S3 unreachable,
shows each as a problem naming the thing, the reason and the log line, while the exit code stays LSB (running: 0)
and ``healthy`` says "running with problems"."""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import FAST_KAFKA_OPTIONS, child_env, wait_until, write_config, ztfd_command
from ztfd.embedded.kafka import KafkaBroker
from ztfd.embedded.net import free_port
from ztfd.embedded.samples import message_stream

ISO_UTC = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$"


def status(cfg_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ztfd_command(cfg_path, "status", *args), capture_output=True, text=True, env=child_env(),
                          timeout=60)


def status_json(cfg_path: Path) -> tuple[int, dict]:
    result = status(cfg_path, "--json")
    assert result.returncode in (0, 3), result.stderr
    return result.returncode, json.loads(result.stdout)


@pytest.fixture
def daemon() -> Iterator[Callable[[Path], None]]:
    started: list[Path] = []

    def start(cfg_path: Path) -> None:
        result = subprocess.run(ztfd_command(cfg_path, "start"), capture_output=True, text=True, env=child_env(),
                                timeout=60)
        assert result.returncode == 0, result.stderr
        started.append(cfg_path)

    yield start
    for cfg_path in started:
        subprocess.run(ztfd_command(cfg_path, "stop", "--timeout", "15"), capture_output=True, env=child_env(),
                       timeout=60)


def kinds(report: dict) -> set[str]:
    return {p["kind"] for p in report["problems"]}


def iso_times(value: object, key: str = "") -> list[tuple[str, object]]:
    """Every (key, value) whose key names a time (``*_at``, ``at``, ``since``, ``time``) anywhere in the report."""
    found = []
    if isinstance(value, dict):
        for k, v in value.items():
            found += iso_times(v, k)
    elif isinstance(value, list):
        for v in value:
            found += iso_times(v, key)
    elif key == "at" or key.endswith("_at") or key in ("since", "time"):
        found.append((key, value))
    return found


def test_a_broker_down_is_named_with_librdkafkas_reason(tmp_path: Path, daemon: Callable[[Path], None]) -> None:
    port = free_port()
    home = tmp_path / "home"
    cfg_path = write_config(home / "ztfd.toml", {
        "kafka": {"bootstrap_servers": f"127.0.0.1:{port}", "group_id": "g", "topics": ["lasair_down"]},
        "kafka.options": dict(FAST_KAFKA_OPTIONS), "stamps": {"enabled": False},
        "supervisor": {"heartbeat_timeout": 30, "stop_timeout": 10},
    }, home)
    daemon(cfg_path)

    def with_broker_problem() -> tuple[int, dict] | None:
        """The status once it names the consumer's broker trouble (each call waits out the lag query's timeout)."""
        code, report = status_json(cfg_path)
        named = any(p["kind"] == "broker" and "from consumer" in p["thing"] for p in report["problems"])
        return (code, report) if named else None

    code, report = wait_until(with_broker_problem, 60, "status to name the unreachable broker")
    assert code == 0 and report["running"] and report["healthy"] is False
    problem = next(p for p in report["problems"] if p["kind"] == "broker")
    assert f"127.0.0.1:{port}" in problem["thing"]
    assert "Connection refused" in problem["reason"], problem
    assert problem["log"]["file"] == str(home / "logs" / "errors.log")
    logged = (home / "logs" / "errors.log").read_text()
    assert "Connection refused" in logged
    # The log line is at the time the problem points to (to the second: the log's own clock format).
    assert problem["log"]["at"][:19].replace("T", " ") in logged, (problem, logged[:2000])
    text = status(cfg_path)
    assert text.returncode == 0
    assert "Problems" in text.stdout and f"Kafka broker 127.0.0.1:{port}" in text.stdout
    assert f"config {cfg_path.resolve()}" in text.stdout and f"home {home.resolve()}" in text.stdout
    assert text.stdout.splitlines()[0].endswith(", with 1 problem")


def test_a_stamp_service_and_s3_down_are_named_and_every_time_is_iso(
    kafka: KafkaBroker, tmp_path: Path, daemon: Callable[[Path], None]
) -> None:
    topic = f"lasair_problems_{uuid.uuid4().hex[:8]}"
    kafka.create_topic(topic)
    kafka.produce(topic, [json.dumps(m) for m in message_stream(3)])
    stamps_url, s3_url = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    home = tmp_path / "home"
    cfg_path = write_config(home / "ztfd.toml", {
        "kafka": {"bootstrap_servers": kafka.bootstrap, "group_id": topic, "topics": [topic]},
        "kafka.options": dict(FAST_KAFKA_OPTIONS),
        "stamps": {"enabled": True, "workers": 1, "alerce_stamp_url": stamps_url, "alerce_api_url": stamps_url,
                   "timeout": 2.0, "rate_limit": 0.0, "retry_base": 30.0, "retry_max": 60.0},
        "s3": {"bucket": "nowhere", "endpoint_url": s3_url, "region": "us-east-1", "interval": 1.0,
               "max_attempts": 1},
        "supervisor": {"heartbeat_timeout": 30, "stop_timeout": 10},
    }, home)
    daemon(cfg_path)

    def both() -> bool:
        return {"stamps", "s3"} <= kinds(status_json(cfg_path)[1])

    wait_until(both, 90, "status to name the stamp service and S3")
    code, report = status_json(cfg_path)
    assert code == 0 and report["healthy"] is False
    stamps = next(p for p in report["problems"] if p["kind"] == "stamps")
    assert stamps_url in stamps["thing"] and stamps["reason"], stamps
    s3 = next(p for p in report["problems"] if p["kind"] == "s3")
    assert "nowhere" in s3["thing"] and s3["reason"] and s3["log"]["file"].endswith("sync.log"), s3
    assert "broker" not in kinds(report)
    times = iso_times(report)
    assert any(key == "started_at" for key, _ in times), "last_pass.started_at is in the report"
    for key, value in times:
        assert value is None or re.match(ISO_UTC, str(value)), (key, value)
