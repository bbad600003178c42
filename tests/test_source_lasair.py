"""The Lasair JSON source: validation, ids, time fields, the observation time and the date (no services)."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from ztfd.embedded import lsst_samples
from ztfd.ingest import nights
from ztfd.sources import DAY_OBS, LSST, SOURCES, UTC_DATE, ZTF, Alert, InvalidMessageError, alert_files, lasair

RECEIVED = dt.datetime(2026, 11, 24, 3, 0, tzinfo=dt.UTC)
SOURCE = lasair.LasairSource()


def decoded(body: dict | bytes) -> Alert:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return SOURCE.decode(raw, None)


def times(alert: Alert) -> nights.ObservedTimes:
    """The alert's time fields, converted as the consumer converts a batch of them."""
    return nights.convert_times([alert])[0]


def dating(alert: Alert, kafka: dt.datetime | None = None) -> nights.Dating:
    return nights.date_of(alert, times(alert), kafka, RECEIVED)


def document(alert: Alert) -> bytes:
    """The alert file the consumer writes for a Lasair message."""
    return alert_files(alert, "data", "stem", "images", {"topic": "t"})[0][1]


def date(alert: Alert) -> str:
    return dating(alert).date


HUGE_INT = "1" + "0" * 5000


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty message"),
        (None, "empty message"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"{not json", "not valid JSON"),
        (b'{"objectId": "ZTF21abvawaj", "jd": nan}', "not valid JSON"),
        (b"[1, 2]", "not a JSON object but a JSON array"),
        (b'"text"', "not a JSON object but a JSON string"),
        (b"NaN", "not a JSON object but a JSON number"),
        (b'{"ra": 1.0, "UTC": "2021-09-01 06:38:12"}', "no objectId"),
        (b'{"objectId": null}', "no objectId"),
        (b'{"objectId": "../../etc/passwd"}', "is not a plain identifier"),
        (b'{"objectId": "ZTF21 abc"}', "is not a plain identifier"),
        (b'{"objectId": ""}', "is not a plain identifier"),
        (b'{"objectId": "' + b"a" * 65 + b'"}', "is not a plain identifier"),
        (b'{"objectId": true}', "objectId must be a string or an integer"),
        (b'{"objectId": {"a": 1}}', "objectId must be a string or an integer"),
        (b'{"diaObjectId": NaN}', "diaObjectId must be a string or an integer"),
        (b'{"diaObjectId": 1.5e17}', "diaObjectId must be a string or an integer"),
        (b'{"diaObjectId": 0}', "is not a positive 64-bit integer"),
        (b'{"diaObjectId": -313637921267122191}', "is not a positive 64-bit integer"),
        (b'{"diaObjectId": 9223372036854775808}', "is not a positive 64-bit integer"),
        (b'{"objectId": "ZTF21abvawaj", "jdmax": "2459458.7"}', "time field jdmax must be a number"),
        (b'{"objectId": "ZTF21abvawaj", "mjdmax": 1e12}', "time field mjdmax = 1000000000000.0 is out of range"),
        (b'{"objectId": "ZTF21abvawaj", "jd": 59458.2}', "time field jd = 59458.2 is out of range for a JD"),
        (b'{"objectId": "ZTF21abvawaj", "mjd": ' + b"9" * 400 + b"}", "an integer of 400 digits is out of range"),
        (b'{"objectId": "ZTF21abvawaj", "UTC": 12}', "UTC must be a date-time string"),
        (b'{"objectId": "ZTF21abvawaj", "UTC": "yesterday"}', 'UTC "yesterday" is not a date-time'),
        # issue 12 item 1: each of these made the consumer raise outside any try, for ever.
        (b'{"objectId": "ZTF21abcdefh", "x": ' + HUGE_INT.encode() + b"}", "an integer of more than"),
        (b'{"diaObjectId": ' + HUGE_INT.encode() + b"}", "an integer of more than"),
        (b'{"objectId": "ZTF21abcdefh", "UTC": "0001-01-01T00:00:00+01:00"}', "is out of range"),
        (b'{"objectId": "ZTF21abcdefh", "UTC": "9999-12-31T23:59:59-01:00"}', "is out of range"),
        (b'{"objectId": "ZTF21abcdefh", "UTC": "0001-01-01 00:00:00"}', "is out of range (1900..2100)"),
        (b'{"objectId": "ZTF21abcdefh", "UTC": "2021-09-01\\u0000"}', "is not a date-time"),
        (b'{"objectId": "ZTF21abcdefh", "UTC": "' + b"9" * 100_0 + b'"}', "is not a date-time"),
        (b'{"objectId": "ZTF21abcdefh", "a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"objectId": "\\ud800"}', "is not a plain identifier"),
    ],
)
def test_bad_messages_are_rejected_with_a_reason(raw: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidMessageError) as caught:
        SOURCE.decode(raw, None)
    assert reason in str(caught.value)
    assert "\n" not in str(caught.value)
    assert len(str(caught.value)) < 200


