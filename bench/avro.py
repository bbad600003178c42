"""Avro ingest: alerts/s of ``ztfd consume`` on a topic of ZTF's own packets (format ``ztf-avro``, stamps off, its
decode pool at ``kafka.decode_workers = "auto"``: none on 2 cores) against a naive loop that decodes the same
messages with fastavro and writes the same files (the packet and its three cutouts, temporary file + rename each)
with no store, and against the bare loop that only reads and decodes them (the distance to what decoding alone
allows). The consumer with one decode worker (``decode_workers = 1``) is measured beside them, to show what a
worker brings here.

The messages are the 15 real sample packets cycled, each with its objectId and candid rewritten to be distinct (so
that every alert gets its own files, as on a real night). ztfd writes more than the loop: a JSON view of each
packet beside it, the sync manifest and the store transaction. As in ``bench.ingest``, every measurement starts
from a flushed disk, the order alternates, and no run's files are deleted before the section ends.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from bench.common import Results, Row, Settings, median, ratio
from bench.ingest import ZTF_PEAK, consume_rate, loop_rate, tmpfs_rates
from bench.stamps import synthetic_object_id
from ztfd.embedded.demo import EmbeddedServices
from ztfd.ingest.decodepool import workers_for
from ztfd.sources import source_for

TOPIC = "bench-avro"
RUBIN_BURST = 333.0  # alerts/s: ~10,000 alerts per 30 s visit
KINDS = ("bare", "naive", "ztfd", "ztfd-one-worker")


def packets_renamed(count: int) -> list[bytes]:
    """``count`` ZTF packets (container files) of distinct objects and candids, from the real samples."""
    from ztfd.embedded.avro_samples import ztf_packet_bytes
    from ztfd.embedded.samples import packets

    base = packets()
    return [ztf_packet_bytes(dataclasses.replace(base[i % len(base)], object_id=synthetic_object_id(i),
                                                 candid=base[i % len(base)].candid + 1000 * (i + 1)))
            for i in range(count)]


def run(settings: Settings, results: Results) -> None:
    count = settings.size(4_000, 400)
    work = settings.workdir / "avro"
    with EmbeddedServices(work / "services", s3=False, stamps=False) as services:
        services.kafka.create_topic(TOPIC)
        started = time.monotonic()
        messages = packets_renamed(count)
        services.kafka.produce(TOPIC, messages)
        size = sum(len(m) for m in messages) / len(messages)
        del messages
        print(f"  produced {count} ZTF packets ({size / 1024:.0f} kB each) in {time.monotonic() - started:.1f}s",
              flush=True)
        bootstrap = services.kafka.bootstrap

        def measure(kind: str, out: Path) -> float:
            if kind.startswith("ztfd"):
                return consume_rate(bootstrap, count, out, results, topic=TOPIC, message_format="ztf-avro",
                                    decode_workers="auto" if kind == "ztfd" else 1)
            return loop_rate(bootstrap, f"{kind}-avro", count, out, topic=TOPIC)

        rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for run_index in range(settings.runs):
            for kind in KINDS if run_index % 2 == 0 else KINDS[::-1]:
                os.sync()
                rates[kind].append(measure(kind, work / f"{kind}-{run_index}"))
            print(f"  run {run_index + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rates.items()), flush=True)
        on_tmpfs = tmpfs_rates(settings, KINDS[1:], measure)
    results.raw["avro"] = {"messages": count, "alerts_per_s": rates, "alerts_per_s_on_tmpfs": on_tmpfs}
    bare, naive, ztfd, pooled = (median(rates[kind]) for kind in KINDS)
    auto = workers_for("auto", source_for("ztf-avro"))
    results.add(
        Row("avro", "ztfd consume of ZTF packets (ztf-avro, stamps off)", ztfd, "alerts/s",
            f"{count:,} packets, decode_workers auto ({auto} on {os.cpu_count()} cores), median of {settings.runs}"),
        Row("avro", "vs ZTF's peak", ratio(ztfd, ZTF_PEAK), "x", f"{ZTF_PEAK:,.0f} alerts/s"),
        Row("avro", "vs Rubin's burst", ratio(ztfd, RUBIN_BURST), "x", f"~{RUBIN_BURST:,.0f} alerts/s",
            ">= 1.0x", ratio(ztfd, RUBIN_BURST) >= 1.0),
        Row("avro", "vs naive fastavro loop writing packet + 3 cutouts", ratio(ztfd, naive), "x",
            f"naive {naive:,.0f}/s", ">= 1.5x", ratio(ztfd, naive) >= 1.5),
        Row("avro", "vs bare read+decode loop (no files)", ratio(ztfd, bare), "x", f"bare {bare:,.0f}/s"),
        Row("avro", "with one decode worker (decode_workers 1)", pooled, "alerts/s",
            f"{ratio(pooled, naive):.2f}x naive, {ratio(pooled, ztfd):.2f}x auto"),
    )
    if on_tmpfs:
        naive, ztfd, pooled = (median(on_tmpfs[kind]) for kind in KINDS[1:])
        results.add(
            Row("avro", "on tmpfs: vs naive loop", ratio(ztfd, naive), "x",
                f"ztfd {ztfd:,.0f}/s, naive {naive:,.0f}/s", ">= 1.5x", ratio(ztfd, naive) >= 1.5),
            Row("avro", "on tmpfs: with one decode worker", pooled, "alerts/s",
                f"{ratio(pooled, naive):.2f}x naive, {ratio(pooled, ztfd):.2f}x auto"),
        )
