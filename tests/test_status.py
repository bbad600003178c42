"""``ztfd status`` reads the store read-only: while a writer holds the lock, for a user who may only read home,
and never migrating an older store."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import child_env, write_config, ztfd_command
from tests.stamp_support import add_alerts
from tests.test_store import TOPIC, load_fixture
from ztfd import config, store
from ztfd.embedded.samples import packets
from ztfd.reporting import status
from ztfd.store import db as store_db
from ztfd.store import jobs
from ztfd.store.db import schema_version

NOBODY = 65534


def status_json(cfg_path: Path) -> tuple[int, dict]:
    result = subprocess.run(ztfd_command(cfg_path, "status", "--json"), env=child_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode in (0, 3), result.stderr
    return result.returncode, json.loads(result.stdout)


def fill(cfg: config.Config) -> None:
    """Alerts and stamp jobs: one done, one failed, the rest ready."""
    conn = store.connect(cfg.db_path)
    add_alerts(conn, packets()[:4], topic=TOPIC)
    owner = jobs.new_owner()
    first, second = jobs.claim(conn, owner, 60, limit=2)
    jobs.complete(conn, first.id, owner, jobs.StampResult("1", None))
    jobs.fail(conn, second.id, owner, "HTTP 503", jobs.FailureClass.HTTP)
    conn.close()


def expected_queue(report: dict) -> None:
    assert report["queue"] == {"ready": 2, "leased": 0, "retry_waiting": 0, "unavailable": 0, "failed": 1, "done": 1}
    assert [t["alerts_total"] for t in report["topics"]] == [4]
    assert report["failures"][0]["reason"] == "HTTP 503"


def test_status_reads_while_another_process_holds_the_write_lock(make_config: Callable[..., Path]) -> None:
    cfg_path = make_config(kafka={"topics": [TOPIC]})
    cfg = config.load(cfg_path)
    fill(cfg)
    writer = store.connect(cfg.db_path)
    writer.execute("BEGIN IMMEDIATE")  # e.g. an operator's VACUUM, or a writer stuck on a full disk
    try:
        jobs.enqueue(writer, [jobs.NewStampJob(1)])  # not committed: status must not see it, nor wait for it
        code, report = status_json(cfg_path)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert code == 3 and report["store"] == str(cfg.db_path)
    expected_queue(report)


@pytest.fixture
def readable_home() -> Iterator[Path]:
    """A home outside pytest's private temporary folder, so that another user can read it."""
    home = Path(tempfile.mkdtemp(prefix="ztfd-readonly-"))
    home.chmod(0o755)
    yield home
    shutil.rmtree(home, ignore_errors=True)


def collect_as_reader(cfg: config.Config) -> dict:
    """``status.collect`` as a user who may only read home: as root, a forked child that became ``nobody``
    (which cannot run this interpreter, hence no exec); otherwise with every folder of home made read-only."""
    if os.geteuid() != 0:
        folders = [p for p in [cfg.home, *cfg.home.rglob("*")] if p.is_dir()]
        for folder in folders:
            folder.chmod(0o555)
        try:
            return status.collect(cfg, kafka_timeout=0.5)
        finally:
            for folder in folders:
                folder.chmod(0o755)
    import confluent_kafka  # noqa: F401 - the child cannot read the interpreter's files: import what it needs now

    from ztfd import sync  # noqa: F401

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(write, json.dumps(status.collect(cfg, kafka_timeout=0.5)).encode())
            os._exit(0)
        except BaseException as exc:
            os.write(write, json.dumps({"error": repr(exc)}).encode())
            os._exit(1)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer = json.loads(pipe.read() or b"{}")
    _, code = os.waitpid(pid, 0)
    assert code == 0, answer
    return answer


@pytest.mark.parametrize("writer_open", [True, False], ids=["daemon-running", "daemon-stopped"])
def test_status_works_for_a_user_who_can_only_read_home(readable_home: Path, writer_open: bool) -> None:
    cfg_path = write_config(readable_home / "ztfd.toml", {"kafka": {"bootstrap_servers": "127.0.0.1:1",
                                                                    "group_id": "g", "topics": [TOPIC]}})
    cfg = config.load(cfg_path)
    fill(cfg)
    writer = store.connect(cfg.db_path) if writer_open else None  # keeps -wal and -shm (root's, 0644)
    try:
        listing = sorted(p.name for p in cfg.db_path.parent.iterdir())
        report = collect_as_reader(cfg)
        assert sorted(p.name for p in cfg.db_path.parent.iterdir()) == listing  # nothing created
    finally:
        if writer is not None:
            writer.close()
    assert report["store"] == str(cfg.db_path)
    expected_queue(report)


