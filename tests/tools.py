"""Debian programs the observability tests drive for real: Prometheus (and promtool) and headless Chromium.

``bin/test`` installs them (``apt-get``, as root) when they are missing; the tests install nothing. Without the
program a test is skipped with the reason, except in CI (``CI=true``), where a missing program fails it: CI
must prove the real thing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ztfd.embedded.net import free_port, wait_for_port

PACKAGES = {"prometheus": "prometheus", "promtool": "prometheus", "chromium": "chromium"}


def require(program: str) -> str:
    """The program's path; skip (fail in CI) when it is not installed."""
    found = shutil.which(program)
    if found:
        return found
    reason = (f"{program} is not installed (Debian package {PACKAGES.get(program, program)}; "
              f"bin/test installs it when run as root)")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}: CI must run this test")
    pytest.skip(reason)


@contextlib.contextmanager
def prometheus_server(workdir: Path, targets: list[str], interval: float = 1.0) -> Iterator[PrometheusServer]:
    """A real Prometheus on 127.0.0.1 scraping ``targets`` (host:port) every ``interval`` s, storage in workdir."""
    binary = require("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n"
        f"  scrape_interval: {interval:g}s\n"
        f"  scrape_timeout: {interval:g}s\n"
        "scrape_configs:\n"
        "  - job_name: ztfd\n"
        "    static_configs:\n"
        f"      - targets: {json.dumps(targets)}\n",
        encoding="utf-8",
    )
    port = free_port()
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    log.close()
    try:
        wait_for_port(port, timeout=60)
        server = PrometheusServer(f"http://127.0.0.1:{port}", workdir / "prometheus.log")
        server.wait_ready(deadline=time.monotonic() + 60)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class PrometheusServer:
    def __init__(self, url: str, log_path: Path) -> None:
        self.url = url
        self.log_path = log_path

    def wait_ready(self, deadline: float) -> None:
        """Poll ``/-/ready`` (503 while the storage opens) until 200, or fail at ``deadline``."""
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"Prometheus not ready; see {self.log_path}")
            time.sleep(0.1)

    def query(self, expression: str) -> list[dict[str, Any]]:
        """An instant query through the HTTP API: ``[{"metric": {labels}, "value": [time, "value"]}, …]``."""
        address = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        with urllib.request.urlopen(address, timeout=10) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def values(self, expression: str, label: str | None = None) -> dict[str, float]:
        """Sample values by one label's value (``""`` for a series without labels)."""
        return {(row["metric"].get(label, "") if label else ""): float(row["value"][1])
                for row in self.query(expression)}

    def samples(self, expression: str) -> list[tuple[dict[str, str], float, float]]:
        return [(row["metric"], float(row["value"][0]), float(row["value"][1])) for row in self.query(expression)]


def run_tool(*args: str, timeout: float = 60, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=None if stdin is None else stdin.decode(), capture_output=True, text=True,
                          timeout=timeout)

