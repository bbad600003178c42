"""The store's schema version: a store written by the code before this layout (``fixtures/store-v1.sql``, see
``fixtures/make_store_v1.py``) is migrated with its data, a newer one is refused, a failed migration changes
nothing."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import child_env, ztfd_command
from ztfd import config, store
from ztfd.reporting import status
from ztfd.store import counters, jobs, manifest, migrations
from ztfd.store.alerts import NewAlert, count_received_on, insert_alerts, iter_alerts, utc_day
from ztfd.store.db import StoreVersionError, schema_version
from ztfd.store.manifest import manifest_files
from ztfd.store.offsets import stored_offsets
from ztfd.store.processes import process
from ztfd.store.rejected import latest_rejected
from ztfd.store.schema import SCHEMA_VERSION
from ztfd.store.stamps import stamp_records

FIXTURE = Path(__file__).parent / "fixtures" / "store-v1.sql"
TOPIC = "lasair_fixture"


def v1_jobs() -> dict[int, tuple[dict, dict | None, str]]:
    """job id -> (payload, result, state) as the v1 code wrote them, read from the dump's text."""
    found = {}
    for line in FIXTURE.read_text().splitlines():
        match = re.match(r"INSERT INTO \"jobs\" VALUES\((\d+),'stamps','(\{.*?\})','(\w+)',.*?,(NULL|'(\{.*\})'),"
                         r"[^,]*,[^,]*,[^,]*,[^,]*\);$", line)
        if match:
            result = json.loads(match.group(5)) if match.group(5) else None
            found[int(match.group(1))] = (json.loads(match.group(2)), result, match.group(3))
    return found


def fixture_time() -> float:
    """When the fixture's consumer stored its batch (its offsets row): before any job was settled."""
    match = re.search(r"INSERT INTO \"offsets\" VALUES\('[^']*',0,0,\d+,([0-9.e+]+)\);", FIXTURE.read_text())
    assert match is not None
    return float(match.group(1))


def load_fixture(db: Path, replace: tuple[str, str] | None = None) -> None:
    script = FIXTURE.read_text()
    if replace is not None:
        script = script.replace(*replace)
    db.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(db) as plain:
        plain.executescript(script)


@pytest.fixture
def v1_config(make_config: Callable[..., Path]) -> config.Config:
    cfg = config.load(make_config(kafka={"topics": [TOPIC]}))
    load_fixture(cfg.db_path)
    return cfg


def test_the_fixture_is_a_v1_store_with_every_kind_of_job(v1_config: config.Config) -> None:
    with sqlite3.connect(v1_config.db_path) as plain:
        assert schema_version(plain) == 1
    states = [state for _, _, state in v1_jobs().values()]
    assert {"done", "failed", "ready"} <= set(states) and states.count("done") == 3


