"""``ztfd start`` / ``stop`` / ``status`` through the real CLI, with real consumers on a real Tansu broker."""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import child_env, wait_until, ztfd_command
from ztfd import config, store
from ztfd.daemon.children import STABLE_AFTER
from ztfd.daemon.supervisor import pid_alive, proc_environ
from ztfd.embedded.kafka import KafkaBroker
from ztfd.embedded.samples import message_stream
from ztfd.store.processes import record_child


def run(cfg_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ztfd_command(cfg_path, *args), capture_output=True, text=True, timeout=timeout,
                          env=child_env())


def status(cfg_path: Path) -> tuple[int, dict[str, Any]]:
    result = run(cfg_path, "status", "--json")
    return result.returncode, json.loads(result.stdout)



def consumers(cfg_path: Path) -> list[dict[str, Any]]:
    return [p for p in status(cfg_path)[1]["processes"] if p["role"] == "consumer"]


def all_consumers_up(cfg_path: Path, topics: list[str]) -> list[dict[str, Any]] | None:
    """The consumer rows once every topic's consumer is alive and has heartbeated."""
    procs = consumers(cfg_path)
    up = {p["topic"]: p for p in procs if p["alive"] and p["heartbeat_age"] is not None and p["state"] == "running"}
    return [up[t] for t in topics] if all(t in up for t in topics) else None


def supervisor_pid(cfg_path: Path) -> int:
    cfg = config.load(cfg_path)
    return int(cfg.pidfile.read_text().strip())


def marked_processes(pidfile: Path) -> list[int]:
    """Every live process carrying this home's supervisor marker (what a leaked child would be)."""
    found = []
    for entry in Path("/proc").iterdir():
        pid = int(entry.name) if entry.name.isdigit() else 0
        if pid and pid_alive(pid) and proc_environ(pid).get("ZTFD_PROCESS_SUPERVISOR") == str(pidfile):
            found.append(pid)
    return found


@pytest.fixture
def daemon_config(kafka: KafkaBroker, make_config: Callable[..., Path]) -> Iterator[tuple[Path, list[str]]]:
    """A config with two topics (stamps and sync off, so only consumers); stops whatever is left at the end."""
    tag = uuid.uuid4().hex[:8]
    topics = [f"sup-a-{tag}", f"sup-b-{tag}"]
    for topic in topics:
        kafka.create_topic(topic)
    cfg_path = make_config(
        kafka={"bootstrap_servers": kafka.bootstrap, "group_id": f"sup-{tag}", "topics": topics},
        supervisor={"heartbeat_timeout": 8, "restart_backoff_max": 2, "stop_timeout": 10},
    )
    yield cfg_path, topics
    run(cfg_path, "stop", "--timeout", "10")
    cfg = config.load(cfg_path)
    leaked = marked_processes(cfg.pidfile)
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    assert not leaked, f"processes left behind: {leaked}"