def test_the_source_is_registered_under_its_contract_name() -> None:
    assert SOURCES["lasair"] is lasair.LasairSource
    assert SOURCE.format == "lasair"


def test_ztf_date_is_the_utc_date_of_the_newest_observation_time() -> None:
    # mjdmax 59458.264479 is 2021-09-01T06:20:51 UTC; the filter ran later (UTC field) on the next day.
    alert = decoded({"objectId": "ZTF21abvawaj", "mjdmin": 59449.22, "mjdmax": 59458.26447919989,
                     "UTC": "2021-09-02 00:10:00"})
    assert (alert.survey, alert.date_rule, alert.observation_key) == (ZTF, UTC_DATE, "mjdmax")
    assert dating(alert) == nights.Dating("2021-09-01", UTC_DATE, "mjdmax")
    assert times(alert).times_utc["mjdmax"].startswith("2021-09-01T06:20:51")
    assert times(alert).times_utc["mjdmin"].startswith("2021-08-23T")
    assert times(alert).obs_mjd == pytest.approx(59458.26447919989)
    assert alert.detection_id is None  # Lasair-ZTF never names the candid


def test_jd_fields_are_converted_and_the_newest_wins() -> None:
    alert = decoded({"objectId": "ZTF18aamyaaj", "jdmin": 2458230.7830787, "jdmax": 2459458.7179051})
    assert date(alert) == "2021-09-01"
    expected = dt.datetime(1858, 11, 17) + dt.timedelta(days=2459458.7179051 - 2400000.5)
    converted = dt.datetime.fromisoformat(times(alert).times_utc["jdmax"].rstrip("Z"))
    assert abs((converted - expected).total_seconds()) < 0.002
    assert times(alert).obs_mjd == pytest.approx(2459458.7179051 - 2400000.5)


def test_without_times_the_utc_field_gives_the_date_then_kafka_then_the_receive_time() -> None:
    with_utc = decoded({"objectId": "ZTF19aayvyfa", "UTC": "2021-09-01 09:05:33"})
    assert dating(with_utc) == nights.Dating("2021-09-01", UTC_DATE, "UTC")
    bare = decoded({"objectId": "ZTF19aayvyfa"})
    kafka = dt.datetime(2021, 9, 3, 1, 0, tzinfo=dt.UTC)
    assert dating(bare, kafka) == nights.Dating("2021-09-03", UTC_DATE, "kafka_timestamp")
    assert dating(bare) == nights.Dating("2026-11-24", UTC_DATE, "received_at")


def test_null_times_are_allowed_and_ignored() -> None:
    alert = decoded({"objectId": "ZTF18abbwsvo", "mjdmax": None, "UTC": "2021-08-31 05:21:07"})
    assert times(alert).times_utc == {}
    assert date(alert) == "2021-08-31"


def test_bare_nan_and_infinity_are_accepted_and_count_as_missing() -> None:
    raw = (b'{"diaObjectId": 313637921267122191, "lastDiaSourceMjdTai": NaN, "firstDiaSourceMjdTai": Infinity, '
           b'"g_latestMJD": -Infinity, "ra": NaN, "UTC": "2025-11-04 05:16:48", "alert": {"diaSourcesList": '
           b'[{"midpointMjdTai": NaN, "diaSourceId": 313673107864813598}]}}')
    alert = decoded(raw)
    assert alert.raw == raw
    assert times(alert).times_utc == {}
    assert alert.observation_key is None and alert.detection_id is None
    assert dating(alert).dated_by == "UTC"
    doc = document(alert)
    assert raw in doc  # verbatim, bare NaN and all: Python's json reads it back
    assert json.loads(doc)["message"]["diaObjectId"] == 313637921267122191


