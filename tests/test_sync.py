"""``ztfd sync`` against moto's S3 server over HTTP, run as a child process like cron or the supervisor would.

Requests are counted at the server side by ``ztfd.embedded.s3.S3Proxy`` (the child's own requests), which can
also be cut to make S3 unreachable and slowed down to kill a pass midway.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import child_env, wait_until, ztfd_command
from ztfd import config, files, store, sync
from ztfd.daemon import housekeeping
from ztfd.embedded.s3 import S3Server
from ztfd.store import deletions, manifest
from ztfd.sync import pending, reconcile, retention, upload
from ztfd.sync.s3 import make_client

_bucket_numbers = itertools.count()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with S3Server(log_path=tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture
def s3(s3_server: S3Server) -> Iterator[S3Server]:
    """The module's server with a clean request log; restored and un-slowed whatever the test did."""
    assert s3_server.proxy is not None
    s3_server.proxy.reset()
    yield s3_server
    s3_server.proxy.delay = 0.0
    s3_server.proxy.missing_keys_forbidden = False
    if s3_server.proxy.is_cut:
        s3_server.proxy.restore()


class Home:
    """A ztfd home with a config pointing at a bucket of the test's own, and helpers to write and sync files."""

    def __init__(self, config_path: Path, server: S3Server, bucket: str, prefix: str) -> None:
        self.config_path = config_path
        self.cfg = config.load(config_path)
        self.path = self.cfg.home
        self.server = server
        self.bucket = bucket
        self.prefix = prefix
        self.conn = store.connect(self.cfg.db_path)

    def write(self, relpath: str, data: bytes, record: bool = True) -> str:
        files.atomic_write(self.path / relpath, data)
        if record:
            with store.transaction(self.conn):
                store.record_files(self.conn, [(relpath, len(data), files.md5_hex(data))])
        return relpath

    def write_many(self, count: int, size: int = 200, start: int = 0) -> dict[str, bytes]:
        written = {}
        rows = []
        for i in range(start, start + count):
            relpath = (f"data/2024-05-0{i % 3 + 1}/topic/ZTF24obj{i:05d}_p0-o{i}.json" if i % 2
                       else f"images/2024-05-0{i % 3 + 1}/ZTF24obj{i:05d}/{1000 + i}_science.fits.gz")
            data = os.urandom(size + i % 17)
            files.atomic_write(self.path / relpath, data)
            rows.append((relpath, len(data), files.md5_hex(data)))
            written[relpath] = data
        with store.transaction(self.conn):
            store.record_files(self.conn, rows)
        return written

    def command(self, *args: str) -> list[str]:
        return ztfd_command(self.config_path, "sync", *args)

    def env(self, **extra: str) -> dict[str, str]:
        return child_env(**self.server.env(), **extra)

    def sync(self, *args: str, env: dict[str, str] | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command("--once", *args), env=env or self.env(), capture_output=True, text=True,
                              timeout=timeout)

    def states(self) -> dict[str, str]:
        return {row["path"]: row["state"] for row in self.conn.execute("SELECT path, state FROM manifest")}

    def row(self, relpath: str) -> sqlite3.Row:
        return self.conn.execute("SELECT * FROM manifest WHERE path = ?", (relpath,)).fetchone()

    def objects(self) -> dict[str, tuple[int, str]]:
        return self.server.objects(self.bucket)

    def puts(self) -> Any:
        assert self.server.proxy is not None
        return self.server.proxy.keys("PUT", self.bucket)

    def counts(self) -> Any:
        assert self.server.proxy is not None
        return self.server.proxy.counts(self.bucket)


@pytest.fixture
def make_home(make_config: Callable[..., Path], s3: S3Server, tmp_path: Path) -> Callable[..., Home]:
    def factory(create_bucket: bool = True, prefix: str = "archive/", name: str = "home",
                kafka: dict[str, Any] | None = None, **s3_keys: Any) -> Home:
        bucket = f"ztfd-sync-{os.getpid()}-{next(_bucket_numbers)}"
        if create_bucket:
            s3.create_bucket(bucket)
        keys = {"bucket": bucket, "prefix": prefix, "endpoint_url": s3.endpoint_url, "region": "us-east-1",
                "max_attempts": 2, "concurrency": 4, **s3_keys}
        return Home(make_config(home=tmp_path / name, s3=keys, kafka=kafka or {}), s3, bucket, prefix)

    return factory


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got: {stderr!r}"
    assert "Traceback" not in stderr
    return lines[0]



# --- the normal path -----------------------------------------------------------------------------------------


def test_first_pass_uploads_everything_and_a_second_sends_nothing(make_home: Callable[..., Home]) -> None:
    home = make_home()
    written = home.write_many(40)
    # Never uploaded: the state database (exists), logs, a temporary file and an unrecorded file being written.
    (home.path / "logs").mkdir(exist_ok=True)
    (home.path / "logs" / "ztfd.log").write_text("a log line\n")
    (home.path / "data" / "2024-05-01" / "topic" / ".ZTF24x.json.abc.tmp").write_bytes(b"half a fi")

    first = home.sync()
    assert first.returncode == 0, first.stderr
    assert "40 files" in first.stdout and "0 failed" in first.stdout and "0 pending" in first.stdout

    objects = home.objects()
    assert set(objects) == {home.prefix + path for path in written}
    for path, data in written.items():
        assert objects[home.prefix + path] == (len(data), hashlib.md5(data).hexdigest())
    assert set(home.states().values()) == {"done"}
    for path, data in written.items():
        row = home.row(path)
        assert row["etag"] == hashlib.md5(data).hexdigest() and row["uploaded_at"] is not None
    counts = home.counts()
    assert counts["PUT"] == 40 and sum(counts.values()) == 40, counts  # no LIST, no HEAD: PUTs only

    home.server.proxy.reset()  # type: ignore[union-attr]
    second = home.sync()
    assert second.returncode == 0, second.stderr
    assert "0 files" in second.stdout
    assert home.counts() == {}, "a pass with nothing to do must send nothing (no PUT, no LIST)"

    summary = sync.summary(home.conn)
    assert summary["pending"] == 0 and summary["done"] == 40 and summary["last_error"] is None
    assert summary["last_pass"]["ok"] is True and summary["last_pass"]["files"] == 0


