"""Hostile Avro messages, built byte by byte: each one took a process down or past its caps before the bounds of
``ztfd.sources.avro_bounds`` (issue 21). Shared by the tests and the fuzzing seeds."""

from __future__ import annotations

import json
import zlib
from typing import Any

SYNC = b"\x5a" * 16
RECURSIVE = {"type": "record", "name": "n", "fields": [{"name": "c", "type": ["null", "n"]}]}


def zigzag(value: int) -> bytes:
    """One Avro long."""
    number = (value << 1) ^ (value >> 63)
    out = bytearray()
    while True:
        byte = number & 0x7F
        number >>= 7
        if number:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _bytes(data: bytes) -> bytes:
    return zigzag(len(data)) + data


def container(schema: Any, block: bytes, count: int = 1, codec: str = "null") -> bytes:
    """An Object Container File of one block (``block`` as written, already compressed for ``codec``)."""
    header = b"Obj\x01" + zigzag(2) + _bytes(b"avro.schema") + _bytes(json.dumps(schema).encode())
    header += _bytes(b"avro.codec") + _bytes(codec.encode()) + zigzag(0) + SYNC
    return header + zigzag(count) + zigzag(len(block)) + block + SYNC


def deflated(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush()


def recursive_record(depth: int = 5000) -> bytes:
    """A record of ``RECURSIVE`` nested ``depth`` levels: 5 kB that crashed fastavro with SIGSEGV."""
    return b"\x02" * depth + b"\x00"


def recursive_container(depth: int = 5000) -> bytes:
    return container(RECURSIVE, recursive_record(depth))


def deflate_bomb(inflated_bytes: int = 200 * 1024 * 1024) -> bytes:
    """A deflate block of ~200 kB that inflates to ``inflated_bytes`` (a string of zeros)."""
    schema = {"type": "record", "name": "b", "fields": [{"name": "s", "type": "string"}]}
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(1024 * 1024)
    parts = [compressor.compress(zigzag(inflated_bytes))]
    parts.extend(compressor.compress(chunk) for _ in range(inflated_bytes // len(chunk)))
    parts.append(compressor.flush())
    return container(schema, b"".join(parts), codec="deflate")


NULL_ARRAY = {"type": "record", "name": "z", "fields": [{"name": "a", "type": {"type": "array", "items": "null"}}]}


def zero_byte_array(count: int = 2**40) -> bytes:
    """An array of ``count`` nulls in a few bytes (230 bytes took 783 MB)."""
    return container(NULL_ARRAY, zigzag(count) + zigzag(0))


BOOLEAN_RECORDS = {"type": "record", "name": "t", "fields": [
    {"name": "a", "type": {"type": "array", "items": {
        "type": "record", "name": "one", "fields": [{"name": "b", "type": "boolean"}]}}}]}


def dict_per_byte(count: int = 4 * 1024 * 1024) -> bytes:
    """An array of ``count`` one-byte records: every byte of the message a dict."""
    return container(BOOLEAN_RECORDS, zigzag(count) + b"\x01" * count + zigzag(0))
