"""Archive: the Parquet dataset (issue 22) against what a user has without it.

- the dataset writer's rate against ``ztfd consume``'s on the same messages (Lasair-ZTF rows; Lasair-LSST full
  alerts): the writer must keep up (>= 1.0x);
- ``ztfd object`` and ``ztfd cone`` on a 2-million-alert dataset (made directly in the writer's schema: consuming
  2 million messages would take the bench an hour), warm, against a search of the alert files for the object
  (the only way without the dataset; measured on a smaller pile of files and scaled linearly to 2 million, since
  2 million files would not fit this disk);
- dataset bytes per alert against the alert files'.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bench.common import Results, Row, Settings, median, ratio
from bench.ingest import consume_rate
from ztfd import archive, config, store
from ztfd.archive import alerts as alerts_dataset
from ztfd.archive import columns, sky
from ztfd.archive.layout import Layout, alerts_file_name
from ztfd.archive.role import Archiver
from ztfd.embedded.demo import EmbeddedServices

BIG = 2_000_000
NIGHTS = 60
ALERTS_PER_OBJECT = 10
GOAL_SECONDS = 0.5


def run(settings: Settings, results: Results) -> None:
    count = settings.size(20_000, 2_000)
    work = settings.workdir / "archive"
    with EmbeddedServices(work / "services", s3=False, stamps=False) as services:
        from ztfd.embedded import lsst_samples
        from ztfd.embedded.samples import message_stream

        streams = {
            "Lasair-ZTF rows": [json.dumps(m).encode() for m in message_stream(count)],
            "Lasair-LSST full alerts": lsst_samples.message_stream(count // 4, ("full",)),
        }
        for index, (name, messages) in enumerate(streams.items()):
            topic = f"bench-archive-{index}"
            services.kafka.create_topic(topic)
            services.kafka.produce(topic, messages)
            writer_vs_consume(settings, services.kafka.bootstrap, topic, len(messages), work / f"home-{index}",
                              name, results)
    big = work / "big"
    size = settings.size(BIG, 200_000)
    made = synthesize(big, size)
    questions(settings, big, size, made, results)
    files_baseline(settings, work / "files", settings.size(100_000, 10_000), size, made, results)


def writer_vs_consume(settings: Settings, bootstrap: str, topic: str, count: int, home: Path, name: str,
                      results: Results) -> None:
    """Alerts/s of ``ztfd consume`` into a fresh home, then of one archiver pass over what it stored, ``runs`` times
    in turn (medians): on a shared machine the load drifts, and both then meet the same drift."""
    consume_rates, writer_rates = [], []
    for run_index in range(settings.runs):
        run_home = home.with_name(f"{home.name}-{run_index}")
        consume_rates.append(consume_rate(bootstrap, count, run_home, results, topic=topic))
        cfg = config.load(run_home / "ztfd.toml")
        conn = store.connect(cfg.db_path)
        try:
            started = time.perf_counter()
            written = Archiver(cfg, conn).one_pass()
            writer_rates.append(written / (time.perf_counter() - started))
        finally:
            conn.close()
        print(f"  run {run_index + 1}: consume {consume_rates[-1]:,.0f}/s, writer {writer_rates[-1]:,.0f}/s",
              flush=True)
    consume, writer = median(consume_rates), median(writer_rates)
    files = [p for p in (run_home / "data").rglob("*") if p.is_file()]
    file_bytes = sum(p.stat().st_size for p in files) / count
    dataset_bytes = sum(p.stat().st_size for p in (run_home / "archive" / "alerts").rglob("*.parquet")) / count
    results.add(
        Row("archive", f"dataset writer, {name}", writer, "alerts/s", f"ztfd consume {consume:,.0f}/s"),
        Row("archive", f"writer vs consume, {name}", ratio(writer, consume), "x",
            f"{count:,} msgs, median of {settings.runs}", ">= 1.0x", ratio(writer, consume) >= 1.0),
        Row("archive", f"bytes per alert, {name}", dataset_bytes, "B",
            f"alert files {file_bytes:,.0f} B ({ratio(dataset_bytes, file_bytes):.2f}x)", "report"),
    )
    results.notes.append(f"archive: bytes per alert of {name}: the stream repeats a few real alerts (with a "
                         "sequence number), which zstd compresses away; real streams of distinct alerts cost more")


def synthesize(home: Path, size: int) -> dict[str, object]:
    """A dataset of ``size`` Lasair-ZTF-like alerts written directly in the writer's layout, types and file sizes
    (one file per night and block of offsets), and a stamps dataset (3 stamps for every tenth alert)."""
    layout = Layout(home)
    rng = np.random.default_rng(22)
    objects = size // ALERTS_PER_OBJECT
    object_index = rng.integers(0, objects, size)
    object_ids = pc.binary_join_element_wise("ZTF", pa.array(np.char.zfill(object_index.astype(str), 9)), "")
    ra_obj = rng.uniform(0, 360, objects)
    dec_obj = np.degrees(np.arcsin(rng.uniform(-1, 1, objects)))
    ra = (ra_obj[object_index] + rng.normal(0, 1e-4, size)) % 360
    dec = np.clip(dec_obj[object_index] + rng.normal(0, 1e-4, size), -90, 90)
    offsets = np.arange(size, dtype=np.int64)
    nights = offsets * NIGHTS // size
    received = 1_700_000_000_000_000 + offsets * 100_000
    rmag = rng.uniform(15, 21, size)
    detection = pa.array((1_000_000_000 + offsets).astype(str))
    message = pc.binary_join_element_wise('{"objectId": "', object_ids, '", "rmag": ',
                                          pa.array(rmag.round(4).astype(str)), "}", "")
    table = pa.table({
        "object_id": object_ids, "survey": pa.array(["ztf"] * size), "partition": pa.array(np.zeros(size, np.int32)),
        "generation": pa.array(np.zeros(size, np.int32)), "offset": pa.array(offsets),
        "detection_id": detection, "observed_at": pa.array(received - 600_000_000).cast(columns.UTC_TIME),
        "received_at": pa.array(received).cast(columns.UTC_TIME), "ra": pa.array(ra), "dec": pa.array(dec),
        "_healpix_29": pa.array(sky.healpix_29(ra, dec)),
        "file": pc.binary_join_element_wise("data/x/", object_ids, ".json", ""),
        "message": message.cast(pa.binary()), "objectId": object_ids, "rmag": pa.array(rmag),
    })
    schema = pa.schema([columns.field(f.name, f.type, columns.ALERT_COLUMNS.get(f.name, ("", f.name))[1])
                        for f in table.schema])
    layout.write_alerts_schema(schema)
    table = table.cast(schema)
    for night in range(NIGHTS):
        date = night_date(night)
        rows = table.filter(pc.equal(pa.array(nights), night))
        first, last = int(rows["offset"][0].as_py()), int(rows["offset"][-1].as_py())
        for start in range(alerts_dataset.chunk_start(first), last + 1, alerts_dataset.CHUNK_OFFSETS):
            part = rows.filter(pc.and_(pc.greater_equal(rows["offset"], start),
                                       pc.less(rows["offset"], start + alerts_dataset.CHUNK_OFFSETS)))
            if part.num_rows:
                name = alerts_file_name(0, 0, part["offset"][0].as_py(), part["offset"][-1].as_py())
                alerts_dataset.write_parquet(home, layout.alerts_folder(date, "bench") / name, part)
    picks = offsets[::10]
    kinds = ("science", "template", "difference")
    stamp_rows = {
        "object_id": pa.array(np.repeat(object_ids.take(pa.array(picks)).to_numpy(zero_copy_only=False), 3)),
        "detection_id": pa.array(np.repeat(detection.take(pa.array(picks)).to_numpy(zero_copy_only=False), 3)),
        "kind": pa.array(list(kinds) * len(picks)),
    }
    stamp_rows["path"] = pc.binary_join_element_wise("images/x/", stamp_rows["object_id"], "/",
                                                     stamp_rows["detection_id"], "_", stamp_rows["kind"], ".fits.gz",
                                                     "")
    stamp_rows["bytes"] = pa.array(np.full(len(picks) * 3, 20_000, np.int64))
    stamp_rows["md5"] = pa.array(["0" * 32] * (len(picks) * 3))
    stamp_rows["written_at"] = pa.array(np.full(len(picks) * 3, 1_700_000_000_000_000)).cast(columns.UTC_TIME)
    stamps = pa.table(stamp_rows).cast(columns.fixed_schema(columns.STAMP_COLUMNS))
    stamp_nights = np.repeat(nights[::10], 3)
    for night in range(NIGHTS):  # one stamps file per night, as the writer makes them
        alerts_dataset.write_parquet(home, layout.stamps_file(night_date(night)),
                                     stamps.filter(pa.array(stamp_nights == night)))
    middle = size // 2
    return {"object": str(object_ids[middle].as_py()), "ra": float(ra[middle]), "dec": float(dec[middle])}


def night_date(night: int) -> str:
    return f"2026-{1 + night // 28:02d}-{1 + night % 28:02d}"


def questions(settings: Settings, home: Path, size: int, made: dict[str, object], results: Results) -> None:
    dataset = archive.open(home)
    object_id = str(made["object"])
    timings: dict[str, list[float]] = {"object": [], "cone": []}
    found = {}
    for _ in range(settings.runs + 1):  # the first run warms the page cache and the footers: not counted
        for name, ask in (("object", lambda: dataset.object_rows(object_id)),
                          ("cone", lambda: dataset.cone(float(made["ra"]), float(made["dec"]), 10.0))):
            started = time.perf_counter()
            found[name] = ask().num_rows
            timings[name].append(time.perf_counter() - started)
    obj, cone = median(timings["object"][1:]), median(timings["cone"][1:])
    results.raw["archive"] = {"alerts": size, "object_s": timings["object"], "cone_s": timings["cone"]}
    results.add(
        Row("archive", f"ztfd object at {size:,} alerts, warm", obj, "s", f"{found['object']} alerts found",
            f"<= {GOAL_SECONDS} s", obj <= GOAL_SECONDS),
        Row("archive", f"ztfd cone 10\" at {size:,} alerts, warm", cone, "s", f"{found['cone']} alerts found",
            f"<= {GOAL_SECONDS} s", cone <= GOAL_SECONDS),
    )
    results.raw["archive"]["object_found"] = found["object"]


def files_baseline(settings: Settings, folder: Path, pile: int, size: int, made: dict[str, object],
                   results: Results) -> None:
    """Seconds to find one object's alert files by name (``data/<night>/<topic>/<objectId>_*``) in a pile of
    ``pile`` files, warm, scaled to ``size``."""
    object_id = str(made["object"])
    per_night = pile // NIGHTS
    for night in range(NIGHTS):
        day = folder / "data" / f"2026-01-{1 + night % 28:02d}-{night}" / "bench"
        day.mkdir(parents=True, exist_ok=True)
        for index in range(per_night):
            name = object_id if index == 0 and night < ALERTS_PER_OBJECT else f"ZTF{night:03d}{index:06d}"
            (day / f"{name}_p0-o{night * per_night + index}.json").write_bytes(b"{}")
    timings = []
    for _ in range(settings.runs + 1):
        started = time.perf_counter()
        hits = [entry.path for night in os.scandir(folder / "data") for topic in os.scandir(night.path)
                for entry in os.scandir(topic.path) if entry.name.startswith(f"{object_id}_")]
        timings.append(time.perf_counter() - started)
    scaled = median(timings[1:]) * size / pile
    obj = median(results.raw["archive"]["object_s"][1:])
    results.add(Row("archive", f"file search for one object, scaled to {size:,}", scaled, "s",
                    f"{median(timings[1:]):.3f} s over {pile:,} files, {len(hits)} found; ztfd object is "
                    f"{ratio(scaled, obj):.1f}x faster", "baseline"))
