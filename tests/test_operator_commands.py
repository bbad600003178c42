"""Operator commands always answer: ``ztfd status`` and ``ztfd metrics`` report a Kafka client they cannot build
(the SASL password lives in the daemon's environment only) as one line, never a traceback; status keeps its LSB
exit codes and metrics keeps serving the store's metrics."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tests.conftest import child_env, wait_until, ztfd_command
from tests.test_consumer import unique
from ztfd.embedded.kafka import KafkaBroker
from ztfd.embedded.net import free_port

SECRET = "hunter2-in-the-unit-only"
SASL = {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "ztfd"}
REFUSAL = "librdkafka: sasl.username and sasl.password must be set"


def status(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ztfd_command(config_path, "status", *args), capture_output=True, text=True,
                          env=child_env(), timeout=60)


def test_status_without_the_daemons_password_answers_with_its_lsb_code_and_one_line(
    kafka: KafkaBroker, make_config: Callable[..., Path]
) -> None:
    topic = unique("sasl")
    config_path = make_config(kafka={"bootstrap_servers": kafka.bootstrap, "group_id": unique("g"), "topics": [topic]},
                              kafka__options=SASL)
    stopped = status(config_path)
    assert stopped.returncode == 3 and "Traceback" not in stopped.stderr, stopped.stderr
    assert [line for line in stopped.stdout.splitlines() if "Kafka: no client" in line] == [
        f"  Kafka: no client, lag unknown: {REFUSAL} (kafka.options, or ZTFD_KAFKA_OPTIONS_* in the daemon's "
        "environment)"]
    started = subprocess.run(ztfd_command(config_path, "start"), capture_output=True, text=True, timeout=60,
                             env=child_env(ZTFD_KAFKA_OPTIONS_SASL_PASSWORD=SECRET))
    assert started.returncode == 0, started.stderr
    try:
        running = wait_until(lambda: (r := status(config_path, "--json")).returncode == 0 and r, 60, "status 0")
        report = json.loads(running.stdout)
        assert report["kafka_client_error"] == REFUSAL and report["topics"][0]["broker"] == "no Kafka client"
        assert "Traceback" not in running.stderr and SECRET not in running.stdout
    finally:
        subprocess.run(ztfd_command(config_path, "stop"), capture_output=True, env=child_env(), timeout=120)


def test_metrics_without_a_kafka_client_serves_the_stores_metrics(make_config: Callable[..., Path]) -> None:
    port = free_port()
    config_path = make_config(metrics={"listen": f"127.0.0.1:{port}"}, kafka__options=SASL)
    child = subprocess.Popen(ztfd_command(config_path, "metrics"), env=child_env(ZTFD_PROCESS_NAME="alone"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def scrape() -> str | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                    body = response.read().decode()
            except OSError:
                return None
            return body if f'ztfd_kafka_up{{host="{socket.gethostname()}",topic="t"}} 0.0' in body else None

        body = wait_until(scrape, 60, "a scrape with the lag query done")
        assert f'ztfd_process_up{{host="{socket.gethostname()}",name="alone",role="metrics"}} 1.0' in body
        assert child.poll() is None
        child.send_signal(signal.SIGTERM)
        assert child.wait(30) == 0
        errors = (config_path.parent / "logs" / "errors.log").read_text()
        assert f"no Kafka client, serving the store's metrics without the lag: {REFUSAL}" in errors
        assert "Traceback" not in errors + child.stderr.read()  # type: ignore[union-attr]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
