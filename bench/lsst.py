"""LSST: a Lasair-LSST full-output topic into ``ztfd consume`` against the naive writer, and the LSST stamp pool
against the alerce client's ``multisurvey_get_stamps`` loop, on the same 50 ms stand-in.

The messages are Lasair-LSST full-alert rows built from the real Rubin samples (~38 kB each: a diaObject, eleven
diaSources, ten forced sources, bare NaN where Lasair sends it). Beside the rates, the consumer's CPU per alert for
each step of its work on those messages, measured here in-process, says where its time goes; the naive loop's
own parse and re-serialisation are measured the same way.

The stamp pool fetches distinct synthetic alerts (the five sample alerts' cutouts under distinct diaObjectIds and
diaSourceIds, the detection named as in full output) from ALeRCE's multisurvey routes of the stand-in; the alerce
client fetches the first ones one after the other with the diaSourceId given, so both make three requests a
triplet.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from bench.common import Results, Row, Settings, median, ratio
from bench.ingest import compare
from bench.stamps import LATENCY, WORKERS, alerce_rate, pool_rate
from ztfd.embedded.demo import EmbeddedServices
from ztfd.store.alerts import NewAlert

TOPIC = "bench-lsst-full"
DAY = "2026-03-05"  # dayObs of the sample alerts
PROFILE_MESSAGES = 500


def run(settings: Settings, results: Results) -> None:
    _ingest(settings, results)
    _stamps(settings, results)


def full_messages(count: int) -> list[bytes]:
    from ztfd.embedded import lsst_samples

    alerts = lsst_samples.object_alerts()
    return [json.dumps(lsst_samples.message(alerts[i % len(alerts)], "full", seq=i)).encode() for i in range(count)]


def _ingest(settings: Settings, results: Results) -> None:
    count = settings.size(5_000, 500)
    messages = full_messages(count)
    size = sum(len(m) for m in messages) / len(messages)
    work = settings.workdir / "lsst-ingest"
    with EmbeddedServices(work / "services", s3=False, stamps=False) as services:
        rates = compare(settings, services.kafka, TOPIC, messages, count, work, results)
    steps = profile(messages[:PROFILE_MESSAGES])
    results.raw["lsst_ingest"] = {"messages": count, "mean_bytes": size, "alerts_per_s": rates, "cpu_ms": steps}
    bare, naive, ztfd = (median(rates[k]) for k in ("bare", "naive", "ztfd"))
    ours = steps["json parse"] + steps["nested time walk"] + steps["time conversion"] + steps["alert file bytes"]
    results.add(
        Row("lsst", "ztfd consume, Lasair-LSST full output", ztfd, "alerts/s",
            f"{count:,} msgs of {size / 1000:.0f} kB, median of {settings.runs}"),
        Row("lsst", "vs naive file-per-message loop", ratio(ztfd, naive), "x", f"naive {naive:,.0f}/s",
            ">= 1.0x", ratio(ztfd, naive) >= 1.0),
        Row("lsst", "vs bare read+parse loop", ratio(ztfd, bare), "x", f"bare {bare:,.0f}/s"),
        Row("lsst", "consumer CPU per alert: parse / time walk / conversion / file + MD5", ours, "ms",
            " / ".join(f"{steps[k]:.2f}" for k in ("json parse", "nested time walk", "time conversion",
                                                   "alert file bytes"))),
        Row("lsst", "naive loop CPU per message: parse / re-serialise", steps["json parse"] + steps["json dumps"],
            "ms", f"{steps['json parse']:.2f} / {steps['json dumps']:.2f}"),
    )


def profile(messages: list[bytes]) -> dict[str, float]:
    """CPU ms per message of each step the consumer (and the naive loop) does with these messages."""
    import datetime as dt

    from ztfd.files import md5_hex
    from ztfd.ingest import nights
    from ztfd.sources import alert_files, lasair

    source = lasair.LasairSource()
    nights.convert_times([source.decode(messages[0])])  # imports and caches warm, as in a running consumer
    timings: dict[str, float] = {}

    def timed(name: str, work: Any) -> Any:
        started = time.process_time()
        value = work()
        timings[name] = (time.process_time() - started) * 1000 / len(messages)
        return value

    bodies = timed("json parse", lambda: [json.loads(m) for m in messages])
    timed("json dumps", lambda: [json.dumps(b) for b in bodies])
    alerts = timed("decode", lambda: [source.decode(m) for m in messages])
    timings["nested time walk"] = max(0.0, timings["decode"] - timings["json parse"])
    observed = timed("time conversion", lambda: nights.convert_times(alerts))
    now = dt.datetime.now(dt.UTC)
    timed("alert file bytes", lambda: [md5_hex(alert_files(a, "data", "stem", "images", {
        "date": nights.date_of(a, t, None, now).date, "times_utc": t.times_utc})[0][1])
        for a, t in zip(alerts, observed, strict=True)])
    return timings


def synthetic_alerts(count: int) -> list:
    """``count`` distinct Rubin alerts: the sample alerts' cutouts under new diaObjectIds and diaSourceIds."""
    from ztfd.embedded import lsst_samples

    base = lsst_samples.object_alerts()
    return [dataclasses.replace(base[i % len(base)], dia_source_id=base[i % len(base)].dia_source_id + 1000 * (i + 1),
                                dia_object_id=base[i % len(base)].dia_object_id + 1000 * (i + 1))
            for i in range(count)]


