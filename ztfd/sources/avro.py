"""Avro as ztfd reads it (fastavro): container files, schemaless records, parsed schemas kept for reuse, all within
the bounds of ``ztfd.sources.avro_bounds``.

- An Object Container File (ZTF's packets: one per Kafka message) carries its writer schema, ~20 kB of JSON that
  fastavro would parse again for every message (a fifth of the decoding time): ``ContainerReader`` reads the
  header itself and parses and judges each distinct schema once (``SchemaCache``). Codecs ``null`` and ``deflate``
  (inflated at most ``MAX_INFLATED_BYTES`` per message); any other is refused.
- A schemaless record (Fink, Confluent wire format, ``avro`` topics) is decoded with a schema known otherwise;
  bytes left over after the record mean the schema is not the writer's, and the message is rejected.

Also the ``avro`` format: schemaless records with the topic's schema named by ``[kafka.schemas]``.
"""

from __future__ import annotations

import hashlib
import io
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztfd.sources import Alert, InvalidMessageError, register
from ztfd.sources.avro_bounds import Bounds, check_record_size, check_schema_text, schema_bounds
from ztfd.sources.packets import alert_of

CONTAINER_MAGIC = b"Obj\x01"
SYNC_SIZE = 16
MAX_CACHED_SCHEMAS = 64  # distinct schemas kept parsed (a stream has a handful of versions), refusals included
MAX_RECORDS = 16  # records one container message may hold (ZTF's hold one)
MAX_INFLATED_BYTES = 32 * 1024 * 1024  # what a container's deflate blocks may inflate to, in all


@dataclass(frozen=True)
class Schema:
    """A writer schema parsed by fastavro, and what its records may cost (``avro_bounds``)."""

    parsed: Any
    bounds: Bounds


class SchemaCache:
    """Parsed schemas by a digest of the text (or key) they came from, the least recently used dropped past a
    bound. A refused text is remembered too: a stream repeating a hostile schema costs one parse. Shared by
    threads (the stamp fetcher parses packets off its event loop)."""

    def __init__(self, size: int = MAX_CACHED_SCHEMAS) -> None:
        self.size = size
        self._parsed: OrderedDict[bytes, Schema | str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, text: bytes) -> Schema:
        """The parsed schema of ``text`` (JSON); ``ValueError`` with a reason if it is not an Avro schema ztfd
        reads."""
        digest = hashlib.blake2b(text, digest_size=20).digest()
        with self._lock:
            found = self._parsed.get(digest)
            if found is not None:
                self._parsed.move_to_end(digest)
        if found is None:
            try:
                found = parse_schema(text)
            except ValueError as exc:
                found = str(exc)
            with self._lock:
                self._parsed[digest] = found
                if len(self._parsed) > self.size:
                    self._parsed.popitem(last=False)
        if isinstance(found, str):
            raise ValueError(found)
        return found


def parse_schema(text: bytes | str) -> Schema:
    """An Avro schema from its JSON text, judged (``avro_bounds``) and parsed by fastavro; ``ValueError`` with a
    one-line reason."""
    import fastavro

    document = check_schema_text(text)
    try:
        parsed = fastavro.parse_schema(document)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except Exception as exc:  # fastavro raises several kinds for a bad schema
        raise ValueError(f"{exc.__class__.__name__}: {str(exc)[:120]}") from None
    return Schema(parsed, schema_bounds(parsed))


def schema_from_file(path: str | Path) -> Schema:
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
        """Every record of one container file; ``InvalidMessageError`` with a reason if it is not one ztfd reads."""
        if not value.startswith(CONTAINER_MAGIC):
            raise InvalidMessageError(f"not an Avro container file (starts with {value[:8]!r})")
        metadata, pos = _read_metadata(value, len(CONTAINER_MAGIC))
        sync = value[pos:pos + SYNC_SIZE]
        pos += SYNC_SIZE
        if len(sync) != SYNC_SIZE or "avro.schema" not in metadata:
            raise InvalidMessageError("Avro container file without a schema or sync marker")
        codec = metadata.get("avro.codec", b"null").decode("ascii", "replace")
        if codec not in ("null", "deflate"):
            raise InvalidMessageError(f"Avro container file of codec {codec[:40]!r} (ztfd reads null and deflate)")
        try:
            schema = self.schemas.get(metadata["avro.schema"])
        except ValueError as exc:
            raise InvalidMessageError(f"the container's writer schema is refused: {exc}") from None
        records: list[dict[str, Any]] = []
        inflate_left = MAX_INFLATED_BYTES
        while pos < len(value):
            count, pos = read_long(value, pos)
            size, pos = read_long(value, pos)
            if count < 0 or size < 0 or pos + size + SYNC_SIZE > len(value):
                raise InvalidMessageError("truncated Avro container block")
            if len(records) + count > MAX_RECORDS:
                raise InvalidMessageError(f"Avro container file holds more than {MAX_RECORDS} records")
            block = value[pos:pos + size]
            pos += size
            if value[pos:pos + SYNC_SIZE] != sync:
                raise InvalidMessageError("Avro container block does not end with the file's sync marker")
            pos += SYNC_SIZE
            if codec == "deflate":
                block = _inflate(block, inflate_left)
                inflate_left -= len(block)
            records.extend(read_records(block, schema, count))
        return records


def _inflate(block: bytes, limit: int) -> bytes:
    """A raw deflate block, inflated only up to ``limit`` bytes: a bomb is refused without being inflated."""
    inflater = zlib.decompressobj(-15)
    try:
        inflated = inflater.decompress(block, limit + 1)
    except zlib.error as exc:
        raise InvalidMessageError(f"Avro container block does not inflate: {exc}") from None
    if len(inflated) > limit:
        raise InvalidMessageError(f"Avro container blocks inflate past {MAX_INFLATED_BYTES} bytes")
    if not inflater.eof:
        raise InvalidMessageError("Avro container block does not inflate: incomplete or truncated stream")
    return inflated


def read_records(data: bytes, schema: Schema, count: int) -> list[dict[str, Any]]:
    """``count`` records encoded one after the other (a container block), all of ``data``, once their size is
    within the schema's bounds."""
    import fastavro

    try:
        check_record_size(len(data), schema.bounds)
    except ValueError as exc:
        raise InvalidMessageError(f"Avro record refused: {exc}") from None
    stream = io.BytesIO(data)
    try:
        records = [fastavro.schemaless_reader(stream, schema.parsed, None) for _ in range(count)]
    except Exception as exc:  # EOFError, ValueError, UnicodeDecodeError, IndexError…: the bytes do not fit
        raise InvalidMessageError(f"Avro record does not decode: {_described(exc)}") from None
    left = len(data) - stream.tell()
    if left:
        raise InvalidMessageError(f"{left} bytes left after the Avro record (not this schema's)")
    return records


def read_schemaless(data: bytes, schema: Schema) -> dict[str, Any]:
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
    pooled_by_default = True  # kafka.decode_workers = "auto" spreads its decoding over the cores

    def __init__(self, schema_file: str | None = None, **_settings: Any) -> None:
        if not schema_file:
            raise ValueError("format avro needs the topic's schema (kafka.schemas)")
        self.schema = schema_from_file(schema_file)

    def decode(self, value: bytes | None, key: bytes | None) -> Alert:
        return alert_of(read_schemaless(value or b"", self.schema), value or b"")
