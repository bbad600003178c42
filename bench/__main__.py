"""``python -m bench [section …] [--quick] [--soak] [--runs N]``: ztfd against baselines, on this machine.

Prints a table (each figure beside its goal, PASS/FAIL), writes ``bench-results.json`` and, after a full run,
``bench/RESULTS.md`` from it (``--results-only``: only that, from an existing ``bench-results.json``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import results as results_md
from bench.common import Results, Row, Settings, machine, render

SECTIONS = ("ingest", "avro", "stamps", "lsst", "sync", "e2e", "store", "archive", "fleet")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bin/bench", description=__doc__)
    parser.add_argument("sections", nargs="*", metavar="section",
                        help=f"sections to run (default all): {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, figures not meaningful")
    parser.add_argument("--soak", action="store_true", help="10 minutes of end-to-end load: RSS growth per role")
    parser.add_argument("--runs", type=int, default=None, help="runs per figure (median); default 3, 1 with --quick")
    parser.add_argument("--out", type=Path, default=Path("bench-results.json"))
    parser.add_argument("--keep", action="store_true", help="keep the work folder (homes, logs)")
    parser.add_argument("--results", type=Path, default=None,
                        help=f"the Markdown results to write (default {results_md.RESULTS_PATH.name} in the bench "
                             "folder, after a full run only; given, after any run)")
    parser.add_argument("--results-only", action="store_true",
                        help="run nothing: write the Markdown results from the existing --out JSON")
    args = parser.parse_args(argv)
    if args.results_only:
        document = json.loads(args.out.read_text())
        write_results(document, args.results or results_md.RESULTS_PATH)
        return 0
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown[0]} (choose from {', '.join(SECTIONS)})")
    sections = args.sections or (["e2e"] if args.soak else list(SECTIONS))
    if args.soak and "e2e" not in sections:
        sections.append("e2e")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    workdir = Path(tempfile.mkdtemp(prefix="ztfd-bench-"))
    settings = Settings(runs=args.runs or (1 if args.quick else 3), quick=args.quick, soak=args.soak, workdir=workdir)
    info = machine()
    print(f"ztfd bench on {info['cpu_count']} cores ({info['platform']}, Python {info['python']}, "
          f"{info['memory_gb']} GB); work folder {workdir}", flush=True)
    results = Results()
    started = time.monotonic()
    failed: list[str] = []
    try:
        for name in sections:
            print(f"\n== {name}", flush=True)
            section_started = time.monotonic()
            try:
                importlib.import_module(f"bench.{name}").run(settings, results)
            except Exception as exc:
                traceback.print_exc()
                failed.append(name)
                results.notes.append(f"{name}: did not complete: {exc}")
                results.add(Row(name, "(section failed)", None, "", "see the note below", "", False))
            print(f"   ({name} took {time.monotonic() - section_started:.0f}s)", flush=True)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    memory_rows(results)
    print(f"\nztfd bench: {info['cpu_count']} cores, {time.monotonic() - started:.0f}s"
          f"{' (--quick: sizes reduced)' if args.quick else ''}\n")
    print(render(results.rows))
    for note in results.notes:
        print(f"note: {note}")
    document = {"machine": info, "settings": {"runs": settings.runs, "quick": args.quick, "soak": args.soak,
                                              "sections": sections},
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **results.to_json()}
    args.out.write_text(json.dumps(document, indent=2))
    print(f"\nwrote {args.out}")
    if args.results or (not failed and not args.quick and set(sections) == set(SECTIONS)):
        write_results(document, args.results or results_md.RESULTS_PATH)
    else:
        print(f"{results_md.RESULTS_PATH.name} left as it was (a partial, failed or --quick run); "
              f"`bin/bench --results-only --out {args.out}` writes it from this run")
    return 1 if failed else 0


def write_results(document: dict[str, object], path: Path) -> None:
    results_md.write(document, path)
    print(f"wrote {path}")


RSS_GOALS_MB = {"consumer": 300.0}  # the consumer with its helpers (file writer, decode workers); others 200 MB


def memory_rows(results: Results) -> None:
    for role, peak in sorted(results.peak_rss_mb.items()):
        goal = RSS_GOALS_MB.get(role, 200.0)
        detail = "with its file writer and decode workers" if role == "consumer" else "during the runs above"
        results.add(Row("memory", f"peak RSS {role}", peak, "MB", detail, f"<= {goal:.0f} MB", peak <= goal))


if __name__ == "__main__":
    sys.exit(main())
