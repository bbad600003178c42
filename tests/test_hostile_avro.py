"""Hostile Avro messages are rejected with a reason, within bounds, without taking the process down (issue 21):
a self-referencing schema 5,000 levels deep (SIGSEGV in fastavro before), a deflate bomb, an array of items of
no bytes, an array turning every byte into a dict; and each distinct writer schema is parsed once (issue 26)."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc

import pytest

from tests import hostile_avro
from ztfd import sources
from ztfd.embedded.samples import packets
from ztfd.sources import InvalidMessageError
from ztfd.sources.avro import MAX_INFLATED_BYTES, ContainerReader, SchemaCache
from ztfd.sources.avro_bounds import MAX_JSON_DEPTH, MAX_TYPE_DEPTH

DECODE_IN_A_CHILD = """
import sys
from tests import hostile_avro
from ztfd import sources
value, key = hostile_avro.{build}
try:
    sources.source_for({format!r}).decode(value, key)
except sources.InvalidMessageError as exc:
    print("rejected:", exc)
"""


@pytest.mark.parametrize(("fmt", "build"), [
    ("ztf-avro", "recursive_container(), None"),
    ("fink", "recursive_record(), json.dumps(hostile_avro.RECURSIVE).encode()"),
])
def test_a_self_referencing_schema_5000_deep_is_rejected_and_the_process_lives(fmt: str, build: str) -> None:
    code = "import json\n" + DECODE_IN_A_CHILD.format(build=build, format=fmt)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rejected:" in done.stdout and "refers to itself" in done.stdout


def test_a_deflate_bomb_is_refused_without_being_inflated() -> None:
    bomb = hostile_avro.deflate_bomb(200 * 1024 * 1024)
    assert len(bomb) < 1024 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(InvalidMessageError, match="inflate past"):
            ContainerReader().read(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * MAX_INFLATED_BYTES < 200 * 1024 * 1024  # the cap's buffer, not the bomb's 200 MiB


def test_deflate_blocks_within_bounds_are_read_and_broken_ones_rejected() -> None:
    schema = {"type": "record", "name": "b", "fields": [{"name": "s", "type": "string"}]}
    record = hostile_avro.zigzag(5) + b"hello"
    assert ContainerReader().read(hostile_avro.container(schema, hostile_avro.deflated(record), codec="deflate")) \
        == [{"s": "hello"}]
    with pytest.raises(InvalidMessageError, match="incomplete"):
        ContainerReader().read(hostile_avro.container(schema, hostile_avro.deflated(record)[:-2], codec="deflate"))
    with pytest.raises(InvalidMessageError, match="codec 'zstandard'"):
        ContainerReader().read(hostile_avro.container(schema, record, codec="zstandard"))


def test_an_array_of_items_of_no_bytes_is_refused_before_decoding() -> None:
    with pytest.raises(InvalidMessageError, match="items that take no bytes"):
        ContainerReader().read(hostile_avro.zero_byte_array())
    empty_record = {"type": "record", "name": "z", "fields": [
        {"name": "a", "type": {"type": "array", "items": {"type": "record", "name": "e", "fields": []}}}]}
    with pytest.raises(InvalidMessageError, match="items that take no bytes"):
        sources.source_for("fink").decode(b"\x02\x00", json.dumps(empty_record).encode())


def test_a_record_that_could_become_too_many_objects_is_refused_before_decoding() -> None:
    tracemalloc.start()
    try:
        with pytest.raises(InvalidMessageError, match=r"could decode to .* MiB of objects"):
            ContainerReader().read(hostile_avro.dict_per_byte())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 * 1024
    small = hostile_avro.dict_per_byte(1000)  # the same schema, a size it may take
    assert len(ContainerReader().read(small)[0]["a"]) == 1000


def _nested_arrays(levels: int) -> dict:
    schema: object = "long"
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return {"type": "record", "name": "deep", "fields": [{"name": "a", "type": schema}]}


@pytest.mark.parametrize(("schema", "reason"), [
    (_nested_arrays(MAX_TYPE_DEPTH + 1), "nested more than"),
    ({"type": "record", "name": "r", "fields": [{"name": "x", "type": "nosuch"}]}, "nosuch"),
    ({"type": "record", "name": "a", "fields": [{"name": "b", "type": {
        "type": "record", "name": "b", "fields": [{"name": "c", "type": {"type": "array", "items": "a"}}]}}]},
     "refers to itself"),
])
def test_schemas_out_of_bounds_are_refused_with_a_reason(schema: dict, reason: str) -> None:
    with pytest.raises(InvalidMessageError, match=reason):
        sources.source_for("fink").decode(b"\x00", json.dumps(schema).encode())


def test_json_deeper_than_python_recurses_is_refused() -> None:
    for depth in (MAX_JSON_DEPTH + 10, 100_000):
        key = b"[" * depth + b"]" * depth
        with pytest.raises(InvalidMessageError, match="nested"):
            sources.source_for("fink").decode(b"\x00", key)


def test_a_string_longer_than_the_message_is_rejected() -> None:
    schema = {"type": "record", "name": "s", "fields": [{"name": "s", "type": "string"}]}
    with pytest.raises(InvalidMessageError, match="does not decode"):
        ContainerReader().read(hostile_avro.container(schema, hostile_avro.zigzag(2**60) + b"abc"))


def test_each_distinct_writer_schema_is_parsed_once_and_a_refused_one_remembered(monkeypatch) -> None:
    import fastavro

    same_schema = [p.path.read_bytes() for p in packets() if p.path.name.startswith("ZTF2")]
    calls = []
    real = fastavro.parse_schema
    monkeypatch.setattr(fastavro, "parse_schema", lambda doc, *a, **k: calls.append(1) or real(doc, *a, **k))
    source = sources.source_for("ztf-avro")
    for packet in same_schema:
        source.decode(packet, None)
    assert len(same_schema) > 1 and len(calls) == 1
    for _ in range(3):
        with pytest.raises(InvalidMessageError, match="refers to itself"):
            source.decode(hostile_avro.recursive_container(10), None)
    assert len(calls) == 2


def test_the_schema_cache_is_bounded() -> None:
    cache = SchemaCache(size=3)
    for index in range(10):
        cache.get(json.dumps({"type": "record", "name": f"r{index}", "fields": []}).encode())
    assert len(cache._parsed) == 3


def test_a_decimal_of_unbounded_size_is_refused_and_a_small_one_read() -> None:
    """fastavro converts a decimal in time quadratic in its size: 100 kB of one took 2 s, 10 MB would take hours."""
    import decimal

    on_bytes = {"type": "record", "name": "d", "fields": [
        {"name": "x", "type": {"type": "bytes", "logicalType": "decimal", "precision": 4, "scale": 2}}]}
    with pytest.raises(InvalidMessageError, match="a decimal on bytes"):
        ContainerReader().read(hostile_avro.container(on_bytes, hostile_avro.zigzag(10**6) + b"\x7f" * 10**6))
    big_fixed = {"type": "record", "name": "d", "fields": [{"name": "x", "type": {
        "type": "fixed", "name": "big", "size": 10**6, "logicalType": "decimal", "precision": 4}}]}
    with pytest.raises(InvalidMessageError, match="a decimal of 1000000 bytes"):
        ContainerReader().read(hostile_avro.container(big_fixed, b"\x7f" * 10**6))
    small = {"type": "record", "name": "d", "fields": [{"name": "x", "type": {
        "type": "fixed", "name": "small", "size": 2, "logicalType": "decimal", "precision": 4, "scale": 2}}]}
    assert ContainerReader().read(hostile_avro.container(small, b"\x00\x96")) == [{"x": decimal.Decimal("1.50")}]
