"""Avro ingest: alerts/s of ``ztfd consume`` on a topic of ZTF's own packets (format ``ztf-avro``, stamps off)
against a naive loop that decodes the same messages with fastavro and writes the same files (the packet and its
three cutouts, temporary file + rename each) with no store.

The messages are the 15 real sample packets cycled, each with its objectId and candid rewritten to be distinct (so
that every alert gets its own files, as on a real night). ztfd writes more than the loop: a JSON view of each
packet beside it, the sync manifest and the store transaction. As in ``bench.ingest``, every measurement starts
from a flushed disk, the order alternates, and no run's files are deleted before the section ends.
"""

from __future__ import annotations

import dataclasses
import os
import time

from bench.common import Results, Row, Settings, median, ratio
from bench.ingest import consume_rate, loop_rate
from bench.stamps import synthetic_object_id
from ztfd.embedded.demo import EmbeddedServices

TOPIC = "bench-avro"


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
        rates: dict[str, list[float]] = {"naive": [], "ztfd": []}
        for run_index in range(settings.runs):
            for kind in ("naive", "ztfd") if run_index % 2 == 0 else ("ztfd", "naive"):
                os.sync()
                if kind == "ztfd":
                    rates[kind].append(consume_rate(services.kafka.bootstrap, count, work / f"ztfd-{run_index}",
                                                    results, topic=TOPIC, message_format="ztf-avro"))
                else:
                    rates[kind].append(loop_rate(services.kafka.bootstrap, "naive-avro", count,
                                                 work / f"naive-{run_index}", topic=TOPIC))
            print(f"  run {run_index + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rates.items()), flush=True)
    results.raw["avro"] = {"messages": count, "alerts_per_s": rates}
    naive, ztfd = median(rates["naive"]), median(rates["ztfd"])
    results.add(
        Row("avro", "ztfd consume of ZTF packets (ztf-avro, stamps off)", ztfd, "alerts/s",
            f"{count:,} packets, median of {settings.runs}"),
        Row("avro", "vs naive fastavro loop writing packet + 3 cutouts", ratio(ztfd, naive), "x",
            f"naive {naive:,.0f}/s", ">= 1.0x", ratio(ztfd, naive) >= 1.0),
    )