def test_dry_run_lists_and_uploads_nothing(make_home: Callable[..., Home]) -> None:
    home = make_home()
    written = home.write_many(5)
    result = home.sync("--dry-run")
    assert result.returncode == 0, result.stderr
    for path, data in written.items():
        assert f"{home.prefix}{path}\t{len(data)}" in result.stdout
    assert "5 files" in result.stdout
    assert home.counts() == {}
    assert set(home.states().values()) == {"pending"}
    assert home.objects() == {}


def test_multipart_above_threshold_is_verified(make_home: Callable[..., Home]) -> None:
    home = make_home(multipart_threshold=1024 * 1024)
    big = os.urandom(11 * 1024 * 1024 + 123)  # parts of 5 MiB (S3's minimum): 3 parts
    home.write("images/2024-05-01/ZTF24big/1_science.fits.gz", big)
    home.write("data/2024-05-01/topic/small.json", b"{}")
    result = home.sync()
    assert result.returncode == 0, result.stderr
    counts = home.counts()
    assert counts["CREATE_MULTIPART"] == 1 and counts["UPLOAD_PART"] == 3 and counts["COMPLETE_MULTIPART"] == 1
    assert counts["PUT"] == 1  # the small file went as one PUT
    key = home.prefix + "images/2024-05-01/ZTF24big/1_science.fits.gz"
    size, etag = home.objects()[key]
    assert size == len(big) and etag.endswith("-3")
    body = home.server.client(direct=True).get_object(Bucket=home.bucket, Key=key)["Body"].read()
    assert hashlib.md5(body).hexdigest() == hashlib.md5(big).hexdigest()
    row = home.row("images/2024-05-01/ZTF24big/1_science.fits.gz")
    assert row["state"] == "done" and row["md5"] == hashlib.md5(big).hexdigest()


def test_a_file_changed_since_it_was_recorded_is_uploaded_as_read_and_recorded(make_home: Callable[..., Home]) -> None:
    home = make_home()
    path = home.write("data/2024-05-01/topic/a.json", b'{"v": 1}')
    files.atomic_write(home.path / path, b'{"v": 2, "longer": true}')  # rewritten without being recorded
    result = home.sync()
    assert result.returncode == 0, result.stderr
    new = b'{"v": 2, "longer": true}'
    assert home.objects()[home.prefix + path] == (len(new), hashlib.md5(new).hexdigest())
    row = home.row(path)
    assert (row["state"], row["size"], row["md5"]) == ("done", len(new), hashlib.md5(new).hexdigest())


def test_a_failing_file_is_reported_and_the_others_go_on(make_home: Callable[..., Home]) -> None:
    home = make_home()
    written = home.write_many(6)
    missing = "data/2024-05-01/topic/gone.json"
    with store.transaction(home.conn):
        store.record_files(home.conn, [(missing, 10, "0" * 32)])  # recorded, then deleted by someone
    result = home.sync()
    assert result.returncode == 1
    assert "1 failed" in result.stdout and "1 pending" in result.stdout
    assert "1 files failed" in one_line(result.stderr)
    assert {home.prefix + p for p in written} == set(home.objects())
    row = home.row(missing)
    assert row["state"] == "pending" and row["attempts"] == 1 and "missing on disk" in row["last_error"]
    summary = sync.summary(home.conn)
    assert summary["failing"] == 1 and summary["last_error"]["message"] == "1 files failed"


def test_mark_uploaded_keeps_a_row_pending_when_new_content_was_recorded_meanwhile(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "state" / "ztfd.sqlite3")
    with store.transaction(conn):
        store.record_files(conn, [("data/a.json", 1, "a" * 32), ("data/b.json", 1, "b" * 32)])
        store.record_files(conn, [("data/a.json", 2, "c" * 32)])  # a writer recorded new content
    manifest.mark_uploaded(conn, [manifest.UploadedFile("data/a.json", "a" * 32, 1, "a" * 32, "a" * 32),
                                  manifest.UploadedFile("data/b.json", "b" * 32, 1, "b" * 32, "b" * 32)], [])
    states = dict(conn.execute("SELECT path, state FROM manifest").fetchall())
    assert states == {"data/a.json": "pending", "data/b.json": "done"}


# --- crashes, outages, bad set-ups ---------------------------------------------------------------------------


def test_a_pass_killed_midway_resumes_without_reuploading_or_losing(make_home: Callable[..., Home]) -> None:
    home = make_home(concurrency=4)
    written = home.write_many(300, size=100)
    home.server.proxy.delay = 0.02  # type: ignore[union-attr]
    child = subprocess.Popen(home.command("--once"), env=home.env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: home.conn.execute("SELECT count(*) FROM manifest WHERE state = 'done'").fetchone()[0]
                   >= 80, 60, "80 uploads marked done")
        child.kill()
    finally:
        child.wait(10)
    done_before = {path for path, state in home.states().items() if state == "done"}
    assert 80 <= len(done_before) < 300, "the kill should land midway"
    puts_before = home.puts()
    assert all(puts_before[home.prefix + path] == 1 for path in done_before)  # done means uploaded

    home.server.proxy.delay = 0.0  # type: ignore[union-attr]
    result = home.sync()
    assert result.returncode == 0, result.stderr
    puts = home.puts()
    assert set(puts) == {home.prefix + path for path in written}  # nothing lost
    assert all(puts[home.prefix + path] == 1 for path in done_before)  # nothing done re-uploaded
    # Each verified upload is marked done at once: only those in flight at the kill can go twice.
    assert sum(puts.values()) - len(written) <= 4  # at most the uploads in flight (s3.concurrency)
    objects = home.objects()
    assert all(objects[home.prefix + p] == (len(d), hashlib.md5(d).hexdigest()) for p, d in written.items())
    assert set(home.states().values()) == {"done"}


