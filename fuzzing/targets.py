"""The fuzz targets: for each decoder of message content, a callback taking one input's bytes, and its seeds.

A callback may see only the refusals its decoder promises (``InvalidMessageError``; ``FetchError`` for the packet
parser); anything else it raises is a finding. The harness (``fuzzing.run``) records findings and goes on; a
crash, a hang or an allocation past the memory limit stops libFuzzer, which keeps the input.

Keyed formats (Fink's schema travels in the Kafka key) take an input as ``<2-byte big-endian key length><key>
<value>``.
"""

from __future__ import annotations

import json
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.avro_support import fink_lsst, rubin_alerts, rubin_schema
from ztfd import sources
from ztfd.embedded import avro_samples
from ztfd.embedded.samples import packets, samples_dir
from ztfd.sources import InvalidMessageError

KEY_LENGTH = struct.Struct(">H")
# Schema ids the confluent-avro target knows without a registry: Rubin's v11, Fink's LSST; any other is ZTF's.
RUBIN_ID, FINK_LSST_ID, ZTF_ID = 1100, 2, 3


@dataclass(frozen=True)
class Target:
    name: str
    make: Callable[[], Callable[[bytes], None]]  # builds the decoder once, returns the per-input callback
    seeds: Callable[[], list[bytes]]


def keyed(value: bytes, key: bytes) -> bytes:
    return KEY_LENGTH.pack(len(key)) + key + value


def split_keyed(data: bytes) -> tuple[bytes, bytes | None]:
    """(value, key) of a keyed input; no key when the input is too short to name one."""
    if len(data) < KEY_LENGTH.size:
        return data, None
    (length,) = KEY_LENGTH.unpack_from(data)
    key = data[KEY_LENGTH.size:KEY_LENGTH.size + length]
    return data[KEY_LENGTH.size + length:], key


def _hostile() -> list[bytes]:
    """The messages of issue 21 that took a process down or past its caps, as seeds of every Avro target."""
    from tests import hostile_avro

    return [hostile_avro.recursive_container(50), hostile_avro.zero_byte_array(), hostile_avro.dict_per_byte(64),
            hostile_avro.deflate_bomb(4 * 1024 * 1024)]


def _source_callback(source: sources.Source, keyed_input: bool) -> Callable[[bytes], None]:
    def decode(data: bytes) -> None:
        value, key = split_keyed(data) if keyed_input else (data, None)
        try:
            alert = source.decode(value, key)
        except InvalidMessageError:
            return
        # What the consumer does next with what a source returns: the JSON view and the files.
        sources.view_json(alert.view)
        sources.alert_files(alert, "d", "s", "i", {"topic": "t"})

    return decode


# --- lasair ---------------------------------------------------------------------------------------------------------


def _lasair_seeds() -> list[bytes]:
    lines = (samples_dir() / "lasair-examples.jsonl").read_bytes().splitlines()
    return [line for line in lines if line.strip()] + [
        path.read_bytes() for path in sorted((samples_dir() / "lsst").glob("lasair_lsst_*.json"))]


# --- ztf-avro and the packet parser -------------------------------------------------------------------------------


def _packet_seeds() -> list[bytes]:
    return [packet.path.read_bytes() for packet in packets()] + _hostile()


def _packet_parser() -> Callable[[bytes], None]:
    from ztfd.sources.avro import ContainerReader
    from ztfd.stamps.providers import FetchError
    from ztfd.stamps.providers.alerce_ztf import packet_stamps

    reader = ContainerReader()
    candid = str(packets()[0].candid)

    def parse(data: bytes) -> None:
        try:
            packet_stamps(reader, data, candid, ["science", "template", "difference"])
        except FetchError:
            return

    return parse


# --- fink -----------------------------------------------------------------------------------------------------------


def _fink_seeds() -> list[bytes]:
    schema, records = fink_lsst()
    seeds = [keyed(*avro_samples.fink_message(schema, record)) for record in records[:3]]
    ztf = avro_samples.ztf_schema()
    seeds += [keyed(*avro_samples.fink_message(ztf, avro_samples.ztf_record(packet))) for packet in packets()[:3]]
    from tests import hostile_avro

    recursive = json.dumps(hostile_avro.RECURSIVE).encode()
    return [*seeds, keyed(hostile_avro.recursive_record(50), recursive)]


# --- confluent-avro and avro ----------------------------------------------------------------------------------------


class _KnownSchemas:
    """The store's schema cache as the confluent-avro source sees it, holding every id (no registry asked)."""

    def __init__(self) -> None:
        self.texts = {RUBIN_ID: avro_samples.schema_json(rubin_schema()),
                      FINK_LSST_ID: avro_samples.schema_json(fink_lsst()[0])}
        self.ztf = avro_samples.schema_json(avro_samples.ztf_schema())

    def get(self, registry: str, schema_id: int) -> str:
        return self.texts.get(schema_id, self.ztf)

    def put(self, registry: str, schema_id: int, text: str) -> None:
        return None


def _confluent_seeds() -> list[bytes]:
    fink_schema, fink = fink_lsst()
    return ([avro_samples.confluent_message(rubin_schema(), RUBIN_ID, rubin) for rubin in rubin_alerts(1)]
            + [avro_samples.confluent_message(fink_schema, FINK_LSST_ID, record) for record in fink[:3]]
            + [avro_samples.confluent_message(avro_samples.ztf_schema(), ZTF_ID, avro_samples.ztf_record(packet))
               for packet in packets()[:2]])


def _schemaless_source() -> sources.Source:
    folder = Path(tempfile.mkdtemp(prefix="ztfd-fuzz-"))
    schema_file = folder / "ztf.avsc"
    schema_file.write_text(avro_samples.schema_json(avro_samples.ztf_schema()))
    return sources.source_for("avro", schema_file=str(schema_file))


def _schemaless_seeds() -> list[bytes]:
    return [avro_samples.schemaless(avro_samples.ztf_schema(), avro_samples.ztf_record(packet))
            for packet in packets()[:4]]


TARGETS = {target.name: target for target in (
    Target("lasair", lambda: _source_callback(sources.source_for("lasair"), False), _lasair_seeds),
    Target("ztf-avro", lambda: _source_callback(sources.source_for("ztf-avro"), False), _packet_seeds),
    Target("fink", lambda: _source_callback(sources.source_for("fink"), True), _fink_seeds),
    Target("confluent-avro", lambda: _source_callback(sources.source_for(
        "confluent-avro", registry_url="http://127.0.0.1:9", schema_cache=_KnownSchemas()), False),
        _confluent_seeds),
    Target("avro", lambda: _source_callback(_schemaless_source(), False), _schemaless_seeds),
    Target("get_avro", _packet_parser, _packet_seeds),
)}
