"""Avro messages built from the real sample packets, for the stamp stand-in's ``get_avro``, tests, the demo and
the bench: ZTF container files (ids rewritten when asked: the bench needs thousands of distinct alerts), Fink's
schemaless records with the schema as key, and Confluent's wire format.

Rewriting ids changes ``objectId``, ``candid`` and ``candidate.candid`` only; the cutouts keep their bytes.
"""

from __future__ import annotations

import functools
import io
import json
import struct
from pathlib import Path
from typing import Any

from ztfd.embedded.samples import SamplePacket, packets


@functools.cache
def _packet_record(path: str) -> tuple[Any, dict[str, Any]]:
    """The writer schema (parsed) and the record of a sample packet file."""
    import fastavro

    with open(path, "rb") as handle:
        reader = fastavro.reader(handle)
        record = next(iter(reader))
        return fastavro.parse_schema(reader.writer_schema), record


def ztf_record(packet: SamplePacket) -> dict[str, Any]:
    """The packet's record with ``packet``'s objectId and candid (a shallow copy: do not modify nested values)."""
    _, record = _packet_record(str(packet.path))
    record = dict(record)
    record["objectId"] = packet.object_id
    record["candid"] = packet.candid
    record["candidate"] = {**record["candidate"], "candid": packet.candid}
    return record


def ztf_packet_bytes(packet: SamplePacket) -> bytes:
    """The packet as ZTF sends it: the file itself, or, when ``packet`` renames it, a container file of the same
    schema holding the renamed record."""
    return _packet_bytes(str(packet.path), packet.object_id, packet.candid)


@functools.lru_cache(maxsize=4096)
def _packet_bytes(path: str, object_id: str, candid: int) -> bytes:
    schema, original = _packet_record(path)
    if (original["objectId"], original["candid"]) == (object_id, candid):
        return Path(path).read_bytes()
    record = {**original, "objectId": object_id, "candid": candid,
              "candidate": {**original["candidate"], "candid": candid}}
    return container_file(schema, [record])


def container_file(schema: Any, records: list[dict[str, Any]]) -> bytes:
    """An Avro Object Container File (codec null) of ``records``."""
    import fastavro

    buffer = io.BytesIO()
    fastavro.writer(buffer, schema, records)
    return buffer.getvalue()


def schemaless(schema: Any, record: dict[str, Any]) -> bytes:
    import fastavro

    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, schema, record)
    return buffer.getvalue()


def schema_json(schema: Any) -> str:
    """A parsed schema's JSON text (as Fink puts it in the key and a registry serves it)."""
    return json.dumps(_plain(schema))


def _plain(schema: Any) -> Any:
    """A fastavro-parsed schema without fastavro's bookkeeping keys."""
    if isinstance(schema, dict):
        return {k: _plain(v) for k, v in schema.items() if not k.startswith("__")}
    if isinstance(schema, list):
        return [_plain(item) for item in schema]
    return schema


def fink_message(schema: Any, record: dict[str, Any]) -> tuple[bytes, bytes]:
    """(value, key) as Fink writes a message: the schemaless record, the schema's JSON as key."""
    return schemaless(schema, record), schema_json(schema).encode()


def confluent_message(schema: Any, schema_id: int, record: dict[str, Any]) -> bytes:
    """Confluent's wire format: magic 0, the big-endian schema id, the schemaless record."""
    return struct.pack(">bI", 0, schema_id) + schemaless(schema, record)


def ztf_schema() -> Any:
    """The parsed writer schema of the first sample packet (what ZTF's 3.3 packets use)."""
    return _packet_record(str(packets()[0].path))[0]