def test_start_status_second_start_and_stop(daemon_config: tuple[Path, list[str]], kafka: KafkaBroker) -> None:
    cfg_path, topics = daemon_config
    started = run(cfg_path, "start")
    assert started.returncode == 0, started.stderr
    pid = supervisor_pid(cfg_path)
    assert pid_alive(pid)

    again = run(cfg_path, "start")
    assert again.returncode != 0
    assert f"pid {pid}" in again.stderr
    config.load(cfg_path).pidfile.unlink()  # deleted by hand: the lock still tells
    again = run(cfg_path, "start")
    assert again.returncode != 0 and f"pid {pid}" in again.stderr

    wait_until(lambda: all_consumers_up(cfg_path, topics), 60, "both consumers to heartbeat")
    kafka.produce(topics[0], message_stream(30))
    code, report = wait_until(
        lambda: (r := status(cfg_path)) and r[1]["topics"][0]["alerts_total"] == 30 and r, 60, "30 alerts stored"
    )
    assert code == 0 and report["running"] is True
    assert report["supervisor"] == {"running": True, "pid": pid, "uptime": report["supervisor"]["uptime"]}
    roles = sorted((p["role"], p["topic"]) for p in report["processes"])
    assert roles == [("consumer", topics[0]), ("consumer", topics[1]), ("reporter", None)]  # report.after_quiet on
    assert all(p["alive"] and p["restarts"] == 0 and isinstance(p["pid"], int) for p in report["processes"])
    first, second = report["topics"]
    assert (first["alerts_today"], first["alerts_total"], second["alerts_total"]) == (30, 30, 0)
    assert first["lag"] == 0 and second["lag"] == 0
    # The running consumers keep what their fetches heard of the ends: status takes the lag from them and opens
    # no Kafka client of its own (its cost is then the store's alone).
    code, report = wait_until(lambda: (r := status(cfg_path)) and all(
        t["lag_from"] == "consumer" for t in r[1]["topics"]) and r, 30, "the lag from the consumers' fetches")
    assert [(t["lag"], t["broker"]) for t in report["topics"]] == [(0, "ok"), (0, "ok")]
    assert all(t["lag_at"].endswith("Z") for t in report["topics"])
    traced = subprocess.run([sys.executable, "-X", "importtime", *ztfd_command(cfg_path, "status", "--json")[1:]],
                            capture_output=True, text=True, timeout=60, env=child_env())
    assert traced.returncode == 0 and "confluent_kafka" not in traced.stderr
    assert set(report["queue"]) == {"ready", "leased", "retry_waiting", "unavailable", "failed", "done"}
    assert report["sync"]["pending"] == 30  # 30 alert files recorded for sync, no bucket to upload them to
    assert report["disk"]["free_bytes"] > 0

    table = run(cfg_path, "status")
    assert table.returncode == 0
    assert f"supervisor pid {pid}" in table.stdout and topics[0] in table.stdout

    child_pids = [p["pid"] for p in report["processes"]]
    stopped = run(cfg_path, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not pid_alive(pid) and not any(pid_alive(p) for p in child_pids)
    assert not config.load(cfg_path).pidfile.exists()
    code, report = status(cfg_path)
    assert code == 3 and report["running"] is False
    assert {p["state"] for p in report["processes"]} == {"stopped"}
    assert run(cfg_path, "status").returncode == 3


def test_killed_child_is_restarted(daemon_config: tuple[Path, list[str]]) -> None:
    cfg_path, topics = daemon_config
    assert run(cfg_path, "start").returncode == 0
    before = wait_until(lambda: all_consumers_up(cfg_path, topics), 60, "consumers up")
    victim = before[0]
    os.kill(victim["pid"], signal.SIGKILL)
    after = wait_until(
        lambda: (up := all_consumers_up(cfg_path, topics)) and up[0]["pid"] != victim["pid"] and up, 60,
        "the killed consumer to come back",
    )
    assert after[0]["restarts"] == 1 and after[0]["last_exit"] == "killed by SIGKILL"
    assert after[1]["pid"] == before[1]["pid"] and after[1]["restarts"] == 0
    # and again: a second kill counts a second restart
    os.kill(after[0]["pid"], signal.SIGKILL)
    again = wait_until(
        lambda: (up := all_consumers_up(cfg_path, topics)) and up[0]["pid"] not in (victim["pid"], after[0]["pid"])
        and up, 60, "the consumer to come back again",
    )
    assert again[0]["restarts"] == 2
    log_text = (config.load(cfg_path).logs_dir / "ztfd.log").read_text()
    assert f"consumer:{topics[0]} exited" in log_text and "restart #2" in log_text


def test_hung_child_is_killed_and_restarted(daemon_config: tuple[Path, list[str]]) -> None:
    cfg_path, topics = daemon_config
    assert run(cfg_path, "start").returncode == 0
    before = wait_until(lambda: all_consumers_up(cfg_path, topics), 60, "consumers up")
    hung = before[1]["pid"]
    os.kill(hung, signal.SIGSTOP)  # alive, but silent: only the heartbeat can tell
    try:
        after = wait_until(
            lambda: (up := all_consumers_up(cfg_path, topics)) and up[1]["pid"] != hung and up, 60,
            "the hung consumer to be replaced",
        )
    finally:
        if pid_alive(hung):
            os.kill(hung, signal.SIGKILL)
    assert not pid_alive(hung)
    assert after[1]["restarts"] == 1
    assert "no heartbeat" in after[1]["last_exit"]
    assert after[0]["pid"] == before[0]["pid"]


def test_supervisor_killed_leaves_no_child_and_next_start_is_clean(daemon_config: tuple[Path, list[str]]) -> None:
    cfg_path, topics = daemon_config
    cfg = config.load(cfg_path)
    assert run(cfg_path, "start").returncode == 0
    children = [p["pid"] for p in wait_until(lambda: all_consumers_up(cfg_path, topics), 60, "consumers up")]
    pid = supervisor_pid(cfg_path)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(pid) and not any(pid_alive(c) for c in children), 30,
             "the children to exit after their supervisor died")
    assert cfg.pidfile.exists()  # stale now
    code, report = status(cfg_path)
    assert code == 3 and report["running"] is False

    started = run(cfg_path, "start")
    assert started.returncode == 0, started.stderr
    new_pid = supervisor_pid(cfg_path)
    assert new_pid != pid and pid_alive(new_pid)
    fresh = wait_until(lambda: all_consumers_up(cfg_path, topics), 60, "consumers up after the restart")
    assert all(p["restarts"] == 0 and p["pid"] not in children for p in fresh)
    assert "replacing stale pidfile" in (cfg.logs_dir / "ztfd.log").read_text()


