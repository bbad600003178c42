"""Ingest: alerts/s of one ``ztfd consume`` (stamps off) against a bare and a naive confluent-kafka loop.

All three read the same N Lasair-shaped messages already in one topic, each run with a fresh consumer group.
ztfd's rate is first to last stored: from the first ``received_at`` to the last alert file recorded in the manifest.

The same runs are made again with their files on a tmpfs (``/dev/shm``) when there is one: creating a file costs
least there, which is the naive loop's best case and the consumer's hardest (its own CPU is then the limit).

No run's files on disk are deleted before the section ends. Deleting 50,000 files makes ext4's inode allocator scan the
recently freed inodes for every file created in the next minutes (``recently_deleted`` in ``ext4_new_inode``,
seen with ``perf``): the loop measured right after a deletion paid 3-10x more kernel time per file than the same
loop on an undisturbed disk. A daemon never deletes in bulk, so the bench must not either.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bench.common import Results, Row, RssSampler, Settings, median, python_child, ratio, wait_until, ztfd_child
from ztfd import store
from ztfd.embedded.demo import FAST_KAFKA_OPTIONS, EmbeddedServices, write_config
from ztfd.store.alerts import count_alerts, iter_alerts
from ztfd.store.manifest import manifest_files
from ztfd.store.rejected import rejected_counts

TOPIC = "bench-ingest"
ZTF_PEAK = 1333.0


def run(settings: Settings, results: Results) -> None:
    count = settings.size(50_000, 5_000)
    work = settings.workdir / "ingest"
    with EmbeddedServices(work / "services", s3=False, stamps=False) as services:
        from ztfd.embedded.samples import message_stream

        rates = compare(settings, services.kafka, TOPIC, (json.dumps(m).encode() for m in message_stream(count)),
                        count, work, results)
        bootstrap = services.kafka.bootstrap

        def measure(kind: str, work: Path) -> float:
            if kind == "ztfd":
                return consume_rate(bootstrap, count, work / "home", results)
            return loop_rate(bootstrap, kind, count, work / "out")

        on_tmpfs = tmpfs_rates(settings, ("naive", "ztfd"), measure)
    results.raw["ingest"] = {"messages": count, "alerts_per_s": rates, "alerts_per_s_on_tmpfs": on_tmpfs}
    bare, naive, ztfd = (median(rates[k]) for k in ("bare", "naive", "ztfd"))
    results.add(
        Row("ingest", "ztfd consume (stamps off)", ztfd, "alerts/s", f"{count:,} msgs, median of {settings.runs}"),
        Row("ingest", "vs bare read+parse loop", ratio(ztfd, bare), "x", f"bare {bare:,.0f}/s"),
        Row("ingest", "vs naive file-per-message loop", ratio(ztfd, naive), "x", f"naive {naive:,.0f}/s",
            ">= 1.5x", ratio(ztfd, naive) >= 1.5),
        Row("ingest", "vs ZTF peak", ratio(ztfd, ZTF_PEAK), "x", "1,333 alerts/s"),
    )
    if on_tmpfs:
        naive, ztfd = median(on_tmpfs["naive"]), median(on_tmpfs["ztfd"])
        results.add(Row("ingest", "on tmpfs: vs naive loop", ratio(ztfd, naive), "x",
                        f"ztfd {ztfd:,.0f}/s, naive {naive:,.0f}/s", ">= 1.2x", ratio(ztfd, naive) >= 1.2))


def tmpfs_rates(settings: Settings, kinds: tuple[str, ...], measure: Callable[[str, Path], float]
                ) -> dict[str, list[float]]:
    """The rates ``measure(kind, work folder)`` of each kind with its files on ``/dev/shm`` (none without it), the
    order alternating between runs; each run's files are deleted after it (a tmpfs keeps no memory of
    deletions)."""
    if not os.access("/dev/shm", os.W_OK) or shutil.disk_usage("/dev/shm").free < 2 * 1024**3:
        print("  no writable tmpfs with 2 GB free at /dev/shm: the tmpfs runs are skipped", flush=True)
        return {}
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    for run_index in range(settings.runs):
        for kind in kinds if run_index % 2 == 0 else kinds[::-1]:
            work = Path(tempfile.mkdtemp(prefix="ztfd-bench-", dir="/dev/shm"))
            try:
                rates[kind].append(measure(kind, work))
            finally:
                shutil.rmtree(work, ignore_errors=True)
        print(f"  tmpfs run {run_index + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rates.items()),
              flush=True)
    return rates


def compare(settings: Settings, kafka: Any, topic: str, messages: Iterable[bytes], count: int, work: Path,
            results: Results) -> dict[str, list[float]]:
    """Produce ``messages`` into ``topic``, then alerts/s of the bare loop, the naive loop and ``ztfd consume``."""
    kafka.create_topic(topic)
    started = time.monotonic()
    kafka.produce(topic, messages)
    print(f"  produced {count} messages in {time.monotonic() - started:.1f}s", flush=True)
    rates: dict[str, list[float]] = {"bare": [], "naive": [], "ztfd": []}
    for run_index in range(settings.runs):
        # Each measurement starts from a flushed disk (os.sync), and the order alternates, so that no loop
        # pays for the writeback of the 50,000 files the one before it left in the page cache.
        order = ("bare", "naive", "ztfd") if run_index % 2 == 0 else ("ztfd", "naive", "bare")
        for kind in order:
            os.sync()
            if kind == "ztfd":
                rates[kind].append(consume_rate(kafka.bootstrap, count, work / f"ztfd-{run_index}", results,
                                                topic=topic))
            else:
                rates[kind].append(loop_rate(kafka.bootstrap, kind, count, work / f"{kind}-{run_index}", topic=topic))
        print(f"  run {run_index + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rates.items()), flush=True)
    return rates


def loop_rate(bootstrap: str, kind: str, count: int, out: Path, topic: str = TOPIC) -> float:
    """Messages/s of a baseline loop (``bench.baselines``) in a child process, first to last message."""
    group = f"bench-{kind}-{time.time_ns()}"
    child = python_child("bench.baselines", kind, "--bootstrap", bootstrap, "--topic", topic, "--group", group,
                         "--count", str(count), "--out", str(out), log_path=out.parent / f"{out.name}.log")
    stdout, _ = child.communicate(timeout=600)
    if child.returncode != 0:
        raise RuntimeError(f"baseline {kind} failed ({child.returncode}); see {out.parent / (out.name + '.log')}")
    timing = json.loads(stdout.decode().strip().splitlines()[-1])
    return timing["count"] / max(1e-9, timing["last"] - timing["first"])


def consume_rate(bootstrap: str, count: int, home: Path, results: Results, topic: str = TOPIC,
                 message_format: str = "lasair", decode_workers: int | str = 0,
                 sections: dict[str, dict[str, Any]] | None = None) -> float:
    """Alerts/s of ``ztfd consume`` (stamps off, ``kafka.decode_workers``) of a topic of ``count`` messages, first
    received to last file recorded. ``sections`` adds keys to the configuration (e.g. group mode and its bucket)."""
    config: dict[str, dict[str, Any]] = {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": f"bench-ztfd-{time.time_ns()}", "topics": [topic],
                  "decode_workers": decode_workers},
        "kafka.options": {**FAST_KAFKA_OPTIONS, "auto.offset.reset": "earliest"},
        "kafka.formats": {topic: message_format},
        "stamps": {"enabled": False},
    }
    for name, values in (sections or {}).items():
        config.setdefault(name, {}).update(values)
    config_path = write_config(home / "ztfd.toml", home, config)
    conn = store.connect(home / "state" / "ztfd.sqlite3")
    try:
        with RssSampler() as sampler, ztfd_child(config_path, "consume", "--topic", topic,
                                                 log_path=home / "consume.out", sampler=sampler):
            wait_until(lambda: count_alerts(conn) + sum(rejected_counts(conn).values()) >= count,
                       timeout=900, interval=0.2, what=f"{count} alerts stored by ztfd consume")
        results.note_rss(sampler)
        first = min(alert.received_at for alert in iter_alerts(conn))
        last = max(row.recorded_at for row in manifest_files(conn, "data/"))
        stored = count_alerts(conn)
    finally:
        conn.close()
    return stored / max(1e-9, last - first)
