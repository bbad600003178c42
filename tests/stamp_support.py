"""Helpers for the stamp and replay tests: alerts and stamp jobs put into a real store the way the consumer does,
``ztfd fetch`` workers as real child processes, and polling with deadlines."""

from __future__ import annotations

import dataclasses
import datetime as dt
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tests.conftest import child_env, ztfd_command
from tests.conftest import wait_until as wait_until  # re-exported for the stamp tests
from ztfd import store
from ztfd.embedded.samples import SamplePacket
from ztfd.store import jobs as store_jobs
from ztfd.store.alerts import NewAlert, alerts_by_id, insert_alerts
from ztfd.store.stamps import stamp_records

FAST_STAMPS = {
    "enabled": True, "workers": 2, "timeout": 2.0, "max_attempts": 4, "previews": True,
    "retry_base": 0.05, "retry_max": 0.2, "unavailable_retry_base": 0.1, "unavailable_retry_max": 0.3,
    "unavailable_give_up": 600.0, "rate_limit": 0.0, "concurrency": 4, "lease_seconds": 10.0,
    # These tests count and fault ALeRCE's requests one stamp and one detections lookup per job; the defaults,
    # get_avro (one request per triplet) and shared detections lists, have tests of their own (test_get_avro.py).
    "ztf_request": "get_stamp", "detections_fresh": 0.0,
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
    rows = []
    for packet in packets:
        offset = next(_offsets)
        alert_date = date or utc_date(packet.mjd)
        rows.append(NewAlert(0, 0, offset, packet.object_id, alert_date, obs_mjd(packet),
                             f"data/{alert_date}/{topic}/{packet.object_id}_p0-o{offset}.json"))
    with store.transaction(conn):
        ids = [alert_id for alert_id in insert_alerts(conn, topic, rows, time.time()) if alert_id is not None]
        if queue:
            store_jobs.enqueue(conn, [store_jobs.NewStampJob(alert_id) for alert_id in ids])
    return ids


def jobs(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every stamp job as a dict: its row, its alert (``payload``) and what is known of the alert's stamps
    (``result``, None until a job of that alert finished)."""
    rows = store_jobs.list_jobs(conn)
    alerts = alerts_by_id(conn, (row.alert_id for row in rows))
    known = stamp_records(conn, alerts)
    result = []
    for row in rows:
        alert, stamps = alerts[row.alert_id], known.get(row.alert_id)
        item = dataclasses.asdict(row)
        item["payload"] = {"alert_id": alert.id, "object_id": alert.object_id, "topic": alert.topic,
                           "date": alert.date, "obs_mjd": alert.obs_mjd}
        item["result"] = None if stamps is None else {
            "candid": stamps.detection_id, "mjd": stamps.detection_mjd, "fetched": list(stamps.fetched),
            "preview": stamps.preview, "worker": stamps.worker}
        result.append(item)
    return result


def settled(conn: sqlite3.Connection) -> bool:
    """No stamp job is ready-and-due or leased (done, failed or waiting in the future)."""
    counts = store_jobs.counts(conn)
    return counts.ready + counts.leased == 0


def all_final(conn: sqlite3.Connection) -> bool:
    return store_jobs.counts(conn).unfinished == 0


def start_fetcher(config: Path, name: str, log_path: Path) -> subprocess.Popen[bytes]:
    output = log_path.open("ab")
    return subprocess.Popen(ztfd_command(config, "fetch"), env=child_env(ZTFD_PROCESS_NAME=name),
                            stdout=output, stderr=subprocess.STDOUT)


def stop_fetcher(process: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return process.wait(timeout)


def fetch_until_final(config: Path, conn: sqlite3.Connection, log_path: Path, what: str, timeout: float = 30.0) -> int:
    """Run one ``ztfd fetch`` until every stamp job is final, then stop it (it must exit 0 on SIGTERM).

    Returns the worker's pid."""
    worker = start_fetcher(config, "fetcher-1", log_path)
    try:
        wait_until(lambda: all_final(conn), timeout=timeout, what=what)
    finally:
        assert stop_fetcher(worker) == 0
    return worker.pid


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


def drive_fetcher(worker: Any, condition: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
    """Run ``worker`` (a ``ztfd.stamps.fetcher.Fetcher``) in this process until ``condition`` holds, then stop it."""
    import asyncio

    async def drive() -> None:
        running = asyncio.create_task(worker.run())
        deadline = time.monotonic() + timeout
        while not condition():
            if running.done():
                running.result()  # the worker's own error, if it died
                raise AssertionError(f"the worker stopped before {what}")
            if time.monotonic() > deadline:
                worker.stopping.set()
                await running
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
            await asyncio.sleep(0.05)
        worker.stopping.set()
        await running

    try:
        asyncio.run(drive())
    finally:
        worker.db.shutdown(wait=True)
        if worker.conn is not None:
            worker.conn.close()
