"""Message validation, time conversion and partition dates (pure functions, no services)."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from ztfd import alerts

MAX = 10_000
RECEIVED = dt.datetime(2026, 11, 24, 3, 0, tzinfo=dt.UTC)


def parsed(body: dict | bytes) -> alerts.Message:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    message = alerts.parse(raw, MAX)
    alerts.convert_times([message])
    return message


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty message"),
        (None, "empty message"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"{not json", "not valid JSON"),
        (b'{"objectId": "ZTF21abvawaj", "jd": NaN}', "not valid JSON: NaN"),
        (b"[1, 2]", "not a JSON object but a JSON array"),
        (b'"text"', "not a JSON object but a JSON string"),
        (b'{"ra": 1.0, "UTC": "2021-09-01 06:38:12"}', "no objectId"),
        (b'{"objectId": null}', "no objectId"),
        (b'{"objectId": "../../etc/passwd"}', "is not a plain identifier"),
        (b'{"objectId": "ZTF21 abc"}', "is not a plain identifier"),
        (b'{"objectId": ""}', "is not a plain identifier"),
        (b'{"objectId": true}', "objectId must be a string or an integer"),
        (b'{"objectId": {"a": 1}}', "objectId must be a string or an integer"),
        (b'{"objectId": "ZTF21abvawaj", "jdmax": "2459458.7"}', "time field jdmax must be a number"),
        (b'{"objectId": "ZTF21abvawaj", "mjdmax": 1e12}', "time field mjdmax = 1000000000000.0 is out of range"),
        (b'{"objectId": "ZTF21abvawaj", "jd": 59458.2}', "time field jd = 59458.2 is out of range for a JD"),
        (b'{"objectId": "ZTF21abvawaj", "UTC": 12}', "UTC must be a date-time string"),
        (b'{"objectId": "ZTF21abvawaj", "UTC": "yesterday"}', 'UTC "yesterday" is not a date-time'),
    ],
)
def test_bad_messages_are_rejected_with_a_reason(raw: bytes | None, reason: str) -> None:
    with pytest.raises(alerts.InvalidMessageError) as caught:
        alerts.parse(raw, MAX)
    assert reason in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_message_larger_than_the_limit_is_rejected() -> None:
    body = json.dumps({"objectId": "ZTF21abvawaj", "pad": "x" * 200}).encode()
    with pytest.raises(alerts.InvalidMessageError, match=r"exceeds kafka\.max_message_bytes"):
        alerts.parse(body, 100)


def test_date_is_the_utc_date_of_the_newest_observation_time() -> None:
    # mjdmax 59458.264479 is 2021-09-01T06:20:51 UTC; the filter ran later (UTC field) on the same day.
    message = parsed({"objectId": "ZTF21abvawaj", "mjdmin": 59449.22, "mjdmax": 59458.26447919989,
                      "UTC": "2021-09-02 00:10:00"})
    assert message.partition_date(RECEIVED) == "2021-09-01"
    assert message.times_utc["mjdmax"].startswith("2021-09-01T06:20:51")
    assert message.times_utc["mjdmin"].startswith("2021-08-23T")
    assert message.newest_mjd == pytest.approx(59458.26447919989)


def test_jd_fields_are_converted_and_the_newest_wins() -> None:
    message = parsed({"objectId": "ZTF18aamyaaj", "jdmin": 2458230.7830787, "jdmax": 2459458.7179051})
    assert message.partition_date(RECEIVED) == "2021-09-01"
    expected = dt.datetime(1858, 11, 17) + dt.timedelta(days=2459458.7179051 - 2400000.5)
    converted = dt.datetime.fromisoformat(message.times_utc["jdmax"].rstrip("Z"))
    assert abs((converted - expected).total_seconds()) < 0.002
    assert message.newest_mjd == pytest.approx(2459458.7179051 - 2400000.5)


def test_without_times_the_utc_field_gives_the_date_then_the_receive_time() -> None:
    assert parsed({"objectId": "ZTF19aayvyfa", "UTC": "2021-09-01 09:05:33"}).partition_date(RECEIVED) == "2021-09-01"
    assert parsed({"objectId": "ZTF19aayvyfa"}).partition_date(RECEIVED) == "2026-11-24"


def test_null_times_are_allowed_and_ignored() -> None:
    message = parsed({"objectId": "ZTF18abbwsvo", "mjdmax": None, "UTC": "2021-08-31 05:21:07"})
    assert message.times_utc == {}
    assert message.partition_date(RECEIVED) == "2021-08-31"


def test_lsst_messages_use_dia_object_id_and_tai() -> None:
    raw = (b'{"diaObjectId": 313637921267122191, "lastDiaSourceMjdTai": 60983.20685446523, '
           b'"firstDiaSourceMjdTai": 60975.153260584724, "UTC": "2025-11-04 05:16:48"}')
    message = parsed(raw)
    assert message.object_id == "313637921267122191"  # an int64 beyond 2**53 survives exactly
    assert not message.is_ztf
    # TAI is 37 s ahead of UTC: the UTC string is 37 s earlier than a naive reading of the MJD.
    naive = dt.datetime(1858, 11, 17) + dt.timedelta(days=60983.20685446523)
    converted = dt.datetime.fromisoformat(message.times_utc["lastDiaSourceMjdTai"].rstrip("Z"))
    assert (naive - converted).total_seconds() == pytest.approx(37, abs=0.01)
    assert message.partition_date(RECEIVED) == "2025-11-04"


def test_document_keeps_the_message_bytes_verbatim() -> None:
    raw = b'{"diaObjectId": 313637921267122191, "ra": 9.057050050707765}'
    message = alerts.parse(raw, MAX)
    doc = alerts.document(message, {"topic": "t"})
    assert raw in doc
    assert json.loads(doc)["message"]["diaObjectId"] == 313637921267122191


def test_file_names_are_stable_and_distinguish_generations() -> None:
    assert alerts.file_name("ZTF21abvawaj", 0, 12, 0) == "ZTF21abvawaj_p0-o12.json"
    assert alerts.file_name("ZTF21abvawaj", 0, 12, 1) == "ZTF21abvawaj_g1-p0-o12.json"


def test_only_time_like_names_are_time_fields() -> None:
    # A filter may select any alias; one that merely contains "mjd" must not make its alerts invalid.
    message = parsed({"objectId": "ZTF21abvawaj", "mjd_span": 5.2, "adjusted": 1, "jdmax": 2459458.7179051})
    assert set(message.times_utc) == {"jdmax"}
    for name in ("jd", "jdmin", "jdgmax", "jdstarthist", "jd_g_minus_r", "mjdmax", "midpointMjdTai"):
        assert alerts.time_kind(name) is not None, name


def test_nested_lsst_times_are_converted_and_count_for_the_date() -> None:
    raw = (b'{"diaObjectId": 313637921267122191, "UTC": "2025-11-04 05:16:48", "alert": {"diaSourcesList": ['
           b'{"midpointMjdTai": 60983.20685446523, "band": "i"}, {"midpointMjdTai": "junk"}]}}')
    message = parsed(raw)
    assert list(message.times_utc) == ["alert.diaSourcesList[0].midpointMjdTai"]
    assert message.partition_date(RECEIVED) == "2025-11-04"


def test_document_is_byte_exact_even_with_surrounding_whitespace() -> None:
    raw = b'  {"objectId": "ZTF21abvawaj"}\n'
    doc = alerts.document(alerts.parse(raw, MAX), {})
    assert doc.startswith(b'{"message": ' + raw + b', "ztfd"')
    assert json.loads(doc)["message"] == {"objectId": "ZTF21abvawaj"}
