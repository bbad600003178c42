"""Stamps: triplets/s of the ``ztfd fetch`` pool against the alerce client and against the pool's ideal.

The local stamp service answers every request after 50 ms. It serves N synthetic objects (the sample cutouts
under distinct objectIds and candids), so that every alert needs its own triplet: nothing is skipped as already
on disk. The pool's jobs are queued only once all its workers heartbeat, and the rate runs from the enqueue to
the last job finished, so process start-up is not counted.

Requests per triplet are counted at the stamp service: with ``get_avro`` (the default) a Lasair-ZTF triplet costs
the detections lookup and one packet; with ``get_stamp`` the lookup and three stamps (a run of its own); on a
catch-up (``CATCH_UP_PER_OBJECT`` alerts of every object queued at once) the pool shares each object's list.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from bench.common import Results, Row, RssSampler, Settings, median, python_child, ratio, wait_until, ztfd_child
from ztfd import store
from ztfd.embedded.demo import write_config
from ztfd.store import jobs
from ztfd.store.alerts import NewAlert, insert_alerts
from ztfd.store.processes import processes

LATENCY = 0.05
CATCH_UP_PER_OBJECT = 3  # alerts per object queued at once after downtime
WORKERS = 4
TOPIC = "bench-stamps"
DATE = "2021-09-01"


def synthetic_packets(count: int) -> list:
    from ztfd.embedded.samples import packets

    base = [p for p in packets() if p.object_id.startswith("ZTF")]
    return [dataclasses.replace(base[i % len(base)], object_id=synthetic_object_id(i),
                                candid=base[i % len(base)].candid + 1000 * (i + 1)) for i in range(count)]


def catch_up_packets(count: int, per_object: int) -> list:
    """``count`` alerts of ``count // per_object`` synthetic objects, ``per_object`` detections each an hour
    apart, interleaved as a topic replays them after downtime."""
    objects = synthetic_packets(max(1, count // per_object))
    return [dataclasses.replace(p, candid=p.candid + n, jd=p.jd + n / 24) for n in range(per_object) for p in objects]


def alerts_of(packets: list) -> list[NewAlert]:
    """The alerts of ``packets`` as the consumer would store them (one topic, one partition)."""
    return [NewAlert(0, 0, offset, p.object_id, DATE, p.mjd, f"data/{DATE}/{TOPIC}/{p.object_id}_p0-o{offset}.json")
            for offset, p in enumerate(packets)]


def synthetic_object_id(index: int) -> str:
    """A ZTF-shaped objectId (``ZTF24`` + 7 lowercase letters), distinct for every index."""
    letters = []
    for _ in range(7):
        index, digit = divmod(index, 26)
        letters.append(chr(ord("a") + digit))
    return "ZTF24" + "".join(reversed(letters))


def run(settings: Settings, results: Results) -> None:
    from ztfd.embedded.alerce import StampService

    count = settings.size(1000, 200)
    alerce_count = settings.size(100, 20)
    work = settings.workdir / "stamps"
    packets = synthetic_packets(count)
    alerts = alerts_of(packets)
    rates: dict[str, list[float]] = {"alerce": [], "previews off": [], "previews on": [], "matplotlib previews": []}
    concurrency = rate_limit = None
    requests: dict[str, list[float]] = {"get_avro": [], "get_stamp": [], "catch-up": []}  # per triplet
    with StampService(packets=packets, latency=LATENCY, include_previous=False) as service:
        urls = {"alerce_stamp_url": service.url, "alerce_api_url": service.url}
        for run_index in range(settings.runs):
            rates["alerce"].append(alerce_rate("alerce", service.url, [[p.object_id, p.candid]
                                                                        for p in packets[:alerce_count]],
                                               work / f"alerce-{run_index}"))
            for key, previews, renderer in (("previews off", False, "fast"), ("previews on", True, "fast"),
                                            ("matplotlib previews", True, "matplotlib")):
                service.reset_log()
                rate, concurrency, rate_limit = pool_rate(
                    urls, alerts, previews, renderer,
                    work / f"pool-{run_index}-{key.replace(' ', '-')}", results)
                rates[key].append(rate)
                if key == "previews off":
                    requests["get_avro"].append(service.arrivals() / len(packets))
            service.reset_log()
            pool_rate(urls, alerts, False, "fast", work / f"pool-{run_index}-get-stamp", results,
                      ztf_request="get_stamp")
            requests["get_stamp"].append(service.arrivals() / len(packets))
            print(f"  run {run_index + 1}: " + ", ".join(f"{k} {v[-1]:,.1f}/s" for k, v in rates.items())
                  + ", requests per triplet " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in requests.items() if v),
                  flush=True)
    catch_up = catch_up_packets(count, CATCH_UP_PER_OBJECT)
    with StampService(packets=catch_up, latency=LATENCY, include_previous=False) as service:
        urls = {"alerce_stamp_url": service.url, "alerce_api_url": service.url}
        for run_index in range(settings.runs):
            service.reset_log()
            pool_rate(urls, alerts_of(catch_up), False, "fast", work / f"pool-{run_index}-catch-up", results)
            requests["catch-up"].append(service.arrivals() / len(catch_up))
    print("  requests per triplet: " + ", ".join(f"{k} {median(v):.2f}" for k, v in requests.items()), flush=True)
    alerce, off, on, matplotlib_on = (median(rates[k]) for k in rates)
    ideal = WORKERS * (concurrency or 1) * 3 / LATENCY / 3  # requests/s over 3 requests a triplet
    if rate_limit:
        ideal = min(ideal, rate_limit / 4)  # 4 requests an alert: detections + 3 stamps
    results.raw["stamps"] = {"alerts": count, "alerce_alerts": alerce_count, "triplets_per_s": rates,
                             "ideal_triplets_per_s": ideal, "concurrency": concurrency, "rate_limit": rate_limit,
                             "requests_per_triplet": requests}
    per_avro, per_stamp, per_catch_up = (median(requests[k]) for k in ("get_avro", "get_stamp", "catch-up"))
    results.add(
        Row("stamps", f"pool of {WORKERS} fetchers, previews off", off, "triplets/s",
            f"{count:,} alerts, 50 ms/request, median of {settings.runs}"),
        Row("stamps", "vs alerce client get_stamps", ratio(off, alerce), "x",
            f"alerce {alerce:.1f}/s ({alerce_count} alerts)", ">= 10x", ratio(off, alerce) >= 10),
        Row("stamps", "vs ideal of declared concurrency", ratio(off, ideal), "x",
            f"ideal {ideal:,.0f}/s ({WORKERS}x{concurrency}x3 req/50ms)"),
        Row("stamps", "pool with previews on", on, "triplets/s", ""),
        Row("stamps", "previews on / off", ratio(on, off), "x", "cost <= 25%", ">= 0.75x", ratio(on, off) >= 0.75),
        Row("stamps", "preview_renderer = matplotlib, on / off", ratio(matplotlib_on, off), "x",
            f"{matplotlib_on:,.0f} triplets/s (not the default)"),
        Row("stamps", "requests per Lasair-ZTF triplet (get_avro, the default)", per_avro, "requests",
            f"get_stamp: {per_stamp:.2f} (detections + 3 stamps)", "<= 2.0", per_avro <= 2.0),
        Row("stamps", f"requests per triplet, catch-up of {CATCH_UP_PER_OBJECT} alerts per object", per_catch_up,
            "requests", f"{len(catch_up):,} alerts, detections shared", "<= 1.5", per_catch_up <= 1.5),
    )
    for previews in (False, True):
        busy = [c for c in results.raw.get("stamps_cpu_cores_busy", []) if c["previews"] == previews]
        if busy:
            results.add(Row("stamps", f"CPU cores busy, previews {'on' if previews else 'off'}",
                            median([c["fetchers"] + c["stamp_service"] for c in busy]), "cores",
                            f"fetchers {median([c['fetchers'] for c in busy]):.2f} + stamp service "
                            f"{median([c['stamp_service'] for c in busy]):.2f}"))


def alerce_rate(kind: str, url: str, pairs: list[list[Any]], out: Path) -> float:
    """Triplets/s of the alerce client (baseline ``kind``: ZTF ``get_stamps`` or LSST ``multisurvey_get_stamps``)
    fetching the (object, detection) ``pairs`` one after the other."""
    out.mkdir(parents=True, exist_ok=True)
    pairs_path = out / "pairs.json"
    pairs_path.write_text(json.dumps(pairs))
    child = python_child("bench.baselines", kind, "--url", url, "--pairs", str(pairs_path),
                         log_path=out / "alerce.log")
    stdout, _ = child.communicate(timeout=900)
    if child.returncode != 0:
        raise RuntimeError(f"alerce baseline failed; see {out / 'alerce.log'}")
    timing = json.loads(stdout.decode().strip().splitlines()[-1])
    return timing["count"] / (timing["last"] - timing["first"])


def pool_rate(
    urls: dict[str, str], alerts: list[NewAlert], previews: bool, renderer: str, home: Path, results: Results,
    cpu_key: str = "stamps_cpu_cores_busy",
    ztf_request: str = "get_avro",
) -> tuple[float, int, float]:
    """Triplets/s of ``WORKERS`` ``ztfd fetch`` processes on a stamp job for each of ``alerts`` (the stamp service's
    base URLs in ``urls``, as ``[stamps]`` keys)."""
    from ztfd import config

    config_path = write_config(home / "ztfd.toml", home, {
        "kafka": {"bootstrap_servers": "127.0.0.1:1", "group_id": "bench", "topics": [TOPIC]},
        "stamps": {"enabled": True, "workers": WORKERS, "previews": previews, "preview_renderer": renderer,
                   **urls, "ztf_request": ztf_request, "rate_limit": 0.0, "timeout": 30.0},
    })
    cfg = config.load(config_path)
    conn = store.connect(cfg.db_path)
    workers: list = []
    try:
        with RssSampler() as sampler, contextlib.ExitStack() as fetchers:
            for index in range(WORKERS):  # as the supervisor would fork them
                workers.append(fetchers.enter_context(
                    ztfd_child(config_path, "fetch", log_path=home / f"fetch-{index}.out", sampler=sampler)))
            wait_until(lambda: len(processes(conn, ["fetcher"])) >= WORKERS,
                       timeout=60, what="4 fetchers to heartbeat")
            cpu_before = _cpu_seconds(workers)
            started = time.time()
            with store.transaction(conn):
                ids = insert_alerts(conn, TOPIC, alerts, started)
                jobs.enqueue(conn, [jobs.NewStampJob(alert_id) for alert_id in ids if alert_id is not None])
            wait_until(lambda: jobs.counts(conn).finished >= len(alerts), timeout=900, interval=0.1,
                       what="every stamp job to finish")
            cpu_after = _cpu_seconds(workers)
        results.note_rss(sampler)
        failed = jobs.counts(conn).failed
        if failed:
            results.notes.append(f"stamps: {failed} jobs failed in {home.name}")
        finished = max(job.updated_at for job in jobs.list_jobs(conn))
        # Where the CPU went (2 cores shared by the workers and the stamp service in this process).
        wall = finished - started
        cpu = {k: round((cpu_after[k] - cpu_before[k]) / wall, 2) for k in cpu_before}
        if renderer == "fast":
            results.raw.setdefault(cpu_key, []).append({"previews": previews, **cpu})
    finally:
        conn.close()
    # The home stays until the section ends: a bulk delete slows the next run's file creation (see bench.ingest).
    return len(alerts) / (finished - started), cfg.stamps.concurrency, cfg.stamps.rate_limit


def _cpu_seconds(workers: list) -> dict[str, float]:
    """CPU seconds so far of the fetch workers and of this process (which runs the stamp service)."""
    import psutil

    def used(proc: psutil.Process) -> float:
        times = proc.cpu_times()
        return times.user + times.system

    total = 0.0
    for popen in workers:
        with contextlib.suppress(psutil.Error):
            total += used(psutil.Process(popen.pid))
    return {"fetchers": total, "stamp_service": used(psutil.Process())}