def test_s3_unreachable_fails_cleanly_and_the_next_pass_succeeds(make_home: Callable[..., Home]) -> None:
    home = make_home()
    written = home.write_many(20)
    before = home.conn.execute("SELECT * FROM manifest ORDER BY path").fetchall()
    home.server.proxy.cut()  # type: ignore[union-attr]
    result = home.sync()
    assert result.returncode == 1
    assert "unreachable" in one_line(result.stderr)
    after = home.conn.execute("SELECT * FROM manifest ORDER BY path").fetchall()
    assert [tuple(r) for r in after] == [tuple(r) for r in before], "an outage must leave the manifest unchanged"
    assert "unreachable" in sync.summary(home.conn)["last_error"]["message"]

    home.server.proxy.restore()  # type: ignore[union-attr]
    result = home.sync()
    assert result.returncode == 0, result.stderr
    assert set(home.objects()) == {home.prefix + path for path in written}
    assert set(home.states().values()) == {"done"}
    assert sync.summary(home.conn)["last_error"] is None


def test_missing_bucket_is_one_clear_line(make_home: Callable[..., Home]) -> None:
    home = make_home(create_bucket=False)
    home.write_many(5)
    result = home.sync()
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "does not exist" in line and home.bucket in line
    assert set(home.states().values()) == {"pending"}


