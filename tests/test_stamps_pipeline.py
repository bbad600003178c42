"""Alerts consumed from a real broker by ``ztfd consume`` end with their stamps, through ``ztfd fetch``."""

from __future__ import annotations

import subprocess
import uuid

from tests.conftest import child_env, ztfd_command
from tests.stamp_support import FAST_STAMPS, all_final, jobs, start_fetcher, stop_fetcher, wait_until
from ztfd import config, store
from ztfd.embedded.samples import lasair_message, packets
from ztfd.stamps.fetcher import preview_path, stamp_path
from ztfd.store.alerts import count_alerts


def test_consumed_alerts_get_byte_identical_stamps(kafka, make_config, stamp_service, tmp_path):
    topic = f"lasair_stamps_{uuid.uuid4().hex[:8]}"
    kafka.create_topic(topic)
    # An SN-like row (mjdmax) and a topic_refresh row (jdmax) per packet: both carry the alert's time.
    messages = [lasair_message(p, shape) for p in packets() for shape in ("sn", "refresh")]
    kafka.produce(topic, messages)
    cfg_path = make_config(
        kafka={"bootstrap_servers": kafka.bootstrap, "group_id": f"g-{topic}", "topics": [topic]},
        stamps={**FAST_STAMPS, "alerce_stamp_url": stamp_service.url, "alerce_api_url": stamp_service.url},
    )
    cfg = config.load(cfg_path)
    stamp_service.error_rate = 0.2  # ALeRCE failing part of the requests on top of it
    consumer = subprocess.Popen(ztfd_command(cfg_path, "consume", "--topic", topic), env=child_env(),
                                stdout=subprocess.DEVNULL, stderr=(tmp_path / "consumer.log").open("wb"))
    fetcher = start_fetcher(cfg_path, "fetcher-1", tmp_path / "fetcher.log")
    try:
        conn = store.connect(cfg.db_path)
        # The sn and refresh rows of a packet carry the same detection time: one job fetches both alerts' stamps
        # (a second job appears only if the first had already finished when the resend arrived).
        stored = lambda: count_alerts(conn)  # noqa: E731
        wait_until(lambda: stored() == len(messages) and len(jobs(conn)) >= len(packets()) and all_final(conn),
                   timeout=90, what="every consumed alert's stamp job to finish")
    finally:
        assert stop_fetcher(fetcher) == 0
        assert stop_fetcher(consumer) == 0
    for job in jobs(conn):
        assert job["state"] == "done", job
        packet = next(p for p in packets() if p.candid == int(job["result"]["candid"]))
        assert packet.object_id == job["payload"]["object_id"]
        assert abs(packet.mjd - job["payload"]["obs_mjd"]) * 86400 < 1  # the candid of the alert's own time
        for kind, served in packet.cutouts.items():
            assert stamp_path(cfg.images_dir, job["payload"]["date"], packet.object_id, packet.candid,
                              kind).read_bytes() == served
        assert preview_path(cfg.images_dir, job["payload"]["date"], packet.object_id, packet.candid).exists()
    assert {int(job["result"]["candid"]) for job in jobs(conn)} == {p.candid for p in packets()}
    assert len(jobs(conn)) <= len(messages)
