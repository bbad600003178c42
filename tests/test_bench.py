"""A smoke run of the bench harness (``bin/bench ingest --quick``): it runs, prints its table, writes its JSON.

The figures of a quick run mean nothing (small sizes, one run); performance is judged by ``bin/bench`` alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import child_env

REPO = Path(__file__).resolve().parents[1]


def quick_bench(kind: str, tmp_path: Path, timeout: float) -> tuple[subprocess.CompletedProcess[str], dict]:
    """``bin/bench <kind> --quick``: its output and its JSON results."""
    out = tmp_path / "bench-results.json"
    result = subprocess.run([sys.executable, "-m", "bench", kind, "--quick", "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, env=child_env(), timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result, json.loads(out.read_text())


@pytest.mark.slow
def test_quick_ingest_bench_reports_every_figure_with_its_goal(tmp_path: Path) -> None:
    result, document = quick_bench("ingest", tmp_path, 240)
    assert f"on {os.cpu_count()} cores" in result.stdout
    rows = {row["name"]: row for row in document["rows"]}
    naive = rows["vs naive file-per-message loop"]
    assert naive["goal"] == ">= 1.0x" and naive["passed"] == (naive["value"] >= 1.0)
    assert rows["ztfd consume (stamps off)"]["value"] > 0
    assert document["peak_rss_mb"]["consumer"] > 10
    rates = document["raw"]["ingest"]["alerts_per_s"]
    assert all(len(rates[kind]) == 1 and rates[kind][0] > 0 for kind in ("bare", "naive", "ztfd"))
    assert "vs naive file-per-message loop" in result.stdout  # the table is printed


@pytest.mark.slow
def test_quick_e2e_bench_reports_the_wal_peak(tmp_path: Path) -> None:
    result, document = quick_bench("e2e", tmp_path, 600)
    row = {row["name"]: row for row in document["rows"]}["store WAL peak size"]
    assert row["unit"] == "MB" and row["value"] > 0 and row["goal"] == "<= 64 MB"
    assert document["raw"]["e2e"]["wal_peak_bytes"] > 0
    assert "store WAL peak size" in result.stdout
