"""Sync: files/s of ``ztfd sync --once`` against ``aws s3 sync`` and ``s5cmd sync``, into the same local moto S3.

Upload: N small alert-like files under ``data/`` (recorded in the manifest as the consumer records them), each
tool into a fresh bucket, wall time of the whole command (start-up included for all three).
Nothing to do: M files already uploaded (the manifest marked done, the bucket filled through moto's in-process
backend: uploading 100,000 objects over HTTP would take longer than the bench), then the real
``ztfd sync --once`` against ``aws s3 sync`` finding nothing to upload over the same tree and bucket.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from bench.common import Results, Row, RssSampler, Settings, median, ratio, ztfd_child
from ztfd import files, store
from ztfd.embedded.demo import LOCAL_AWS_ENV, child_env, write_config
from ztfd.store import manifest
from ztfd.sync import status as sync_status

MOTO_ACCOUNT = "123456789012"


def run(settings: Settings, results: Results) -> None:
    import logging

    from ztfd.embedded.s3 import S3Server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto in-process would log every request
    count = settings.size(10_000, 1_000)
    idle_count = settings.size(100_000, 5_000)
    work = settings.workdir / "sync"
    times: dict[str, list[float]] = {"ztfd": [], "aws": [], "s5cmd": []}
    idle: dict[str, list[float]] = {"ztfd": [], "aws": []}
    # In-process moto ("thread"): the nothing-to-do part fills its backend directly. No counting proxy.
    with S3Server(mode="thread", proxy=False) as server:
        s3 = _client(server.endpoint_url)
        home = work / "upload"
        make_tree(home, count)
        for run_index in range(settings.runs):
            for tool in ("aws", "s5cmd", "ztfd"):
                bucket = f"bench-{tool}-{run_index}"
                s3.create_bucket(Bucket=bucket)
                seconds = _upload(tool, home, bucket, server.endpoint_url, results)
                keys = _count_keys(s3, bucket)
                if keys != count:
                    raise RuntimeError(f"{tool} uploaded {keys} of {count} files")
                times[tool].append(seconds)
                _empty_bucket(bucket)
            print(f"  upload run {run_index + 1}: " + ", ".join(f"{k} {count / v[-1]:,.0f} files/s"
                                                                 for k, v in times.items()), flush=True)
        shutil.rmtree(home, ignore_errors=True)

        home = work / "idle"
        started = time.monotonic()
        make_tree(home, idle_count)
        bucket = "bench-idle"
        s3.create_bucket(Bucket=bucket)
        _fill_backend(bucket, home)
        _mark_uploaded(home)
        print(f"  {idle_count:,} files on disk and in S3 in {time.monotonic() - started:.0f}s", flush=True)
        for run_index in range(settings.runs):
            idle["ztfd"].append(_upload("ztfd", home, bucket, server.endpoint_url, results, expect_nothing=True))
            idle["aws"].append(_upload("aws", home, bucket, server.endpoint_url, results, expect_nothing=True))
            print(f"  nothing-to-do run {run_index + 1}: ztfd {idle['ztfd'][-1]:.2f}s, aws {idle['aws'][-1]:.1f}s",
                  flush=True)
    rates = {tool: count / median(seconds) for tool, seconds in times.items()}
    idle_ztfd, idle_aws = median(idle["ztfd"]), median(idle["aws"])
    results.raw["sync"] = {"files": count, "seconds": times, "idle_files": idle_count, "idle_seconds": idle}
    results.add(
        Row("sync", "ztfd sync --once upload", rates["ztfd"], "files/s", f"{count:,} files, median of {settings.runs}"),
        Row("sync", "vs aws s3 sync", ratio(rates["ztfd"], rates["aws"]), "x", f"aws {rates['aws']:,.0f} files/s",
            ">= 1.0x", rates["ztfd"] >= rates["aws"]),
        Row("sync", "vs s5cmd sync", ratio(rates["ztfd"], rates["s5cmd"]), "x",
            f"s5cmd {rates['s5cmd']:,.0f} files/s", ">= 0.9x", rates["ztfd"] >= 0.9 * rates["s5cmd"]),
        Row("sync", "nothing to do, ztfd", idle_ztfd, "s", f"{idle_count:,} files uploaded"),
        Row("sync", "nothing to do, faster than aws", ratio(idle_aws, idle_ztfd), "x", f"aws {idle_aws:.1f}s",
            ">= 50x", idle_aws >= 50 * idle_ztfd),
    )


def make_tree(home: Path, count: int) -> None:
    """``count`` alert-sized JSON files under data/<date>/<topic>/, recorded in the manifest as pending."""
    from ztfd.embedded.samples import message_stream

    home.mkdir(parents=True, exist_ok=True)
    # An hour old: S3 lists LastModified to the second, and aws s3 sync uploads a file newer than its object.
    aged = time.time() - 3600
    conn = store.connect(home / "state" / "ztfd.sqlite3")
    try:
        recorded = []
        for seq, message in enumerate(message_stream(count)):
            date = f"2021-09-{1 + seq % 20:02d}"
            relpath = f"data/{date}/lasair_bench{seq % 2}/{message['objectId']}_p0-o{seq}.json"
            data = json.dumps(message, indent=1).encode()
            path = home / relpath
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            os.utime(path, (aged, aged))
            recorded.append((relpath, len(data), files.md5_hex(data)))
            if len(recorded) >= 5000:
                with store.transaction(conn):
                    store.record_files(conn, recorded)
                recorded = []
        with store.transaction(conn):
            store.record_files(conn, recorded)
    finally:
        conn.close()


def _mark_uploaded(home: Path) -> None:
    conn = store.connect(home / "state" / "ztfd.sqlite3")
    try:
        with store.transaction(conn):
            manifest.mark_all_uploaded(conn)
    finally:
        conn.close()


def _reset_manifest(home: Path) -> None:
    conn = store.connect(home / "state" / "ztfd.sqlite3")
    try:
        with store.transaction(conn):
            manifest.mark_all_pending(conn)
            for key in (sync_status.STATUS_LAST_PASS, sync_status.STATUS_LAST_ERROR):
                store.set_status(conn, key, None)
        pending = manifest.count_pending(conn)
    finally:
        conn.close()
    if not pending:
        raise RuntimeError("the manifest has nothing pending")


def _upload(tool: str, home: Path, bucket: str, endpoint: str, results: Results, expect_nothing: bool = False) -> float:
    """Wall seconds of one ``tool`` pass from ``home/data`` to ``s3://bucket/data/``."""
    if tool == "ztfd":
        if not expect_nothing and pending_files(home) == 0:
            _reset_manifest(home)
        config_path = write_config(home / "ztfd.toml", home, {
            "kafka": {"bootstrap_servers": "127.0.0.1:1", "group_id": "bench", "topics": ["t"]},
            "stamps": {"enabled": False},
            "s3": {"bucket": bucket, "endpoint_url": endpoint, "region": LOCAL_AWS_ENV["AWS_DEFAULT_REGION"]},
        })
        started = time.monotonic()
        with RssSampler() as sampler, ztfd_child(config_path, "sync", "--once", log_path=home / "sync.out",
                                                 sampler=sampler) as proc:
            code = proc.wait(1800)
        seconds = time.monotonic() - started
        results.note_rss(sampler)
        if code != 0:
            raise RuntimeError(f"ztfd sync --once exited {code}; see {home / 'sync.out'}")
        if expect_nothing and _last_pass_files(home) != 0:
            raise RuntimeError("ztfd sync uploaded files on a pass that should have had nothing to do")
        return seconds
    source, target = str(home / "data") + "/", f"s3://{bucket}/data/"
    if tool == "aws":
        argv = [_bin("aws"), "s3", "sync", source, target, "--endpoint-url", endpoint, "--no-progress"]
    else:
        argv = [_bin("s5cmd"), "--endpoint-url", endpoint, "sync", source, target]
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, env=child_env(), timeout=1800)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"{tool} exited {result.returncode}: {result.stderr.strip()[-300:]}")
    if expect_nothing and "upload:" in result.stdout:
        raise RuntimeError(f"{tool} uploaded files on a pass that should have had nothing to do")
    return seconds


