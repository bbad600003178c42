"""The Avro formats on real data: ZTF's packets (ztf-avro), Fink's ZTF and LSST records (fink), Rubin's schema in
Confluent's wire format against the local schema registry (confluent-avro), and a known schema (avro)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import pytest

from tests.avro_support import RUBIN_SCHEMA_ID, fink_lsst, rubin_alerts, rubin_schema
from ztfd import sources, store
from ztfd.embedded import avro_samples
from ztfd.embedded.registry import SchemaRegistry
from ztfd.embedded.samples import JD_MJD_OFFSET, packets
from ztfd.ingest import nights
from ztfd.sources import InvalidMessageError, SourceUnavailableError
from ztfd.sources.packets import CUTOUT_FIELDS, NULL_IN_PACKET
from ztfd.store.avro_schemas import StoredSchemas

MJD_EPOCH = dt.datetime(1858, 11, 17, tzinfo=dt.UTC)


def dated(alert: sources.Alert) -> str:
    [times] = nights.convert_times([alert])
    return nights.date_of(alert, times, None, dt.datetime.now(dt.UTC)).date


def test_ztf_avro_every_sample_packet_with_its_cutouts_byte_for_byte() -> None:
    source = sources.source_for("ztf-avro")
    for packet in packets():
        raw = packet.path.read_bytes()
        alert = source.decode(raw, None)
        assert (alert.survey, alert.object_id, alert.detection_id) == ("ztf", packet.object_id, str(packet.candid))
        assert alert.raw is raw and alert.suffix == ".avro"
        assert {c.kind: c.data for c in alert.cutouts} == packet.cutouts
        assert all(c.suffix == ".fits.gz" for c in alert.cutouts)
        assert dated(alert) == (MJD_EPOCH + dt.timedelta(days=packet.jd - JD_MJD_OFFSET)).date().isoformat()
        view = json.loads(sources.view_json(alert.view))  # strict JSON: what jq reads
        assert view["candidate"]["jd"] == packet.jd and view["objectId"] == packet.object_id
        for kind, name in CUTOUT_FIELDS.items():
            assert view[name]["stampData"] == {"bytes": len(packet.cutouts[kind]),
                                               "file": f"{packet.candid}_{kind}.fits.gz"}
        assert b"stampData" not in json.dumps(view["prv_candidates"]).encode()


def test_ztf_avro_files_of_an_alert() -> None:
    packet = packets()[0]
    alert = sources.source_for("ztf-avro").decode(packet.path.read_bytes(), None)
    files = dict(sources.alert_files(alert, "data/d/t", "stem", "images/d/o", {"topic": "t"}))
    assert files["data/d/t/stem.avro"] == packet.path.read_bytes()
    companion = json.loads(files["data/d/t/stem.json"])
    assert companion["ztfd"] == {"topic": "t"} and companion["message"]["candid"] == packet.candid
    for kind in ("science", "template", "difference"):
        assert files[f"images/d/o/{packet.candid}_{kind}.fits.gz"] == packet.cutouts[kind]


@pytest.mark.parametrize(("mangle", "reason"), [
    (lambda raw: b"", "empty"),
    (lambda raw: b'{"objectId": "ZTF21abvawaj"}', "not an Avro container file"),
    (lambda raw: raw[:200], "truncated"),
    (lambda raw: raw[:-3], "truncated Avro container block"),
    (lambda raw: raw[:-16] + bytes(16), "sync marker"),
    (lambda raw: raw[:4000] + b"\xff" * 50 + raw[4050:], "Avro|schema"),
])
def test_ztf_avro_rejects_what_is_not_a_packet(mangle, reason: str) -> None:
    raw = packets()[0].path.read_bytes()
    with pytest.raises(InvalidMessageError, match=reason):
        sources.source_for("ztf-avro").decode(mangle(raw), None)


def test_ztf_avro_two_records_or_another_shape_are_rejected() -> None:
    schema = avro_samples.ztf_schema()
    record = avro_samples.ztf_record(packets()[0])
    with pytest.raises(InvalidMessageError, match="holds 2 records"):
        sources.source_for("ztf-avro").decode(avro_samples.container_file(schema, [record, record]), None)
    other = {"type": "record", "name": "x", "fields": [{"name": "oid", "type": "string"}]}
    with pytest.raises(InvalidMessageError, match="neither a ZTF packet"):
        sources.source_for("ztf-avro").decode(avro_samples.container_file(other, [{"oid": "a"}]), None)


def test_null_and_invalid_cutouts_are_recorded_and_the_alert_kept() -> None:
    schema = avro_samples.ztf_schema()
    record = avro_samples.ztf_record(packets()[0])
    record["cutoutTemplate"] = None
    record["cutoutDifference"] = {**record["cutoutDifference"], "stampData": b"<html>not a stamp</html>"}
    alert = sources.source_for("ztf-avro").decode(avro_samples.container_file(schema, [record]), None)
    by_kind = {c.kind: c for c in alert.cutouts}
    assert by_kind["science"].data == packets()[0].cutouts["science"]
    assert by_kind["template"].data is None and by_kind["template"].problem == NULL_IN_PACKET
    assert by_kind["difference"].data is None and "not gzip" in by_kind["difference"].problem
    view = json.loads(sources.view_json(alert.view))
    assert view["cutoutTemplate"] is None
    assert "not gzip" in view["cutoutDifference"]["stampData"]["problem"]
    names = [path for path, _ in sources.alert_files(alert, "d", "s", "i", {})]
    assert names == ["d/s.avro", "d/s.json", f"i/{record['candid']}_science.fits.gz"]


def test_view_json_is_strict_json_with_nan_as_null() -> None:
    assert json.loads(sources.view_json({"a": float("nan"), "b": [float("inf"), 1.5], "c": b"xyz"})) == {
        "a": None, "b": [None, 1.5], "c": {"bytes": 3}}


def test_fink_lsst_real_alerts_ids_dayobs_and_raw_fits_cutouts() -> None:
    schema, records = fink_lsst()
    source = sources.source_for("fink")
    for record in records:
        value, key = avro_samples.fink_message(schema, record)
        alert = source.decode(value, key)
        assert alert.survey == "lsst" and alert.detection_id == str(record["diaSourceId"])
        expected_object = (record["diaObject"] or {}).get("diaObjectId") or record["ssSource"]["ssObjectId"]
        assert alert.object_id == str(expected_object)
        assert {c.kind: c.data for c in alert.cutouts} == {
            "science": record["cutoutScience"], "template": record["cutoutTemplate"],
            "difference": record["cutoutDifference"]}
        assert all(c.suffix == ".fits" and c.data.startswith(b"SIMPLE") for c in alert.cutouts)
        # Observed 2026-03-06 ~02:15 UTC, in the night of dayObs 2026-03-05 (Rubin's TAI date minus 12 h).
        assert dated(alert) == "2026-03-05"
    assert len(source.schemas._parsed) == 1  # one key, parsed once


def test_fink_absent_ids_are_zero_or_none() -> None:
    schema, records = fink_lsst()
    record = dict(records[0])
    record["diaObject"] = {**record["diaObject"], "diaObjectId": 0}
    record["ssSource"] = dict.fromkeys(record["ssSource"])  # Fink's absent record: every field None
    alert = sources.source_for("fink").decode(*avro_samples.fink_message(schema, record))
    assert alert.object_id == alert.detection_id == str(record["diaSourceId"])


def test_fink_ztf_and_bad_keys() -> None:
    packet = dataclasses.replace(packets()[1], object_id="ZTF99finkzzz", candid=42)
    value, key = avro_samples.fink_message(avro_samples.ztf_schema(), avro_samples.ztf_record(packet))
    source = sources.source_for("fink")
    alert = source.decode(value, key)
    assert (alert.survey, alert.object_id, alert.detection_id) == ("ztf", "ZTF99finkzzz", "42")
    assert [c.data for c in alert.cutouts] == [packets()[1].cutouts[k] for k in ("science", "template", "difference")]
    with pytest.raises(InvalidMessageError, match="no Kafka key"):
        source.decode(value, None)
    with pytest.raises(InvalidMessageError, match="not an Avro schema"):
        source.decode(value, b"fbvsn_fsvsn")
    with pytest.raises(InvalidMessageError, match=r"left after the Avro record|does not decode"):
        source.decode(value + b"\x00\x01", key)


@pytest.fixture
def registry() -> SchemaRegistry:
    with SchemaRegistry({RUBIN_SCHEMA_ID: avro_samples.schema_json(rubin_schema())}) as running:
        yield running


def test_confluent_rubin_alerts_schema_fetched_once_and_kept_in_the_store(
    registry: SchemaRegistry, tmp_path: Path
) -> None:
    conn = store.connect(tmp_path / "state" / "ztfd.sqlite3")
    context = {"registry_url": registry.url, "schema_cache": StoredSchemas(conn), "registry_timeout": 5}
    alerts = rubin_alerts(4)
    messages = [avro_samples.confluent_message(rubin_schema(), RUBIN_SCHEMA_ID, a) for a in alerts]
    source = sources.source_for("confluent-avro", **context)
    for message, record in zip(messages, alerts, strict=True):
        alert = source.decode(message, None)
        assert alert.raw == message and alert.survey == "lsst"
        assert alert.detection_id == str(record["diaSourceId"]) and int(alert.detection_id) > 2**62
        assert alert.object_id == str(record["diaObject"]["diaObjectId"])
        assert [c.data for c in alert.cutouts] == [record["cutoutScience"], record["cutoutTemplate"],
                                                  record["cutoutDifference"]]
    assert registry.requests(RUBIN_SCHEMA_ID) == 1
    again = sources.source_for("confluent-avro", **context)  # a restarted consumer: the store has it
    again.decode(messages[0], None)
    assert registry.requests() == 1


def test_confluent_rejects_and_registry_trouble(registry: SchemaRegistry) -> None:
    context = {"registry_url": registry.url, "registry_timeout": 5}
    source = sources.source_for("confluent-avro", **context)
    record = rubin_alerts(1)[0]
    with pytest.raises(InvalidMessageError, match="unknown to the schema registry"):
        source.decode(avro_samples.confluent_message(rubin_schema(), 4242, record), None)
    with pytest.raises(InvalidMessageError, match="not the Confluent wire format"):
        source.decode(b"\x01" + avro_samples.confluent_message(rubin_schema(), RUBIN_SCHEMA_ID, record)[1:], None)
    with pytest.raises(InvalidMessageError, match="5-byte header"):
        source.decode(b"\x00\x00", None)
    registry.unavailable = 10
    with pytest.raises(SourceUnavailableError, match="HTTP 503"):
        source.decode(avro_samples.confluent_message(rubin_schema(), RUBIN_SCHEMA_ID, record), None)
    registry.stop()
    with pytest.raises(SourceUnavailableError, match="unreachable"):
        source.decode(avro_samples.confluent_message(rubin_schema(), RUBIN_SCHEMA_ID, record), None)


def test_avro_with_a_known_schema(tmp_path: Path) -> None:
    schema_file = tmp_path / "rubin.avsc"
    schema_file.write_text(avro_samples.schema_json(rubin_schema()))
    source = sources.source_for("avro", schema_file=str(schema_file))
    record = rubin_alerts(1)[0]
    alert = source.decode(avro_samples.schemaless(rubin_schema(), record), None)
    assert alert.detection_id == str(record["diaSourceId"])
    ztf_bytes = avro_samples.schemaless(avro_samples.ztf_schema(), avro_samples.ztf_record(packets()[0]))
    with pytest.raises(InvalidMessageError):
        source.decode(ztf_bytes, None)


def test_view_json_renders_logical_types_as_text_and_never_raises() -> None:
    import decimal
    import uuid

    moment = dt.datetime(2026, 3, 6, 2, 14, 13, tzinfo=dt.UTC)
    assert json.loads(sources.view_json({"t": moment, "d": decimal.Decimal("1.5"), "u": uuid.UUID(int=1)})) == {
        "t": "2026-03-06T02:14:13+00:00", "d": "1.5", "u": "00000000-0000-0000-0000-000000000001"}
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert "ztfd_view_error" in json.loads(sources.view_json(deep))


def test_view_json_is_the_same_bytes_for_the_same_packet_and_reads_like_the_record() -> None:
    source = sources.source_for("ztf-avro")
    for packet in packets():
        raw = packet.path.read_bytes()
        first, again = (sources.view_json(source.decode(raw, None).view) for _ in range(2))
        assert first == again  # a redelivery rewrites the .json with the same bytes
        assert json.loads(first)["candidate"]["candid"] == packet.candid


def test_view_json_falls_back_for_what_orjson_refuses() -> None:
    assert json.loads(sources.view_json({"big": 2**70, "nan": float("nan")})) == {"big": 2**70, "nan": None}
    assert json.loads(sources.view_json({"s": "\ud800"})) == {"s": "\ud800"}
