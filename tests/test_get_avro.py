"""``stamps.ztf_request = "get_avro"`` (the default): one request per Lasair-ZTF triplet, the packet kept beside the
stamps, and one detections response for every queued alert of an object; against the local stamp service."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json

import fastavro
import pytest

from tests.stamp_support import FAST_STAMPS, add_alerts, fetch_until_final, jobs, stamps_config
from ztfd import config, store
from ztfd.config import StampsConfig
from ztfd.embedded.alerce import AVRO, DETECTIONS, STAMP, StampService
from ztfd.embedded.avro_samples import ztf_packet_bytes
from ztfd.embedded.samples import packets
from ztfd.stamps.fetcher import preview_path, stamp_path
from ztfd.stamps.providers import NotYetAvailableError, StampRequest
from ztfd.stamps.providers.alerce_ztf import AlerceZtf
from ztfd.store.manifest import manifest_files

GET_AVRO = {"ztf_request": "get_avro", "detections_fresh": 600.0}


def test_one_request_per_triplet_the_packet_kept_and_the_stamps_byte_for_byte(make_config, stamp_service,
                                                                              tmp_path) -> None:
    cfg_path = stamps_config(make_config, stamp_service.url, **GET_AVRO)
    cfg = config.load(cfg_path)
    conn = store.connect(cfg.db_path)
    add_alerts(conn, packets())
    fetch_until_final(cfg_path, conn, tmp_path / "worker.log", what="every job done")
    manifest = {row.path for row in manifest_files(conn)}
    for job, packet in zip(jobs(conn), packets(), strict=True):
        assert job["state"] == "done" and int(job["result"]["candid"]) == packet.candid
        date = job["payload"]["date"]
        for kind, served in packet.cutouts.items():
            assert stamp_path(cfg.images_dir, date, packet.object_id, packet.candid, kind).read_bytes() == served
        kept = cfg.images_dir / date / packet.object_id / f"{packet.candid}.avro"
        assert kept.read_bytes() == packet.path.read_bytes()
        assert kept.relative_to(cfg.home).as_posix() in manifest
        assert preview_path(cfg.images_dir, date, packet.object_id, packet.candid).stat().st_size > 0
    objects = {p.object_id for p in packets()}
    assert stamp_service.count(STAMP) == 0
    assert stamp_service.count(AVRO) == len(packets())
    assert stamp_service.count(DETECTIONS) == len(objects)  # two alerts of ZTF21abvawaj: one list
    assert (stamp_service.count(AVRO) + stamp_service.count(DETECTIONS)) / len(packets()) <= 2.0


def test_a_catch_up_with_several_alerts_per_object_asks_each_object_once(make_config, tmp_path) -> None:
    base = packets()[:4]
    names = ("ZTF99catchaa", "ZTF99catchbb", "ZTF99catchcc", "ZTF99catchdd")
    catch_up = [dataclasses.replace(p, object_id=names[i], candid=p.candid + n, jd=p.jd + n / 24)
                for n in range(3) for i, p in enumerate(base)]  # interleaved, as a topic replays them
    with StampService(packets=catch_up) as service:
        cfg_path = stamps_config(make_config, service.url, **GET_AVRO, workers=2)
        conn = store.connect(config.load(cfg_path).db_path)
        add_alerts(conn, catch_up)
        fetch_until_final(cfg_path, conn, tmp_path / "worker.log", what="the catch-up done")
        assert all(job["state"] == "done" for job in jobs(conn))
        assert service.count(DETECTIONS) == len(base)
        assert service.count(AVRO) == len(catch_up)
        assert (service.count(AVRO) + service.count(DETECTIONS)) / len(catch_up) <= 1.5


def test_get_avro_faults_are_retried_or_waited_for(make_config, stamp_service, tmp_path) -> None:
    late, broken, wrong = packets()[0], packets()[1], packets()[2]
    stamp_service.not_found_then_available(2, candid=late.candid)
    stamp_service.server_errors(1, candid=broken.candid)
    stamp_service.truncated(1, candid=wrong.candid)
    cfg_path = stamps_config(make_config, stamp_service.url, **GET_AVRO)
    conn = store.connect(config.load(cfg_path).db_path)
    add_alerts(conn, [late, broken, wrong])
    fetch_until_final(cfg_path, conn, tmp_path / "worker.log", what="every job done")
    assert [job["state"] for job in jobs(conn)] == ["done"] * 3
    assert stamp_service.count(AVRO, candid=late.candid) == 3
    assert stamp_service.count(AVRO, candid=broken.candid) == 2
    assert stamp_service.count(AVRO, candid=wrong.candid) == 2


def test_a_packet_that_is_not_avro_fails_with_its_reason(make_config, stamp_service, tmp_path) -> None:
    packet = packets()[0]
    stamp_service.garbage(None, candid=packet.candid)
    cfg_path = stamps_config(make_config, stamp_service.url, **GET_AVRO, max_attempts=2)
    conn = store.connect(config.load(cfg_path).db_path)
    add_alerts(conn, [packet])
    fetch_until_final(cfg_path, conn, tmp_path / "worker.log", what="the job failed")
    (job,) = jobs(conn)
    assert job["state"] == "failed" and "get_avro: not an Avro container file" in job["last_error"]


class FakeCache:
    def __init__(self, kept: dict[str, bytes]) -> None:
        self.kept = kept

    async def get(self, object_id: str) -> bytes | None:
        return self.kept.get(object_id)

    async def put(self, object_id: str, body: bytes) -> None:
        self.kept[object_id] = body


def test_a_kept_detections_list_without_the_alert_is_fetched_again() -> None:
    """Unit test of the provider with a faked GET: a stale list in the cache costs one more request, no wait."""
    packet = packets()[0]
    fresh = json.dumps([{"candid": str(packet.candid), "mjd": packet.mjd, "has_stamp": True}]).encode()
    asked: list[str] = []

    async def get(url: str, params: dict[str, str] | None) -> tuple[int, bytes]:
        asked.append(url)
        return 200, fresh

    provider = AlerceZtf(StampsConfig(**{**FAST_STAMPS, **GET_AVRO}))
    provider.cache = FakeCache({packet.object_id: b"[]"})
    request = StampRequest("ztf", packet.object_id, "2021-09-01", packet.mjd, None)
    detection = asyncio.run(provider.find_detection(get, request))
    assert detection.detection_id == str(packet.candid) and len(asked) == 1
    assert provider.cache.kept[packet.object_id] == fresh
    asyncio.run(provider.find_detection(get, request))
    assert len(asked) == 1  # now the kept list serves
    provider.cache = FakeCache({})

    async def missing(url: str, params: dict[str, str] | None) -> tuple[int, bytes]:
        return 404, b"{}"

    with pytest.raises(NotYetAvailableError):
        asyncio.run(provider.find_detection(missing, request))


def test_the_stand_in_serves_renamed_packets_with_their_new_ids() -> None:
    renamed = dataclasses.replace(packets()[0], object_id="ZTF99renamed", candid=123)
    (record,) = fastavro.reader(io.BytesIO(ztf_packet_bytes(renamed)))
    assert (record["objectId"], record["candid"], record["candidate"]["candid"]) == ("ZTF99renamed", 123, 123)
    assert record["cutoutScience"]["stampData"] == packets()[0].cutouts["science"]


def test_get_avro_packets_are_decoded_off_the_event_loop_within_bounds_and_the_step_timeout(monkeypatch) -> None:
    """Unit test of the provider with a faked GET: a hostile packet fails the fetch with its reason, the decoding
    runs on another thread than the loop's, and one that outlasts ``stamps.step_timeout`` is abandoned."""
    import threading

    from tests import hostile_avro
    from ztfd.stamps.providers import Detection, FetchError, alerce_ztf

    packet = packets()[0]
    served = {"body": hostile_avro.recursive_container()}

    async def get(url: str, params: dict[str, str] | None) -> tuple[int, bytes]:
        return 200, served["body"]

    provider = AlerceZtf(StampsConfig(**{**FAST_STAMPS, **GET_AVRO, "step_timeout": 0.5}))
    request = StampRequest("ztf", packet.object_id, "2021-09-01", packet.mjd, None)
    detection = Detection(str(packet.candid), packet.mjd)
    kinds = ["science", "template", "difference"]
    with pytest.raises(FetchError, match=r"get_avro: the container's writer schema is refused: .*refers to itself"):
        asyncio.run(provider.fetch_packet(get, request, detection, kinds))

    threads, release = [], threading.Event()
    real = alerce_ztf.packet_stamps

    def watched(*args):
        threads.append(threading.current_thread())
        return real(*args)

    monkeypatch.setattr(alerce_ztf, "packet_stamps", watched)
    served["body"] = ztf_packet_bytes(packet)
    bundle = asyncio.run(provider.fetch_packet(get, request, detection, kinds))
    assert sorted(bundle.stamps) == sorted(kinds) and threads[0] is not threading.main_thread()

    monkeypatch.setattr(alerce_ztf, "packet_stamps", lambda *args: release.wait(30))
    try:
        with pytest.raises(FetchError, match="step_timeout"):
            asyncio.run(provider.fetch_packet(get, request, detection, kinds))
    finally:
        release.set()