def _stamps(settings: Settings, results: Results) -> None:
    from ztfd.embedded.alerce import StampService

    count = settings.size(1000, 200)
    alerce_count = settings.size(100, 20)
    work = settings.workdir / "lsst-stamps"
    synthetic = synthetic_alerts(count)
    alerts = [NewAlert(0, 0, offset, str(a.dia_object_id), DAY, a.mjd_tai - 37 / 86400,
                       f"data/{DAY}/{TOPIC}/{a.dia_object_id}_p0-o{offset}.json", "lsst", str(a.dia_source_id), a.band)
              for offset, a in enumerate(synthetic)]
    rates: dict[str, list[float]] = {"alerce": [], "pool": []}
    concurrency = None
    with StampService(packets=(), lsst_alerts=synthetic, latency=LATENCY, include_previous=False) as service:
        for alert in synthetic:  # the stand-in gzips each cutout once: before the clock runs, not during
            for kind in ("science", "template", "difference"):
                service.alerce_lsst_stamp(alert.dia_source_id, kind)
        urls = {"lsst_provider": "alerce", "alerce_lsst_url": service.url}
        for run_index in range(settings.runs):
            pairs = [[a.dia_object_id, a.dia_source_id] for a in synthetic[:alerce_count]]
            rates["alerce"].append(alerce_rate("alerce-lsst", service.url, pairs, work / f"alerce-{run_index}"))
            rate, concurrency, _ = pool_rate(urls, alerts, False, "fast", work / f"pool-{run_index}", results,
                                             cpu_key="lsst_stamps_cpu_cores_busy")
            rates["pool"].append(rate)
            print(f"  run {run_index + 1}: " + ", ".join(f"{k} {v[-1]:,.1f}/s" for k, v in rates.items()), flush=True)
    alerce, pool = median(rates["alerce"]), median(rates["pool"])
    results.raw["lsst_stamps"] = {"alerts": count, "alerce_alerts": alerce_count, "triplets_per_s": rates,
                                  "concurrency": concurrency}
    results.add(
        Row("lsst", f"LSST stamp pool of {WORKERS} fetchers (alerce), previews off", pool, "triplets/s",
            f"{count:,} alerts, 50 ms/request, median of {settings.runs}"),
        Row("lsst", "vs alerce client multisurvey_get_stamps", ratio(pool, alerce), "x",
            f"alerce {alerce:.1f}/s ({alerce_count} alerts)", ">= 10x", ratio(pool, alerce) >= 10),
    )
