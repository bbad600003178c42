"""Shared fixtures: real local services (started and stopped here) and a config writer.

Services come from ``ztfd.embedded`` so that tests, ``ztfd demo`` and ``bin/bench`` run the same code.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ztfd.embedded import demo
from ztfd.embedded.alerce import StampService
from ztfd.embedded.kafka import KafkaBroker

FAST_KAFKA_OPTIONS = demo.FAST_KAFKA_OPTIONS


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """One Tansu broker for the session (so one per xdist worker, on a free port); tests use unique topic and
    group names."""
    log_path = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with KafkaBroker(log_path=log_path) as broker:
        yield broker


@pytest.fixture
def stamp_service() -> Iterator[StampService]:
    """The local ALeRCE-like stamp service (real sample cutouts); one per test, so faults and its log are the test's."""
    with StampService() as service:
        yield service


def write_config(path: Path, sections: dict[str, dict[str, Any]], home: Path | str = ".") -> Path:
    """Write a ztfd TOML config (the writer ``ztfd demo`` and ``bin/bench`` use)."""
    return demo.write_config(path, Path(home), sections)


def wait_until(
    condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition", interval: float = 0.05
) -> Any:
    """Poll ``condition`` until it returns something true (which is returned), or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def small_fs(path: Path, size: str, nr_inodes: int | None = None) -> Iterator[Path]:
    """A tmpfs of ``size`` (and ``nr_inodes``, if given) mounted at ``path`` for the block; unmounted after it,
    whatever happened. Mounting needs root (CI runs as root): elsewhere the test is skipped and says why."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the tests as root)")
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" if nr_inodes is None else f"size={size},nr_inodes={nr_inodes}"
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Path]:
    """Build a config file for a home under tmp_path: ``make_config(kafka={...}, stamps={...}, s3={...})``.

    Defaults: stamps and sync off, fast Kafka options; pass sections to override keys.
    """

    def factory(home: Path | None = None, **sections: dict[str, Any]) -> Path:
        home = home or tmp_path / "home"
        home.mkdir(parents=True, exist_ok=True)
        merged: dict[str, dict[str, Any]] = {
            "kafka": {"bootstrap_servers": "127.0.0.1:1", "group_id": "ztfd-test", "topics": ["t"]},
            "kafka.options": dict(FAST_KAFKA_OPTIONS),
            "stamps": {"enabled": False},
            "s3": {},
        }
        for name, values in sections.items():
            key = name.replace("__", ".")
            merged.setdefault(key, {}).update(values)
        return write_config(home / "ztfd.toml", {k: v for k, v in merged.items() if v or k == "kafka"}, home)

    return factory


def ztfd_command(config_path: Path, *args: str) -> list[str]:
    """The argv that runs the ztfd CLI of this checkout in a child process."""
    return [sys.executable, "-m", "ztfd", "--config", str(config_path), *args]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra)
    return env


def s3_filesystem(server: Any) -> Any:
    """pyarrow's S3 filesystem on a test's moto server (``ztfd.embedded.s3.S3Server``)."""
    from pyarrow import fs

    env = server.env()
    return fs.S3FileSystem(endpoint_override=server.endpoint_url.removeprefix("http://"), scheme="http",
                           region="us-east-1", access_key=env.get("AWS_ACCESS_KEY_ID", "testing"),
                           secret_key=env.get("AWS_SECRET_ACCESS_KEY", "testing"))


def dedent(text: str) -> str:
    return textwrap.dedent(text).lstrip()
