"""The LSST stamp providers on their own: what each answer of ALeRCE and Lasair means (a fake ``get``)."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
from typing import Any

import pytest

from ztfd.config import StampsConfig
from ztfd.embedded import lsst_samples
from ztfd.embedded.alerce import first_hdu
from ztfd.sources import LSST, ZTF
from ztfd.stamps.providers import (
    PROVIDERS,
    Detection,
    FetchError,
    NotYetAvailableError,
    StampRequest,
    configured_surveys,
)
from ztfd.stamps.providers.alerce_lsst import AlerceLsst, parse_detections
from ztfd.stamps.providers.lasair_lsst import LasairLsst

SAMPLE = lsst_samples.object_alerts()[0]
TAI_MINUS_UTC = 37 / 86400


def request(obs_mjd: float | None = None) -> StampRequest:
    return StampRequest(LSST, str(SAMPLE.dia_object_id), "2026-03-05", obs_mjd, None)


def answering(status: int, body: bytes) -> Any:  # an HttpGet that records its calls
    calls: list[tuple[str, dict[str, str] | None]] = []

    async def get(url: str, params: dict[str, str] | None) -> tuple[int, bytes]:
        calls.append((url, params))
        return status, body

    get.calls = calls  # type: ignore[attr-defined]
    return get


def detection_rows(*rows: tuple[object, object, object]) -> bytes:
    return json.dumps([{"oid": SAMPLE.dia_object_id, "measurement_id": i, "mjd": m, "has_stamp": s}
                       for i, m, s in rows]).encode()


def test_providers_are_registered_per_survey_and_none_means_no_stamps() -> None:
    assert PROVIDERS[(LSST, "alerce")] is AlerceLsst and PROVIDERS[(LSST, "lasair")] is LasairLsst
    assert PROVIDERS[(ZTF, "alerce")] is not AlerceLsst
    assert LSST not in configured_surveys(StampsConfig(lsst_provider="none"))
    assert configured_surveys(StampsConfig())[LSST] == "alerce"


def test_alerce_detections_are_tai_and_converted_before_matching() -> None:
    obs_utc = SAMPLE.mjd_tai - TAI_MINUS_UTC  # what the consumer computes for the alert
    body = detection_rows((SAMPLE.dia_source_id, SAMPLE.mjd_tai, True), (1, SAMPLE.mjd_tai - 1, True))
    (first, _) = parse_detections(body)
    assert first.candid == SAMPLE.dia_source_id  # a JSON integer beyond 2**53, exact
    assert first.mjd == pytest.approx(obs_utc, abs=1e-8)
    # Within 30 s only because the 37 s of TAI - UTC were taken off.
    provider = AlerceLsst(dataclasses.replace(StampsConfig(), match_tolerance=30.0))
    chosen = asyncio.run(provider.find_detection(answering(200, body), request(obs_utc)))
    assert chosen.detection_id == str(SAMPLE.dia_source_id)


def test_alerce_detections_skip_rows_no_id_could_be_exact_in() -> None:
    body = detection_rows((1.7e17, 61105.0, True), (True, 61105.0, True), ("12", 61105.0, True),
                          (5, "61105", True), (6, 61105.0, None), (7, 61105.0, True))
    assert [(row.candid, row.has_stamp) for row in parse_detections(body)] == [(6, False), (7, True)]
    with pytest.raises(FetchError, match="not JSON"):
        parse_detections(b"[{not json")


def test_an_unknown_object_is_not_yet_available() -> None:
    with pytest.raises(NotYetAvailableError, match="no detection with stamps"):
        asyncio.run(AlerceLsst(StampsConfig()).find_detection(answering(200, b"[]"), request()))
    with pytest.raises(FetchError, match="HTTP 500"):  # the detections route failing is a failure
        asyncio.run(AlerceLsst(StampsConfig()).find_detection(answering(500, b"{}"), request()))


def test_alerce_500_means_not_stored_yet_and_other_5xx_a_failure() -> None:
    provider, detection = AlerceLsst(StampsConfig()), Detection(str(SAMPLE.dia_source_id), None)
    with pytest.raises(NotYetAvailableError, match="not stored"):
        asyncio.run(provider.fetch(answering(500, b'{"detail":"An error occurred"}'), request(), detection, "science"))
    with pytest.raises(FetchError, match="HTTP 502"):
        asyncio.run(provider.fetch(answering(502, b""), request(), detection, "science"))
    served = gzip.compress(SAMPLE.cutouts["template"], mtime=0)
    get = answering(200, served)
    assert asyncio.run(provider.fetch(get, request(), detection, "template")) == served
    assert get.calls[0][1] == {"oid": str(SAMPLE.dia_object_id), "measurement_id": str(SAMPLE.dia_source_id),
                               "stamp_type": "cutoutTemplate", "file_format": "fits", "survey_id": "lsst"}
    assert provider.check(served).shape == (30, 30)
    assert provider.file_name("170094456272322680", "template") == "170094456272322680_template.fits.gz"
    with pytest.raises(ValueError, match="not gzip"):
        provider.check(SAMPLE.cutouts["template"])


@pytest.mark.parametrize("body", [b"None", b"", b"<html>error</html>"])
def test_a_lasair_body_that_is_not_fits_is_not_yet_available(body: bytes) -> None:
    provider, detection = LasairLsst(StampsConfig()), Detection(str(SAMPLE.dia_source_id), None)
    with pytest.raises(NotYetAvailableError, match="Lasair has no difference cutout"):
        asyncio.run(provider.fetch(answering(200, body), request(), detection, "difference"))


def test_lasair_serves_the_first_hdu_plain() -> None:
    provider, detection = LasairLsst(StampsConfig()), Detection(str(SAMPLE.dia_source_id), None)
    served = first_hdu(SAMPLE.cutouts["science"])
    get = answering(200, served)
    assert asyncio.run(provider.fetch(get, request(), detection, "science")) == served
    assert get.calls[0] == (f"https://lasair-lsst.lsst.ac.uk/fits/{SAMPLE.dia_source_id}_cutoutScience/", None)
    assert provider.check(served).shape == (30, 30)
    assert provider.file_name("1", "science") == "1_science.fits"
    with pytest.raises(FetchError, match="HTTP 503"):
        asyncio.run(provider.fetch(answering(503, b"Service Unavailable"), request(), detection, "science"))
    with pytest.raises(ValueError):
        provider.check(served[: len(served) // 2])  # cut short: no whole image


def test_stamps_beyond_the_caps_are_refused() -> None:
    small = StampsConfig(max_stamp_side=16)
    with pytest.raises(ValueError, match="per side"):
        LasairLsst(small).check(first_hdu(SAMPLE.cutouts["science"]))
    with pytest.raises(ValueError, match="per side"):
        AlerceLsst(small).check(gzip.compress(SAMPLE.cutouts["science"]))


def test_the_preview_of_a_rubin_triplet_is_headed_to_fit_its_narrow_canvas() -> None:
    import io

    from PIL import Image

    from ztfd.stamps import preview

    provider = AlerceLsst(StampsConfig())
    images = {kind: provider.check(gzip.compress(data)) for kind, data in SAMPLE.cutouts.items()}
    png = preview.render(str(SAMPLE.dia_object_id), str(SAMPLE.dia_source_id), SAMPLE.mjd_tai - TAI_MINUS_UTC,
                         images, band="i", label="diaSourceId")
    with Image.open(io.BytesIO(png)) as picture:
        assert picture.width == 3 * 4 * 30 + 4 * preview.PAD  # 30-pixel cutouts, enlarged 4 times
        header = picture.crop((0, 0, picture.width, preview.HEADER)).load()
        right_margin = [header[x, y] for x in range(picture.width - preview.PAD + 2, picture.width)
                        for y in range(preview.HEADER)]
        assert set(right_margin) == {preview.BACKGROUND}  # the header text was shrunk to fit, not cut off
    assert preview._when(61105.0, "i").startswith("band i   2026-03-06")
