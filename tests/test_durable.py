"""The durable frontier a fleet host commits to Kafka: files uploaded, stamps settled, their files uploaded."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ztfd import store
from ztfd.files import md5_hex
from ztfd.store import archive_marks
from ztfd.store.alerts import NewAlert
from ztfd.store.archive_marks import PartitionKey
from ztfd.store.batches import AlertToStore, BatchToStore, store_batch
from ztfd.store.durable import durable_through, rejected_not_exported
from ztfd.store.jobs import FETCH_JOB, claim, complete, detection_key, fail
from ztfd.store.manifest import UploadedFile, mark_uploaded, record_files
from ztfd.store.rejected import NewRejected
from ztfd.store.states import FailureClass

if TYPE_CHECKING:
    from ztfd.ingest.durability import DurableCommits

TOPIC = "t"


def alert(offset: int, object_id: str) -> AlertToStore:
    mjd = 60000.0 + offset
    path = f"data/2026-01-01/{TOPIC}/{object_id}_p0-o{offset}.json"
    row = NewAlert(0, 0, offset, object_id, "2026-01-01", mjd, path)
    return AlertToStore(row, (path,), FETCH_JOB, detection_key(object_id, mjd, "2026-01-01"))


def upload(conn, paths: list[str]) -> None:  # type: ignore[no-untyped-def]
    mark_uploaded(conn, [UploadedFile(p, "m", 1, "m", "m") for p in paths], [])


def test_the_frontier_stops_at_the_first_alert_not_yet_in_s3(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "s.sqlite3")
    alerts = [alert(offset, f"ZTF{offset}") for offset in range(10, 14)]
    store_batch(conn, BatchToStore(TOPIC, 0.0, alerts, [], {0: (0, 14)}, []),
                {a.alert.path: (1, "m") for a in alerts})
    assert durable_through(conn, TOPIC, 0, 0, 10, 14) == 10  # nothing uploaded, no stamps

    upload(conn, [a.alert.path for a in alerts])
    assert durable_through(conn, TOPIC, 0, 0, 10, 14) == 10  # files in S3, stamp jobs still waiting

    jobs = claim(conn, "w", 60.0, limit=4)
    by_offset = {job.alert.kafka_offset: job.id for job in jobs}
    assert complete(conn, by_offset[10], "w")
    assert fail(conn, by_offset[11], "w", "gone for good", FailureClass.UNAVAILABLE)
    # offset 12's job settles with a stamp written but not uploaded yet
    with store.transaction(conn):
        record_files(conn, [("images/2026-01-01/ZTF12/1_science.fits.gz", 1, "m")])
    assert complete(conn, by_offset[12], "w")
    assert durable_through(conn, TOPIC, 0, 0, 10, 14) == 12  # done and failed for good both count as settled

    upload(conn, ["images/2026-01-01/ZTF12/1_science.fits.gz"])
    assert durable_through(conn, TOPIC, 0, 0, 10, 14) == 13  # offset 13's job still waits
    assert complete(conn, by_offset[13], "w")
    assert durable_through(conn, TOPIC, 0, 0, 10, 14) == 14
    # only this partition generation counts, and never past what the host stored
    assert durable_through(conn, TOPIC, 0, 1, 0, 14) == 14
    assert durable_through(conn, TOPIC, 0, 0, 12, 12) == 12


def test_an_object_folders_neighbour_does_not_hold_it_back(tmp_path: Path) -> None:
    """ZTF1's folder range must not take in ZTF10's pending files."""
    conn = store.connect(tmp_path / "s.sqlite3")
    one = alert(0, "ZTF1")._replace(job_kind=None)
    store_batch(conn, BatchToStore(TOPIC, 0.0, [one], [], {0: (0, 1)}, []), {one.alert.path: (1, "m")})
    with store.transaction(conn):
        record_files(conn, [("images/2026-01-01/ZTF10/x.png", 1, "m")])
    upload(conn, [one.alert.path])
    assert durable_through(conn, TOPIC, 0, 0, 0, 1) == 1
    with store.transaction(conn):
        record_files(conn, [("images/2026-01-01/ZTF1/x.png", 1, "m")])
    assert durable_through(conn, TOPIC, 0, 0, 0, 1) == 0


class RecordingKafka:
    """What DurableCommits says to Kafka: the asynchronous and the waited-for commits."""

    def __init__(self) -> None:
        self.commits: list[dict[int, int]] = []
        self.waited: list[dict[int, int]] = []
        self.refuse = False  # commit_now fails

    def commit(self, offsets: dict[int, int]) -> None:
        self.commits.append(dict(offsets))

    def commit_now(self, offsets: dict[int, int]) -> dict[int, int]:
        self.waited.append(dict(offsets))
        return {} if self.refuse else dict(offsets)


def test_the_committer_moves_forward_only_resets_on_a_new_generation_and_commits_before_handing_over(
    tmp_path: Path
) -> None:
    from ztfd.ingest.durability import DurableCommits

    conn = store.connect(tmp_path / "s.sqlite3")
    alerts = [alert(offset, f"ZTF{offset}")._replace(job_kind=None) for offset in range(0, 4)]
    store_batch(conn, BatchToStore(TOPIC, 0.0, alerts, [], {0: (0, 4)}, []), {a.alert.path: (1, "m") for a in alerts})
    generation = {0: 0}
    kafka = RecordingKafka()
    commits = DurableCommits(conn, TOPIC, kafka, generation.__getitem__, every=5.0,  # type: ignore[arg-type]
                             home=tmp_path)
    commits.hold({}, [0])  # no commit yet: from 0
    assert commits.tick(force=True) == {} and kafka.commits == []  # nothing durable
    upload(conn, [a.alert.path for a in alerts[:2]])
    assert commits.tick() == {}  # not due yet
    assert commits.tick(force=True) == {0: 2} and kafka.commits == [{0: 2}]
    assert commits.tick(force=True) == {}  # nothing moved: nothing said
    # a recreated topic: generation 1 starts at 0, below the deleted topic's commit
    generation[0] = 1
    new = [alert(offset, f"NEW{offset}")._replace(alert=alert(offset, f"NEW{offset}").alert._replace(generation=1),
                                                  job_kind=None) for offset in range(0, 2)]
    store_batch(conn, BatchToStore(TOPIC, 0.0, new, [], {0: (1, 2)}, []), {a.alert.path: (1, "m") for a in new})
    upload(conn, [new[0].alert.path])
    assert commits.tick(force=True) == {0: 1}
    upload(conn, [new[1].alert.path])
    # handed back: committed as far as durable, waiting for the answer, then forgotten; the generation and commit
    # it was handed back at are what the archiver then leaves to the next holder (ztfd.archive.handedback)
    assert commits.release([0]) == {0: (1, 2)}
    assert kafka.waited == [{0: 2}] and commits.committed == {}
    assert commits.release([0]) == {}  # not held: nothing said
    assert kafka.waited == [{0: 2}]


def test_a_rejected_message_is_exported_at_once_and_holds_the_frontier_until_its_export_is_uploaded(
    tmp_path: Path
) -> None:
    from ztfd.ingest.durability import DurableCommits

    conn = store.connect(tmp_path / "s.sqlite3")
    alerts = [alert(offset, f"ZTF{offset}")._replace(job_kind=None) for offset in (0, 1, 3)]
    received = 1767225600.0  # 2026-01-01T00:00Z
    store_batch(conn, BatchToStore(TOPIC, received, alerts, [NewRejected(0, 0, 2, "not JSON", b"\xff")], {0: (0, 4)},
                                   []), {a.alert.path: (1, "m") for a in alerts})
    upload(conn, [a.alert.path for a in alerts])
    kafka = RecordingKafka()
    commits = DurableCommits(conn, TOPIC, kafka, {0: 0}.__getitem__, every=5.0,  # type: ignore[arg-type]
                             home=tmp_path)
    commits.hold({}, [0])
    assert commits.tick(force=True) == {0: 2}  # held at the rejected message: exported, not yet uploaded
    export = f"data/2026-01-01/{TOPIC}/rejected-p0-o2.jsonl"  # its Kafka identity: the same key on every host
    assert json.loads((tmp_path / export).read_bytes())["reason"] == "not JSON"
    assert rejected_not_exported(conn, TOPIC, 0, 0, 0, 4) == []  # exported once, not at every tick
    assert commits.tick(force=True) == {}
    mark_uploaded(conn, [UploadedFile(export, md5_hex((tmp_path / export).read_bytes()), 1, "m", "m")], [])
    assert commits.tick(force=True) == {0: 4}


def test_with_the_archive_on_an_alert_waits_for_its_row_in_an_uploaded_dataset_file(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "s.sqlite3")
    alerts = [alert(offset, f"ZTF{offset}")._replace(job_kind=None) for offset in range(3)]
    store_batch(conn, BatchToStore(TOPIC, 0.0, alerts, [], {0: (0, 3)}, []), {a.alert.path: (1, "m") for a in alerts})
    upload(conn, [a.alert.path for a in alerts])
    assert durable_through(conn, TOPIC, 0, 0, 0, 3) == 3  # archive off: nothing waits for it
    assert durable_through(conn, TOPIC, 0, 0, 0, 3, archive=True) == 0  # no row in the dataset yet
    folder = f"archive/alerts/night=2026-01-01/topic={TOPIC}"
    dataset_file = f"{folder}/p0-g0-o000000000000-000000000001.parquet"  # a part: offsets 0 to 1
    with store.transaction(conn):
        record_files(conn, [(dataset_file, 1, "m"), ("archive/alerts/_common_metadata", 1, "m")])
        archive_marks.advance(conn, PartitionKey(TOPIC, 0, 0), 1, 2)  # offsets 0 and 1 written
    assert durable_through(conn, TOPIC, 0, 0, 0, 3, archive=True) == 0  # their file not uploaded
    upload(conn, [dataset_file])
    assert durable_through(conn, TOPIC, 0, 0, 0, 3, archive=True) == 0  # nor the dataset's schema
    upload(conn, ["archive/alerts/_common_metadata"])
    assert durable_through(conn, TOPIC, 0, 0, 0, 3, archive=True) == 2  # offset 2 is not in the dataset yet
    second_part = f"{folder}/p0-g0-o000000000002-000000000002.parquet"
    with store.transaction(conn):
        record_files(conn, [(second_part, 1, "m")])
        archive_marks.advance(conn, PartitionKey(TOPIC, 0, 0), 2, 1)
    assert durable_through(conn, TOPIC, 0, 0, 0, 3, archive=True) == 2  # only the part holding offset 2 waits
    upload(conn, [second_part])
    assert durable_through(conn, TOPIC, 0, 0, 0, 3, archive=True) == 3
    # A fold of the parts into one file: until it is uploaded, every offset it holds waits for it (the parts'
    # objects are deleted from S3 only after it is).
    record_files(conn, [(f"{folder}/p0-g0-o000000000000-000000000002.parquet", 1, "m")])
    assert durable_through(conn, TOPIC, 0, 0, 0, 3, archive=True) == 0


def four_stored(tmp_path: Path) -> tuple[sqlite3.Connection, list[AlertToStore], RecordingKafka, DurableCommits]:
    """A store with alerts 0-3 of partition 0 (no stamp jobs), and a committer of it holding nothing yet."""
    from ztfd.ingest.durability import DurableCommits

    conn = store.connect(tmp_path / "s.sqlite3")
    alerts = [alert(offset, f"ZTF{offset}")._replace(job_kind=None) for offset in range(0, 4)]
    store_batch(conn, BatchToStore(TOPIC, 0.0, alerts, [], {0: (0, 4)}, []), {a.alert.path: (1, "m") for a in alerts})
    kafka = RecordingKafka()
    commits = DurableCommits(conn, TOPIC, kafka, {0: 0}.__getitem__, every=5.0,  # type: ignore[arg-type]
                             home=tmp_path)
    return conn, alerts, kafka, commits


def test_a_commit_kafka_refused_is_sent_again_and_never_below_what_was_sent(tmp_path: Path) -> None:
    from ztfd.ingest.kafka import Refusal

    rebalancing = Refusal("ILLEGAL_GENERATION", "Broker: Specified group generation id is not valid")
    conn, alerts, kafka, commits = four_stored(tmp_path)
    commits.hold({0: 1}, [0])
    upload(conn, [a.alert.path for a in alerts[:3]])
    assert commits.tick(force=True) == {0: 3}
    # A newer stamp of alert 1's object waits for its upload: the store's walk from 1 would now stop at 1.
    record_files(conn, [(f"images/2026-01-01/ZTF1/{'9' * 18}.png", 1, "m")])
    commits.answered({}, {0: rebalancing})  # refused: Kafka still has 1
    assert commits.confirmed == {0: 1} and commits.resent == 1
    # nothing more became durable, yet the next tick sends the commit again, and never below what was sent
    assert commits.tick(force=True) == {0: 3} and kafka.commits == [{0: 3}, {0: 3}]
    commits.answered({0: 3}, {})
    assert commits.confirmed == {0: 3}
    assert commits.tick(force=True) == {}  # taken: nothing more to say
    # two commits in flight: the older one refused, the newer one taken
    upload(conn, [alerts[3].alert.path])
    store_batch(conn, BatchToStore(TOPIC, 0.0, [alert(4, "ZTF4")._replace(job_kind=None)], [], {0: (0, 5)}, []),
                {alert(4, "ZTF4").alert.path: (1, "m")})
    assert commits.tick(force=True) == {0: 4}
    upload(conn, [alert(4, "ZTF4").alert.path])
    assert commits.tick(force=True) == {0: 5}
    commits.answered({}, {0: Refusal("NOT_COORDINATOR", "Broker: Not coordinator")})  # the answer to 4
    commits.answered({0: 5}, {})  # the answer to 5
    assert commits.confirmed == {0: 5}
    assert commits.tick(force=True) in ({}, {0: 5})  # at most the same offset again, never a lower one
    commits.answered({0: 9}, {})  # more than was ever sent: not believed
    assert commits.confirmed == {0: 5}
    # handed back with a commit still unanswered: it is waited for before the partition goes
    commits.committed[0] = 6
    assert commits.release([0]) == {0: (0, 6)} and kafka.waited == [{0: 6}]
    # ... and when Kafka refuses that one, the next owner starts at the offset Kafka confirmed
    commits.hold({0: 5}, [0])
    commits.committed[0] = 6  # sent, unanswered
    kafka.refuse = True
    assert commits.release([0]) == {0: (0, 5)}


def test_a_commit_left_unanswered_is_sent_again(tmp_path: Path) -> None:
    from ztfd.ingest.durability import ANSWER_WAIT, DurableCommits

    conn = store.connect(tmp_path / "s.sqlite3")
    alerts = [alert(offset, f"ZTF{offset}")._replace(job_kind=None) for offset in range(0, 2)]
    store_batch(conn, BatchToStore(TOPIC, 0.0, alerts, [], {0: (0, 2)}, []), {a.alert.path: (1, "m") for a in alerts})
    upload(conn, [a.alert.path for a in alerts])
    now = [0.0]
    kafka = RecordingKafka()
    commits = DurableCommits(conn, TOPIC, kafka, {0: 0}.__getitem__, every=1.0,  # type: ignore[arg-type]
                             home=tmp_path, clock=lambda: now[0])
    commits.hold({}, [0])
    assert commits.tick(force=True) == {0: 2}
    now[0] = ANSWER_WAIT / 2
    assert commits.tick(force=True) == {}  # an answer may still come
    now[0] = ANSWER_WAIT + 1
    assert commits.tick(force=True) == {0: 2} and commits.resent == 1  # none came: sent again
    commits.answered({0: 2}, {})
    now[0] = 3 * ANSWER_WAIT
    assert commits.tick(force=True) == {} and commits.sent_at == {}


def test_a_stopping_host_asks_again_until_kafka_takes_every_held_partitions_durable_offset(tmp_path: Path) -> None:
    """A stop in the middle of a rebalance: Kafka refuses the commit until the member joined the new generation.
    ``commit_held`` says so and keeps the partitions (the consumer serves the group and asks again); once taken, the
    hand-back has nothing left to wait for and hands over at the durable offset."""
    from ztfd.ingest.durability import DurableCommits

    conn = store.connect(tmp_path / "s.sqlite3")
    alerts = [alert(offset, f"ZTF{offset}")._replace(job_kind=None) for offset in range(0, 3)]
    store_batch(conn, BatchToStore(TOPIC, 0.0, alerts, [], {0: (0, 3)}, []), {a.alert.path: (1, "m") for a in alerts})
    upload(conn, [a.alert.path for a in alerts[:2]])
    kafka = RecordingKafka()
    commits = DurableCommits(conn, TOPIC, kafka, {0: 0}.__getitem__, every=3600.0,  # type: ignore[arg-type]
                             home=tmp_path)
    commits.hold({}, [0])
    kafka.refuse = True
    assert commits.commit_held() is False and commits.confirmed == {0: 0}
    assert commits.committed == {0: 2}  # still held, sent but not taken: the next try sends it again
    assert commits.commit_held() is False and kafka.waited == [{0: 2}, {0: 2}]
    kafka.refuse = False
    assert commits.commit_held() is True and commits.confirmed == {0: 2}
    assert commits.commit_held() is True and len(kafka.waited) == 3  # nothing due: nothing said
    assert commits.release([0]) == {0: (0, 2)} and len(kafka.waited) == 3


def test_a_commit_held_back_near_the_brokers_retention_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stamp job waiting for the service (or uploads failing) holds a partition's commit: past half the broker's
    retention (a day when it does not say) the consumer warns, once an hour, since a host lost with its disk after
    the broker dropped those messages would lose them. A commit that keeps up, or nothing stored past it, is not
    warned about, nor an alert arriving after a long quiet spell."""
    from ztfd.ingest.durability import HELD_WARN_EVERY, HELD_WARN_UNKNOWN_RETENTION, DurableCommits

    conn = store.connect(tmp_path / "s.sqlite3")
    alerts = [alert(offset, f"ZTF{offset}")._replace(job_kind=None) for offset in range(0, 3)]
    store_batch(conn, BatchToStore(TOPIC, 0.0, alerts, [], {0: (0, 3)}, []), {a.alert.path: (1, "m") for a in alerts})
    upload(conn, [alerts[0].alert.path])  # alerts 1 and 2 wait: the commit stops at 1
    now = [0.0]
    commits = DurableCommits(conn, TOPIC, RecordingKafka(), {0: 0}.__getitem__, every=1.0,  # type: ignore[arg-type]
                             home=tmp_path, clock=lambda: now[0])
    commits.hold({}, [0])

    def warnings_at(when: float) -> int:
        now[0] = when
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ztfd.ingest.durability"):
            commits.tick(force=True)
        return sum("has stayed at" in record.getMessage() for record in caplog.records)

    assert commits.held_warning_after() == HELD_WARN_UNKNOWN_RETENTION
    assert warnings_at(10.0) == 0  # the commit moved to 1 just now
    assert warnings_at(HELD_WARN_UNKNOWN_RETENTION) == 0  # held for less than a day
    assert warnings_at(HELD_WARN_UNKNOWN_RETENTION + 11) == 1
    assert warnings_at(HELD_WARN_UNKNOWN_RETENTION + 12) == 0  # said again only an hour later
    assert warnings_at(HELD_WARN_UNKNOWN_RETENTION + 12 + HELD_WARN_EVERY) == 1
    commits.keeps_for = 4 * HELD_WARN_UNKNOWN_RETENTION  # the broker keeps 4 days: warned after 2
    assert commits.held_warning_after() == 2 * HELD_WARN_UNKNOWN_RETENTION
    upload(conn, [a.alert.path for a in alerts[1:]])
    assert warnings_at(3 * HELD_WARN_UNKNOWN_RETENTION) == 0  # durable at last: committed through 3, nothing held
    assert commits.committed == {0: 3}
    # days without alerts, then one that waits: held from its arrival, not from the commit's last move
    late = alert(3, "ZTF3")._replace(job_kind=None)
    store_batch(conn, BatchToStore(TOPIC, 0.0, [late], [], {0: (0, 4)}, []), {late.alert.path: (1, "m")})
    assert warnings_at(9 * HELD_WARN_UNKNOWN_RETENTION) == 0
    assert warnings_at(10 * HELD_WARN_UNKNOWN_RETENTION) == 0  # one day of the two (half the 4 days kept)
    assert warnings_at(11 * HELD_WARN_UNKNOWN_RETENTION) == 1


