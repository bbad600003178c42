"""Logs: many processes writing the same files through rotation (no line lost, none interleaved), rotation, and
the throttle for conditions that repeat."""

from __future__ import annotations

import logging
import multiprocessing
import re
from pathlib import Path

import pytest

from ztfd import logs

WRITERS = 4
LINES = 5000
PADDING = "x" * 60
BLOCK = 5
LINE = re.compile(r"^w(\d+) (\d+) " + PADDING + "$")


def write_lines(logs_dir: str, writer: int, start: multiprocessing.synchronize.Event) -> None:
    handler = logs.SharedRotatingFileHandler(Path(logs_dir) / "ztfd.log", max_bytes=20_000, backup_count=10_000)
    start.wait()
    logger = logging.getLogger(f"writer{writer}")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(message)s"))
    if writer % 2 == 0:  # records, one line each (ztfd.log, errors.log)
        for n in range(LINES):
            logger.info("w%d %d %s", writer, n, PADDING)
    else:  # blocks of BLOCK lines in one write (a consumer's per-batch topic log)
        for first in range(0, LINES, BLOCK):
            handler.write_block("".join(f"w{writer} {n} {PADDING}\n" for n in range(first, first + BLOCK)).encode())
    handler.close()


def test_concurrent_writers_through_rotation_lose_and_interleave_nothing(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=write_lines, args=(str(tmp_path), w, start)) for w in range(WRITERS)]
    for proc in procs:
        proc.start()
    start.set()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    files = sorted(tmp_path.glob("ztfd.log*"))
    files = [f for f in files if not f.name.endswith(".lock")]
    assert len(files) > 50  # ~1.7 MB through 20 kB files: it really rotated, many times
    seen: dict[int, list[int]] = {w: [] for w in range(WRITERS)}
    for path in files:
        for line in path.read_text().splitlines():
            match = LINE.match(line)
            assert match, f"mangled line in {path.name}: {line[:80]!r}"
            seen[int(match.group(1))].append(int(match.group(2)))
    for writer, numbers in seen.items():
        assert sorted(numbers) == list(range(LINES)), f"writer {writer}: lost or duplicated lines"
    # Rotation keeps files at max_bytes, but for at most one late write per other writer (to a file just rotated
    # away by another process, before this one noticed: late, not lost).
    assert max(f.stat().st_size for f in files) <= 20_000 + (WRITERS - 1) * BLOCK * 80


def test_rotate_shifts_the_backups_and_keeps_backup_count(tmp_path: Path) -> None:
    path = tmp_path / "supervisor.out"
    for generation in range(4):
        path.write_text(f"generation {generation}\n")
        logs.rotate(path, backup_count=2)
    assert not path.exists()
    assert (tmp_path / "supervisor.out.1").read_text() == "generation 3\n"
    assert (tmp_path / "supervisor.out.2").read_text() == "generation 2\n"
    assert not (tmp_path / "supervisor.out.3").exists()
    path.write_text("no backups\n")
    logs.rotate(path, backup_count=0)
    assert path.read_text() == ""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_logs_a_condition_once_per_period_and_counts_what_it_held_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    throttle = logs.Throttle(logging.getLogger("test.throttle"), every=30.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.throttle"):
        for _ in range(5):
            throttle("down", logging.WARNING, "broker %s is down", "b1")
        throttle("other", logging.INFO, "another condition")
        clock.now += 30.0
        throttle("down", logging.WARNING, "broker %s is down", "b1")
    assert [r.getMessage() for r in caplog.records] == [
        "broker b1 is down", "another condition", "broker b1 is down (4 repeats not shown)"]


def test_throttle_as_a_filter_lets_each_kind_of_line_through_once_per_period() -> None:
    clock = Clock()
    throttle = logs.Throttle(every=30.0, clock=clock)

    def record(text: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("ztfd.librdkafka", logging.WARNING, __file__, 1, text, args, None)

    assert throttle.filter(record("%s: connection refused", "FAIL"))
    assert not throttle.filter(record("%s: connection refused", "FAIL"))
    assert throttle.filter(record("%s: broker up", "UP"))
    clock.now += 31.0
    late = record("%s: connection refused", "FAIL")
    assert throttle.filter(late) and late.getMessage() == "FAIL: connection refused (1 repeats not shown)"
