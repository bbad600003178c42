"""``bin/fuzz``: fuzz every decoder of message content for a set time each, then print and keep the figures.

    bin/fuzz                         every target, 60 s each, 2 at a time
    bin/fuzz --seconds 600 fink      one target for 10 minutes
    bin/fuzz --out DIR               where corpora, logs, findings and results.json go (default fuzz-results/)

Each target's corpus starts from the real samples (``fuzzing.targets``) and grows in ``DIR/corpus/<target>``; a
later run goes on from it. A run that libFuzzer ends early (a crash, a hang, memory past the limit: the input is
kept as ``DIR/findings/<target>-crash-*``) is started again for the time left. Exit status 1 when anything was
found.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from fuzzing.targets import TARGETS

RSS_LIMIT_MB = 2048  # libFuzzer's memory limit per target process (Avro bounds: a record's objects <= 512 MiB)
INPUT_TIMEOUT = 10  # seconds one input may take before libFuzzer calls it a hang
MAX_LEN = 256 * 1024  # the largest input libFuzzer makes (the samples are up to 75 kB)
STATUS = re.compile(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/(\S+)")


def seed_corpus(name: str, corpus: Path) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        for index, seed in enumerate(TARGETS[name].seeds()):
            (corpus / f"seed-{index:03d}").write_bytes(seed)


def start(name: str, out: Path, seconds: int) -> subprocess.Popen[bytes]:
    corpus, findings = out / "corpus" / name, out / "findings"
    seed_corpus(name, corpus)
    findings.mkdir(parents=True, exist_ok=True)
    log = (out / f"{name}.log").open("ab")
    command = [sys.executable, "-m", "fuzzing.run", name, str(findings), str(corpus),
               f"-max_total_time={seconds}", f"-timeout={INPUT_TIMEOUT}", f"-rss_limit_mb={RSS_LIMIT_MB}",
               f"-max_len={MAX_LEN}", f"-artifact_prefix={findings}/{name}-", "-print_final_stats=1"]
    return subprocess.Popen(command, stdout=log, stderr=log, env={**os.environ, "PYTHONHASHSEED": "0"})


def figures(name: str, out: Path) -> dict[str, object]:
    """What the target's log says: executions, coverage, corpus, restarts; and what it found."""
    text = (out / f"{name}.log").read_text(errors="replace")
    executions = sum(int(n) for n in re.findall(r"stat::number_of_executed_units: (\d+)", text))
    last = STATUS.findall(text)
    findings = sorted(p.name for p in (out / "findings").glob(f"{name}-*") if p.suffix != ".txt")
    return {"target": name, "executions": executions,
            "coverage": int(last[-1][1]) if last else 0, "features": int(last[-1][2]) if last else 0,
            "corpus_units": int(last[-1][3]) if last else 0, "corpus_size": last[-1][4] if last else "0b",
            "runs": text.count("INFO: Seed:"), "findings": findings}


def fuzz(name: str, out: Path, seconds: int) -> None:
    """Run ``name`` until ``seconds`` are used, starting it again after a crash."""
    deadline = time.monotonic() + seconds
    while (left := int(deadline - time.monotonic())) > 0:
        if start(name, out, left).wait() == 0:
            return


def main() -> int:
    parser = argparse.ArgumentParser(prog="bin/fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", choices=[[], *TARGETS], default=[], metavar="TARGET",
                        help=f"among {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    parser.add_argument("--jobs", type=int, default=2, help="targets at a time (default 2)")
    parser.add_argument("--out", type=Path, default=Path("fuzz-results"))
    args = parser.parse_args()
    names = args.targets or list(TARGETS)
    args.out.mkdir(parents=True, exist_ok=True)
    from concurrent.futures import ThreadPoolExecutor

    began = time.monotonic()
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(lambda name: fuzz(name, args.out, args.seconds), names))
    results = [figures(name, args.out) for name in names]
    (args.out / "results.json").write_text(json.dumps(
        {"seconds_per_target": args.seconds, "wall_seconds": round(time.monotonic() - began), "targets": results},
        indent=2) + "\n")
    print(f"{'target':16} {'executions':>11} {'cov':>6} {'ft':>6} {'corpus':>14} {'runs':>4}  findings")
    for row in results:
        corpus = f"{row['corpus_units']}/{row['corpus_size']}"
        print(f"{row['target']:16} {row['executions']:>11} {row['coverage']:>6} {row['features']:>6} {corpus:>14} "
              f"{row['runs']:>4}  {', '.join(row['findings']) or 'none'}")
    return 1 if any(row["findings"] for row in results) else 0


if __name__ == "__main__":
    sys.exit(main())
