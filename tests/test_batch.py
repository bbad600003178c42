"""The batch builder (``ztfd.ingest.batch``): Kafka messages in, a batch out, with no broker, store or file."""

from __future__ import annotations

import json
from typing import Any

from tests.kafka_fakes import FakeMessage
from ztfd import sources
from ztfd.embedded import samples
from ztfd.ingest.batch import BatchBuilder
from ztfd.sources.lasair import LasairSource
from ztfd.stamps.providers.packet import PREVIEW_JOB
from ztfd.store.jobs import FETCH_JOB

TOPIC = "t"


def nothing_stored(partition: int, generation: int, low: int, high: int) -> list[int]:
    return []


def first_generation(partition: int, offset: int) -> int:
    return 0


def builder(source: Any = None, already_stored: Any = nothing_stored, **settings: Any) -> BatchBuilder:
    options: dict[str, Any] = {"max_message_bytes": 100_000, "stamp_providers": {}, "previews": False, **settings}
    return BatchBuilder(TOPIC, source or LasairSource(), already_stored, **options)


def lasair_messages(count: int, start: int = 0) -> list[FakeMessage]:
    return [FakeMessage(json.dumps(m).encode(), start + n) for n, m in enumerate(samples.message_stream(count))]


class ServesEveryAlert:
    def serves(self, alert: sources.Alert) -> bool:
        return True


class PacketSource:
    """Avro-like packets carrying their three stamps; a packet ``bad-time`` carries a time astropy refuses."""

    format = "test-packets"

    def decode(self, value: bytes | None, key: bytes | None) -> sources.Alert:
        candid = (value or b"").decode()
        observed = sources.TimeField("candidate.jd", 2459458.76, "nonsense" if candid == "bad-time" else "jd", "utc")
        return sources.Alert(
            raw=b"packet " + candid.encode(), survey=sources.ZTF, object_id="ZTF21abvawaj",
            detection_id=candid.replace("bad-time", "42"), times=[observed],
            observation_key="candidate.jd", date_rule=sources.UTC_DATE, suffix=".avro", view={"candid": candid},
            cutouts=tuple(sources.Cutout(k, f"{k} of {candid}".encode(), ".fits.gz") for k in sources.STAMP_TYPES))


def test_good_messages_become_files_and_rows_and_bad_ones_are_rejected_with_their_reason() -> None:
    messages = lasair_messages(5)
    messages[1] = FakeMessage(b"{not json", 1)
    messages[3] = FakeMessage(b"x" * 100_001, 3)
    batch = builder().build(messages, first_generation)
    assert batch is not None
    assert [entry.item.offset for entry in batch.documents] == [0, 2, 4]
    [(bad_json, why_json), (too_big, why_big)] = batch.rejected
    assert (bad_json.offset, too_big.offset) == (1, 3)
    assert why_json.startswith("not valid JSON")
    assert why_big == "message of 100001 bytes exceeds kafka.max_message_bytes (100000)"
    assert batch.resume_at == {0: (0, 5)}  # rejected messages are done with too
    entry = batch.documents[0]
    body = json.loads(entry.files[0][1])
    assert entry.path == f"data/{entry.date}/{TOPIC}/{entry.alert.object_id}_p0-o0.json"
    assert body["message"]["seq"] == 0 and body["ztfd"]["offset"] == 0 and body["ztfd"]["date"] == entry.date
    stored = batch.to_store
    assert [a.alert.kafka_offset for a in stored.alerts] == [0, 2, 4]
    assert [(r.kafka_offset, r.raw[:9]) for r in stored.rejected] == [(1, b"{not json"), (3, b"xxxxxxxxx")]
    assert stored.offsets == {0: (0, 5)}
    assert sum(messages for *_, messages in stored.traffic) == 5


def test_messages_the_store_has_are_set_aside_but_their_offsets_still_move_on() -> None:
    asked = []

    def stored(partition: int, generation: int, low: int, high: int) -> list[int]:
        asked.append((partition, generation, low, high))
        return [10, 11]

    batch = builder(already_stored=stored).build(lasair_messages(4, start=10), first_generation)
    assert batch is not None
    assert [entry.item.offset for entry in batch.documents] == [12, 13]
    assert asked == [(0, 0, 10, 13)]  # one question per partition and generation
    assert batch.resume_at == {0: (0, 14)}