def test_status_never_migrates_an_older_store(make_config: Callable[..., Path]) -> None:
    cfg_path = make_config(kafka={"topics": [TOPIC]})
    cfg = config.load(cfg_path)
    load_fixture(cfg.db_path)
    result = subprocess.run(ztfd_command(cfg_path, "status"), env=child_env(), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "schema version 1, older" in result.stderr and "only reads" in result.stderr
    with sqlite3.connect(cfg.db_path) as plain:
        assert schema_version(plain) == 1


def test_status_of_a_store_being_created_is_that_of_no_store(make_config: Callable[..., Path]) -> None:
    """``ztfd start`` creates the file before its tables: a status in that instant shows no store yet (it used
    to read version 0 as "older than this ztfd" and exit 2)."""
    cfg_path = make_config(kafka={"topics": [TOPIC]})
    cfg = config.load(cfg_path)
    cfg.db_path.parent.mkdir(parents=True, exist_ok=True)
    sqlite3.connect(cfg.db_path).close()  # the file exists, empty: what the first writer's connect made so far
    with pytest.raises(store_db.StoreNotCreatedError):
        store_db.connect_readonly(cfg.db_path)
    result = subprocess.run(ztfd_command(cfg_path, "status", "--json"), env=child_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode in (0, 3), result.stderr
    report = json.loads(result.stdout)
    assert report["running"] is False and report["queue"]["ready"] == 0


# Tables that grow with history, and the partial indexes over them that hold only open work (bounded).
HISTORY = {"alerts", "manifest", "jobs", "stamps", "rejected"}
OPEN_WORK = {"jobs_ready", "jobs_leased", "jobs_failed", "manifest_pending"}


def test_status_reads_no_history_table_whole(make_config: Callable[..., Path],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Every query ``ztfd status`` makes is answered from counters, small tables, indexed ranges or the partial
    indexes of open work: none walks the alerts, jobs, stamps, rejected messages or files of all history."""
    cfg = config.load(make_config(kafka={"topics": [TOPIC]}))
    fill(cfg)
    statements: list[str] = []
    real_open = store_db._open_uri

    def traced(uri: str, timeout: float) -> sqlite3.Connection:
        conn = real_open(uri, timeout)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(store_db, "_open_uri", traced)
    status.collect(cfg, lag=False)
    assert statements
    plain = sqlite3.connect(cfg.db_path)
    aliases = {"a": "alerts", "m": "manifest", "j": "jobs", "s": "stamps", "c": "retention_checks"}
    for statement in statements:
        if not statement.lstrip().upper().startswith(("SELECT", "WITH")):
            continue
        for *_, detail in plain.execute(f"EXPLAIN QUERY PLAN {statement}"):
            words = detail.split()
            if words[0] != "SCAN":
                continue
            table = aliases.get(words[1], words[1])
            index = re.search(r"USING (?:COVERING )?INDEX (\w+)", detail)
            assert table not in HISTORY or (index is not None and index[1] in OPEN_WORK), (statement, detail)


# What ``ztfd status`` has no use for, and each costs it time to import, most of all from a cold disk (the command's
# goal is 0.5 s cold, ``bin/bench store``): the supervisor and housekeeping, sync's upload machinery, and the
# libraries of the alert formats, stamps, previews and S3.
NOT_FOR_STATUS = ("ztfd.daemon.supervisor", "ztfd.daemon.housekeeping", "ztfd.sync.command", "ztfd.sync.upload",
                  "fastavro",
                  "astropy", "numpy", "matplotlib", "PIL", "boto3", "botocore", "aiohttp", "requests", "psutil")


def test_status_imports_nothing_it_does_not_use(make_config: Callable[..., Path], tmp_path: Path) -> None:
    cfg_path = make_config(kafka={"topics": [TOPIC]})
    fill(config.load(cfg_path))
    found = tmp_path / "modules.txt"
    program = ("import sys\nfrom ztfd.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
               f"open({str(found)!r}, 'w').write('\\n'.join(sys.modules))\n")
    result = subprocess.run([ztfd_command(cfg_path)[0], "-c", program, "--config", str(cfg_path), "status", "--json"],
                            env=child_env(), capture_output=True, text=True, timeout=60)
    assert json.loads(result.stdout)["topics"][0]["alerts_total"] == 4, result.stderr
    modules = set(found.read_text().split())
    assert "ztfd.reporting.status" in modules and "ztfd.sync.status" in modules
    assert not {m for m in modules if m.split(".")[0] in NOT_FOR_STATUS or m in NOT_FOR_STATUS}