def test_lsst_plain_output_is_dated_by_last_dia_source_and_day_obs() -> None:
    # 60983.20685446523 TAI is 2025-11-04T04:57:15 UTC, observed in the night of dayObs 2025-11-03 (visit
    # 2025110300243); validityStartMjdTai (a processing time, 2026-02-12) never dates it.
    raw = (b'{"diaObjectId": 313637921267122191, "lastDiaSourceMjdTai": 60983.20685446523, '
           b'"validityStartMjdTai": 61083.81863899446, "firstDiaSourceMjdTai": 60975.153260584724, '
           b'"UTC": "2026-02-14 13:41:02"}')
    alert = decoded(raw)
    assert alert.object_id == "313637921267122191"  # an int64 beyond 2**53 survives exactly
    assert (alert.survey, alert.date_rule) == (LSST, DAY_OBS)
    # TAI is 37 s ahead of UTC: the UTC string is 37 s earlier than a naive reading of the MJD.
    naive = dt.datetime(1858, 11, 17) + dt.timedelta(days=60983.20685446523)
    converted = dt.datetime.fromisoformat(times(alert).times_utc["lastDiaSourceMjdTai"].rstrip("Z"))
    assert (naive - converted).total_seconds() == pytest.approx(37, abs=0.01)
    assert times(alert).times_utc["validityStartMjdTai"].startswith("2026-02-12")
    assert dating(alert) == nights.Dating("2025-11-03", DAY_OBS, "lastDiaSourceMjdTai")


def test_lsst_derived_and_model_times_are_converted_but_never_date_the_alert() -> None:
    raw = (b'{"diaObjectId": 313637921267122191, "i_latestMJD": 60983.20685446523, "latestPairMJD": 60983.2055, '
           b'"BBBPeakMJD": 99999.0, "absMagMJD": "junk", "UTC": "2026-02-14 13:41:02"}')
    alert = decoded(raw)
    assert set(times(alert).times_utc) == {"i_latestMJD", "latestPairMJD"}  # a fitted peak out of range is not an error
    assert dating(alert) == nights.Dating("2026-02-14", DAY_OBS, "UTC")
    # The same names in a ZTF message are ordinary columns, as they always were.
    assert times(decoded({"objectId": "ZTF21abvawaj", "BBBPeakMJD": "x"})).times_utc == {}


def test_lsst_full_output_the_real_sample_is_dated_by_its_newest_dia_source() -> None:
    alert = decoded(lsst_samples.lasair_fixture_message("full"))
    assert alert.observation_key == "alert.diaSourcesList[0].midpointMjdTai"
    assert alert.detection_id == "313673107864813598"  # beyond 2**53, exact
    assert alert.band == "i"
    assert times(alert).times_utc[alert.observation_key] == "2025-11-04T04:57:15.226Z"
    assert times(alert).times_utc["alert.diaObject.validityStartMjdTai"].startswith("2026-02-12")
    assert times(alert).times_utc["alert.diaSourcesList[0].timeProcessedMjdTai"].startswith("2026-02-10")
    assert dating(alert).date == "2025-11-03"


def test_lsst_lite_output_has_no_ids_but_is_dated_by_its_dia_sources() -> None:
    alert = decoded(lsst_samples.lasair_fixture_message("lite"))
    assert alert.detection_id is None
    assert alert.band == "i"
    assert dating(alert) == nights.Dating(
        "2025-11-03", DAY_OBS, "alert.diaSourcesList[0].midpointMjdTai")


def test_the_newest_dia_source_wins_whatever_its_place_in_the_list() -> None:
    raw = (b'{"diaObjectId": 313637921267122191, "alert": {"diaSourcesList": ['
           b'{"midpointMjdTai": 60975.153260584724, "diaSourceId": 313637921267122191, "band": "g"}, '
           b'{"midpointMjdTai": 60983.20685446523, "diaSourceId": 313673107864813598, "band": "i"}, '
           b'{"midpointMjdTai": "junk"}, 7, {"midpointMjdTai": true}]}}')
    alert = decoded(raw)
    assert (alert.observation_key, alert.detection_id, alert.band) == (
        "alert.diaSourcesList[1].midpointMjdTai", "313673107864813598", "i")


@pytest.mark.parametrize("bad_id", [b"true", b"1.5", b'"313673107864813598"', b"-4", b"18446744073709551616"])
def test_an_unusable_dia_source_id_leaves_the_detection_to_be_found(bad_id: bytes) -> None:
    raw = (b'{"diaObjectId": 313637921267122191, "alert": {"diaSourcesList": [{"midpointMjdTai": 60983.2068, '
           b'"diaSourceId": ' + bad_id + b', "band": "<b>"}]}}')
    alert = decoded(raw)
    assert alert.detection_id is None and alert.band is None
    assert alert.observation_key is not None