def test_the_generation_names_the_files_and_the_newest_generation_sets_the_offset_to_resume_from() -> None:
    def recreated_at_offset_0(partition: int, offset: int) -> int:
        return 1 if offset < 100 else 0

    messages = [*lasair_messages(2, start=100), *lasair_messages(2)]
    batch = builder().build(messages, recreated_at_offset_0)
    assert batch is not None
    assert [entry.path.rsplit("_", 1)[1] for entry in batch.documents] == [
        "p0-o100.json", "p0-o101.json", "g1-p0-o0.json", "g1-p0-o1.json"]
    assert json.loads(batch.documents[2].files[0][1])["ztfd"]["generation"] == 1
    assert batch.resume_at == {0: (1, 2)}


def test_nothing_to_store_is_no_batch() -> None:
    assert builder().build([], first_generation) is None


def test_an_alert_whose_times_cannot_be_converted_is_rejected_alone() -> None:
    messages = [FakeMessage(b"1704217901015015001", 0), FakeMessage(b"bad-time", 1),
                FakeMessage(b"1704174284215015008", 2)]
    batch = builder(PacketSource()).build(messages, first_generation)
    assert batch is not None
    assert [entry.item.offset for entry in batch.documents] == [0, 2]
    assert [item.offset for item, _ in batch.rejected] == [1]
    assert "cannot be stored" in batch.rejected[0][1]


def test_the_alert_is_built_once_and_its_converted_times_go_beside_it() -> None:
    source = PacketSource()
    batch = builder(source).build([FakeMessage(b"1704217901015015001", 0)], first_generation)
    assert batch is not None
    entry = batch.documents[0]
    assert entry.alert == source.decode(b"1704217901015015001", None)  # as the source made it
    meta = json.loads(entry.files[1][1])["ztfd"]
    assert meta["times_utc"] == {"candidate.jd": "2021-09-01T06:14:24.000Z"}
    assert meta["dated_by"] == "candidate.jd" and meta["date"] == entry.date == "2021-09-01"
    row = batch.to_store.alerts[0].alert
    assert row.obs_mjd is not None and abs(row.obs_mjd - (2459458.76 - 2400000.5)) < 1e-6


def test_stamp_jobs_follow_the_provider_and_the_packet() -> None:
    fetch = builder(stamp_providers={sources.ZTF: ServesEveryAlert()}).build(lasair_messages(1), first_generation)
    assert fetch is not None
    [row] = fetch.to_store.alerts
    assert row.job_kind == FETCH_JOB and row.dedupe_key is not None
    assert builder().build(lasair_messages(1), first_generation).to_store.alerts[0].job_kind is None  # type: ignore[union-attr]
    packet = [FakeMessage(b"1704217901015015001", 0)]
    preview = builder(PacketSource(), previews=True).build(packet, first_generation)
    assert preview is not None and preview.to_store.alerts[0].job_kind == PREVIEW_JOB
    assert preview.to_store.alerts[0].files == tuple(path for path, _ in preview.documents[0].files)
    assert len(preview.documents[0].files) == 2 + 3  # the packet, its JSON companion, three stamps
    no_previews = builder(PacketSource(), previews=False).build(packet, first_generation)
    assert no_previews is not None and no_previews.to_store.alerts[0].job_kind is None


def test_a_kafka_timestamp_is_written_to_the_millisecond() -> None:
    import datetime as dt

    from ztfd.ingest.nights import iso_utc, iso_utc_ms

    for stamp in (1, 999, 1_000, 1_630_475_000_123, 1_630_475_000_999, 4_102_444_799_999):
        assert iso_utc_ms(stamp) == iso_utc(dt.datetime.fromtimestamp(stamp / 1000, dt.UTC))
    assert iso_utc_ms(253_402_300_799_999) == "9999-12-31T23:59:59.999Z"  # exact where a float would round