def test_a_v1_store_is_migrated_with_its_data(v1_config: config.Config) -> None:
    before = v1_jobs()
    conn = store.connect(v1_config.db_path)
    assert schema_version(conn) == SCHEMA_VERSION
    # Jobs keep their ids, states, attempts and reasons, and now refer to the alert their payload named.
    migrated = {job.id: job for job in jobs.list_jobs(conn)}
    assert sorted(migrated) == sorted(before)
    for job_id, (payload, _result, state) in before.items():
        assert (migrated[job_id].alert_id, migrated[job_id].state) == (payload["alert_id"], state)
    assert migrated[4].last_error == "HTTP 503 from get_stamp"
    # What the done jobs learned is kept with their alerts: the candid exactly as text, the kinds fetched.
    done = {payload["alert_id"]: result for payload, result, state in before.values() if state == "done"}
    records = stamp_records(conn, done)
    assert sorted(records) == sorted(done)
    for alert_id, result in done.items():
        record = records[alert_id]
        assert record.detection_id == result["candid"]
        assert (record.detection_mjd, record.preview, record.worker) == (result["mjd"], result["preview"],
                                                                         result["worker"])
        assert sorted(record.fetched) == sorted(result["fetched"])
    # The rest is untouched: alerts, rejected messages with their bytes, offsets, manifest, processes.
    alerts = list(iter_alerts(conn))
    assert len(alerts) == 24 and all(a.path.startswith(f"data/{a.date}/{TOPIC}/") for a in alerts)
    assert {r.raw for r in latest_rejected(conn, TOPIC, 10)} == {b"not json", b"{}"}
    assert stored_offsets(conn, TOPIC)[0].next_offset == 26
    assert {row.path for row in manifest_files(conn)} == {a.path for a in alerts}
    assert process(conn, "fetcher:1") is not None
    # The counters start from the rows kept: alerts per night and per day of receipt.
    assert counters.topic_totals(conn)[TOPIC].stored == 24
    by_day = Counter(utc_day(a.received_at) for a in alerts)
    assert {day: count_received_on(conn, TOPIC, day) for day in by_day} == dict(by_day)
    # The queue works on the migrated jobs: a claim hands out a ready job with its alert.
    counts = jobs.counts(conn, now=fixture_time())  # as the fixture's two waiting jobs still waited
    assert (counts.done, counts.failed, counts.retry_waiting, counts.unavailable) == (3, 1, 1, 1)
    [claimed] = jobs.claim(conn, jobs.new_owner(), 60)
    assert claimed.alert.id == before[claimed.id][0]["alert_id"]
    conn.close()
    # Opening it again finds it current: no second migration.
    again = store.connect(v1_config.db_path)
    assert len(jobs.list_jobs(again)) == len(before)
    again.close()


def test_status_reads_a_migrated_store(v1_config: config.Config) -> None:
    store.connect(v1_config.db_path).close()
    report = status.collect(v1_config, kafka_timeout=0.5)
    assert report["queue"]["done"] == 3 and report["queue"]["failed"] == 1
    assert report["failures"][0]["reason"] == "HTTP 503 from get_stamp"
    assert report["failures"][0]["object_id"].startswith("ZTF")
    assert report["rejected"] == {TOPIC: 2}


