"""What the store forgets (``ztfd prune``, ztfd.daemon.housekeeping): done jobs, rows of gone processes, old rejected
messages (exported to files that sync uploads), and what ``ztfd status`` and ``replay`` still know afterwards."""

from __future__ import annotations

import base64
import dataclasses
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import child_env, ztfd_command
from tests.stamp_support import add_alerts
from ztfd import config, store
from ztfd.daemon import housekeeping
from ztfd.embedded.s3 import S3Server
from ztfd.embedded.samples import packets
from ztfd.files import md5_hex
from ztfd.reporting import status
from ztfd.store import jobs, rejected
from ztfd.store.manifest import manifest_files
from ztfd.store.processes import process, processes, record_child
from ztfd.store.stamps import stamp_records

TOPIC = "lasair_keep"
DAY = 86400.0


@pytest.fixture
def cfg(make_config: Callable[..., Path]) -> config.Config:
    return config.load(make_config(kafka={"topics": [TOPIC]}, store={"rejected_keep_days": 10}))


def queue_report(cfg: config.Config) -> tuple[dict, dict]:
    report = status.collect(cfg, kafka_timeout=0.2)
    return report["queue"], {t["topic"]: t["alerts_total"] for t in report["topics"]}


def test_done_jobs_are_forgotten_after_a_day_and_their_stamps_kept(cfg: config.Config) -> None:
    conn = store.connect(cfg.db_path)
    ids = add_alerts(conn, packets()[:6], topic=TOPIC)
    owner = jobs.new_owner()
    claimed = jobs.claim(conn, owner, 60, limit=4)
    for job in claimed[:3]:
        assert jobs.complete(conn, job.id, owner, jobs.StampResult(f"17042{job.alert.id}", 59458.5, ("science",)))
    assert jobs.fail(conn, claimed[3].id, owner, "HTTP 503", jobs.FailureClass.HTTP)
    queue_before, alerts_before = queue_report(cfg)
    assert (queue_before["done"], queue_before["failed"], queue_before["ready"]) == (3, 1, 2)

    assert housekeeping.prune(conn, cfg).done_jobs == 0  # finished just now: kept a day
    pruned = housekeeping.prune(conn, cfg, now=time.time() + DAY + 60)
    assert pruned.done_jobs == 3
    left = jobs.list_jobs(conn)
    assert sorted(job.state for job in left) == ["failed", "ready", "ready"]
    # What the jobs learned stays with the alerts; status reports the same queue and totals.
    records = stamp_records(conn, ids)
    assert sorted(records) == sorted(job.alert.id for job in claimed[:3])
    assert all(records[job.alert.id].detection_id == f"17042{job.alert.id}" for job in claimed[:3])
    assert queue_report(cfg) == (queue_before, alerts_before)
    conn.close()


def test_rows_of_gone_processes_are_dropped(cfg: config.Config) -> None:
    conn = store.connect(cfg.db_path)
    gone = subprocess.Popen(["true"])
    gone.wait()
    with store.transaction(conn):
        store.heartbeat(conn, "supervisor", "supervisor")
        record_child(conn, "fetcher:4242", "fetcher", None, gone.pid, 0, "running", None, started=True)
        record_child(conn, "consumer:x", "consumer", TOPIC, None, 3, "backoff", "exit 1", started=True)
        store.heartbeat(conn, "fetcher:1", "fetcher")  # this very process: alive
    assert housekeeping.prune(conn, cfg).processes == 0  # seen a moment ago: kept
    assert housekeeping.prune(conn, cfg, now=time.time() + DAY + 60).processes == 2
    assert sorted(row.name for row in processes(conn)) == ["fetcher:1", "supervisor"]
    conn.close()


def old_rejected(conn, received_at: float, offsets: range, raw: Callable[[int], bytes]) -> None:
    with store.transaction(conn):
        rejected.add_rejected(conn, TOPIC, [rejected.NewRejected(0, 0, o, f"bad {o}", raw(o)) for o in offsets],
                              received_at)


