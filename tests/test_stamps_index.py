"""The fleet's stamps index of a night (``ztfd.archive.fleet_stamps``), written by the night report writer from the
bucket's listing, through moto over HTTP: each key once, a lost host's stamps present although its own stamps file
never reached the bucket, read once with the hosts' files, and its upload does not make the night due again."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests.test_archive_overlap import write_rows
from ztfd import archive, config, files, store
from ztfd.archive import fleet_stamps
from ztfd.archive.stamps import StampsWriter, write_if_changed
from ztfd.embedded.s3 import S3Server
from ztfd.reporting.fleet_night import FROM_THE_FLEET_HERE, FleetNight
from ztfd.store import manifest
from ztfd.store.rejected import export_path
from ztfd.sync.s3 import FatalError

NIGHT = "2026-03-04"
PREFIX = "fleet/"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with S3Server(log_path=tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


def host_home(root: Path, name: str, stamps: dict[str, list[str]]) -> Path:
    """A host's home with the stamp files of ``stamps`` (object -> detections) and its own stamps file."""
    home = root / name
    for object_id, detections in stamps.items():
        folder = home / "images" / NIGHT / object_id
        folder.mkdir(parents=True, exist_ok=True)
        for detection in detections:
            for kind in ("science", "template", "difference"):
                (folder / f"{detection}_{kind}.fits.gz").write_bytes(f"{object_id} {detection} {kind}".encode())
            (folder / f"{detection}.png").write_bytes(f"preview of {detection}".encode())
    assert StampsWriter(home, writer=f"{name}-0000abcd").write_night(NIGHT) is not None
    return home


def upload(client: Any, bucket: str, home: Path, folder: str) -> list[str]:
    """Put every file under ``home/folder`` as the syncer would (``<prefix><path relative to the home>``)."""
    keys = []
    for path in sorted((home / folder).rglob("*")):
        if path.is_file():
            keys.append(PREFIX + path.relative_to(home).as_posix())
            client.put_object(Bucket=bucket, Key=keys[-1], Body=path.read_bytes())
    return keys


