"""``ztf-avro``: ZTF's own alert packets, one Avro Object Container File per Kafka message, writer schema inside.

ZTF's brokers (UW's ``ztf_YYYYMMDD_programid1`` topics, Lasair's mirror) and ALeRCE's classifier streams write
messages so. The message's bytes are kept as received (``<objectId>_p<partition>-o<offset>.avro``) beside a JSON
view of the packet without its cutouts, and the cutouts become the alert's stamps (``ztfd.sources.packets``).
"""

from __future__ import annotations

from typing import Any

from ztfd.sources import Alert, InvalidMessageError, register
from ztfd.sources.avro import ContainerReader
from ztfd.sources.packets import alert_of


@register("ztf-avro")
class ZtfAvro:
    format = "ztf-avro"
    pooled_by_default = True  # kafka.decode_workers = "auto" spreads its decoding over the cores

    def __init__(self, **_settings: Any) -> None:
        self.reader = ContainerReader()

    def decode(self, value: bytes | None, key: bytes | None) -> Alert:
        if not value:
            raise InvalidMessageError("empty message")
        records = self.reader.read(value)
        if len(records) != 1:
            raise InvalidMessageError(f"the container holds {len(records)} records; ztf-avro expects one alert")
        return alert_of(records[0], value)