def _last_pass_files(home: Path) -> int:
    conn = store.connect(home / "state" / "ztfd.sqlite3")
    try:
        last = store.get_status(conn, sync_status.STATUS_LAST_PASS)
    finally:
        conn.close()
    if last is None or last[0] is None:
        raise RuntimeError("ztfd sync recorded no pass")
    return int(json.loads(last[0])["files"])


def pending_files(home: Path) -> int:
    conn = store.connect(home / "state" / "ztfd.sqlite3")
    try:
        return manifest.count_pending(conn)
    finally:
        conn.close()


def _bin(name: str) -> str:
    import sys

    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} is not installed (bin/bench installs the bench extra)")
    return found


def _client(endpoint: str):  # -> a boto3 S3 client
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=LOCAL_AWS_ENV["AWS_DEFAULT_REGION"],
                        aws_access_key_id=LOCAL_AWS_ENV["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=LOCAL_AWS_ENV["AWS_SECRET_ACCESS_KEY"])


def _count_keys(s3, bucket: str) -> int:
    return sum(page.get("KeyCount", 0) for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket))


def _backend():  # moto in-process backend (the server runs in this process)
    from moto.s3.models import s3_backends

    return s3_backends[MOTO_ACCOUNT]["aws"]


def _empty_bucket(bucket: str) -> None:
    """Drop a bucket's objects in-process: the next tool starts from the same empty state, memory stays flat."""
    backend = _backend()
    backend.buckets[bucket].keys.clear()


def _fill_backend(bucket: str, home: Path) -> None:
    backend = _backend()
    for root, _dirs, names in os.walk(home / "data"):
        for name in names:
            path = Path(root) / name
            backend.put_object(bucket, path.relative_to(home).as_posix(), path.read_bytes())