def test_the_index_lists_each_stamp_in_the_bucket_once_with_a_lost_hosts_and_is_not_due_again(
        s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        make_config: Callable[..., Path]) -> None:
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    bucket = f"index-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(bucket)
    client = s3.client(direct=True)
    # Detection 2 of ZTF1 was fetched by both hosts (again by the survivor after a takeover); the lost host's images
    # reached the bucket, its stamps file of the night never did.
    lost = host_home(tmp_path, "lost", {"ZTF26aaaaaaa": ["1", "2"]})
    survivor = host_home(tmp_path, "survivor", {"ZTF26aaaaaaa": ["2", "3"], "ZTF26bbbbbbb": ["4"]})
    keys = set(upload(client, bucket, lost, "images")) | set(upload(client, bucket, survivor, "images"))
    write_rows(survivor, NIGHT, [1, 2, 3], object_id="ZTF26aaaaaaa")  # its alerts: detections 1 to 3 (taken over)
    upload(client, bucket, survivor, "archive")
    # one stamp uploaded in parts: its ETag is no MD5
    big = f"{PREFIX}images/{NIGHT}/ZTF26bbbbbbb/5_science.fits.gz"
    started = client.create_multipart_upload(Bucket=bucket, Key=big)
    part = client.upload_part(Bucket=bucket, Key=big, UploadId=started["UploadId"], PartNumber=1, Body=b"parts")
    client.complete_multipart_upload(Bucket=bucket, Key=big, UploadId=started["UploadId"],
                                     MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]})
    keys.add(big)

    writer_home = tmp_path / "writer"
    cfg = config.load(make_config(
        writer_home, kafka={"assignment": "group", "group_id": "g"}, archive={"enabled": True},
        s3={"bucket": bucket, "prefix": PREFIX, "endpoint_url": s3.endpoint_url, "region": "us-east-1"}))
    conn = store.connect(cfg.db_path)
    try:
        night = FleetNight(cfg, conn)
        quiet = time.time() + cfg.report.after_quiet + 60
        [(date, version)] = night.due(quiet)
        assert date == NIGHT

        # A writer killed after writing the index and before recording it: the next one records it all the same.
        index = writer_home / "archive" / "stamps" / f"night={NIGHT}" / "stamps.parquet"
        assert write_if_changed(writer_home, index, fleet_stamps.listed_rows(client, bucket, PREFIX, NIGHT))
        assert manifest.recorded_file(conn, f"archive/stamps/night={NIGHT}/stamps.parquet") is None
        rows = night.write_stamps_index(NIGHT)
        table = pq.read_table(index)
        assert table.schema.remove_metadata() == pq.read_table(next(
            (survivor / "archive").rglob("*.parquet"))).schema.remove_metadata()
        listed = table.to_pylist()
        assert len(listed) == len(rows) == len(keys)
        assert sorted(row["path"] for row in listed) == sorted(key.removeprefix(PREFIX) for key in keys)  # once each
        on_disk = {p.relative_to(home).as_posix(): p for home in (lost, survivor) for p in (home / "images").rglob("*")
                   if p.is_file()}
        for row in listed:
            if row["path"] in on_disk:
                assert row["md5"] == files.md5_file(on_disk[row["path"]]), row
                assert row["bytes"] == on_disk[row["path"]].stat().st_size
            else:
                assert row["md5"] is None and row["bytes"] == len(b"parts")  # the multipart upload's
        assert {(row["detection_id"], row["kind"]) for row in listed if row["object_id"] == "ZTF26aaaaaaa"} >= \
            {("1", "science"), ("1", "preview")}  # only the lost host had detection 1
        assert manifest.recorded_file(conn, f"archive/stamps/night={NIGHT}/stamps.parquet") is not None
        before = index.stat().st_mtime_ns
        assert night.write_stamps_index(NIGHT) == rows and index.stat().st_mtime_ns == before  # unchanged: kept

        # The syncer uploads it; read with the hosts' files, each path once.
        upload(client, bucket, writer_home, "archive")
        reader = archive.open(f"{bucket}/{PREFIX}", filesystem=s3.arrow_filesystem(direct=True))
        assert reader.sql("SELECT count(*) AS n, count(DISTINCT path) AS d FROM stamps").to_pylist() == \
            [{"n": len(keys), "d": len(keys)}]
        assert reader.night_stamp_paths(NIGHT).num_rows == len(keys)
        shown = [stamp["path"] for row in reader.object_rows("ZTF26aaaaaaa").to_pylist() for stamp in row["stamps"]]
        assert sorted(shown) == sorted(k.removeprefix(PREFIX) for k in keys if "/ZTF26aaaaaaa/" in k)  # once each

        # Its own index uploaded does not make the night due again; a host's new stamps file does.
        night.reported(date, version)
        assert night.due(quiet) == []
        (survivor / "images" / NIGHT / "ZTF26bbbbbbb" / "6_science.fits.gz").write_bytes(b"six")
        assert StampsWriter(survivor, writer="survivor-0000abcd").write_night(NIGHT) is not None
        upload(client, bucket, survivor, "archive")
        assert [d for d, _ in night.due(quiet + 60)] == [NIGHT]

        # The report counts the fleet's rejected messages of the day from the exports in the bucket (one file per
        # message in fleet mode, named by its Kafka identity): whichever host rejected them, each once.
        for key in (f"data/{NIGHT}/t1/{export_path('t1', 0, 0, 7, 0.0).rsplit('/', 1)[1]}",
                    f"data/{NIGHT}/t1/{export_path('t1', 1, 2, 9, 0.0).rsplit('/', 1)[1]}",
                    f"data/{NIGHT}/t2/{export_path('t2', 0, 0, 3, 0.0).rsplit('/', 1)[1]}",
                    f"data/{NIGHT}/t1/ZTF26aaaaaaa_p0-o7.json",  # an alert's file: not counted
                    f"data/2026-03-05/t1/{export_path('t1', 0, 0, 8, 0.0).rsplit('/', 1)[1]}"):  # another day
            client.put_object(Bucket=bucket, Key=PREFIX + key, Body=b"{}\n")
        assert night.rejected_in_bucket(NIGHT, None) == 3 and night.rejected_in_bucket(NIGHT, "t1") == 2
        _, counts = night.gather(NIGHT, None)
        assert counts["rejected"] == 3 and "every host's exports in the bucket" in counts["note"]

        # Credentials that may not list the bucket: the report is still made, without the index, and counts this
        # host's rejected messages (none), saying so.
        def refused(*_: Any) -> Any:
            raise FatalError("access denied to bucket (AccessDenied)")

        monkeypatch.setattr(fleet_stamps, "listed", refused)
        monkeypatch.setattr("ztfd.reporting.fleet_night.listed", refused)
        cards, counts = night.gather(NIGHT, None)
        assert cards and counts["rejected"] == 0 and counts["note"] == FROM_THE_FLEET_HERE
    finally:
        conn.close()