def test_missing_credentials_are_one_clear_line(make_home: Callable[..., Home]) -> None:
    home = make_home()
    home.write_many(3)
    env = {k: v for k, v in home.env().items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    result = home.sync(env=env)
    assert result.returncode == 1
    assert "no usable AWS credentials" in one_line(result.stderr)
    assert set(home.states().values()) == {"pending"}


def test_bad_credentials_are_one_clear_line(make_config: Callable[..., Path], tmp_path: Path) -> None:
    # A moto server that checks credentials after its first request (the bucket creation).
    with S3Server(environ={"INITIAL_NO_AUTH_ACTION_COUNT": "1"}) as server:
        server.create_bucket("ztfd-auth")
        home = Home(make_config(home=tmp_path / "auth", s3={"bucket": "ztfd-auth", "endpoint_url": server.endpoint_url,
                                                              "max_attempts": 2}), server, "ztfd-auth", "")
        home.write_many(3)
        result = home.sync()
        assert result.returncode == 1
        line = one_line(result.stderr)
        assert "refused the credentials (InvalidAccessKeyId)" in line
        assert server.env()["AWS_SECRET_ACCESS_KEY"] not in result.stderr + result.stdout
        assert set(home.states().values()) == {"pending"}


def test_empty_bucket_setting_exits_2(make_config: Callable[..., Path]) -> None:
    config_path = make_config()
    result = subprocess.run(ztfd_command(config_path, "sync", "--once"), capture_output=True, text=True,
                            env=child_env(), timeout=60)
    assert result.returncode == 2
    assert one_line(result.stderr) == "ztfd: config: s3.bucket is empty: nothing to sync to"


# --- --full, the lock, retention, the daemon -----------------------------------------------------------------


def test_full_reconciles_added_changed_and_removed_files(make_home: Callable[..., Home]) -> None:
    home = make_home()
    written = home.write_many(6)
    assert home.sync().returncode == 0
    paths = sorted(written)
    changed, removed = paths[0], paths[1]
    files.atomic_write(home.path / changed, b"new content of a different size")
    (home.path / removed).unlink()
    added = "data/2024-05-09/by-hand/copied.json"
    files.atomic_write(home.path / added, b'{"by": "hand"}')
    (home.path / "data" / "2024-05-09" / "by-hand" / ".copied2.json.x.tmp").write_bytes(b"partial")
    (home.path / "logs").mkdir(exist_ok=True)
    (home.path / "logs" / "sync.log").write_text("not data\n")
    home.server.proxy.reset()  # type: ignore[union-attr]

    plain = home.sync()  # without --full nothing is walked: nothing changes
    assert plain.returncode == 0 and home.counts() == {}

    dry = home.sync("--dry-run", "--full")
    assert dry.returncode == 0 and f"added\t{added}" in dry.stdout and f"removed\t{removed}" in dry.stdout
    assert home.counts() == {} and added not in home.states()

    result = home.sync("--full")
    assert result.returncode == 0, result.stderr
    assert home.puts() == {home.prefix + added: 1, home.prefix + changed: 1}
    states = home.states()
    assert removed not in states and states[added] == "done" and states[changed] == "done"
    objects = home.objects()
    assert objects[home.prefix + changed][1] == hashlib.md5(b"new content of a different size").hexdigest()
    assert home.prefix + removed in objects  # --full never deletes from S3
    assert not any(".tmp" in key or "logs/" in key or "state/" in key for key in objects)


def test_two_concurrent_passes_never_upload_twice(make_home: Callable[..., Home]) -> None:
    home = make_home(concurrency=4)
    written = home.write_many(150, size=100)
    home.server.proxy.delay = 0.01  # type: ignore[union-attr]
    children = [subprocess.Popen(home.command("--once"), env=home.env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [child.communicate(timeout=90) for child in children]
    assert [child.returncode for child in children] == [0, 0], outputs
    puts = home.puts()
    assert set(puts) == {home.prefix + path for path in written}
    assert set(puts.values()) == {1}, "a file was uploaded by both passes"
    assert sorted(int(out.split(" files")[0].rsplit(" ", 1)[1]) for out, _ in outputs) == [0, 150]


def test_once_gives_up_after_the_lock_timeout(make_home: Callable[..., Home]) -> None:
    home = make_home(lock_timeout=0.5)
    home.write_many(2)
    with open(home.cfg.state_dir / "sync.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = home.sync()
    assert result.returncode == 1
    assert "another sync pass holds" in one_line(result.stderr)
    assert home.counts() == {} and set(home.states().values()) == {"pending"}


def test_retention_deletes_only_old_uploaded_files(make_home: Callable[..., Home]) -> None:
    home = make_home(delete_local_after_days=1)
    written = home.write_many(6)
    assert home.sync().returncode == 0  # uploaded just now: nothing is old enough
    assert all((home.path / path).exists() for path in written)
    old, young = sorted(written)[:3], sorted(written)[3:]
    with store.transaction(home.conn):
        home.conn.executemany("UPDATE manifest SET uploaded_at = ? WHERE path = ?",
                              [(time.time() - 2 * 86400, path) for path in old])
    not_uploaded = home.write("data/2024-05-01/topic/late.json", b"{}")
    with store.transaction(home.conn):  # recorded long ago, uploaded only now: not old for retention
        home.conn.execute("UPDATE manifest SET recorded_at = 0 WHERE path = ?", (not_uploaded,))

    result = home.sync()
    assert result.returncode == 0, result.stderr
    assert "3 local files deleted" in result.stdout
    assert not any((home.path / path).exists() for path in old)
    assert all((home.path / path).exists() for path in [*young, not_uploaded])
    states = home.states()
    assert all(states[path] == "archived" for path in old) and all(states[p] == "done" for p in young)
    assert set(home.objects()) >= {home.prefix + path for path in written}

    home.server.proxy.reset()  # type: ignore[union-attr]
    full = home.sync("--full")  # archived files are neither re-uploaded nor forgotten
    assert full.returncode == 0, full.stderr
    assert home.puts() == {}
    assert all(home.states()[path] == "archived" for path in old)
    assert sync.summary(home.conn)["archived"] == 3


def prune_a_day_later(home: Home) -> housekeeping.Pruned:
    return housekeeping.prune(home.conn, home.cfg, now=time.time() + housekeeping.UPLOADED_KEEP + 3600)


def test_uploaded_files_are_forgotten_a_day_later_and_never_uploaded_again(make_home: Callable[..., Home]) -> None:
    """The store keeps a file's row until a day after it is safe in S3: then ``prune`` forgets it, the counts stay,
    ``--full`` leaves the file be (it is no newer than the horizon) and takes what changed since. A file recorded
    again with the same bytes after its upload does not move the horizon past files written before."""
    home = make_home()
    written = home.write_many(8)
    assert home.sync().returncode == 0
    pending = home.write("data/2024-05-02/topic/not-yet.json", b'{"late": 1}')  # recorded, not uploaded
    unrecorded = home.write("data/2024-05-02/topic/killed.json", b"{}", record=False)  # a writer killed before
    again = sorted(written)[-1]  # recorded again with the same bytes: stays done, recorded_at is now
    home.write(again, written[again])
    before = sync.summary(home.conn)
    assert prune_a_day_later(home).uploaded_files == len(written)
    assert home.states() == {pending: "pending"}  # only the file not in S3 is still listed
    after = sync.summary(home.conn)
    assert (after["done"], after["done_bytes"], after["pending"]) == (before["done"], before["done_bytes"], 1)
    assert manifest.forgotten_before(home.conn) >= max(
        (home.path / path).stat().st_mtime for path in written if path != again)

    changed = sorted(written)[0]
    files.atomic_write(home.path / changed, b"edited by hand after it was forgotten")
    added = home.write("data/2024-05-03/by-hand/new.json", b"{}", record=False)
    home.server.proxy.reset()  # type: ignore[union-attr]
    full = home.sync("--full")
    assert full.returncode == 0, full.stderr
    # The horizon is the upload's time, not the later record's: the file written before it is taken too, and the
    # file written again after its upload is sent again (the same bytes under the same key: nothing lost).
    assert home.puts() == {home.prefix + path: 1 for path in (changed, added, pending, unrecorded, again)}
    assert set(home.states()) == {changed, added, pending, unrecorded, again}
    assert "6 forgotten" in (home.path / "logs" / "sync.log").read_text()


def test_full_sees_rows_forgotten_while_it_walks(make_home: Callable[..., Home],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A prune during a long ``--full`` walk forgets rows the walk has not reached yet: those files are left be,
    not recorded and uploaded again (the horizon is read at each unlisted file)."""
    home = make_home()
    written = home.write_many(6)
    assert home.sync().returncode == 0
    real_walk = reconcile.walk_synced

    def walk_with_a_prune(where: Path) -> Iterator[Path]:
        for index, path in enumerate(real_walk(where)):
            if index == 1:
                prune_a_day_later(home)
            yield path

    monkeypatch.setattr(reconcile, "walk_synced", walk_with_a_prune)
    plan = reconcile.reconcile(home.conn, home.cfg)
    assert (plan.added, plan.changed, plan.forgotten) == ([], [], len(written) - 1)  # all but the first


def test_with_retention_on_every_manifest_row_is_kept(make_home: Callable[..., Home]) -> None:
    """Retention needs the done rows, and the archived ones are all that says which files are in S3 only."""
    home = make_home(delete_local_after_days=1)
    written = home.write_many(4)
    assert home.sync().returncode == 0
    assert prune_a_day_later(home).uploaded_files == 0
    old = sorted(written)[:2]
    with store.transaction(home.conn):
        home.conn.executemany("UPDATE manifest SET uploaded_at = ? WHERE path = ?",
                              [(time.time() - 9 * 86400, path) for path in old])
    assert "2 local files deleted" in home.sync().stdout
    assert prune_a_day_later(home).uploaded_files == 0
    assert set(home.states()) == set(written)
    assert sync.summary(home.conn)["archived"] == 2


def test_daemon_passes_heartbeats_and_stops_on_sigterm(make_home: Callable[..., Home]) -> None:
    home = make_home(interval=3600)
    written = home.write_many(10)
    child = subprocess.Popen(ztfd_command(home.config_path, "sync"), env=home.env(ZTFD_PROCESS_NAME="syncer-test"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: set(home.states().values()) == {"done"}, 60, "the first pass")
        wait_until(lambda: home.conn.execute("SELECT 1 FROM processes WHERE name = 'syncer-test' AND role = 'syncer'"
                                             ).fetchone() is not None, 30, "a heartbeat")
        wait_until(lambda: sync.summary(home.conn)["last_pass"] is not None, 30, "the pass status")
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, stderr
    assert set(home.objects()) == {home.prefix + path for path in written}
    last_pass = sync.summary(home.conn)["last_pass"]
    assert last_pass["files"] == 10 and last_pass["ok"] is True
    assert (home.path / "logs" / "sync.log").read_text().count("sync pass: 10 files") == 1


def test_summary_of_an_empty_store(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "s.sqlite3")
    assert sync.summary(conn) == {"pending": 0, "pending_bytes": 0, "done": 0, "done_bytes": 0, "archived": 0,
                                  "failing": 0, "unverified": 0, "deleting": 0, "last_pass": None, "last_error": None}


def test_pass_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    stop = threading.Event()
    lock_path = tmp_path / "sync.lock"
    with sync.pass_lock(lock_path, 0, stop) as first:
        assert first
        with sync.pass_lock(lock_path, 0.2, stop) as second:  # another open file description: excluded
            assert not second
    with sync.pass_lock(lock_path, 0, stop) as again:
        assert again


# --- review fixes: retention race, indexes, chunked --full, streaming uploads ---------------------------------


def test_retention_never_deletes_content_rewritten_while_it_runs(make_home: Callable[..., Home],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    home = make_home(delete_local_after_days=1)
    written = home.write_many(4)
    assert home.sync().returncode == 0
    with store.transaction(home.conn):
        home.conn.execute("UPDATE manifest SET uploaded_at = ?", (time.time() - 2 * 86400,))
    victim = sorted(written)[0]
    checked = retention.Retention.may_delete

    def then_rewritten(self: retention.Retention, row: manifest.OldUpload) -> Any:
        verdict = checked(self, row)
        if row.path == victim:  # replay --force rewrites it between the check and the archive/unlink
            home.write(victim, b"new content")
        return verdict

    monkeypatch.setattr(retention.Retention, "may_delete", then_rewritten)
    for key, value in home.server.env().items():
        monkeypatch.setenv(key, value)
    deleted = retention.apply_retention(home.conn, home.cfg, make_client(home.cfg), threading.Event()).deleted
    assert deleted == 3
    assert (home.path / victim).read_bytes() == b"new content"  # before: unlinked although pending
    assert home.row(victim)["state"] == "pending"
    assert all(not (home.path / p).exists() and home.row(p)["state"] == "archived" for p in written if p != victim)


def test_rewritten_after_archiving_but_before_recording_is_kept(make_home: Callable[..., Home],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    home = make_home(delete_local_after_days=1)
    victim = home.write("data/2024-05-01/t/a.json", b"old")
    assert home.sync().returncode == 0
    with store.transaction(home.conn):
        home.conn.execute("UPDATE manifest SET uploaded_at = ?", (time.time() - 2 * 86400,))
    checked = retention.Retention.may_delete

    def then_rewritten(self: retention.Retention, row: manifest.OldUpload) -> Any:
        verdict = checked(self, row)
        home.write(victim, b"new", record=False)  # on disk, not yet recorded: the row still says done
        return verdict

    monkeypatch.setattr(retention.Retention, "may_delete", then_rewritten)
    for key, value in home.server.env().items():
        monkeypatch.setenv(key, value)
    assert retention.apply_retention(home.conn, home.cfg, make_client(home.cfg), threading.Event()).deleted == 0
    assert (home.path / victim).read_bytes() == b"new"
    assert home.row(victim)["state"] == "done"  # the writer's record_files makes it pending next


def test_retention_query_uses_its_index(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "ztfd.sqlite3")
    plan = " ".join(row[3] for row in conn.execute(
        "EXPLAIN QUERY PLAN " + manifest.OLD_UPLOADS_QUERY, (1.0, 0.0, 0.0, "", 64)))
    assert "manifest_uploaded" in plan and "TEMP B-TREE" not in plan, plan


def test_full_applies_its_plan_in_short_transactions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = store.connect(tmp_path / "ztfd.sqlite3")
    opened = []
    real = store.transaction

    def counting(connection: sqlite3.Connection, *args: Any, **kwargs: Any) -> Any:
        opened.append(1)
        return real(connection, *args, **kwargs)

    monkeypatch.setattr(store, "transaction", counting)
    monkeypatch.setattr(reconcile, "APPLY_CHUNK", 2)
    plan = reconcile.Plan(added=[(f"data/{i}.json", 1, "a" * 32) for i in range(5)])
    reconcile.apply_plan(conn, plan)
    assert len(opened) == 3  # 2 + 2 + 1 rows
    assert conn.execute("SELECT count(*) FROM manifest").fetchone()[0] == 5


def test_larger_single_part_files_are_streamed_not_read_whole(make_home: Callable[..., Home],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    home = make_home()
    big = os.urandom(3 * 1024 * 1024 + 5)
    small = b"x" * 100
    paths = [home.write("images/2024-05-01/o/1_science.fits.gz", big), home.write("data/2024-05-01/t/a.json", small)]
    monkeypatch.setattr(upload, "IN_MEMORY_MAX", 1024 * 1024)
    reads: list[int] = []
    real_open = Path.open

    def watched_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        handle = real_open(self, *args, **kwargs)
        real_read = handle.read

        def read(size: int = -1) -> bytes:
            data = real_read(size)
            reads.append(len(data))
            return data

        handle.read = read  # type: ignore[method-assign]
        return handle

    monkeypatch.setattr(Path, "open", watched_open)
    for key, value in home.server.env().items():
        monkeypatch.setenv(key, value)
    uploader = upload.Uploader(home.cfg, make_client(home.cfg), threading.Event())
    for path, data in zip(paths, (big, small), strict=True):
        uploaded = uploader.upload(manifest.FileRecord(path, len(data), hashlib.md5(data).hexdigest()))
        assert (uploaded.size, uploaded.md5) == (len(data), hashlib.md5(data).hexdigest())
    assert reads and max(reads) <= 1 << 20, reads  # hashed in blocks and streamed: never read whole
    assert home.objects() == {home.prefix + p: (len(d), hashlib.md5(d).hexdigest())
                              for p, d in zip(paths, (big, small), strict=True)}


def test_persistent_5xx_is_an_outage_that_blames_no_file(make_home: Callable[..., Home]) -> None:
    home = make_home()
    written = home.write_many(30)
    before = home.conn.execute("SELECT * FROM manifest ORDER BY path").fetchall()
    home.server.proxy.fail_with(503, "SlowDown")  # type: ignore[union-attr]
    try:
        result = home.sync()
    finally:
        home.server.proxy.fail_with(None)  # type: ignore[union-attr]
    assert result.returncode == 1
    assert "treated as an outage" in one_line(result.stderr) and "SlowDown" in result.stderr
    after = home.conn.execute("SELECT * FROM manifest ORDER BY path").fetchall()
    assert [tuple(r) for r in after] == [tuple(r) for r in before], "an outage must not bump every row's attempts"
    # It stopped after a few files instead of working through all 30 (2 botocore attempts each).
    assert len(home.puts()) <= pending.OUTAGE_AFTER + 2 * 4, home.puts()

    result = home.sync()
    assert result.returncode == 0, result.stderr
    assert set(home.objects()) == {home.prefix + path for path in written}


def test_a_few_5xx_failures_are_the_files_failures(make_home: Callable[..., Home]) -> None:
    home = make_home(concurrency=1)
    home.write_many(2)  # fewer than OUTAGE_AFTER files fail: no outage, each row counts its failed attempt
    home.server.proxy.fail_with(500, "InternalError")  # type: ignore[union-attr]
    try:
        result = home.sync()
    finally:
        home.server.proxy.fail_with(None)  # type: ignore[union-attr]
    assert result.returncode == 1 and "2 files failed" in result.stderr, result.stderr
    assert [row["attempts"] for row in home.conn.execute("SELECT attempts FROM manifest")] == [1, 1]


# --- retention against what S3 really answers: ETags, 403 for a missing object, the documented IAM policy ------


def age_uploads(home: Home, days: float = 2) -> None:
    with store.transaction(home.conn):
        home.conn.execute("UPDATE manifest SET uploaded_at = ? WHERE state = 'done'", (time.time() - days * 86400,))


@pytest.mark.parametrize("kind", ["single-part", "multipart"])
def test_retention_requeues_a_file_whose_s3_copy_has_other_bytes_of_the_same_size(
        make_home: Callable[..., Home], kind: str) -> None:
    home = make_home(delete_local_after_days=1, multipart_threshold=1024 * 1024)
    size = 100 if kind == "single-part" else 6 * 1024 * 1024 + 7  # 2 parts of at least 5 MiB
    intact = home.write(f"images/2024-05-01/o/{kind}-intact.fits.gz", os.urandom(size))
    replaced_data = os.urandom(size)
    replaced = home.write(f"images/2024-05-01/o/{kind}-replaced.fits.gz", replaced_data)
    assert home.sync().returncode == 0
    if kind == "multipart":
        assert home.row(intact)["etag"].endswith("-2")
    # Someone (another tool, a bad restore) overwrote one object with other bytes of the same size.
    home.server.client(direct=True).put_object(Bucket=home.bucket, Key=home.prefix + replaced, Body=os.urandom(size))
    age_uploads(home)

    result = home.sync()
    assert result.returncode == 1 and "1 pending" in result.stdout, result.stdout + result.stderr
    assert not (home.path / intact).exists() and home.row(intact)["state"] == "archived"  # same ETag: verified
    assert (home.path / replaced).read_bytes() == replaced_data  # before: deleted, S3 holding other bytes
    assert home.row(replaced)["state"] == "pending"

    assert home.sync().returncode == 0  # uploaded again: S3 holds the archive's bytes
    assert home.objects()[home.prefix + replaced][0] == size
    body = home.server.client(direct=True).get_object(Bucket=home.bucket, Key=home.prefix + replaced)["Body"]
    assert body.read() == replaced_data


def test_a_fleet_hosts_pass_puts_its_schema_file_back_when_another_hosts_late_upload_replaced_it(
        make_home: Callable[..., Home]) -> None:
    """Every host of a fleet uploads the dataset's schema file under one key: a host gone for good may have
    uploaded an older schema last. Each pass asks S3 (one HEAD) and uploads this host's again when it differs."""
    home = make_home(prefix="fleet/", kafka={"assignment": "group"})
    schema = home.write("archive/alerts/_common_metadata", b"the schema the fleet agreed, with column b")
    alert = home.write("data/2024-05-01/topic/ZTF24a_p0-o1.json", b"{}")
    assert home.sync().returncode == 0
    older = b"an older schema, without b"
    home.server.client(direct=True).put_object(Bucket=home.bucket, Key=home.prefix + schema, Body=older)

    home.server.proxy.reset()  # type: ignore[union-attr]
    result = home.sync()
    assert result.returncode == 0, result.stdout + result.stderr
    body = home.server.client(direct=True).get_object(Bucket=home.bucket, Key=home.prefix + schema)["Body"]
    assert body.read() == (home.path / schema).read_bytes()
    assert home.puts() == {home.prefix + schema: 1}  # the alert's file is not uploaded again
    assert home.row(schema)["state"] == home.row(alert)["state"] == "done"

    home.server.proxy.reset()  # type: ignore[union-attr]
    assert home.sync().returncode == 0
    assert home.counts() == {"HEAD": 1}  # S3 holds this host's: one HEAD a pass, nothing uploaded


def test_the_fleets_report_writer_puts_its_report_back_when_the_previous_writers_late_upload_replaced_it(
        make_home: Callable[..., Home], monkeypatch: pytest.MonkeyPatch) -> None:
    """Partition 0 moved: the previous writer's pending report of a night can land after the new writer's. The
    writer asks S3 for each of the night's pages and its stamps index (a HEAD each; not the light curves, one per
    object) and queues the night's files, or the index, again when one differs: a late page 2 as much as a late
    first page."""
    import datetime as dt

    from ztfd.reporting.fleet_night import REPORTED, FleetNight
    from ztfd.store.status_facts import set_status

    home = make_home(prefix="fleet/", kafka={"assignment": "group"})
    for name, value in home.server.env().items():  # this process asks S3, as the reporter does
        monkeypatch.setenv(name, value)
    today = dt.datetime.now(dt.UTC).date().isoformat()
    first = home.write(f"reports/{today}/index.html", b"<p>both hosts' alerts: 12</p>")
    second = home.write(f"reports/{today}/page-2.html", b"<p>the rest</p>")
    home.write(f"reports/{today}/lc/ZTF24aaaaaaa.png", b"a light curve")  # one per object: not asked each round
    index = home.write(f"archive/stamps/night={today}/stamps.parquet", b"the fleet's stamps index")
    with store.transaction(home.conn):
        set_status(home.conn, REPORTED + today, "v2")
        set_status(home.conn, REPORTED + "2020-01-01", "v1")  # a night past the look-back: not asked
    assert home.sync().returncode == 0
    night = FleetNight(home.cfg, home.conn)
    home.server.proxy.reset()  # type: ignore[union-attr]
    night.check_uploads(time.time())
    assert home.counts() == {"HEAD": 3} and set(home.states().values()) == {"done"}  # S3 holds this host's

    home.server.client(direct=True).put_object(Bucket=home.bucket, Key=home.prefix + second, Body=b"<p>older</p>")
    night.check_uploads(time.time())  # only the second page was replaced
    assert home.row(first)["state"] == home.row(second)["state"] == "pending" and home.row(index)["state"] == "done"
    assert home.sync().returncode == 0
    body = home.server.client(direct=True).get_object(Bucket=home.bucket, Key=home.prefix + second)["Body"]
    assert body.read() == (home.path / second).read_bytes()

    stale = b"<p>one host's alerts: 7</p>"  # the previous writer's, uploaded late
    home.server.client(direct=True).put_object(Bucket=home.bucket, Key=home.prefix + first, Body=stale)
    home.server.client(direct=True).put_object(Bucket=home.bucket, Key=home.prefix + index, Body=b"older")
    night.check_uploads(time.time())
    assert home.row(first)["state"] == home.row(second)["state"] == home.row(index)["state"] == "pending"
    assert home.sync().returncode == 0
    body = home.server.client(direct=True).get_object(Bucket=home.bucket, Key=home.prefix + first)["Body"]
    assert body.read() == (home.path / first).read_bytes()


def test_retention_counts_a_403_as_unverified_and_uploads_the_file_again_after_a_few_passes(
        make_home: Callable[..., Home]) -> None:
    home = make_home(delete_local_after_days=1)
    written = home.write_many(3)
    assert home.sync().returncode == 0
    lost = sorted(written)[0]
    home.server.client(direct=True).delete_object(Bucket=home.bucket, Key=home.prefix + lost)  # a lifecycle rule
    age_uploads(home)
    home.server.proxy.missing_keys_forbidden = True  # type: ignore[union-attr]  # credentials without ListBucket

    for attempt in range(1, retention.UNVERIFIED_PASSES):
        result = home.sync()
        assert result.returncode == 0, result.stderr  # nothing pending: the file is kept, nothing lost
        assert "1 not verified on S3" in result.stdout
        assert (home.path / lost).read_bytes() == written[lost] and home.row(lost)["state"] == "done"
        summary = sync.summary(home.conn)
        assert summary["unverified"] == 1 and summary["last_pass"]["unverified"] == 1, summary
        assert "403" in summary["last_error"]["message"] and "s3:ListBucket" in summary["last_error"]["message"]
        assert home.conn.execute("SELECT passes FROM retention_checks WHERE path = ?", (lost,)).fetchone()[0] == attempt
    assert all(not (home.path / p).exists() for p in written if p != lost)  # the others were verified: deleted
    log = (home.path / "logs" / "sync.log").read_text()
    assert f"cannot verify {lost}" in log

    flagged = home.sync()  # the last pass it may stay unverified: queued for upload again
    assert flagged.returncode == 1 and "1 pending" in flagged.stdout, flagged.stdout
    assert home.row(lost)["state"] == "pending" and "403" in home.row(lost)["last_error"]
    assert sync.summary(home.conn)["last_pass"]["requeued"] == 1
    assert "queued for upload again" in (home.path / "logs" / "sync.log").read_text()

    again = home.sync()
    assert again.returncode == 0, again.stderr
    assert home.objects()[home.prefix + lost] == (len(written[lost]), hashlib.md5(written[lost]).hexdigest())
    summary = sync.summary(home.conn)
    assert summary["unverified"] == 0 and summary["last_error"] is None


def documented_policy(bucket: str, prefix: str) -> dict[str, Any]:
    """The IAM policy ztfd ships (``etc/s3-policy.json``, shown in the docs' "Sync to S3"), for this bucket and
    prefix."""
    policy = (Path(__file__).resolve().parents[1] / "etc" / "s3-policy.json").read_text()
    return json.loads(policy.replace("<bucket>", bucket).replace("<prefix>", prefix))


def iam_user(iam: Any, name: str, policy: dict[str, Any]) -> dict[str, str]:
    """Credentials (as environment variables) of a new moto IAM user with ``policy`` inline."""
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


@pytest.mark.parametrize("without", [None, "s3:GetObject"])
def test_the_documented_iam_policy_is_what_sync_and_retention_need(make_config: Callable[..., Path], tmp_path: Path,
                                                                   without: str | None) -> None:
    """moto enforcing the shipped policy (each request's action and resource): uploads, a multipart upload and
    retention work with it; without s3:GetObject retention cannot verify (403) and deletes nothing."""
    with S3Server() as server:
        bucket, prefix = "ztfd-iam", "archive/"
        admin = server.client(direct=True)
        admin.create_bucket(Bucket=bucket)
        policy = documented_policy(bucket, prefix)
        if without:
            for statement in policy["Statement"]:
                actions = [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]
                statement["Action"] = [a for a in actions if a != without]
            policy["Statement"] = [st for st in policy["Statement"] if st["Action"]]
        iam = boto3_client(server, "iam")
        ztfd_keys = iam_user(iam, "ztfd", policy)
        admin_keys = iam_user(iam, "admin", {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "*", "Resource": "*"}]})
        urllib.request.urlopen(urllib.request.Request(  # from now on moto checks every request against IAM
            f"http://127.0.0.1:{server.backend_port}/moto-api/reset-auth", data=b"0", method="POST",
            headers={"Content-Type": "text/plain"}), timeout=10)
        admin = boto3_client(server, "s3", admin_keys)

        home = Home(make_config(home=tmp_path / "iam", s3={
            "bucket": bucket, "prefix": prefix, "endpoint_url": server.endpoint_url, "region": "us-east-1",
            "max_attempts": 2, "delete_local_after_days": 1, "multipart_threshold": 1024 * 1024}),
            server, bucket, prefix)
        env = {**home.env(), **ztfd_keys}
        written = home.write_many(4)
        big = home.write("images/2024-05-01/o/big_science.fits.gz", os.urandom(6 * 1024 * 1024))
        first = home.sync(env=env)
        assert first.returncode == 0, first.stderr
        keys = {o["Key"] for o in admin.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])}
        assert keys == {prefix + p for p in [*written, big]}

        lost = sorted(written)[0]
        admin.delete_object(Bucket=bucket, Key=prefix + lost)
        age_uploads(home)
        second = home.sync(env=env)
        summary = sync.summary(home.conn)
        if without is None:  # every file verified and deleted, the lost one queued again
            assert second.returncode == 1 and "1 pending" in second.stdout, second.stdout + second.stderr
            assert summary["archived"] == 4 and home.row(lost)["state"] == "pending"
            assert home.sync(env=env).returncode == 0
            assert admin.head_object(Bucket=bucket, Key=prefix + lost)["ContentLength"] == len(written[lost])
            # An archive file replaced by one of another name (compaction): deleted from S3 once that one is up.
            part = home.write("archive/alerts/night=2024-05-01/topic=t/p0-g0-o000000000000-000000000001.parquet",
                              b"part")
            assert home.sync(env=env).returncode == 0
            folded = home.write("archive/alerts/night=2024-05-01/topic=t/p0-g0-o000000000000-000000000002.parquet",
                                b"folded")
            with store.transaction(home.conn):
                deletions.request(home.conn, [part], folded)
            (home.path / part).unlink()
            assert sync.summary(home.conn)["deleting"] == 1  # what ztfd status shows
            deleting = home.sync(env=env)
            assert deleting.returncode == 0 and "1 objects deleted from S3" in deleting.stdout, deleting.stdout
            keys = {o["Key"] for o in admin.list_objects_v2(Bucket=bucket, Prefix=prefix + "archive/")["Contents"]}
            assert keys == {prefix + folded} and sync.summary(home.conn)["deleting"] == 0
        else:  # nothing could be verified: everything kept, counted, reported
            assert second.returncode == 0, second.stderr
            assert summary["archived"] == 0 and summary["unverified"] == 5
            assert all((home.path / p).exists() for p in [*written, big])
            assert "403" in summary["last_error"]["message"]


def boto3_client(server: S3Server, service: str, keys: dict[str, str] | None = None) -> Any:
    """A client of moto itself (past the proxy) with these IAM credentials (the dummy ones by default)."""
    import boto3

    keys = keys or {"AWS_ACCESS_KEY_ID": "ztfd-test-access-key", "AWS_SECRET_ACCESS_KEY": "x"}
    return boto3.session.Session().client(
        service, endpoint_url=f"http://127.0.0.1:{server.backend_port}", region_name="us-east-1",
        aws_access_key_id=keys["AWS_ACCESS_KEY_ID"], aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])


