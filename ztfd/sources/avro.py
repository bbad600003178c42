"""Avro as ztfd reads it (fastavro): container files, schemaless records, parsed schemas kept for reuse.

- An Object Container File (ZTF's packets: one per Kafka message) carries its writer schema, ~10 kB of JSON that
  fastavro would parse again for every message (a fifth of the decoding time): ``read_container`` reads the
  header itself and parses each distinct schema once (codecs ``null`` and ``deflate``; anything else goes to
  ``fastavro.reader``).
- A schemaless record (Fink, Confluent wire format, ``avro`` topics) is decoded with a schema known otherwise;
  bytes left over after the record mean the schema is not the writer's, and the message is rejected.

Also the ``avro`` format: schemaless records with the topic's schema named by ``[kafka.schemas]``.
"""

from __future__ import annotations

import io
import json
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ztfd.sources import Alert, InvalidMessageError, register
from ztfd.sources.packets import alert_of

CONTAINER_MAGIC = b"Obj\x01"
SYNC_SIZE = 16
MAX_CACHED_SCHEMAS = 64  # distinct schemas kept parsed (a stream has a handful of versions)
MAX_RECORDS = 16  # records one container message may hold (ZTF's hold one)


class SchemaCache:
    """Parsed schemas by the text (or key) they came from, the least recently used dropped past a bound."""

    def __init__(self, size: int = MAX_CACHED_SCHEMAS) -> None:
        self.size = size
        self._parsed: OrderedDict[bytes, Any] = OrderedDict()

    def get(self, text: bytes) -> Any:
        """The parsed schema of ``text`` (JSON); ``ValueError`` with a reason if it is not an Avro schema."""
        parsed = self._parsed.get(text)
        if parsed is None:
            parsed = parse_schema(text)
            self._parsed[text] = parsed
            if len(self._parsed) > self.size:
                self._parsed.popitem(last=False)
        else:
            self._parsed.move_to_end(text)
        return parsed


def parse_schema(text: bytes | str) -> Any:
    """An Avro schema from its JSON text, parsed by fastavro; ``ValueError`` with a one-line reason."""
    import fastavro

    try:
        document = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON ({exc.__class__.__name__})") from None
    try:
        return fastavro.parse_schema(document)
    except Exception as exc:  # fastavro raises several kinds for a bad schema
        raise ValueError(f"{exc.__class__.__name__}: {str(exc)[:120]}") from None


def schema_from_file(path: str | Path) -> Any:
    """The parsed schema in an ``.avsc`` file (``OSError``, or ``ValueError`` when it is not a schema)."""
    return parse_schema(Path(path).read_bytes())


def read_long(data: bytes, pos: int) -> tuple[int, int]:
    """One Avro ``long`` (zig-zag varint) at ``pos``: its value and the position after it."""
    shift = result = 0
    while True:
        if pos >= len(data):
            raise InvalidMessageError("truncated Avro header")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7
        if shift > 63:
            raise InvalidMessageError("bad Avro long in the header")


def _read_bytes(data: bytes, pos: int) -> tuple[bytes, int]:
    size, pos = read_long(data, pos)
    if size < 0 or pos + size > len(data):
        raise InvalidMessageError("truncated Avro header")
    return data[pos:pos + size], pos + size


def _read_metadata(data: bytes, pos: int) -> tuple[dict[str, bytes], int]:
    """The header's metadata map (``avro.schema``, ``avro.codec``)."""
    metadata: dict[str, bytes] = {}
    while True:
        count, pos = read_long(data, pos)
        if count == 0:
            return metadata, pos
        if count < 0:
            count = -count
            _size, pos = read_long(data, pos)
        for _ in range(count):
            key, pos = _read_bytes(data, pos)
            value, pos = _read_bytes(data, pos)
            metadata[key.decode("utf-8", "replace")] = value


