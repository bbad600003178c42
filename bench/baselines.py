"""Baseline loops run as child processes (``python -m bench.baselines …``), printing one JSON line of timings.

These are what a user would otherwise write: a confluent-kafka loop that reads and parses each message, and the
same loop writing one JSON file per message (temporary file + rename) with no store at all; for Avro packets, a loop
that decodes each with fastavro and writes the packet and its three cutouts. Both read in
batches of 1000 (``consume``), which is faster than the per-message ``poll`` of the lasair package's consumer:
the baseline is made as strong as a simple loop can be.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def consume_loop(bootstrap: str, topic: str, group: str, count: int,
                 handle: Callable[[list[Any]], None]) -> dict[str, float]:
    """Read ``count`` messages of ``topic`` in batches of 1000, each batch's good ones given to ``handle`` (a
    batch, not a call a message: the loop stays as fast as one written inline); the timings."""
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
                         "enable.auto.commit": False, "session.timeout.ms": 6000, "heartbeat.interval.ms": 500})
    consumer.subscribe([topic])
    seen, first = 0, None
    while seen < count:
        messages = consumer.consume(1000, 1.0)
        if messages and first is None:
            first = time.time()
        good = [msg for msg in messages if msg.error() is None]
        seen += len(good)
        handle(good)
    last = time.time()
    consumer.close()
    return {"first": first or last, "last": last, "count": seen}


def file_writer() -> Callable[[Path, str, bytes], None]:
    """``write(folder, name, data)``: one file (temporary file + rename), its folder made the first time."""
    folders: set[Path] = set()

    def write(folder: Path, name: str, data: bytes) -> None:
        if folder not in folders:
            folder.mkdir(parents=True, exist_ok=True)
            folders.add(folder)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, folder / name)

    return write


def kafka_loop(bootstrap: str, topic: str, group: str, count: int, out_dir: Path | None) -> dict[str, float]:
    """Parse each message as JSON; with ``out_dir``, write each object's document as a file, no store."""
    write = file_writer()

    def handle(batch: list[Any]) -> None:
        for msg in batch:
            try:
                document = json.loads(msg.value())
            except ValueError:
                continue
            if out_dir is None or not isinstance(document, dict):
                continue
            name = f"{document.get('objectId', 'unknown')}_p{msg.partition()}-o{msg.offset()}.json"
            write(out_dir / str(msg.topic()), name, json.dumps(document).encode())

    return consume_loop(bootstrap, topic, group, count, handle)


def avro_loop(bootstrap: str, topic: str, group: str, count: int, out_dir: Path | None) -> dict[str, float]:
    """The naive loop for a ZTF packet stream: decode each message with fastavro, write the packet as received and
    its three cutouts (temporary file + rename each), no store. Without ``out_dir``, the bare loop: read and decode
    only."""
    import io

    import fastavro

    write = file_writer()

    def handle(batch: list[Any]) -> None:
        for msg in batch:
            record = next(iter(fastavro.reader(io.BytesIO(msg.value()))))
            if out_dir is None:
                continue
            object_id, candid = record["objectId"], record["candid"]
            write(out_dir / "data" / str(msg.topic()), f"{object_id}_p{msg.partition()}-o{msg.offset()}.avro",
                  msg.value())
            for kind in ("Science", "Template", "Difference"):
                write(out_dir / "images" / object_id, f"{candid}_{kind.lower()}.fits.gz",
                      record[f"cutout{kind}"]["stampData"])

    return consume_loop(bootstrap, topic, group, count, handle)


def alerce_client(url: str, pairs: list[tuple[str, int]]) -> dict[str, float]:
    """The alerce client's own way: ``Alerce().get_stamps(oid, candid)``, one alert after the other."""
    import warnings

    from alerce.core import Alerce

    warnings.simplefilter("ignore")  # ZTF cutouts raise a harmless VerifyWarning on every open
    client = Alerce()
    client.legacy_stamps_client.load_config_from_object({"AVRO_URL": url})
    first = time.time()
    for object_id, candid in pairs:
        stamps = client.get_stamps(object_id, candid, survey="ztf")
        if not stamps or len(stamps) != 3:
            raise RuntimeError(f"alerce client returned {stamps!r} for {object_id} {candid}")
    return {"first": first, "last": time.time(), "count": len(pairs)}


def alerce_lsst_client(url: str, pairs: list[tuple[int, int]]) -> dict[str, float]:
    """The alerce client's way for Rubin: ``multisurvey_get_stamps("lsst", diaObjectId, diaSourceId)``, one alert
    after the other (three requests each, gunzipped and opened as FITS), pointed at ``url`` as the facts describe
    (the sub-client's ``STAMP_URL``)."""
    import warnings

    from alerce.core import Alerce

    warnings.simplefilter("ignore")
    client = Alerce().multisurvey_stamps_client
    client.load_config_from_object({"STAMP_URL": url.rstrip("/") + "/stamps_api"})
    first = time.time()
    for object_id, source_id in pairs:
        stamps = client.multisurvey_get_stamps("lsst", object_id, candid=source_id)
        if not stamps or len(stamps) != 3:
            raise RuntimeError(f"alerce client returned {stamps!r} for {object_id} {source_id}")
    return {"first": first, "last": time.time(), "count": len(pairs)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["bare", "naive", "bare-avro", "naive-avro", "alerce", "alerce-lsst"])
    parser.add_argument("--bootstrap")
    parser.add_argument("--topic")
    parser.add_argument("--group")
    parser.add_argument("--count", type=int)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--url")
    parser.add_argument("--pairs", type=Path)
    args = parser.parse_args()
    if args.kind == "alerce":
        result = alerce_client(args.url, json.loads(args.pairs.read_text()))
    elif args.kind == "alerce-lsst":
        result = alerce_lsst_client(args.url, json.loads(args.pairs.read_text()))
    elif args.kind in ("naive-avro", "bare-avro"):
        result = avro_loop(args.bootstrap, args.topic, args.group, args.count,
                           args.out if args.kind == "naive-avro" else None)
    else:
        result = kafka_loop(args.bootstrap, args.topic, args.group, args.count,
                            args.out if args.kind == "naive" else None)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