def test_a_failed_migration_leaves_the_store_as_it_was(v1_config: config.Config,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def half_then_crash(conn: sqlite3.Connection) -> None:
        migrations._v1_to_v2(conn)
        raise RuntimeError("disk on fire")

    monkeypatch.setitem(migrations.STEPS, 1, half_then_crash)
    with pytest.raises(RuntimeError):
        store.connect(v1_config.db_path)
    with sqlite3.connect(v1_config.db_path) as plain:
        assert schema_version(plain) == 1
    monkeypatch.undo()
    conn = store.connect(v1_config.db_path)  # and the real migration still works afterwards
    assert len(jobs.list_jobs(conn)) == len(v1_jobs())
    conn.close()


def test_a_store_of_a_newer_ztfd_is_refused_with_one_line(make_config: Callable[..., Path]) -> None:
    cfg_path = make_config(kafka={"topics": [TOPIC]})
    cfg = config.load(cfg_path)
    newer = f"VALUES('schema_version','{SCHEMA_VERSION + 1}')"
    load_fixture(cfg.db_path, replace=("VALUES('schema_version','1')", newer))
    with pytest.raises(StoreVersionError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        store.connect(cfg.db_path)
    for command in (["rejected"], ["status"], ["replay", "--date", "2021-09-01"]):
        result = subprocess.run(ztfd_command(cfg_path, *command), env=child_env(), capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert result.stderr.count("\n") == 1 and "newer than this ztfd reads" in result.stderr, result.stderr
    with sqlite3.connect(cfg.db_path) as plain:  # and left alone
        assert schema_version(plain) == SCHEMA_VERSION + 1


def test_a_v4_store_counts_alerts_per_batch_after_its_migration(make_config: Callable[..., Path]) -> None:
    """Version 5 counts alerts in ``insert_alerts`` (no trigger per row) and per day of receipt in
    ``counter_received`` (no index on every alert): a version-4 store loses the trigger and the index, and its
    day counts are seeded from its alerts."""
    cfg = config.load(make_config(kafka={"topics": [TOPIC]}))
    conn = store.connect(cfg.db_path)
    day_one, day_two = 1_767_225_600.0, 1_767_225_600.0 + 86_400  # 2026-01-01 and -02 UTC, midday below
    with store.transaction(conn):
        insert_alerts(conn, TOPIC, [NewAlert(0, 0, n, f"ZTF26a{n:06d}", "2026-01-01", None, f"data/x/{n}.json")
                                    for n in range(3)], day_one + 43_200)
        insert_alerts(conn, TOPIC, [NewAlert(0, 0, 3, "ZTF26a000003", "2026-01-01", None, "data/x/3.json")],
                      day_two + 43_200)
    # Back to version 4's layout: the trigger, the index, no counter_received, counters as its trigger kept them.
    conn.executescript(
        "DROP TABLE counter_received; CREATE INDEX alerts_received ON alerts (topic, received_at);"
        "CREATE TRIGGER count_alert AFTER INSERT ON alerts BEGIN UPDATE counter_alerts SET alerts = alerts + 1 "
        "WHERE date = NEW.date AND topic = NEW.topic; END;"
        "UPDATE meta SET value = '4' WHERE key = 'schema_version';")
    conn.close()
    conn = store.connect(cfg.db_path)
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "count_alert" not in names and "alerts_received" not in names and "counter_received" in names
    assert (count_received_on(conn, TOPIC, "2026-01-01"), count_received_on(conn, TOPIC, "2026-01-02")) == (3, 1)
    # A batch counts once per night, and an alert stored already (redelivered) not again.
    with store.transaction(conn):
        ids = insert_alerts(conn, TOPIC, [NewAlert(0, 0, 3, "ZTF26a000003", "2026-01-01", None, "data/x/3.json"),
                                          NewAlert(0, 0, 4, "ZTF26a000004", "2026-01-02", None, "data/x/4.json")],
                            day_two + 50_000)
    assert ids[0] is None and ids[1] is not None
    totals = counters.topic_totals(conn)[TOPIC]
    assert (totals.stored, totals.last_alert_at) == (5, day_two + 50_000)
    assert count_received_on(conn, TOPIC, "2026-01-02") == 2
    conn.close()


def test_a_v5_store_walks_its_pending_files_oldest_first_after_its_migration(
    make_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 6 orders the pending files' index by record time (new rows land at its end, not at random places of a
    second path-ordered tree): a version-5 store gets the new index, and uploads go oldest first, a page at a time;
    what is recorded during a walk (a new file, new bytes for one being walked) waits for the next walk."""
    cfg = config.load(make_config(kafka={"topics": [TOPIC]}))
    conn = store.connect(cfg.db_path)
    clock = iter(float(t) for t in range(1_000, 2_000))
    monkeypatch.setattr(manifest.time, "time", lambda: next(clock))
    for path in ("images/z", "data/m", "data/a", "images/b"):  # recorded one after the other, each at its own time
        manifest.record_files(conn, [(path, 1, f"md5-{path}")])
    conn.executescript("DROP INDEX manifest_pending; CREATE INDEX manifest_pending ON manifest (path) "
                       "WHERE state = 'pending'; UPDATE meta SET value = '5' WHERE key = 'schema_version';")
    conn.close()
    conn = store.connect(cfg.db_path)
    [sql] = [row[0] for row in conn.execute("SELECT sql FROM sqlite_master WHERE name = 'manifest_pending'")]
    assert "(recorded_at, path)" in sql
    walk = manifest.iter_pending(conn, page=2)
    seen = [next(walk).path, next(walk).path, next(walk).path]
    manifest.record_files(conn, [("images/z", 2, "new bytes"), ("data/new", 1, "x")])  # during the second page
    seen.extend(item.path for item in walk)
    assert seen == ["images/z", "data/m", "data/a", "images/b"]
    assert [item.path for item in manifest.iter_pending(conn)] == ["data/m", "data/a", "images/b", "data/new",
                                                                    "images/z"]
    conn.close()


def test_a_v6_store_counts_failures_by_their_class_after_its_migration(make_config: Callable[..., Path]) -> None:
    """Version 7 keeps the class of a failed attempt in ``jobs.failure`` and counts that, not the reason's words: a
    version-6 store (no column, a trigger matching words) gets the column and the new trigger, keeps its counts,
    and its jobs leased before the upgrade are counted as lost when their lease runs out."""
    cfg = config.load(make_config(kafka={"topics": [TOPIC]}))
    conn = store.connect(cfg.db_path)
    with store.transaction(conn):
        ids = insert_alerts(conn, TOPIC, [NewAlert(0, 0, n, f"ZTF26a{n:06d}", "2026-01-01", None, f"data/x/{n}.json")
                                          for n in range(3)], 1_767_225_600.0)
        jobs.enqueue(conn, [jobs.NewStampJob(alert_id) for alert_id in ids if alert_id is not None])
    owner = jobs.new_owner()
    first, second, _third = jobs.claim(conn, owner, 60, limit=3)
    # Back to version 6's layout: no failure column, the trigger classifying by words, one failure counted by it.
    conn.executescript(
        "DROP TRIGGER count_stamp_failure; ALTER TABLE jobs DROP COLUMN failure;"
        "CREATE TRIGGER count_stamp_failure AFTER UPDATE OF last_error ON jobs WHEN OLD.state = 'leased' "
        "AND NEW.last_error IS NOT NULL BEGIN INSERT INTO counter_stamp_failures (reason, failures) VALUES "
        "(CASE WHEN NEW.last_error LIKE '%HTTP %' THEN 'http' ELSE 'other' END, 1) "
        "ON CONFLICT (reason) DO UPDATE SET failures = failures + 1; END;"
        "UPDATE meta SET value = '6' WHERE key = 'schema_version';")
    conn.execute("UPDATE jobs SET state = 'failed', last_error = 'HTTP 503' WHERE id = ?", (first.id,))
    assert counters.stamp_failures(conn)["http"] == 1
    conn.close()
    conn = store.connect(cfg.db_path)
    assert schema_version(conn) == SCHEMA_VERSION
    assert "failure" in {row["name"] for row in conn.execute("PRAGMA table_info(jobs)")}
    [sql] = [row[0] for row in conn.execute("SELECT sql FROM sqlite_master WHERE name = 'count_stamp_failure'")]
    assert "LIKE" not in sql and "NEW.failure" in sql
    # A reason that reads like HTTP but was classed a timeout counts as a timeout; the earlier count stays.
    assert jobs.fail(conn, second.id, owner, "science stamp: HTTP 502", jobs.FailureClass.TIMEOUT)
    with store.transaction(conn):
        jobs.requeue_expired(conn, now=time.time() + 120)  # the third lease ran out during the upgrade
    failures = counters.stamp_failures(conn)
    assert (failures["http"], failures["timeout"], failures["worker_lost"]) == (1, 1, 1)
    assert sum(failures.values()) == 3
    assert [job.state for job in jobs.list_jobs(conn)] == ["failed", "failed", "ready"]


def test_every_connection_bounds_the_wal(tmp_path: Path) -> None:
    """The WAL is checkpointed every 1000 pages and truncated back to journal_size_limit after a burst
    (``bin/bench e2e`` reports the peak it reached)."""
    from ztfd.store.db import WAL_CHECKPOINT_PAGES, WAL_SIZE_LIMIT

    conn = store.connect(tmp_path / "state" / "ztfd.sqlite3")
    assert conn.execute("PRAGMA journal_size_limit").fetchone()[0] == WAL_SIZE_LIMIT
    assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == WAL_CHECKPOINT_PAGES
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_failing_uploads_are_counted_where_they_change_and_a_v7_store_is_seeded(
    make_config: Callable[..., Path]
) -> None:
    """Version 8 counts the pending files whose last upload failed in ``counter_failing`` (triggers, in the writer's
    transaction) instead of counting them over every pending row: the count follows a failure, new bytes, an upload
    and a forgotten row, agrees with the rows, and a version-7 store gets it seeded from its rows."""
    cfg = config.load(make_config(kafka={"topics": [TOPIC]}))
    conn = store.connect(cfg.db_path)

    def by_rows() -> int:
        return conn.execute("SELECT count(*) FROM manifest WHERE state = 'pending' AND attempts > 0").fetchone()[0]

    files = [(f"data/x/{n}.json", 10, f"md5-{n}") for n in range(5)]
    with store.transaction(conn):
        store.record_files(conn, files)
    records = {record.path: record for record in manifest.iter_pending(conn)}
    failed = [manifest.FailedUpload(records[path], "S3 says no") for path, _, _ in files[:3]]
    manifest.mark_uploaded(conn, [], failed)
    manifest.mark_uploaded(conn, [], failed[:1])  # a second failure of the same file: still one failing file
    assert manifest.count_failing(conn) == by_rows() == 3
    with store.transaction(conn):
        store.record_files(conn, [("data/x/0.json", 11, "new bytes")])  # new content: a clean slate
    path, size, md5 = files[1]
    manifest.mark_uploaded(conn, [manifest.UploadedFile(path, md5, size, md5, f'"{md5}"')], [])
    assert manifest.count_failing(conn) == by_rows() == 1
    with store.transaction(conn):
        manifest.drop_files(conn, ["data/x/2.json"])
    assert manifest.count_failing(conn) == by_rows() == 0
    manifest.mark_uploaded(conn, [], [manifest.FailedUpload(records[files[3][0]], "timeout")])
    # Back to version 7: no counter, no triggers; the migration seeds the count from the rows.
    conn.executescript("DROP TRIGGER count_failing_insert; DROP TRIGGER count_failing_update; "
                       "DROP TRIGGER count_failing_delete; DROP TABLE counter_failing; "
                       "UPDATE manifest SET attempts = 2 WHERE path = 'data/x/4.json'; "
                       "UPDATE meta SET value = '7' WHERE key = 'schema_version';")
    conn.close()
    conn = store.connect(cfg.db_path)
    assert manifest.count_failing(conn) == by_rows() == 2
    manifest.mark_uploaded(conn, [manifest.UploadedFile("data/x/4.json", "md5-4", 10, "md5-4", '"md5-4"')], [])
    assert manifest.count_failing(conn) == by_rows() == 1
    conn.close()


def test_a_second_connection_in_a_process_keeps_the_first_ones_writes_visible(tmp_path: Path) -> None:
    """A role opens a second connection (its heartbeat thread) while its first is open; another process then opens
    and closes the store. Reading the header again at the second open would close a descriptor of the database
    file, dropping this process's SQLite locks: the other process's close would take the store for unused and delete
    the WAL under the first connection, whose later writes no other process would ever see."""
    db = tmp_path / "state" / "ztfd.sqlite3"
    first = store.connect(db)
    second = store.connect(db)
    open_and_close = f"from pathlib import Path; from ztfd import store; store.connect(Path({str(db)!r})).close()"
    subprocess.run([sys.executable, "-c", open_and_close], check=True, env=child_env())
    with store.transaction(first):
        store.set_status(first, "probe", "written")
    read = ("from pathlib import Path; from ztfd import store; "
            f"print(store.get_status(store.connect(Path({str(db)!r})), 'probe')[0])")
    seen = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, check=True, env=child_env())
    assert seen.stdout.strip() == "written"
    first.close()
    second.close()