class ContainerReader:
    """Reads Object Container Files, one parsed schema per distinct writer schema."""

    def __init__(self) -> None:
        self.schemas = SchemaCache()

    def read(self, value: bytes) -> list[dict[str, Any]]:
        """Every record of one container file; ``InvalidMessageError`` with a reason if it is not one."""
        if not value.startswith(CONTAINER_MAGIC):
            raise InvalidMessageError(f"not an Avro container file (starts with {value[:8]!r})")
        metadata, pos = _read_metadata(value, len(CONTAINER_MAGIC))
        sync = value[pos:pos + SYNC_SIZE]
        pos += SYNC_SIZE
        if len(sync) != SYNC_SIZE or "avro.schema" not in metadata:
            raise InvalidMessageError("Avro container file without a schema or sync marker")
        codec = metadata.get("avro.codec", b"null").decode("ascii", "replace")
        if codec not in ("null", "deflate"):
            return _read_with_fastavro(value)
        try:
            schema = self.schemas.get(metadata["avro.schema"])
        except ValueError as exc:
            raise InvalidMessageError(f"the container's writer schema is not an Avro schema: {exc}") from None
        records: list[dict[str, Any]] = []
        while pos < len(value):
            count, pos = read_long(value, pos)
            size, pos = read_long(value, pos)
            if count < 0 or size < 0 or pos + size + SYNC_SIZE > len(value):
                raise InvalidMessageError("truncated Avro container block")
            block = value[pos:pos + size]
            pos += size
            if value[pos:pos + SYNC_SIZE] != sync:
                raise InvalidMessageError("Avro container block does not end with the file's sync marker")
            pos += SYNC_SIZE
            if codec == "deflate":
                try:
                    block = zlib.decompress(block, -15)
                except zlib.error as exc:
                    raise InvalidMessageError(f"Avro container block does not inflate: {exc}") from None
            if len(records) + count > MAX_RECORDS:
                raise InvalidMessageError(f"Avro container file holds more than {MAX_RECORDS} records")
            records.extend(read_records(block, schema, count))
        return records


def _read_with_fastavro(value: bytes) -> list[dict[str, Any]]:
    import fastavro

    try:
        reader = fastavro.reader(io.BytesIO(value))
        records = []
        for record in reader:
            records.append(record)
            if len(records) > MAX_RECORDS:
                raise InvalidMessageError(f"Avro container file holds more than {MAX_RECORDS} records")
        return records
    except InvalidMessageError:
        raise
    except Exception as exc:
        raise InvalidMessageError(f"not a readable Avro container file: {_described(exc)}") from None


def read_records(data: bytes, schema: Any, count: int) -> list[dict[str, Any]]:
    """``count`` records encoded one after the other (a container block), all of ``data``."""
    import fastavro

    stream = io.BytesIO(data)
    try:
        records = [fastavro.schemaless_reader(stream, schema, None) for _ in range(count)]
    except Exception as exc:  # EOFError, ValueError, UnicodeDecodeError, IndexError…: the bytes do not fit
        raise InvalidMessageError(f"Avro record does not decode: {_described(exc)}") from None
    left = len(data) - stream.tell()
    if left:
        raise InvalidMessageError(f"{left} bytes left after the Avro record (not this schema's)")
    return records


def read_schemaless(data: bytes, schema: Any) -> dict[str, Any]:
    """One schemaless record that must fill ``data`` exactly."""
    if not data:
        raise InvalidMessageError("empty Avro record")
    (record,) = read_records(data, schema, 1)
    if not isinstance(record, dict):
        raise InvalidMessageError("the Avro schema is not a record")
    return record


def _described(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


@register("avro")
class SchemalessAvro:
    """``avro``: each message is one schemaless record of the schema ``[kafka.schemas]`` names for its topic."""

    format = "avro"

    def __init__(self, schema_file: str | None = None, **_settings: Any) -> None:
        if not schema_file:
            raise ValueError("format avro needs the topic's schema (kafka.schemas)")
        self.schema = schema_from_file(schema_file)

    def decode(self, value: bytes | None, key: bytes | None) -> Alert:
        return alert_of(read_schemaless(value or b"", self.schema), value or b"")
