"""A short fuzzing run in the suite (issue 21): every target's callback over its real seeds and random mutations of
them, and ``bin/fuzz``'s entry for a few seconds under atheris. The long runs are in docs/fuzzing.md."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from fuzzing.targets import TARGETS

MUTATIONS = 1500  # per target: a few seconds each


def mutated(seed: bytes, rng: random.Random) -> bytes:
    """One of libFuzzer's simple mutations: flip bytes, cut, splice in random bytes or repeat a slice."""
    data = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        if not data:
            data = bytearray(rng.randbytes(8))
        at = rng.randrange(len(data))
        choice = rng.randrange(4)
        if choice == 0:
            data[at] ^= 1 << rng.randrange(8)
        elif choice == 1:
            del data[at:at + rng.randint(1, 64)]
        elif choice == 2:
            data[at:at] = rng.randbytes(rng.randint(1, 8))
        else:
            data[at:at] = data[at:at + rng.randint(1, 32)] * rng.randint(2, 8)
    return bytes(data)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_each_target_takes_its_seeds_and_their_mutations_with_only_the_refusals_it_promises(name: str) -> None:
    target = TARGETS[name]
    callback, seeds = target.make(), target.seeds()
    assert seeds
    rng = random.Random(name)
    for seed in seeds:
        callback(seed)
    for _ in range(MUTATIONS):
        callback(mutated(rng.choice(seeds), rng))


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed (fuzz extra)")
def test_bin_fuzz_runs_a_target_under_atheris_and_reports_its_figures(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-m", "fuzzing", "--seconds", "3", "--out", str(tmp_path), "lasair"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    (row,) = json.loads((tmp_path / "results.json").read_text())["targets"]
    assert row["target"] == "lasair" and row["executions"] > 0 and row["coverage"] > 0 and row["findings"] == []
    assert "lasair" in done.stdout