def test_one_chilean_night_is_one_day_obs_across_midnight_utc() -> None:
    # 2025-11-04 03:00 UTC and 2025-11-03 23:00 UTC are the same night in Chile (UTC-3).
    early = nights.day_obs_of_moment(dt.datetime(2025, 11, 4, 3, 0, tzinfo=dt.UTC))
    late = nights.day_obs_of_moment(dt.datetime(2025, 11, 3, 23, 0, tzinfo=dt.UTC))
    assert early == late == "2025-11-03"
    # The worked examples of the facts (midpointMjdTai -> dayObs, checked against the visit ids).
    assert nights.day_obs(61105.093643486834) == "2026-03-05"
    assert nights.day_obs(60983.20685446523) == "2025-11-03"
    # dayObs rolls over at 12:00 TAI, i.e. 11:59:23 UTC.
    assert nights.day_obs_of_moment(dt.datetime(2025, 11, 4, 11, 59, 22, tzinfo=dt.UTC)) == "2025-11-03"
    assert nights.day_obs_of_moment(dt.datetime(2025, 11, 4, 11, 59, 24, tzinfo=dt.UTC)) == "2025-11-04"


def test_the_alert_file_keeps_the_message_bytes_verbatim() -> None:
    raw = b'  {"diaObjectId": 313637921267122191, "ra": 9.057050050707765}\n'
    doc = document(SOURCE.decode(raw, None))
    assert doc.startswith(b'{"message": ' + raw + b', "ztfd"')
    assert json.loads(doc)["message"]["diaObjectId"] == 313637921267122191


def test_only_time_like_names_are_time_fields() -> None:
    # A filter may select any alias; one that merely contains "mjd" must not make its alerts invalid.
    alert = decoded({"objectId": "ZTF21abvawaj", "mjd_span": 5.2, "adjusted": 1, "jdmax": 2459458.7179051})
    assert set(times(alert).times_utc) == {"jdmax"}
    for name in ("jd", "jdmin", "jdgmax", "jdstarthist", "jd_g_minus_r", "mjdmax", "midpointMjdTai"):
        assert lasair.time_kind(name) is not None, name


def test_nested_lsst_times_are_converted_and_count_for_the_date() -> None:
    raw = (b'{"diaObjectId": 313637921267122191, "UTC": "2025-11-04 05:16:48", "alert": {"diaSourcesList": ['
           b'{"midpointMjdTai": 60983.20685446523, "band": "i"}, {"midpointMjdTai": "junk"}]}}')
    alert = decoded(raw)
    assert list(times(alert).times_utc) == ["alert.diaSourcesList[0].midpointMjdTai"]
    assert date(alert) == "2025-11-03"


def test_lsst_plain_output_of_the_real_objects_row() -> None:
    alert = decoded(lsst_samples.lasair_fixture_message("plain"))
    assert dating(alert) == nights.Dating("2025-11-03", DAY_OBS, "lastDiaSourceMjdTai")
    # Lasair's derived times are converted for the file; validityStartMjdTai is 100 days later and ignored.
    assert {"i_latestMJD", "g_latestMJD", "latestPairMJD", "validityStartMjdTai"} <= set(times(alert).times_utc)
    assert alert.detection_id is None


@pytest.mark.parametrize("mode", lsst_samples.MODES)
def test_messages_built_from_the_real_rubin_alerts_in_every_mode(mode: str) -> None:
    for sample in lsst_samples.object_alerts():
        raw = json.dumps(lsst_samples.message(sample, mode)).encode()
        alert = decoded(raw)
        assert alert.object_id == str(sample.dia_object_id)
        assert dating(alert).date == "2026-03-05"  # dayObs of visits 20260305000xx
        assert alert.detection_id == (str(sample.dia_source_id) if mode == "full" else None)
        assert times(alert).obs_mjd is not None and abs(times(alert).obs_mjd - (sample.mjd_tai - 37 / 86400)) < 1e-8


def test_a_message_nested_deeper_than_json_reads_is_refused_whichever_parser_is_faster() -> None:
    """orjson reads 1,023 levels, json fewer: a message 1,010 deep is refused as it was before orjson."""
    deep = b'{"objectId": "ZTF21abcdefg", "x": ' + b"[" * 1010 + b"]" * 1010 + b"}"
    with pytest.raises(InvalidMessageError, match="nested too deeply"):
        lasair.LasairSource().decode(deep)
    shallow = b'{"objectId": "ZTF21abcdefg", "x": ' + b"[" * 400 + b"]" * 400 + b"}"
    assert lasair.LasairSource().decode(shallow).object_id == "ZTF21abcdefg"
