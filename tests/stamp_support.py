"""Helpers for the stamp and replay tests: alerts and stamp jobs put into a real store the way the consumer does,
``ztfd fetch`` workers as real child processes, and polling with deadlines."""

from __future__ import annotations

import datetime as dt
import json
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tests.conftest import child_env, ztfd_command
from tests.conftest import wait_until as wait_until  # re-exported for the stamp tests
from ztfd import jobqueue, store
from ztfd.embedded.samples import SamplePacket

FAST_STAMPS = {
    "enabled": True, "workers": 2, "timeout": 2.0, "max_attempts": 4, "previews": True,
    "retry_base": 0.05, "retry_max": 0.2, "unavailable_retry_base": 0.1, "unavailable_retry_max": 0.3,
    "unavailable_give_up": 600.0, "rate_limit": 0.0, "concurrency": 4, "lease_seconds": 10.0,
}


def stamps_config(make_config: Callable[..., Path], url: str, **overrides: Any) -> Path:
    return make_config(stamps={**FAST_STAMPS, "alerce_stamp_url": url, "alerce_api_url": url, **overrides})


def utc_date(mjd: float) -> str:
    return (dt.datetime(1858, 11, 17) + dt.timedelta(days=mjd)).date().isoformat()


_offsets = iter(range(10**9))


def add_alerts(
    conn: sqlite3.Connection,
    packets: Iterable[SamplePacket],
    topic: str = "t",
    date: str | None = None,
    obs_mjd: Callable[[SamplePacket], float | None] = lambda p: p.mjd,
    queue: bool = True,
) -> list[int]:
    """Store one alert per packet (as the consumer would) and queue its stamp job; return the alert ids."""
    ids = []
    with store.transaction(conn):
        for packet in packets:
            offset = next(_offsets)
            alert_date = date or utc_date(packet.mjd)
            row = conn.execute(
                "INSERT INTO alerts (topic, partition, generation, kafka_offset, object_id, date, obs_mjd, path, "
                "received_at) VALUES (?, 0, 0, ?, ?, ?, ?, ?, ?) RETURNING id",
                (topic, offset, packet.object_id, alert_date, obs_mjd(packet),
                 f"data/{alert_date}/{topic}/{packet.object_id}_p0-o{offset}.json", time.time()),
            ).fetchone()
            ids.append(row["id"])
            if queue:
                payload = {"alert_id": row["id"], "object_id": packet.object_id, "topic": topic,
                           "date": alert_date, "obs_mjd": obs_mjd(packet)}
                jobqueue.enqueue(conn, jobqueue.STAMPS, [payload])
    return ids


def jobs(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT * FROM jobs WHERE kind = ? ORDER BY id", (jobqueue.STAMPS,)).fetchall()
    result = []
    for row in rows:
        item = dict(row)
        item["payload"] = json.loads(item["payload"])
        item["result"] = json.loads(item["result"]) if item["result"] else None
        result.append(item)
    return result


def settled(conn: sqlite3.Connection) -> bool:
    """No stamp job is ready-and-due or leased (done, failed or waiting in the future)."""
    row = conn.execute(
        "SELECT count(*) FROM jobs WHERE kind = ? AND (state = 'leased' OR (state = 'ready' AND not_before <= ?))",
        (jobqueue.STAMPS, time.time()),
    ).fetchone()
    return row[0] == 0


def all_final(conn: sqlite3.Connection) -> bool:
    row = conn.execute("SELECT count(*) FROM jobs WHERE state NOT IN ('done', 'failed')").fetchone()
    return row[0] == 0


def start_worker(config: Path, name: str, log_path: Path) -> subprocess.Popen[bytes]:
    output = log_path.open("ab")
    return subprocess.Popen(ztfd_command(config, "fetch"), env=child_env(ZTFD_PROCESS_NAME=name),
                            stdout=output, stderr=subprocess.STDOUT)


def stop_worker(process: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return process.wait(timeout)


def fetch_until_final(config: Path, conn: sqlite3.Connection, log_path: Path, what: str, timeout: float = 30.0) -> int:
    """Run one ``ztfd fetch`` until every stamp job is final, then stop it (it must exit 0 on SIGTERM).

    Returns the worker's pid."""
    worker = start_worker(config, "fetcher-1", log_path)
    try:
        wait_until(lambda: all_final(conn), timeout=timeout, what=what)
    finally:
        assert stop_worker(worker) == 0
    return worker.pid


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
