"""The metrics endpoint under half-open connections: ``ztfd metrics`` keeps answering real scrapes with a bounded
number of threads, and closes connections that stay idle."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.conftest import child_env, wait_until, ztfd_command
from tests.test_metrics import _scrape as scrape
from ztfd.embedded.net import free_port
from ztfd.reporting import metrics

HALF_OPEN = 40


def threads_of(pid: int) -> int:
    """The process's threads, less librdkafka's (``rdk:*``): the lag query's Kafka client comes and goes with its
    own threads, whatever the connections do."""
    count = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            count += not (task / "comm").read_text().startswith("rdk:")
    return count


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_half_open_connections_cost_no_thread_and_are_closed_when_idle(make_config: Callable[..., Path]) -> None:
    port = free_port()
    config_path = make_config(metrics={"listen": f"127.0.0.1:{port}"})
    child = subprocess.Popen(ztfd_command(config_path, "metrics"), env=child_env(ZTFD_PROCESS_NAME="m"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sockets: list[socket.socket] = []
    try:
        wait_until(lambda: scrape(port), 60, "/metrics to answer")
        baseline = threads_of(child.pid)
        for _ in range(HALF_OPEN):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.setblocking(False)
            sockets.append(sock)
        sockets[0].sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # a request begun and never finished
        body = scrape(port)
        assert body is not None and f'ztfd_process_up{{host="{socket.gethostname()}",name="m",role="metrics"}}' in body
        assert threads_of(child.pid) <= baseline + metrics.SERVER_THREADS, "a thread per connection"
        wait_until(lambda: all(closed_by_server(s) for s in sockets[1:]), metrics.IDLE_TIMEOUT + 30,
                   "idle connections to be closed")
        assert scrape(port) is not None
        child.send_signal(signal.SIGTERM)
        assert child.wait(30) == 0, child.stderr.read()  # type: ignore[union-attr]
    finally:
        for sock in sockets:
            sock.close()
        if child.poll() is None:
            child.kill()
            child.wait()
