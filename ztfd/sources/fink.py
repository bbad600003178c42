"""``fink``: Fink's livestream and Data Transfer messages, a schemaless Avro record whose schema (JSON) is the
Kafka key (Fink ≥ 2023; older keys named a schema version, which ztfd does not resolve).

Both of Fink's streams: ``fink_<filter>_ztf`` (ZTF packets with Fink's additions, gzipped cutouts) and
``fink_<filter>_lsst`` (Rubin alerts, raw FITS cutouts); the record's shape says which (``ztfd.sources.packets``).
A key is parsed and judged once and kept (``SchemaCache``, by digest): every message of a topic carries the same
one. A key whose schema is out of bounds (``ztfd.sources.avro_bounds``) rejects the message.
"""

from __future__ import annotations

from typing import Any

from ztfd.sources import Alert, InvalidMessageError, register
from ztfd.sources.avro import SchemaCache, read_schemaless
from ztfd.sources.packets import alert_of


@register("fink")
class Fink:
    format = "fink"
    pooled_by_default = True  # kafka.decode_workers = "auto" spreads its decoding over the cores

    def __init__(self, **_settings: Any) -> None:
        self.schemas = SchemaCache()

    def decode(self, value: bytes | None, key: bytes | None) -> Alert:
        if not key:
            raise InvalidMessageError("no Kafka key: a Fink message carries its Avro schema there")
        try:
            schema = self.schemas.get(key)
        except ValueError as exc:
            raise InvalidMessageError(
                f"the Kafka key is not an Avro schema ztfd reads (Fink puts it there): {exc}") from None
        return alert_of(read_schemaless(value or b"", schema), value or b"")
