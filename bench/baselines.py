"""Baseline loops run as child processes (``python -m bench.baselines …``), printing one JSON line of timings.

These are what a user would otherwise write: a confluent-kafka loop that reads and parses each message, and the
same loop writing one JSON file per message (temporary file + rename) with no store at all. Both read in
batches of 1000 (``consume``), which is faster than the per-message ``poll`` of the lasair package's consumer:
the baseline is made as strong as a simple loop can be.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def kafka_loop(bootstrap: str, topic: str, group: str, count: int, out_dir: Path | None) -> dict[str, float]:
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
                         "enable.auto.commit": False, "session.timeout.ms": 6000, "heartbeat.interval.ms": 500})
    consumer.subscribe([topic])
    seen, first = 0, None
    folders: set[Path] = set()
    while seen < count:
        messages = consumer.consume(1000, 1.0)
        if messages and first is None:
            first = time.time()
        for msg in messages:
            if msg.error() is not None:
                continue
            try:
                document = json.loads(msg.value())
            except ValueError:
                seen += 1
                continue
            seen += 1
            if out_dir is None or not isinstance(document, dict):
                continue
            folder = out_dir / str(msg.topic())
            if folder not in folders:
                folder.mkdir(parents=True, exist_ok=True)
                folders.add(folder)
            name = f"{document.get('objectId', 'unknown')}_p{msg.partition()}-o{msg.offset()}.json"
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
            with os.fdopen(fd, "wb") as handle:
                handle.write(json.dumps(document).encode())
            os.replace(tmp, folder / name)
    last = time.time()
    consumer.close()
    return {"first": first or last, "last": last, "count": seen}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["bare", "naive"])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = kafka_loop(args.bootstrap, args.topic, args.group, args.count, args.out if args.kind == "naive" else None)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
