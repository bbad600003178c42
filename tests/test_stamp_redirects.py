"""Stamp requests follow no redirect to another host: a stamp service answering 302 to another 127.0.0.x port is
a failed attempt with its reason, and the other host hears nothing; a redirect on the same host is followed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.stamp_support import add_alerts, fetch_until_final, jobs, stamps_config
from ztfd import config, store
from ztfd.embedded.alerce import AVRO, STAMP, StampService
from ztfd.embedded.samples import packets


@pytest.fixture
def elsewhere() -> Iterator[StampService]:
    """Another stamp service, on another loopback address: where a hostile redirect would send ztfd."""
    with StampService(host="127.0.0.2") as service:
        yield service


@pytest.mark.parametrize(("request_kind", "endpoint"), [("get_stamp", STAMP), ("get_avro", AVRO)])
def test_a_redirect_to_another_host_is_not_followed(
    make_config: Callable[..., Path], stamp_service: StampService, elsewhere: StampService, tmp_path: Path,
    request_kind: str, endpoint: str,
) -> None:
    packet = packets()[0]
    stamp_service.redirect(elsewhere.url, times=None, candid=packet.candid)  # get_avro's faults are STAMP's too
    cfg_path = stamps_config(make_config, stamp_service.url, max_attempts=2, ztf_request=request_kind)
    conn = store.connect(config.load(cfg_path).db_path)
    add_alerts(conn, [packet])
    fetch_until_final(cfg_path, conn, tmp_path / "worker.log", what="the job to fail")
    (job,) = jobs(conn)
    assert job["state"] == "failed"
    assert f"redirected to another host (http://127.0.0.2:{elsewhere.port}): not followed" in job["last_error"]
    assert elsewhere.arrivals() == 0
    assert stamp_service.count(endpoint, status=302) >= 2


def test_a_redirect_on_the_same_host_is_followed(
    make_config: Callable[..., Path], stamp_service: StampService, tmp_path: Path,
) -> None:
    packet = packets()[0]
    stamp_service.redirect(stamp_service.url, times=1, candid=packet.candid)
    cfg_path = stamps_config(make_config, stamp_service.url, ztf_request="get_avro")
    conn = store.connect(config.load(cfg_path).db_path)
    add_alerts(conn, [packet])
    fetch_until_final(cfg_path, conn, tmp_path / "worker.log", what="the job to finish")
    (job,) = jobs(conn)
    assert job["state"] == "done", job["last_error"]
    assert stamp_service.count(AVRO, status=302) == 1 and stamp_service.count(AVRO, status=200) == 1
