"""An alert file read back for the dataset: the Kafka value as received, the decoded message and its Avro schema.

The store names each alert's file (``alerts.path``). A JSON alert file holds the message byte for byte under
``message`` (``ztfd.sources.alert_files``); an Avro alert keeps the value as received in ``.avro`` beside a JSON
view. The Avro value is decoded with its writer schema when it can be found here (an Object Container File
carries it; ``confluent-avro`` values name a schema id the store keeps; ``avro`` topics have a configured
schema file); otherwise (``fink``, whose schema travels in the Kafka key) the JSON view is the message.
"""

from __future__ import annotations

import io
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
import orjson
import ujson

CONTAINER_MAGIC = b"Obj\x01"
CONFLUENT_HEADER = struct.Struct(">bI")
METADATA_MARK = b', "ztfd": '
CUTOUT_PREFIX = "cutout"


@dataclass(frozen=True)
class Message:
    raw: bytes  # the Kafka value as received
    record: dict[str, Any] | None  # the decoded message (cutouts left out); None if it is not a JSON/Avro object
    schema: dict[str, Any] | None = None  # the Avro writer schema (parsed JSON), when known


class SchemaSource:
    """Where Avro writer schemas come from for one home: confluent ids (the store), ``avro`` topics' files."""

    def __init__(self, registry_schema: Any = None, topic_schema: Any = None) -> None:
        self.registry_schema = registry_schema  # callable(schema_id) -> schema text or None
        self.topic_schema = topic_schema  # callable(topic) -> schema file path or None
        self._parsed: dict[Any, tuple[dict[str, Any], Any]] = {}

    def by_id(self, schema_id: int) -> tuple[dict[str, Any], Any] | None:
        if self.registry_schema is None:
            return None
        return self._parse(("id", schema_id), lambda: self.registry_schema(schema_id))

    def of_topic(self, topic: str) -> tuple[dict[str, Any], Any] | None:
        if self.topic_schema is None:
            return None
        return self._parse(("topic", topic), lambda: _read_text(self.topic_schema(topic)))

    def _parse(self, key: Any, text: Any) -> tuple[dict[str, Any], Any] | None:
        if key not in self._parsed:
            found = text()
            if found is None:
                return None
            plain = json.loads(found)
            self._parsed[key] = (plain, fastavro.parse_schema(plain))
        return self._parsed[key]


def _read_text(path: str | None) -> str | None:
    return None if path is None else Path(path).read_text()


def read(home: Path, path: str, topic: str, schemas: SchemaSource) -> Message:
    """The message of the alert file ``path`` (relative to ``home``)."""
    with open(f"{home}/{path}", "rb") as handle:  # a plain string path: pathlib's parsing cost a tenth of the pass
        data = handle.read()
    if path.endswith(".json"):
        raw = _embedded_message(data)
        return Message(raw, _object(_parse_json(raw)))
    view = home / (path.rsplit(".", 1)[0] + ".json")
    decoded = _decode_avro(data, topic, schemas)
    if decoded is not None:
        record, schema = decoded
        return Message(data, _without_cutouts(record), schema)
    record = _parse_json(_embedded_message(view.read_bytes())) if view.exists() else None
    return Message(data, _without_cutouts(_object(record)))


def _parse_json(raw: bytes) -> Any:
    """orjson (several times faster), else ujson: orjson refuses the bare NaN Lasair-LSST sends, which ujson reads
    as NaN, twice as fast as json (the writer's main cost with full Rubin alerts). json has the last word (an
    integer beyond 64 bits, which ujson refuses)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        return ujson.loads(raw)
    except (ValueError, OverflowError):
        return json.loads(raw)


def _embedded_message(data: bytes) -> bytes:
    """The bytes under ``message`` in an alert file ``{"message": <value>, "ztfd": {...}}``, exactly as written."""
    start = data.index(b":") + 1
    end = data.rindex(METADATA_MARK)
    return data[start:end].strip()


def _object(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _decode_avro(data: bytes, topic: str, schemas: SchemaSource) -> tuple[dict[str, Any], dict[str, Any]] | None:
    if data.startswith(CONTAINER_MAGIC):
        reader = fastavro.reader(io.BytesIO(data))
        return next(iter(reader)), reader.writer_schema
    if data[:1] == b"\x00" and len(data) > CONFLUENT_HEADER.size:
        _magic, schema_id = CONFLUENT_HEADER.unpack_from(data)
        found = schemas.by_id(schema_id)
        if found is not None:
            return fastavro.schemaless_reader(io.BytesIO(data[CONFLUENT_HEADER.size:]), found[1], None), found[0]
    found = schemas.of_topic(topic)
    if found is not None:
        return fastavro.schemaless_reader(io.BytesIO(data), found[1], None), found[0]
    return None


def _without_cutouts(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The stamps are files of their own (``stamps`` dataset): their bytes are not columns."""
    if record is None:
        return None
    return {key: value for key, value in record.items() if not key.startswith(CUTOUT_PREFIX)}


# Where a message says where it is, first found wins: a packet's detection, then Lasair's columns.
_NESTED = ("candidate", "diaSource", "diaObject", "alert")
_PAIRS = (("ra", "dec"), ("ramean", "decmean"), ("ra", "decl"))


def position(record: dict[str, Any] | None, depth: int = 0) -> tuple[float | None, float | None]:
    """(ra, dec) in degrees from the message, or (None, None)."""
    if not isinstance(record, dict) or depth > 2:
        return None, None
    for name in _NESTED[:2]:
        found = position(record.get(name), depth + 1) if isinstance(record.get(name), dict) else (None, None)
        if found[0] is not None:
            return found
    for ra_key, dec_key in _PAIRS:
        ra, dec = record.get(ra_key), record.get(dec_key)
        if _finite(ra) and _finite(dec) and -90 <= dec <= 90:
            return float(ra) % 360.0, float(dec)
    for name in _NESTED[2:]:
        nested = record.get(name)
        if isinstance(nested, dict):
            found = position(nested, depth + 1)
            if found[0] is not None:
                return found
    return None, None


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