def test_leftovers_of_a_crashed_supervisor_are_terminated(daemon_config: tuple[Path, list[str]]) -> None:
    """A child that outlived its supervisor and ignores SIGTERM (hung) is found by the next start and killed.

    (A SIGSTOPped child cannot stand in for it: when its supervisor dies its process group is orphaned, and the
    kernel sends it SIGHUP and SIGCONT.) A recorded pid that now belongs to an unrelated process is left alone.
    """
    cfg_path, topics = daemon_config
    # The leftover is killed supervisor.stop_timeout after its SIGTERM: a short one here, the wait is all it costs.
    text = cfg_path.read_text()
    assert "stop_timeout = 10\n" in text
    cfg_path.write_text(text.replace("stop_timeout = 10\n", "stop_timeout = 2\n"))
    cfg = config.load(cfg_path)
    hung_code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
                 "time.sleep(120)")
    hung = subprocess.Popen([sys.executable, "-c", hung_code], stdout=subprocess.PIPE, text=True,
                            env=child_env(ZTFD_PROCESS_SUPERVISOR=str(cfg.pidfile), ZTFD_PROCESS_NAME="fetcher:1"))
    innocent = subprocess.Popen(["sleep", "120"])
    try:
        assert hung.stdout is not None and hung.stdout.readline().strip() == "ready"
        conn = store.connect(cfg.db_path)
        # What a supervisor killed with -9 leaves behind: its children's rows.
        record_child(conn, "fetcher:1", "fetcher", None, hung.pid, 0, "running", None, started=True)
        record_child(conn, f"consumer:{topics[0]}", "consumer", topics[0], innocent.pid, 0, "running", None,
                     started=True)  # a reused pid
        conn.close()
        started = run(cfg_path, "start")  # returns once the daemon has cleaned up and holds the pidfile
        assert started.returncode == 0, started.stderr
        assert hung.wait(5) == -signal.SIGKILL  # SIGTERM was ignored: killed after supervisor.stop_timeout
        assert innocent.poll() is None
        wait_until(lambda: all_consumers_up(cfg_path, topics), 60, "fresh consumers")
        assert "left by a supervisor that died" in (cfg.logs_dir / "ztfd.log").read_text()
    finally:
        for proc in (hung, innocent):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_stale_pidfiles_are_replaced(daemon_config: tuple[Path, list[str]]) -> None:
    cfg_path, _topics = daemon_config
    cfg = config.load(cfg_path)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    for stale_pid in (dead.pid, os.getpid()):  # a dead pid; a live pid that holds no lock (this test)
        cfg.pidfile.write_text(f"{stale_pid}\n")
        assert status(cfg_path)[0] == 3
        started = run(cfg_path, "start")
        assert started.returncode == 0, started.stderr
        assert supervisor_pid(cfg_path) not in (stale_pid, dead.pid)
        assert run(cfg_path, "stop").returncode == 0
        assert not cfg.pidfile.exists()