def test_old_rejected_messages_are_exported_recorded_and_deleted(cfg: config.Config,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    conn = store.connect(cfg.db_path)
    now = time.time()
    twenty_days_ago = now - 20 * DAY

    def raw(offset: int) -> bytes:
        return b"\xff\x00 not json " + str(offset).encode()

    old_rejected(conn, twenty_days_ago, range(0, 7), raw)
    old_rejected(conn, now - 3600, range(7, 9), raw)  # recent: stays
    before = status.collect(cfg, kafka_timeout=0.2)["rejected"]
    assert before == {TOPIC: 9}

    # A crash after the file is written and before the rows go: the next run writes the same file again.
    real_forget = rejected.forget_rejected
    monkeypatch.setattr(housekeeping, "forget_rejected", lambda *_: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        housekeeping.prune(conn, cfg)
    monkeypatch.setattr(housekeeping, "forget_rejected", real_forget)
    pruned = housekeeping.prune(conn, cfg)
    assert pruned.rejected == 7
    day = time.strftime("%Y-%m-%d", time.gmtime(twenty_days_ago))
    (export,) = pruned.exports
    assert export == f"data/{day}/{TOPIC}/rejected-p0-o0.jsonl"  # named by its first message's Kafka identity
    body = (cfg.home / export).read_bytes()
    lines = [json.loads(line) for line in body.splitlines()]
    assert [(r["offset"], r["reason"], base64.b64decode(r["raw_base64"])) for r in lines] == [
        (o, f"bad {o}", raw(o)) for o in range(7)]
    # Recorded for sync, once; the store keeps only the recent ones; status still counts all nine.
    (row,) = [f for f in manifest_files(conn) if f.path == export]
    assert (row.size, row.md5, row.state) == (len(body), md5_hex(body), "pending")
    assert sorted(r.kafka_offset for r in rejected.latest_rejected(conn, TOPIC, 100)) == [7, 8]
    assert status.collect(cfg, kafka_timeout=0.2)["rejected"] == before
    assert housekeeping.prune(conn, cfg).rejected == 0
    conn.close()


def test_in_fleet_mode_each_rejected_message_is_exported_to_a_file_of_its_own(cfg: config.Config) -> None:
    """Another host may export the message's neighbours (it took the partition over): a file per message, named by
    its Kafka identity, is the same key with the same message on every host."""
    fleet = dataclasses.replace(cfg, kafka=dataclasses.replace(cfg.kafka, assignment="group"))
    conn = store.connect(cfg.db_path)
    received = time.time() - 20 * DAY
    old_rejected(conn, received, range(3, 5), lambda offset: b"bad")
    with store.transaction(conn):
        rejected.add_rejected(conn, TOPIC, [rejected.NewRejected(1, 2, 9, "bad", b"x")], received)
    day = time.strftime("%Y-%m-%d", time.gmtime(received))
    assert sorted(housekeeping.prune(conn, fleet).exports) == [
        f"data/{day}/{TOPIC}/rejected-g2-p1-o9.jsonl", f"data/{day}/{TOPIC}/rejected-p0-o3.jsonl",
        f"data/{day}/{TOPIC}/rejected-p0-o4.jsonl"]
    assert [json.loads(line)["offset"] for line in
            (cfg.home / f"data/{day}/{TOPIC}/rejected-p0-o4.jsonl").read_bytes().splitlines()] == [4]
    conn.close()


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    with S3Server(proxy=False, log_path=tmp_path / "moto.log") as server:
        yield server


def test_ztfd_prune_exports_what_ztfd_sync_then_uploads(make_config: Callable[..., Path], s3: S3Server) -> None:
    s3.create_bucket("keep")
    cfg_path = make_config(kafka={"topics": [TOPIC]}, store={"rejected_keep_days": 1},
                           s3={"bucket": "keep", "endpoint_url": s3.endpoint_url, "region": "us-east-1"})
    cfg = config.load(cfg_path)
    conn = store.connect(cfg.db_path)
    old_rejected(conn, time.time() - 3 * DAY, range(3), lambda o: b"{" * o)
    with store.transaction(conn):
        store.heartbeat(conn, "fetcher:1", "fetcher")
    conn.close()
    env = child_env(**s3.env())
    result = subprocess.run(ztfd_command(cfg_path, "prune"), env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "3 rejected messages (exported to 1 files)" in result.stdout
    synced = subprocess.run(ztfd_command(cfg_path, "sync", "--once"), env=env, capture_output=True, text=True,
                            timeout=120)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    keys = [key for key in s3.objects("keep") if "/rejected-" in key]
    assert len(keys) == 1 and keys[0].startswith("data/") and keys[0].endswith(".jsonl")
    conn = store.connect(cfg.db_path)
    assert process(conn, "fetcher:1") is not None  # this process is alive: its row stays
    conn.close()
