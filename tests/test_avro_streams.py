"""Avro topics through the real broker (Tansu) and the real CLI: ZTF's packets, Fink's ZTF and LSST records, Rubin's
schema in Confluent's wire format against the local schema registry, a known schema; the alert kept as received
with its JSON view, the stamps from the packet byte for byte, and not one request to the stamp service for them."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.avro_support import RUBIN_SCHEMA_ID, fink_lsst, produce_keyed, rubin_alerts, rubin_schema
from tests.conftest import wait_until
from tests.stamp_support import FAST_STAMPS, start_fetcher, stop_fetcher, utc_date
from tests.test_consumer import Consumers, count, terminate, unique
from tests.test_replay import replay as run_replay
from ztfd import sources, store
from ztfd.embedded import avro_samples
from ztfd.embedded.alerce import StampService
from ztfd.embedded.kafka import KafkaBroker
from ztfd.embedded.registry import SchemaRegistry
from ztfd.embedded.samples import packets
from ztfd.store.manifest import manifest_files

KINDS = sources.STAMP_TYPES


@pytest.fixture
def consumers() -> Consumers:
    running = Consumers()
    yield running
    running.stop_all()


def stored_alerts(db: Path) -> list[sqlite3.Row]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM alerts ORDER BY kafka_offset").fetchall()
    finally:
        conn.close()


def consume_all(consumers: Consumers, config_path: Path, topic: str, alerts: int, rejected: int = 0) -> Path:
    """Run ``ztfd consume`` until the topic's alerts and rejected messages are stored; stop it (exit 0)."""
    db = config_path.parent / "state" / "ztfd.sqlite3"
    proc = consumers.start(config_path, topic)
    wait_until(lambda: count(db, "SELECT count(*) FROM alerts WHERE topic = ?", topic) >= alerts
               and count(db, "SELECT count(*) FROM rejected WHERE topic = ?", topic) >= rejected, 90,
               f"{alerts} alerts and {rejected} rejected of {topic}")
    assert terminate(proc) == 0, proc.stderr.read().decode() if proc.stderr else ""
    return db


def test_ztf_packets_kept_as_received_with_their_stamps_and_no_stamp_request(
    kafka: KafkaBroker, make_config: Callable[..., Path], consumers: Consumers, stamp_service: StampService,
    tmp_path: Path,
) -> None:
    topic = unique("ztf_avro")
    real = list(packets())
    schema = avro_samples.ztf_schema()
    partial = avro_samples.ztf_record(dataclasses.replace(real[0], object_id="ZTF99nulltmp", candid=99))
    partial["cutoutTemplate"] = None
    values = [p.path.read_bytes() for p in real]
    values += [b"Obj\x01 not really", avro_samples.container_file(schema, [partial])]
    kafka.create_topic(topic)
    kafka.produce(topic, values)
    config_path = make_config(kafka={"bootstrap_servers": kafka.bootstrap, "group_id": unique("g"), "topics": [topic]},
                              kafka__formats={topic: "ztf-avro"},
                              stamps={**FAST_STAMPS, "alerce_stamp_url": stamp_service.url,
                                      "alerce_api_url": stamp_service.url})
    home = config_path.parent
    db = consume_all(consumers, config_path, topic, alerts=len(real) + 1, rejected=1)
    rows = stored_alerts(db)
    for offset, packet in enumerate(real):
        row = rows[offset]
        date = utc_date(packet.mjd)
        assert (row["object_id"], row["detection_id"], row["survey"]) == (packet.object_id, str(packet.candid), "ztf")
        stem = home / "data" / date / topic / f"{packet.object_id}_p0-o{offset}"
        assert row["path"] == f"data/{date}/{topic}/{packet.object_id}_p0-o{offset}.avro"
        assert stem.with_suffix(".avro").read_bytes() == packet.path.read_bytes()
        companion = json.loads(stem.with_suffix(".json").read_bytes())
        assert companion["message"]["candid"] == packet.candid
        assert companion["message"]["cutoutScience"]["stampData"]["file"] == f"{packet.candid}_science.fits.gz"
        assert companion["ztfd"]["offset"] == offset and companion["ztfd"]["date"] == date
        for kind in KINDS:
            stamp = home / "images" / date / packet.object_id / f"{packet.candid}_{kind}.fits.gz"
            assert stamp.read_bytes() == packet.cutouts[kind]
    conn = store.connect(db)
    recorded = {row.path for row in manifest_files(conn)}
    assert len([p for p in recorded if p.startswith("images/")]) == 3 * len(real) + 2  # partial: science, difference
    assert len([p for p in recorded if p.startswith("data/")]) == 2 * (len(real) + 1)
    kinds = dict(conn.execute("SELECT kind, count(*) FROM jobs GROUP BY kind").fetchall())
    assert kinds == {"preview": len(real), "stamps": 1}  # the partial packet's template is asked for
    (reason,) = conn.execute("SELECT reason FROM rejected").fetchone()
    assert "Avro" in reason
    worker = start_fetcher(config_path, "fetcher-1", tmp_path / "fetch.log")
    try:
        wait_until(lambda: count(db, "SELECT count(*) FROM jobs WHERE kind = 'preview' AND state = 'done'")
                   == len(real), 60, "every preview drawn")
    finally:
        assert stop_fetcher(worker) == 0
    for offset, packet in enumerate(real):
        assert (home / "images" / rows[offset]["date"] / packet.object_id / f"{packet.candid}.png").stat().st_size > 0
    asked = {record.object_id for record in stamp_service.requests()}
    assert asked <= {"ZTF99nulltmp"}, f"stamp requests for alerts that carried their stamps: {asked}"
    replay_redraws_a_preview_and_fetches_only_a_lost_stamp(config_path, stamp_service, rows, real)


def replay_redraws_a_preview_and_fetches_only_a_lost_stamp(config_path: Path, service: StampService,
                                                            rows: list[sqlite3.Row], real: list) -> None:
    """``ztfd replay``: a packet alert whose preview is gone gets a preview job and no request; one whose stamp is
    gone has it fetched from the stamp service (the packet is the only other place it was)."""
    home = config_path.parent
    by_date: dict[str, list[int]] = {}
    for offset in range(len(real)):
        by_date.setdefault(rows[offset]["date"], []).append(offset)
    date, offsets = max(by_date.items(), key=lambda item: len(item[1]))
    assert len(offsets) >= 2, "the samples have a night with two packets"
    no_preview, no_stamp = real[offsets[0]], real[offsets[1]]
    preview = home / "images" / date / no_preview.object_id / f"{no_preview.candid}.png"
    stamp = home / "images" / date / no_stamp.object_id / f"{no_stamp.candid}_template.fits.gz"
    preview.unlink()
    stamp.unlink()
    service.reset_log()
    result = run_replay(config_path, "--date", date, "--workers", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(offsets)} alerts, {len(offsets) - 2} complete on disk, 2 to fetch" in result.stdout
    assert preview.stat().st_size > 0
    assert stamp.read_bytes() == no_stamp.cutouts["template"]
    asked = {record.object_id for record in service.requests()}
    assert asked == {no_stamp.object_id}, asked


def rubin_files_match(home: Path, row: sqlite3.Row, record: dict) -> None:
    """A Rubin alert's files: under its dayObs and diaObjectId, the cutouts raw FITS byte for byte."""
    folder = home / "images" / row["date"] / row["object_id"]
    for kind, name in zip(KINDS, ("cutoutScience", "cutoutTemplate", "cutoutDifference"), strict=True):
        assert (folder / f"{record['diaSourceId']}_{kind}.fits").read_bytes() == record[name]


def test_fink_ztf_and_lsst_topics(
    kafka: KafkaBroker, make_config: Callable[..., Path], consumers: Consumers,
) -> None:
    lsst_topic, ztf_topic = unique("fink_uniform_sample_lsst"), unique("fink_sn_candidates_ztf")
    schema, records = fink_lsst()
    renamed = [dataclasses.replace(p, object_id=f"ZTF99fink{chr(97 + i)}{chr(97 + i)}{chr(97 + i)}", candid=1000 + i)
               for i, p in enumerate(packets()[:3])]
    for topic in (lsst_topic, ztf_topic):
        kafka.create_topic(topic)
    produce_keyed(kafka.bootstrap, lsst_topic, [avro_samples.fink_message(schema, r) for r in records]
                  + [(b"\x00\x01", b"fbvsn_fsvsn")])
    produce_keyed(kafka.bootstrap, ztf_topic, [avro_samples.fink_message(avro_samples.ztf_schema(),
                                                                         avro_samples.ztf_record(p)) for p in renamed])
    config_path = make_config(kafka={"bootstrap_servers": kafka.bootstrap, "group_id": unique("g"),
                                     "topics": ["^fink_.*_(ztf|lsst)"]},
                              kafka__formats={"^fink_": "fink"})
    home = config_path.parent
    db = consume_all(consumers, config_path, lsst_topic, alerts=len(records), rejected=1)
    lsst_rows = stored_alerts(db)
    for row, record in zip(lsst_rows, records, strict=True):
        assert row["survey"] == "lsst" and row["date"] == "2026-03-05"  # dayObs, not the UTC date (03-06)
        assert row["detection_id"] == str(record["diaSourceId"])
        assert row["object_id"] == str((record["diaObject"] or {}).get("diaObjectId")
                                       or record["ssSource"]["ssObjectId"])
        assert (home / row["path"]).read_bytes() == avro_samples.fink_message(schema, record)[0]
        rubin_files_match(home, row, record)
    consume_all(consumers, config_path, ztf_topic, alerts=len(renamed))
    conn = store.connect(db)
    ztf_rows = [r for r in stored_alerts(db) if r["topic"] == ztf_topic]
    assert [(r["object_id"], r["detection_id"]) for r in ztf_rows] == [(p.object_id, str(p.candid)) for p in renamed]
    for row, packet in zip(ztf_rows, renamed, strict=True):
        for kind in KINDS:
            path = home / "images" / row["date"] / packet.object_id / f"{packet.candid}_{kind}.fits.gz"
            assert path.read_bytes() == packet.cutouts[kind]
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0  # stamps and previews off


def test_confluent_rubin_topic_against_the_schema_registry_and_a_known_schema(
    kafka: KafkaBroker, make_config: Callable[..., Path], consumers: Consumers, tmp_path: Path,
) -> None:
    confluent_topic, plain_topic = unique("lsst-alerts-v11"), unique("rubin_plain")
    alerts, later = rubin_alerts(6)[:5], rubin_alerts(6)[5]
    schema_file = tmp_path / "rubin-v11.avsc"
    schema_file.write_text(avro_samples.schema_json(rubin_schema()))
    with SchemaRegistry({RUBIN_SCHEMA_ID: schema_file.read_text()}) as registry:
        for topic in (confluent_topic, plain_topic):
            kafka.create_topic(topic)
        wire = [avro_samples.confluent_message(rubin_schema(), RUBIN_SCHEMA_ID, a) for a in alerts]
        kafka.produce(confluent_topic, [*wire, avro_samples.confluent_message(rubin_schema(), 999, alerts[0])])
        kafka.produce(plain_topic, [avro_samples.schemaless(rubin_schema(), a) for a in alerts])
        config_path = make_config(
            kafka={"bootstrap_servers": kafka.bootstrap, "group_id": unique("g"),
                   "topics": [confluent_topic, plain_topic], "schema_registry_url": registry.url},
            kafka__formats={confluent_topic: "confluent-avro", plain_topic: "avro"},
            kafka__schemas={plain_topic: str(schema_file)})
        home = config_path.parent
        db = consume_all(consumers, config_path, confluent_topic, alerts=len(alerts), rejected=1)
        assert registry.requests(RUBIN_SCHEMA_ID) == 1 and registry.requests(999) == 1
        kafka.produce(confluent_topic, [avro_samples.confluent_message(rubin_schema(), RUBIN_SCHEMA_ID, later)])
        consume_all(consumers, config_path, confluent_topic, alerts=len(alerts) + 1, rejected=1)  # a restart
        assert registry.requests(RUBIN_SCHEMA_ID) == 1  # kept in the store
        consume_all(consumers, config_path, plain_topic, alerts=len(alerts))
    conn = store.connect(db)
    (reason,) = conn.execute("SELECT reason FROM rejected").fetchone()
    assert reason == "schema id 999 is unknown to the schema registry (404)"
    for topic in (confluent_topic, plain_topic):
        rows = [r for r in stored_alerts(db) if r["topic"] == topic][:len(alerts)]
        assert [r["detection_id"] for r in rows] == [str(a["diaSourceId"]) for a in alerts]
        for row, record in zip(rows, alerts, strict=True):
            assert row["object_id"] == str(record["diaObject"]["diaObjectId"]) and row["survey"] == "lsst"
            assert row["path"].endswith(".avro")
            rubin_files_match(home, row, record)
    assert (home / stored_alerts(db)[0]["path"]).read_bytes() == wire[0]