def test_stop_and_status_when_nothing_ever_ran(make_config: Callable[..., Path]) -> None:
    cfg_path = make_config()
    cfg = config.load(cfg_path)
    stopped = run(cfg_path, "stop")
    assert stopped.returncode == 0 and "not running" in stopped.stdout
    result = run(cfg_path, "status", "--json")
    assert result.returncode == 3
    report = json.loads(result.stdout)
    assert report["running"] is False and report["processes"] == []
    assert report["queue"]["ready"] == 0 and report["sync"]["pending"] == 0
    assert report["topics"][0]["lag"] is None  # the broker at 127.0.0.1:1 does not answer
    assert not cfg.db_path.exists()  # status and stop create nothing
    table = run(cfg_path, "status")
    assert table.returncode == 3 and "ztfd is not running" in table.stdout


def test_foreground_supervisor_stops_on_sigterm(daemon_config: tuple[Path, list[str]]) -> None:
    """How systemd runs it: ``start --foreground``, SIGTERM to the main process only (KillMode=mixed)."""
    cfg_path, topics = daemon_config
    proc = subprocess.Popen(ztfd_command(cfg_path, "start", "--foreground"), env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        children = [p["pid"] for p in wait_until(lambda: all_consumers_up(cfg_path, topics), 60, "consumers up")]
        assert supervisor_pid(cfg_path) == proc.pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not any(pid_alive(c) for c in children)
    assert not config.load(cfg_path).pidfile.exists()
    last_exits = {p["last_exit"] for p in status(cfg_path)[1]["processes"]}
    assert last_exits == {"exit 0"}  # consumers finished their batch and exited cleanly


def test_stop_kills_a_supervisor_that_does_not_stop_and_its_children(daemon_config: tuple[Path, list[str]]) -> None:
    cfg_path, topics = daemon_config
    assert run(cfg_path, "start").returncode == 0
    children = [p["pid"] for p in wait_until(lambda: all_consumers_up(cfg_path, topics), 60, "consumers up")]
    pid = supervisor_pid(cfg_path)
    os.kill(pid, signal.SIGSTOP)  # it cannot act on SIGTERM now
    stopped = run(cfg_path, "stop", "--timeout", "2")
    assert stopped.returncode == 0
    assert f"supervisor (pid {pid}) did not stop within 2s" in stopped.stderr
    assert not pid_alive(pid) and not any(pid_alive(c) for c in children)
    assert not config.load(cfg_path).pidfile.exists()
    assert status(cfg_path)[0] == 3


def one_topic_config(kafka: KafkaBroker, make_config: Callable[..., Path], **sections: dict[str, Any]) -> Path:
    tag = uuid.uuid4().hex[:8]
    topic = f"sup-one-{tag}"
    kafka.create_topic(topic)
    return make_config(kafka={"bootstrap_servers": kafka.bootstrap, "group_id": f"sup-{tag}", "topics": [topic]},
                       **sections)


def stop_and_check_nothing_left(cfg_path: Path) -> None:
    run(cfg_path, "stop", "--timeout", "10")
    leaked = marked_processes(config.load(cfg_path).pidfile)
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    assert not leaked, f"processes left behind: {leaked}"


def removable_interpreter(root: Path) -> Path:
    """This interpreter, with its packages, behind a path that can be removed (and put back) while a supervisor
    started from it runs: the supervisor forks its children from ``sys.executable``, so their exec then fails."""
    venv = root / "venv"
    (venv / "bin").mkdir(parents=True)
    real = Path(os.path.realpath(sys.executable))
    in_venv = sys.prefix != sys.base_prefix
    if in_venv:
        (venv / "lib").symlink_to(Path(sys.prefix) / "lib")
    (venv / "pyvenv.cfg").write_text(f"home = {real.parent}\n"
                                     f"include-system-site-packages = {'false' if in_venv else 'true'}\n")
    python = venv / "bin" / "python"
    python.symlink_to(real)
    return python


def restart_delays(log_text: str, name: str) -> list[float]:
    """The delays the supervisor announced for ``name``'s restarts, in order (``restart #N in Xs``)."""
    pattern = rf"{re.escape(name)} exited after [\d.]+s \(.*\): restart #\d+ in ([\d.]+)s"
    return [float(delay) for delay in re.findall(pattern, log_text)]


def test_a_child_that_cannot_be_started_backs_off_instead_of_storming(
    kafka: KafkaBroker, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """Before: a failed exec measured the child's "uptime" from its previous start, long ago, and restarted it
    every second forever. Now every quick failure, a failed start included, doubles the delay (up to
    restart_backoff_max), and only a child that stayed up STABLE_AFTER seconds starts again from 1 s."""
    cfg_path = one_topic_config(kafka, make_config,
                                supervisor={"heartbeat_timeout": 120, "restart_backoff_max": 4, "stop_timeout": 10})
    cfg = config.load(cfg_path)
    topic = cfg.kafka.topics[0]
    name = f"consumer:{topic}"
    python = removable_interpreter(tmp_path)
    target = python.readlink()
    started = subprocess.run([str(python), "-m", "ztfd", "--config", str(cfg_path), "start"], capture_output=True,
                             text=True, timeout=60, env=child_env())
    assert started.returncode == 0, started.stderr
    ztfd_log = cfg.logs_dir / "ztfd.log"
    try:
        def up_for(seconds: float) -> dict[str, Any] | None:
            rows = all_consumers_up(cfg_path, [topic])
            return rows[0] if rows and rows[0]["uptime"] > seconds else None

        first = wait_until(lambda: up_for(0), 60, "the consumer up")
        python.unlink()  # from now on every start of a child fails at exec
        os.kill(first["pid"], signal.SIGKILL)
        delays = wait_until(lambda: (d := restart_delays(ztfd_log.read_text(), name)) and len(d) >= 4 and d, 60,
                            "three failed starts")
        assert "cannot start" in ztfd_log.read_text()
        assert delays[:4] == [1.0, 2.0, 4.0, 4.0]  # the kill, then three failed starts (the last at the cap)

        python.symlink_to(target)  # it can start again: the 4 s delay runs out, and it stays up
        second = wait_until(lambda: (row := up_for(STABLE_AFTER + 1)) and row["pid"] != first["pid"] and row, 60,
                            "the consumer to start again and stay up")
        os.kill(second["pid"], signal.SIGKILL)
        delays = wait_until(lambda: (d := restart_delays(ztfd_log.read_text(), name)) and len(d) >= 5 and d, 30,
                            "the restart after a stable run")
        assert delays[4] == 1.0  # it had stayed up: back to the smallest delay
    finally:
        if not python.exists():
            python.symlink_to(target)
        stop_and_check_nothing_left(cfg_path)


OUT_MAX_BYTES = 300  # a few lines of the failing child below: each line costs a child start


def test_supervisor_out_is_rotated_while_children_write_to_it(
    kafka: KafkaBroker, make_config: Callable[..., Path]
) -> None:
    """Children write into a pipe the supervisor copies through the log files' handler: supervisor.out rotates at
    logging.max_bytes while the daemon runs (before, only when it started), and no line is cut."""
    cfg_path = one_topic_config(kafka, make_config, logging={"max_bytes": OUT_MAX_BYTES, "backup_count": 2},
                                supervisor={"heartbeat_timeout": 120, "restart_backoff_max": 0.2, "stop_timeout": 10})
    cfg = config.load(cfg_path)
    topic = cfg.kafka.topics[0]
    assert run(cfg_path, "start").returncode == 0
    out = cfg.logs_dir / "supervisor.out"
    try:
        (consumer,) = wait_until(lambda: all_consumers_up(cfg_path, [topic]), 60, "the consumer up")
        daemon = supervisor_pid(cfg_path)
        # From now on every start of the child fails with one line on its stderr: a configuration gone bad.
        cfg_path.write_text("bogus_key = 1\n" + cfg_path.read_text())
        os.kill(consumer["pid"], signal.SIGKILL)
        wait_until(lambda: out.with_name("supervisor.out.2").exists(), 90, "supervisor.out to rotate twice")
        assert pid_alive(daemon)
    finally:
        cfg_path.write_text(cfg_path.read_text().replace("bogus_key = 1\n", ""))
        stop_and_check_nothing_left(cfg_path)
    expected = "ztfd: config: unknown key bogus_key"
    for path in (out, out.with_name("supervisor.out.1"), out.with_name("supervisor.out.2")):
        text = path.read_text()
        assert len(text.encode()) <= OUT_MAX_BYTES, path
        assert all(line == expected for line in text.splitlines() if "bogus" in line), text
    assert expected in out.with_name("supervisor.out.1").read_text()


def test_a_second_sigterm_stops_the_supervisor_and_its_children_at_once(
    kafka: KafkaBroker, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """The first SIGTERM waits for a syncer whose upload hangs (an S3 endpoint that accepts and never answers);
    the second makes the supervisor exit at once (143), and the syncer too: its second SIGTERM comes with the
    supervisor's death. The file it was uploading is still pending, for the next pass."""
    with socket.create_server(("127.0.0.1", 0)) as stalled:  # the kernel accepts connections; nobody answers
        cfg_path = one_topic_config(
            kafka, make_config,
            s3={"bucket": "stalled", "endpoint_url": f"http://127.0.0.1:{stalled.getsockname()[1]}",
                "region": "us-east-1", "interval": 3600},
            supervisor={"heartbeat_timeout": 120, "stop_timeout": 120},
        )
        cfg = config.load(cfg_path)
        pending = cfg.home / "data" / "pending.json"
        pending.parent.mkdir(parents=True)
        pending.write_bytes(b"{}")
        conn = store.connect(cfg.db_path)
        store.record_files(conn, [("data/pending.json", 2, hashlib.md5(b"{}").hexdigest())])
        conn.close()
        env = child_env(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")
        with (tmp_path / "foreground.out").open("wb") as output:
            proc = subprocess.Popen(ztfd_command(cfg_path, "start", "--foreground"), env=env, stdout=output,
                                    stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: select.select([stalled], [], [], 0)[0], 60, "the syncer's upload to reach S3")
            syncer = wait_until(lambda: next((p["pid"] for p in status(cfg_path)[1]["processes"]
                                              if p["role"] == "syncer" and p["alive"]), None), 30, "the syncer")
            ztfd_log = cfg.logs_dir / "ztfd.log"
            proc.send_signal(signal.SIGTERM)
            wait_until(lambda: re.search(r"stopping \d+ children", ztfd_log.read_text()), 30, "the stop forwarded")
            assert proc.poll() is None and pid_alive(syncer)  # waiting for the upload in flight
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 128 + signal.SIGTERM
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert "received a second SIGTERM: stopping at once (exit 143)" in ztfd_log.read_text()
        wait_until(lambda: not pid_alive(syncer), 30, "the syncer to stop at once too")
        assert status(cfg_path)[1]["sync"]["pending"] == 1  # never marked uploaded: the next pass sends it
        stop_and_check_nothing_left(cfg_path)
