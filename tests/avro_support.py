"""Rubin and Fink messages for the Avro tests, from real data: Rubin's v11.0 schema (tests/fixtures/rubin) carrying
the real Rubin cutouts of the Fink sample, and the Fink sample's own records and schema."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import fastavro

from ztfd.embedded.samples import samples_dir

RUBIN_FIXTURE = Path(__file__).parent / "fixtures" / "rubin" / "alert_packet_v11_0_fakeAlert.avro"
FINK_LSST_SAMPLE = samples_dir() / "lsst" / "fink_lsst_part-2-918301_compact.avro"
RUBIN_SCHEMA_ID = 1100  # Rubin's rule: major * 100 + minor
CUTOUT_FIELDS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")


@functools.cache
def _read(path: Path) -> tuple[Any, tuple[dict[str, Any], ...]]:
    with path.open("rb") as handle:
        reader = fastavro.reader(handle)
        records = tuple(reader)
        return fastavro.parse_schema(reader.writer_schema), records


def rubin_schema() -> Any:
    return _read(RUBIN_FIXTURE)[0]


def fink_lsst() -> tuple[Any, tuple[dict[str, Any], ...]]:
    """Fink's LSST writer schema and its 7 real alerts (2 solar-system sources without a diaObjectId)."""
    return _read(FINK_LSST_SAMPLE)


def rubin_alerts(count: int) -> list[dict[str, Any]]:
    """``count`` Rubin v11.0 alerts: the fixture's record with distinct ids (diaSourceId, diaObjectId) and each the
    three real cutouts of one Fink sample alert (cycled)."""
    _, (fake,) = _read(RUBIN_FIXTURE)
    _, real = fink_lsst()
    alerts = []
    for index in range(count):
        source_id = 9_100_000_000_000_000_000 + index  # above 2**62: 64-bit ids must stay exact
        alert = dict(fake)
        alert["diaSourceId"] = source_id
        alert["diaSource"] = {**fake["diaSource"], "diaSourceId": source_id}
        alert["diaObject"] = {**fake["diaObject"], "diaObjectId": 8_100_000_000_000_000_000 + index}
        for name in CUTOUT_FIELDS:
            alert[name] = real[index % len(real)][name]
        alerts.append(alert)
    return alerts


def produce_keyed(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes | None]]) -> None:
    """Produce (value, key) messages (Fink puts the schema in the key)."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": False})
    for value, key in messages:
        producer.produce(topic, value=value, key=key)
        producer.poll(0)
    if producer.flush(60):
        raise RuntimeError(f"messages to {topic} were not delivered")