def test_objects_get_the_content_type_a_browser_needs(make_home: Callable[..., Home]) -> None:
    """Through moto over HTTP: a report page is shown, not downloaded; every kind of file ztfd writes is typed."""
    home = make_home(multipart_threshold=1024 * 1024)
    expected = {
        "reports/2024-05-01/index.html": "text/html; charset=utf-8",
        "reports/2024-05-01/lc/ZTF24obj00001.png": "image/png",
        "data/2024-05-01/topic/ZTF24obj00001_p0-o1.json": "application/json",
        "images/2024-05-01/ZTF24obj00001/1001_science.fits.gz": "application/gzip",
        "data/2024-05-01/fink/ZTF24obj00001_p0-o2.avro": "application/avro",
        "data/2024-05-01/topic/rejected-7.jsonl": "application/x-ndjson",
        "archive/2024-05-01/topic/part-0.parquet": "application/vnd.apache.parquet",
        "data/2024-05-01/topic/notes.unknown": "application/octet-stream",
    }
    for path in expected:
        home.write(path, os.urandom(64))
    home.write("images/2024-05-01/big/1002_science.fits.gz", os.urandom(6 * 1024 * 1024))  # multipart
    expected["images/2024-05-01/big/1002_science.fits.gz"] = "application/gzip"
    done = home.sync()
    assert done.returncode == 0, done.stderr
    assert home.counts()["CREATE_MULTIPART"] == 1
    client = home.server.client()
    for path, content_type in expected.items():
        assert client.head_object(Bucket=home.bucket, Key=home.prefix + path)["ContentType"] == content_type, path


def test_the_syncer_does_not_load_the_archive_readers() -> None:
    """The syncer needs the archive's names, not its readers: pyarrow and DuckDB are ~120 MB of RSS (the syncer's
    budget is 200 MB) and half a second at every start."""
    import sys

    probe = ("import sys, ztfd.sync.daemon, ztfd.sync.passes, ztfd.sync.shared_keys; "
             "print(sorted(m for m in ('pyarrow', 'duckdb', 'astropy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout
