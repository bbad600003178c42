"""The Parquet dataset (issue 22) through the real parts: real messages of four kinds through Tansu, consumed and
archived by a real supervisor (``ztfd start`` with ``[archive] enabled``), uploaded to moto's S3 by its syncer, read
back with pyarrow, DuckDB and pandas from disk and from S3, and asked through the ``ztfd`` command line."""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import signal
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests import conftest
from tests.avro_support import RUBIN_FIXTURE, rubin_alerts
from tests.conftest import FAST_KAFKA_OPTIONS, child_env, wait_until, write_config, ztfd_command
from ztfd import archive
from ztfd.embedded import avro_samples, lsst_samples, samples
from ztfd.embedded.kafka import KafkaBroker
from ztfd.embedded.s3 import S3Server
from ztfd.files import md5_file

LSST_FIXTURE_OBJECT = "313637921267122191"  # Lasair's real full alert: 171 bare NaN
NIGHT_ONE_MJD = 59458.30  # 2021-09-01 UTC
NIGHT_TWO_MJD = 59459.30  # 2021-09-02 UTC
LATE_MJD = 59458.35  # a late alert of night one, sent after the dataset holds that night


def ztf_row(seq: int, mjd: float, rmag: float | None) -> dict[str, Any]:
    """A Lasair-ZTF filter row (the columns Lasair's SN filter selects), one object per seq."""
    return {"objectId": f"ZTF21aaa{seq:04d}", "ramean": 10.0 + seq * 0.01, "decmean": -5.0 + seq * 0.01,
            "mjdmin": mjd - 3, "mjdmax": mjd, "rmag": rmag, "classification": "SN", "seq": seq,
            "UTC": "2021-09-03 00:00:00"}


def rubin_schemas() -> tuple[dict[str, Any], dict[str, Any]]:
    """Rubin's v11.0 writer schema and a v11.1 made from it (diaSource gains ``exposureTime``, as v11.1 did)."""
    with RUBIN_FIXTURE.open("rb") as handle:
        v11_0 = fastavro.reader(handle).writer_schema
    v11_1 = copy.deepcopy(v11_0)
    for fld in v11_1["fields"]:
        if fld["name"] == "diaSource":
            fld["type"]["fields"].append({"name": "exposureTime", "type": ["null", "double"], "default": None})
    return v11_0, v11_1


def container(schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    fastavro.writer(buffer, schema, [record])
    return buffer.getvalue()


@dataclass
class Archived:
    home: Path
    config: Path
    topics: dict[str, str]  # kind -> topic
    s3: S3Server
    bucket: str
    db: Path

    def dataset(self) -> pa.Table:
        return archive.open(self.home).alerts.to_table()

    def ztfd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(ztfd_command(self.config, *args), capture_output=True, text=True, timeout=120,
                              env=child_env(**self.s3.env()))
        if check:
            assert done.returncode == 0, done.stderr
        return done


def stored_keys(db: Path) -> set[tuple[str, int, int, int]]:
    conn = sqlite3.connect(db)
    try:
        return set(conn.execute("SELECT topic, partition, generation, kafka_offset FROM alerts"))
    except sqlite3.OperationalError:  # the store is being created
        return set()
    finally:
        conn.close()


def dataset_keys(table: pa.Table) -> list[tuple[str, int, int, int]]:
    return list(zip(table["topic"].to_pylist(), table["partition"].to_pylist(), table["generation"].to_pylist(),
                    table["offset"].to_pylist(), strict=True))


def all_written(home: Path, db: Path) -> bool:
    try:
        return sorted(dataset_keys(archive.open(home).alerts.to_table())) == sorted(stored_keys(db))
    except (OSError, pa.ArrowInvalid, sqlite3.Error):
        return False


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with S3Server(log_path=tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture(scope="module")
def archived(kafka: KafkaBroker, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archived]:
    run = uuid.uuid4().hex[:8]
    topics = {kind: f"archive-{kind}-{run}" for kind in ("ztf", "lsst", "packets", "rubin")}
    home = tmp_path_factory.mktemp("archive-home")
    bucket = f"ztfd-archive-{run}"
    s3_server.create_bucket(bucket)
    config = write_config(home / "ztfd.toml", {
        "kafka": {"bootstrap_servers": kafka.bootstrap, "group_id": f"g-{run}", "topics": list(topics.values())},
        "kafka.options": dict(FAST_KAFKA_OPTIONS),
        "kafka.formats": {topics["packets"]: "ztf-avro", topics["rubin"]: "ztf-avro"},
        "stamps": {"enabled": False},
        "s3": {"bucket": bucket, "prefix": "mirror/", "endpoint_url": s3_server.endpoint_url, "region": "us-east-1",
               "interval": 1, "max_attempts": 2},
        "report": {"after_quiet": 0},
        "archive": {"enabled": True, "interval": 1, "compact_after": 2},
    }, home)
    for topic in topics.values():
        kafka.create_topic(topic)
    kafka.produce(topics["ztf"], [ztf_row(seq, NIGHT_ONE_MJD, 19.0 + seq / 10) for seq in range(6)]
                  + [ztf_row(seq, NIGHT_TWO_MJD, None) for seq in range(6, 10)])
    kafka.produce(topics["lsst"], [lsst_samples.lasair_fixture_message("full"),
                                   lsst_samples.lasair_fixture_message("plain"),
                                   *lsst_samples.message_stream(6, ("full",))])
    kafka.produce(topics["packets"], [avro_samples.ztf_packet_bytes(p) for p in samples.packets()])
    v11_0, v11_1 = rubin_schemas()
    records = rubin_alerts(4)
    for index, record in enumerate(records[2:]):
        record["diaSource"] = {**record["diaSource"], "exposureTime": 30.0 + index}
    kafka.produce(topics["rubin"], [container(v11_0, r) for r in records[:2]]
                  + [container(v11_1, r) for r in records[2:]])
    db = home / "state" / "ztfd.sqlite3"
    log = (home / "supervisor.log").open("ab")
    proc = subprocess.Popen(ztfd_command(config, "start", "--foreground"), env=child_env(**s3_server.env()),
                            stdout=log, stderr=subprocess.STDOUT)
    result = Archived(home, config, topics, s3_server, bucket, db)
    try:
        expected = 10 + 8 + len(samples.packets()) + 4
        wait_until(lambda: db.exists() and len(stored_keys(db)) >= expected, 120, "every message stored")
        wait_until(lambda: all_written(home, db), 60, "every stored alert in the dataset")
        yield result
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_every_stored_alert_is_in_the_dataset_exactly_once(archived: Archived) -> None:
    keys = dataset_keys(archived.dataset())
    assert len(keys) == len(set(keys))
    assert set(keys) == stored_keys(archived.db)
    layout = sorted(p.relative_to(archived.home).parts[:4] for p in (archived.home / "archive" / "alerts").rglob(
        "*.parquet"))
    assert {parts[2].split("=")[0] for parts in layout} == {"night"}
    assert {parts[3].split("=")[1] for parts in layout} == set(archived.topics.values())


def _types(dtype: pa.DataType, path: str) -> Iterator[tuple[str, pa.DataType]]:
    yield path, dtype
    if pa.types.is_struct(dtype):
        for fld in dtype:
            yield from _types(fld.type, f"{path}.{fld.name}")
    elif pa.types.is_list(dtype):
        yield from _types(dtype.value_type, f"{path}[]")


def test_no_column_is_of_the_null_type_and_no_id_is_a_float(archived: Archived) -> None:
    for parquet in (archived.home / "archive" / "alerts").rglob("*.parquet"):
        for fld in pq.read_schema(parquet):
            for path, dtype in _types(fld.type, fld.name):
                assert not pa.types.is_null(dtype), f"{parquet.name}: {path} is null-typed"
                if path.rstrip("[]").rsplit(".", 1)[-1].endswith(("Id", "ID", "_id", "candid")):
                    assert not pa.types.is_floating(dtype), f"{parquet.name}: {path} is {dtype}"
    schema = archive.open(archived.home).alerts.schema
    assert schema.field("object_id").type == pa.string()
    assert schema.field("_healpix_29").type == pa.int64()
    assert schema.field("object_id").metadata[b"description"].startswith(b"the object's id")


def test_lasair_lsst_ids_beyond_2_to_the_53_stay_exact_and_nan_stays_nan(archived: Archived) -> None:
    table = archive.open(archived.home).sql(
        f"SELECT object_id, diaObjectId, alert, message FROM alerts WHERE topic = '{archived.topics['lsst']}'"
        f" AND object_id = '{LSST_FIXTURE_OBJECT}'")
    rows = table.to_pylist()
    assert len(rows) == 2  # full and plain
    assert {row["diaObjectId"] for row in rows} == {int(LSST_FIXTURE_OBJECT)}  # int64, exact above 2**53
    full = next(row for row in rows if row["alert"] is not None)
    dia_object = full["alert"]["diaObject"]
    nans = [key for key, value in dia_object.items() if isinstance(value, float) and math.isnan(value)]
    assert len(nans) >= 50
    assert full["message"] == lsst_samples.lasair_fixture_message("full")  # the Kafka value, byte for byte


def test_ztf_packets_are_typed_from_their_avro_schema_without_cutouts(archived: Archived) -> None:
    table = archive.open(archived.home).alerts.to_table(
        filter=ds.field("topic") == archived.topics["packets"])
    assert table.num_rows == len(samples.packets())
    assert pa.types.is_struct(table.schema.field("candidate").type)
    assert pa.types.is_list(table.schema.field("prv_candidates").type)
    assert table.schema.field("candid").type == pa.int64()
    assert not [name for name in table.column_names if name.startswith("cutout")]
    by_candid = {row["detection_id"]: row for row in table.to_pylist()}
    for packet in samples.packets():
        row = by_candid[str(packet.candid)]
        assert math.isclose(row["ra"], packet.ra) and math.isclose(row["dec"], packet.dec)
        assert row["candidate"]["candid"] == packet.candid
    assert len(list((archived.home / "archive" / "schemas").glob("*.avsc"))) >= 2  # ZTF's and Rubin's


def test_a_rubin_schema_version_change_inside_one_topic_reads_as_one_table(archived: Archived) -> None:
    table = archive.open(archived.home).sql(
        f"SELECT diaSource.exposureTime AS t, diaSource.diaSourceId AS id FROM alerts "
        f"WHERE topic = '{archived.topics['rubin']}' ORDER BY \"offset\"")
    assert table.column("t").to_pylist() == [None, None, 30.0, 31.0]
    assert min(table.column("id").to_pylist()) > 2**62  # exact 64-bit ids


def test_a_column_null_in_a_whole_night_keeps_its_type(archived: Archived) -> None:
    night_two = list((archived.home / "archive" / "alerts" / "night=2021-09-02").rglob("*.parquet"))
    assert night_two
    for parquet in night_two:
        assert pq.read_schema(parquet).field("rmag").type == pa.float64()
        assert pq.read_table(parquet).column("rmag").null_count == pq.read_metadata(parquet).num_rows


def test_duckdb_pandas_and_the_command_line_read_it(archived: Archived) -> None:
    import duckdb

    root = archived.home / "archive" / "alerts"
    counted = duckdb.sql(f"SELECT count(*) FROM read_parquet('{root}/**/*.parquet', hive_partitioning=true, "
                         "union_by_name=true)").fetchall()[0]
    assert counted is not None and counted[0] == len(stored_keys(archived.db))
    frame = archive.open(archived.home).to_pandas()
    assert len(frame) == counted[0]
    lsst = frame[frame["object_id"] == LSST_FIXTURE_OBJECT]
    assert set(lsst["diaObjectId"].tolist()) == {int(LSST_FIXTURE_OBJECT)}
    answer = archived.ztfd("query", "SELECT topic, count(*) AS n FROM alerts GROUP BY topic ORDER BY topic",
                           "--format", "json")
    assert {row["topic"]: row["n"] for row in json.loads(answer.stdout)} == {
        archived.topics["lsst"]: 8, archived.topics["packets"]: len(samples.packets()),
        archived.topics["rubin"]: 4, archived.topics["ztf"]: 10}
    bad = archived.ztfd("query", "SELECT nope FROM alerts", check=False)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "nope" in bad.stderr
    csv_answer = archived.ztfd("object", "ZTF21abvawaj", "--format", "csv")
    lines = csv_answer.stdout.strip().splitlines()
    assert lines[0].startswith("observed_at,") and len(lines) == 3  # two packets of that object
    stamps = json.loads(archived.ztfd("object", "ZTF21abvawaj", "--format", "json").stdout)
    assert {stamp["kind"] for row in stamps for stamp in row["stamps"]} == {"science", "template", "difference"}


def test_cone_agrees_with_a_brute_force_angular_separation(archived: Archived) -> None:
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    everything = archive.open(archived.home).sql(
        "SELECT object_id, \"offset\", topic, ra, dec FROM alerts WHERE ra IS NOT NULL").to_pylist()
    centre = everything[0]
    coords = SkyCoord([r["ra"] for r in everything] * u.deg, [r["dec"] for r in everything] * u.deg)
    for radius in (1.0, 60.0, 600.0, 7200.0):
        separations = coords.separation(SkyCoord(centre["ra"] * u.deg, centre["dec"] * u.deg)).arcsec
        margin = 1e-6 * radius
        inside = {(r["topic"], r["object_id"]) for r, s in zip(everything, separations, strict=True)
                  if s < radius - margin}
        outside = {(r["topic"], r["object_id"]) for r, s in zip(everything, separations, strict=True)
                   if s > radius + margin}
        answer = json.loads(archived.ztfd("cone", str(centre["ra"]), str(centre["dec"]), str(radius),
                                          "--format", "json").stdout)
        found = {(row["topic"], row["object_id"]) for row in answer}
        assert inside <= found and not found & outside, radius
        for row in answer:
            assert row["distance_arcsec"] <= radius


def test_a_late_alert_joins_a_night_already_written(archived: Archived, kafka: KafkaBroker) -> None:
    before = {p.name for p in (archived.home / "archive" / "alerts" / "night=2021-09-01").rglob("*.parquet")}
    assert before
    kafka.produce(archived.topics["ztf"], [ztf_row(99, LATE_MJD, 18.5)])
    late = "ZTF21aaa0099"

    def in_night_one() -> bool:
        table = archive.open(archived.home).alerts.to_table(filter=ds.field("object_id") == late)
        return table.num_rows == 1 and str(table["night"][0]) == "2021-09-01"

    wait_until(in_night_one, 60, "the late alert in night 2021-09-01")
    wait_until(lambda: all_written(archived.home, archived.db), 30, "no duplicate after the late alert")


def test_the_dataset_reads_back_from_s3(archived: Archived) -> None:
    def uploaded() -> bool:  # every file of archive/ in S3 with its current content (a rewritten one too)
        remote = {key: etag for key, (_size, etag) in archived.s3.objects(archived.bucket).items()}
        local = {f"mirror/{p.relative_to(archived.home).as_posix()}": md5_file(p)
                 for p in (archived.home / "archive").rglob("*") if p.is_file() and not p.name.startswith(".")}
        return all(remote.get(key) == md5 for key, md5 in local.items())

    wait_until(uploaded, 60, "the archive/ files in S3")

    def folded_everywhere() -> bool:
        """Every night quiet: its parts folded into one file per partition and block, on disk and in S3 (the
        folded parts deleted there too, once their new file was uploaded)."""
        files = [p for p in (archived.home / "archive" / "alerts").rglob("*.parquet")]
        blocks = [(p.parent, p.name.split("-o")[0], int(p.name.split("-o")[1][:12]) // 10_000) for p in files]
        remote = {key for key in archived.s3.objects(archived.bucket)
                  if key.startswith("mirror/archive/alerts/") and key.endswith(".parquet")}
        local = {f"mirror/{p.relative_to(archived.home).as_posix()}" for p in files}
        return len(set(blocks)) == len(blocks) and remote == local and uploaded()

    wait_until(folded_everywhere, 60, "the part files folded, on disk and in S3")
    s3fs = s3_filesystem(archived)
    remote = archive.alerts_dataset(f"{archived.bucket}/mirror/archive/alerts", filesystem=s3fs).to_table()
    local = archived.dataset()
    assert sorted(dataset_keys(remote)) == sorted(dataset_keys(local))
    import duckdb

    counted = duckdb.sql("SELECT count(DISTINCT object_id) FROM remote").fetchall()[0]
    assert counted is not None and counted[0] == len(set(local["object_id"].to_pylist()))


def s3_filesystem(archived: Archived) -> Any:
    return conftest.s3_filesystem(archived.s3)


def test_a_fleets_hosts_write_stamps_files_of_their_own_read_as_one_dataset_from_s3(
        archived: Archived, tmp_path: Path) -> None:
    """In a fleet each host writes its own stamps file of a night (two hosts never upload different bytes under one
    key); read from S3 they are one dataset, and a stamp both hosts have (fetched again after a takeover) is shown
    once in an object's row."""
    import shutil
    from types import SimpleNamespace

    from ztfd.archive.stamps import StampsWriter, writer_name

    night_dir = max((p for p in (archived.home / "images").iterdir() if p.is_dir()),
                    key=lambda night: sum(1 for p in night.iterdir() if p.is_dir()))
    objects = sorted(p for p in night_dir.iterdir() if p.is_dir())
    assert len(objects) >= 2  # the real ZTF packets' cutouts: several objects a night
    shared, own = objects[0], objects[-1]
    names = []
    for host, dirs in (("a", [shared]), ("b", [shared, own])):
        home = tmp_path / host
        for folder in dirs:
            shutil.copytree(folder, home / "images" / night_dir.name / folder.name)
        fleet_cfg = SimpleNamespace(kafka=SimpleNamespace(group_mode=True), home=home)
        names.append(writer_name(fleet_cfg))
        written = StampsWriter(home, names[-1]).write_night(night_dir.name)
        assert written is not None and written[0].endswith(f"/stamps-{names[-1]}.parquet")
    assert names[0] != names[1]
    assert writer_name(SimpleNamespace(kafka=SimpleNamespace(group_mode=False), home=tmp_path / "a")) == ""

    client = archived.s3.client()
    prefix = f"fleet-{uuid.uuid4().hex[:6]}/"
    uploads = [(p, p.relative_to(archived.home)) for p in (archived.home / "archive" / "alerts").rglob("*")
               if p.is_file() and not p.name.startswith(".")]
    uploads += [(p, p.relative_to(tmp_path / host)) for host in ("a", "b")
                for p in (tmp_path / host / "archive" / "stamps").rglob("*.parquet")]
    for path, key in uploads:
        client.put_object(Bucket=archived.bucket, Key=prefix + key.as_posix(), Body=path.read_bytes())
    reader = archive.open(f"{archived.bucket}/{prefix}", filesystem=s3_filesystem(archived))
    files_of = {folder.name: sorted(f"images/{night_dir.name}/{folder.name}/{f.name}" for f in folder.iterdir())
                for folder in (shared, own)}
    stamps = reader.stamps.to_table().to_pylist()
    assert sorted(row["path"] for row in stamps) == sorted(files_of[shared.name] * 2 + files_of[own.name])
    shown = [stamp["path"] for row in reader.object_rows(shared.name).to_pylist() for stamp in row["stamps"]]
    assert shown and len(shown) == len(set(shown)) and set(shown) <= set(files_of[shared.name])


def test_a_reader_of_s3_lists_again_when_a_file_is_replaced_or_deleted_under_it(
        archived: Archived, caplog: pytest.LogCaptureFixture) -> None:
    """The race a reader of S3 meets while the archiver and sync rewrite files: the dataset is listed (opened),
    then one file is replaced by a larger version and another deleted, then read. ``ztfd.archive`` lists again
    and reads the new state; a dataset read as listed fails."""

    client = archived.s3.client()
    prefix = f"race-{uuid.uuid4().hex[:6]}/"
    local = sorted(p for p in (archived.home / "archive").rglob("*")
                   if p.is_file() and not p.name.startswith(".") and "stamps" not in p.parts)  # as if no stamps
    for path in local:
        client.put_object(Bucket=archived.bucket, Key=prefix + path.relative_to(archived.home).as_posix(),
                          Body=path.read_bytes())
    s3fs = s3_filesystem(archived)
    alerts = sorted(p for p in local if p.suffix == ".parquet" and "alerts" in p.parts)
    replaced, deleted = alerts[0], alerts[-1]
    gone = set(dataset_keys(pq.read_table(deleted).append_column(
        "topic", pa.array([deleted.parent.name.removeprefix("topic=")] * pq.read_metadata(deleted).num_rows))))

    def change_under_the_reader(copies: int) -> None:
        """Replace ``replaced`` by the same rows written bigger (uncompressed, with ``copies`` times 4 kB of
        metadata as padding), delete ``deleted``."""
        table = pq.read_table(replaced)
        buffer = io.BytesIO()
        pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), b"pad": b"x" * 4096 * copies}),
                       buffer, compression="none")
        client.put_object(Bucket=archived.bucket, Key=prefix + replaced.relative_to(archived.home).as_posix(),
                          Body=buffer.getvalue())
        client.delete_object(Bucket=archived.bucket, Key=prefix + deleted.relative_to(archived.home).as_posix())

    expected = sorted(set(dataset_keys(archived.dataset())) - gone)
    reader = archive.open(f"{archived.bucket}/{prefix}", filesystem=s3fs)  # lists the files
    assert reader.stamps.count_rows() == 0  # nothing under archive/stamps/ in the bucket: no stamps, no error
    listed = reader.alerts
    change_under_the_reader(1)
    with pytest.raises((OSError, pa.ArrowInvalid)):
        listed.to_table()  # read as listed: the race
    with caplog.at_level(logging.INFO, logger="ztfd.archive.query"):
        assert sorted(dataset_keys(reader.to_table())) == expected
    assert [r for r in caplog.records if "listing the files again" in r.getMessage()]
    caplog.clear()

    client.put_object(Bucket=archived.bucket, Key=prefix + deleted.relative_to(archived.home).as_posix(),
                      Body=deleted.read_bytes())
    reader = archive.open(f"{archived.bucket}/{prefix}", filesystem=s3fs)
    change_under_the_reader(2)
    with caplog.at_level(logging.INFO, logger="ztfd.archive.query"):
        counted = reader.sql("SELECT count(*) AS n FROM alerts")  # DuckDB scanning the dataset meets it too
    assert counted["n"].to_pylist() == [len(expected)]
    assert [r for r in caplog.records if "listing the files again" in r.getMessage()]
