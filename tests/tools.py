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

from tests.conftest import wait_until
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
        server.wait_ready(timeout=60)
        yield server
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(30)
        process.kill()  # a no-op once it has exited
        process.wait()


class PrometheusServer:
    def __init__(self, url: str, log_path: Path) -> None:
        self.url = url
        self.log_path = log_path

    def wait_ready(self, timeout: float) -> None:
        """Poll ``/-/ready`` (503 while the storage opens) until 200, or fail after ``timeout`` s."""

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_until(ready, timeout, f"Prometheus to be ready (see {self.log_path})", interval=0.1)

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



class Chromium:
    """Headless Chromium driven over the DevTools protocol (one page): load a URL, collect console errors,
    check images, take a screenshot. ``with Chromium(workdir) as browser: browser.open(url)``."""

    def __init__(self, workdir: Path, width: int = 1400, height: int = 1000) -> None:
        self.workdir = workdir
        self.width, self.height = width, height
        self.process: subprocess.Popen[bytes] | None = None
        self.socket: Any = None
        self.session: str | None = None
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def __enter__(self) -> Chromium:
        import websocket

        binary = require("chromium")
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / "chromium.log"
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
                 "--remote-debugging-address=127.0.0.1", f"--user-data-dir={self.workdir / 'profile'}",
                 f"--window-size={self.width},{self.height}", "--no-first-run", "--no-default-browser-check",
                 "--disable-extensions", "--disable-background-networking", "--disable-sync",
                 "--disable-component-update", "--disable-features=MediaRouter,OptimizationHints", "about:blank"],
                stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            # Chromium writes the port it chose to <profile>/DevToolsActivePort (port, then the browser's path).
            active = self.workdir / "profile" / "DevToolsActivePort"
            process = self.process

            def started() -> bool:
                if active.exists() and len(active.read_text().split()) >= 2:
                    return True
                if process.poll() is not None:
                    raise AssertionError(f"chromium did not start; see {log_path}")
                return False

            wait_until(started, 60, f"chromium to start (see {log_path})")
            port, path = active.read_text().split()[:2]
            self.socket = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=60,
                                                      suppress_origin=True)
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                self.call(f"{domain}.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                      deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.socket is not None:
            with contextlib.suppress(Exception):
                self.socket.close()
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command (to the page's session once attached) and return its result; events are kept."""
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        self.socket.send(json.dumps(message))
        while True:
            answer = json.loads(self.socket.recv())
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise AssertionError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            self.events.append(answer)

    def wait_event(self, method: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method:
                    return event
            seen = len(self.events)
            if time.monotonic() > deadline:
                raise AssertionError(f"no {method} within {timeout:.0f}s")
            self.socket.settimeout(max(0.1, deadline - time.monotonic()))
            self.events.append(json.loads(self.socket.recv()))

    def open(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def images(self) -> list[dict[str, Any]]:
        """Every <img> loaded in full (lazy ones too): its src and natural width (0: broken)."""
        return self.evaluate(
            "Promise.all(Array.from(document.images).map(img => { img.loading = 'eager'; "
            "return img.decode().then(() => true, () => false).then(ok => "
            "({src: img.currentSrc || img.src, ok: ok && img.complete, width: img.naturalWidth})); }))")

    def console_errors(self) -> list[str]:
        """Errors the page logged: console.error, uncaught exceptions, failed loads (Log domain)."""
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                errors.append(params["exceptionDetails"].get("text", "exception"))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                errors.append(f"{params['entry'].get('text')} {params['entry'].get('url', '')}".strip())
        return errors

    def screenshot(self, path: Path) -> Path:
        import base64

        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path
