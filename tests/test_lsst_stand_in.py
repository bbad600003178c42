"""The local stamp service's LSST routes (ALeRCE multisurvey, Lasair /fits/) serve the real Rubin cutouts."""

from __future__ import annotations

import gzip
import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from ztfd.embedded import lsst_samples
from ztfd.embedded.alerce import LASAIR_FITS, LSST_STAMP, StampService, first_hdu


@pytest.fixture(scope="module")
def service() -> Iterator[StampService]:
    with StampService() as running:
        yield running


def get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read(), answer.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def stamp_url(service: StampService, object_id: object, source_id: object, kind: str = "cutoutScience") -> str:
    return (f"{service.url}/stamps_api/stamp?oid={object_id}&measurement_id={source_id}&stamp_type={kind}"
            "&file_format=fits&survey_id=lsst")


def test_it_serves_the_alerts_with_a_dia_object() -> None:
    with_objects = lsst_samples.object_alerts()
    assert len(lsst_samples.rubin_alerts()) == 7 and len(with_objects) == 5
    assert all(a.dia_source_id > 2**53 and a.dia_object_id > 2**53 for a in with_objects)  # type: ignore[operator]


def test_detections_list_each_alert_with_stamps_and_its_history_without(service: StampService) -> None:
    for alert in lsst_samples.object_alerts():
        status, body, _ = get(f"{service.url}/lightcurve_api/detections?survey_id=lsst&oid={alert.dia_object_id}")
        assert status == 200
        rows = json.loads(body)  # Python's json keeps the int64 ids exact
        stamped = [row for row in rows if row["has_stamp"]]
        assert [(r["oid"], r["measurement_id"], r["mjd"]) for r in stamped] == [
            (alert.dia_object_id, alert.dia_source_id, alert.mjd_tai)]
        assert len(rows) > 1 and all(row["mjd"] <= alert.mjd_tai for row in rows)
    assert json.loads(get(f"{service.url}/lightcurve_api/detections?survey_id=lsst&oid=1")[1]) == []
    assert get(f"{service.url}/lightcurve_api/detections?oid=1")[0] == 422
    assert get(f"{service.url}/lightcurve_api/detections?survey_id=ztf&oid=1")[0] == 400


def test_alerce_serves_the_gzip_of_the_whole_rubin_cutout(service: StampService) -> None:
    from astropy.io import fits

    alert = lsst_samples.object_alerts()[0]
    for kind, name in (("science", "cutoutScience"), ("template", "cutoutTemplate"),
                       ("difference", "cutoutDifference")):
        status, body, content_type = get(stamp_url(service, alert.dia_object_id, alert.dia_source_id, name))
        assert (status, content_type) == (200, "application/gzip")
        assert body == service.alerce_lsst_stamp(alert.dia_source_id, kind)
        assert gzip.decompress(body) == alert.cutouts[kind]
        with fits.open(io.BytesIO(gzip.decompress(body))) as hdus:
            assert [hdu.name for hdu in hdus] == ["PRIMARY", "UNCERT", "PSFIMAGE"]


def test_alerce_answers_500_for_a_stamp_it_does_not_have(service: StampService) -> None:
    alert = lsst_samples.object_alerts()[0]
    assert get(stamp_url(service, alert.dia_object_id, 12345))[:2] == (500, b'{"detail":"An error occurred"}')
    assert get(stamp_url(service, 1, alert.dia_source_id))[0] == 500  # another object's alert
    assert get(stamp_url(service, alert.dia_object_id, alert.dia_source_id, "cutoutMask"))[0] == 500
    assert get(f"{service.url}/stamps_api/stamp?oid=1&measurement_id=2")[0] == 422


def test_lasair_serves_the_first_hdu_plain_after_a_redirect(service: StampService) -> None:
    from astropy.io import fits

    alert = lsst_samples.object_alerts()[1]
    status, body, content_type = get(f"{service.url}/fits/{alert.dia_source_id}_cutoutDifference")  # no slash
    assert (status, content_type) == (200, "image/fits")
    assert body == service.lasair_lsst_stamp(alert.dia_source_id, "difference")
    assert alert.cutouts["difference"].startswith(body) and len(body) < len(alert.cutouts["difference"])
    with fits.open(io.BytesIO(body)) as hdus:
        assert len(hdus) == 1 and hdus[0].data.shape == (30, 30)
    assert get(f"{service.url}/fits/12345_cutoutScience/")[:2] == (200, b"None")  # Lasair's "no such cutout"


def test_faults_reach_the_lsst_routes(service: StampService) -> None:
    alert = lsst_samples.object_alerts()[2]
    lasair_url = f"{service.url}/fits/{alert.dia_source_id}_cutoutScience/"
    service.server_errors(1, status=502, endpoint=LSST_STAMP)
    assert get(stamp_url(service, alert.dia_object_id, alert.dia_source_id))[0] == 502
    service.not_found_then_available(1, endpoint=LSST_STAMP)
    assert get(stamp_url(service, alert.dia_object_id, alert.dia_source_id))[0] == 500
    service.not_found_then_available(1, endpoint=LASAIR_FITS)
    assert get(lasair_url)[:2] == (200, b"None")
    service.inject("empty_body", 1)
    assert get(lasair_url)[:2] == (200, b"")
    service.truncated(1, endpoint=LASAIR_FITS)
    assert len(get(lasair_url)[1]) == len(service.lasair_lsst_stamp(alert.dia_source_id, "science")) // 2
    assert get(lasair_url)[1] == service.lasair_lsst_stamp(alert.dia_source_id, "science")


def test_first_hdu_is_a_prefix_of_whole_blocks() -> None:
    for alert in lsst_samples.rubin_alerts():
        for data in alert.cutouts.values():
            head = first_hdu(data)
            assert data.startswith(head) and len(head) % 2880 == 0 and len(head) < len(data)
    with pytest.raises(ValueError, match="no END card"):
        first_hdu(b"SIMPLE  = T" + b" " * 2000)
