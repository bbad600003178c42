"""Topic patterns through the real supervisor CLI and Tansu: a topic created after start gets its consumer, a
drained and quiet one exits without being restarted, and comes back when its topic has messages again."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.test_supervisor import marked_processes, run, status
from ztfd import config
from ztfd.embedded.kafka import KafkaBroker
from ztfd.embedded.samples import packets


def topic_rows(cfg_path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(consumer by topic, topic report by topic) from ``ztfd status --json``."""
    report = status(cfg_path)[1]
    consumers = {p["topic"]: p for p in report["processes"] if p["role"] == "consumer"}
    return consumers, {t["topic"]: t for t in report["topics"]}


def stored(cfg_path: Path, topic: str, count: int) -> bool:
    return topic_rows(cfg_path)[1].get(topic, {}).get("alerts_total", 0) >= count


def consumer_state(cfg_path: Path, topic: str) -> str | None:
    return topic_rows(cfg_path)[0].get(topic, {}).get("state")


@pytest.fixture
def pattern_daemon(kafka: KafkaBroker, make_config: Callable[..., Path]) -> Iterator[tuple[Path, str]]:
    tag = uuid.uuid4().hex[:8]
    pattern = f"^ztf_{tag}_[0-9]{{8}}_programid1$"
    cfg_path = make_config(
        kafka={"bootstrap_servers": kafka.bootstrap, "group_id": f"pat-{tag}", "topics": [pattern],
               "topic_scan_seconds": 1, "idle_topic_seconds": 5},
        kafka__formats={pattern: "ztf-avro"},
        supervisor={"heartbeat_timeout": 20, "restart_backoff_max": 2, "stop_timeout": 10},
    )
    yield cfg_path, tag
    run(cfg_path, "stop", "--timeout", "10")
    leaked = marked_processes(config.load(cfg_path).pidfile)
    assert not leaked, f"processes left behind: {leaked}"


def test_a_pattern_follows_topics_created_later_and_idle_ones_exit_until_they_have_news(
    pattern_daemon: tuple[Path, str], kafka: KafkaBroker
) -> None:
    cfg_path, tag = pattern_daemon
    night1, night2, other = f"ztf_{tag}_20210831_programid1", f"ztf_{tag}_20210901_programid1", f"ztf_{tag}_x"
    raw = [p.path.read_bytes() for p in packets()]
    kafka.create_topic(night1)
    kafka.produce(night1, raw[:3])
    assert run(cfg_path, "start").returncode == 0
    wait_until(lambda: stored(cfg_path, night1, 3), 60, "the first night's alerts")
    kafka.create_topic(night2)  # a topic that appears while ztfd runs
    kafka.create_topic(other)  # not matched
    kafka.produce(night2, raw[3:7])
    wait_until(lambda: stored(cfg_path, night2, 4), 60, "the new night's alerts")
    wait_until(lambda: consumer_state(cfg_path, night1) == "idle", 60, "the first night's consumer idle")
    consumers, _ = topic_rows(cfg_path)
    assert not consumers[night1]["alive"] and consumers[night1]["last_exit"] == "exit 4"
    assert other not in consumers
    kafka.produce(night1, raw[7:9])  # the idle topic has news
    wait_until(lambda: stored(cfg_path, night1, 5), 60, "the first night's late alerts")
    assert consumer_state(cfg_path, night1) in ("running", "idle")
    code, report = status(cfg_path)
    assert code == 0 and report["running"]
