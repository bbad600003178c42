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

from bench import results
from tests.conftest import child_env

REPO = Path(__file__).resolve().parents[1]


def quick_bench(kind: str, tmp_path: Path, timeout: float) -> tuple[subprocess.CompletedProcess[str], dict]:
    """``bin/bench <kind> --quick``: its output and its JSON results (its RESULTS.md in tmp_path)."""
    out = tmp_path / "bench-results.json"
    result = subprocess.run([sys.executable, "-m", "bench", kind, "--quick", "--out", str(out),
                             "--results", str(tmp_path / "RESULTS.md")], cwd=REPO,
                            capture_output=True, text=True, env=child_env(), timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result, json.loads(out.read_text())


@pytest.mark.slow
def test_quick_ingest_bench_reports_every_figure_with_its_goal(tmp_path: Path) -> None:
    result, document = quick_bench("ingest", tmp_path, 240)
    results_md = tmp_path / "RESULTS.md"
    assert f"on {os.cpu_count()} cores" in result.stdout
    rows = {row["name"]: row for row in document["rows"]}
    naive = rows["vs naive file-per-message loop"]
    assert naive["goal"] == ">= 1.5x" and naive["passed"] == (naive["value"] >= 1.5)
    assert rows["ztfd consume (stamps off)"]["value"] > 0
    assert document["peak_rss_mb"]["consumer"] > 10
    rates = document["raw"]["ingest"]["alerts_per_s"]
    assert all(len(rates[kind]) == 1 and rates[kind][0] > 0 for kind in ("bare", "naive", "ztfd"))
    assert "vs naive file-per-message loop" in result.stdout  # the table is printed
    assert f"| ingest | vs naive file-per-message loop | {naive['value']:.2f} x |" in results_md.read_text()


@pytest.mark.slow
def test_quick_avro_bench_reports_the_pool_beside_both_loops_and_the_surveys_rates(tmp_path: Path) -> None:
    _, document = quick_bench("avro", tmp_path, 600)
    rows = {row["name"]: row for row in document["rows"]}
    naive = rows["vs naive fastavro loop writing packet + 3 cutouts"]
    assert naive["goal"] == ">= 1.5x" and naive["passed"] == (naive["value"] >= 1.5)
    assert {"vs ZTF's peak", "vs Rubin's burst", "vs bare read+decode loop (no files)",
            "with one decode worker (decode_workers 1)"} <= rows.keys()
    rates = document["raw"]["avro"]["alerts_per_s"]
    assert all(len(rates[kind]) == 1 and rates[kind][0] > 0 for kind in ("bare", "naive", "ztfd", "ztfd-one-worker"))
    memory = rows["peak RSS consumer"]
    assert memory["goal"] == "<= 300 MB" and document["peak_rss_mb"]["consumer"] > 10


def test_results_markdown_replaces_only_its_block(tmp_path: Path) -> None:
    """bench/RESULTS.md: the run's rows between the markers (a ``|`` in a cell escaped), the text by hand kept."""
    path = tmp_path / "RESULTS.md"
    path.write_text(f"# results\n\n{results.START}\nold figures\n{results.END}\n\n## Profiles\nby hand\n")
    document = {"machine": {"cpu_count": 2, "platform": "Linux", "python": "3.11", "memory_gb": 4.0},
                "settings": {"runs": 3, "quick": False, "sections": ["sync"]}, "finished_at": "2026-12-03T10:00:00",
                "rows": [{"section": "sync", "name": "vs aws s3 sync", "value": 1.05, "unit": "x",
                          "detail": "aws 330 | s5cmd 359", "goal": ">= 1.0x", "passed": True}],
                "notes": ["sync: a note"]}
    results.write(document, path)
    text = path.read_text()
    assert "old figures" not in text and text.endswith("## Profiles\nby hand\n") and text.startswith("# results\n")
    assert "| sync | vs aws s3 sync | 1.05 x | aws 330 \\| s5cmd 359 | >= 1.0x | PASS |" in text
    assert "2026-12-03T10:00:00 on 2 cores" in text and "- note: sync: a note" in text

    fresh = tmp_path / "new" / "RESULTS.md"
    fresh.parent.mkdir()
    results.write(document, fresh)  # a missing file is created with the block
    assert results.START in fresh.read_text() and "vs aws s3 sync" in fresh.read_text()
    path.write_text("no markers\n")
    with pytest.raises(ValueError, match=r"has no .* block"):
        results.write(document, path)


@pytest.mark.slow
def test_quick_e2e_bench_reports_the_wal_peak(tmp_path: Path) -> None:
    result, document = quick_bench("e2e", tmp_path, 600)
    row = {row["name"]: row for row in document["rows"]}["store WAL peak size"]
    assert row["unit"] == "MB" and row["value"] > 0 and row["goal"] == "<= 64 MB"
    assert document["raw"]["e2e"]["wal_peak_bytes"] > 0
    assert "store WAL peak size" in result.stdout


def test_fleet_figures_are_judged_against_the_issues_goals() -> None:
    """The fleet section's table from its measurements (no services: the section itself runs in bin/bench only):
    each figure beside its goal, the verdict following the value."""
    from bench.common import Results, Settings
    from bench.fleet import HANDOVER_GOAL, SESSION_TIMEOUT_MS, Loss, Uploads, report

    def judged(handover: float, requests: int, group_rate: float) -> dict[str, dict]:
        results = Results()
        loss = Loss(handover, [1, 3], 40, Uploads(alerts=1000, puts=6200, bytes=137_000_000,
                                                  stamp_requests=requests))
        single = Uploads(alerts=1000, puts=6000, bytes=137_000_000, stamp_requests=2000)
        report(Settings(runs=1), results, 5000, {"all": [1000.0], "group": [group_rate]}, [loss], [single])
        return {row.name: row.__dict__ for row in results.rows}

    rows = judged(handover=HANDOVER_GOAL - 1, requests=2100, group_rate=950.0)
    handover = rows["host lost (kill -9, home deleted) -> its partitions flowing again"]
    assert handover["passed"] and f"session.timeout.ms {SESSION_TIMEOUT_MS}" in handover["detail"]
    assert rows["stamp requests per triplet across a host loss"]["value"] == pytest.approx(2.1)
    assert rows["stamp requests per triplet across a host loss"]["passed"]
    assert rows["group mode vs assignment = all"]["passed"]
    assert rows["S3 PUTs per alert, fleet with a host lost"]["value"] == pytest.approx(6.2)
    assert "one host: 6.00" in rows["S3 PUTs per alert, fleet with a host lost"]["detail"]

    rows = judged(handover=HANDOVER_GOAL + 1, requests=2300, group_rate=850.0)
    assert not rows["host lost (kill -9, home deleted) -> its partitions flowing again"]["passed"]
    assert not rows["stamp requests per triplet across a host loss"]["passed"]
    assert not rows["group mode vs assignment = all"]["passed"]