def test_the_committer_tells_each_partitions_progress_and_counts_the_work_redone_and_handed_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Taken over at 1 from a host that had stored through 3: once the frontier passes 3, the redone offsets are
    logged with their count; handed back at 3 with 4 stored, the hand-over says 1 is left to redo, and
    ``handed_over`` is what the fleet topic is told of it."""
    from ztfd.ingest.fleet import Progress

    conn, alerts, _kafka, commits = four_stored(tmp_path)
    commits.hold({0: 1}, [0], redo={0: Progress(3, 1, "gone:/home", 0.0)})
    assert commits.progress() == {0: Progress(4, 1)}  # stored here through 3, durable through 0
    caplog.set_level(logging.INFO, logger="ztfd.ingest.durability")
    upload(conn, [a.alert.path for a in alerts[1:2]])
    assert commits.tick(force=True) == {0: 2}
    assert "redone" not in caplog.text  # offset 2 is not durable yet
    upload(conn, [a.alert.path for a in alerts[2:3]])
    assert commits.tick(force=True) == {0: 3}
    assert "redone t[0]: the 2 offsets 1..2 that gone:/home had stored but not made durable are durable now" in \
        caplog.text
    assert commits.progress() == {0: Progress(4, 3)} and commits.progress([1]) == {}
    assert commits.release([0]) == {0: (0, 3)}
    assert commits.handed_over == {0: Progress(4, 3)}
    assert "handing over t: [0] committed at 3 (1 stored here past it: the next owner redoes them)" in \
        caplog.text
    assert commits.release([0]) == {} and commits.handed_over == {}  # not held: nothing to tell
    assert caplog.text.count("redone t[0]") == 1
