"""The schema registry: basic auth in the URL works and is never shown; a 4xx answer for a schema id is final
(the message rejected with its reason, the answer remembered), while 401/5xx/timeouts stay retryable."""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import test_consumer
from tests.avro_support import RUBIN_SCHEMA_ID, rubin_alerts, rubin_schema
from tests.conftest import child_env, ztfd_command
from tests.test_avro_streams import consume_all
from tests.test_consumer import Consumers, unique
from ztfd import sources
from ztfd.embedded import avro_samples
from ztfd.embedded.kafka import KafkaBroker
from ztfd.embedded.registry import SchemaRegistry
from ztfd.sources import InvalidMessageError, SourceUnavailableError

consumers = test_consumer.consumers  # the fixture: ``ztfd consume`` children stopped after the test

USER, PASSWORD = "ztfd", "p@ss:w/rd"
ENCODED = "p%40ss%3Aw%2Frd"


@pytest.fixture
def registry() -> Iterator[SchemaRegistry]:
    with SchemaRegistry({RUBIN_SCHEMA_ID: avro_samples.schema_json(rubin_schema())},
                        credentials=(USER, PASSWORD)) as running:
        yield running



def with_credentials(url: str, password: str = ENCODED) -> str:
    return url.replace("http://", f"http://{USER}:{password}@")


def message(schema_id: int) -> bytes:
    return avro_samples.confluent_message(rubin_schema(), schema_id, rubin_alerts(1)[0])


def test_4xx_is_final_and_remembered_while_401_and_5xx_stay_retryable(registry: SchemaRegistry) -> None:
    source = sources.source_for("confluent-avro", registry_url=with_credentials(registry.url), registry_timeout=5)
    assert source.decode(message(RUBIN_SCHEMA_ID), None).survey == "lsst"
    registry.answer_status(777, 422)
    for _ in range(3):
        with pytest.raises(InvalidMessageError, match=r"schema id 777 is refused by the schema registry \(422\)"):
            source.decode(message(777), None)
        with pytest.raises(InvalidMessageError, match=r"schema id 999 is unknown to the schema registry \(404\)"):
            source.decode(message(999), None)
    assert registry.requests(777) == 1 and registry.requests(999) == 1  # the negative answers are remembered
    registry.answer_status(555, 503)
    with pytest.raises(SourceUnavailableError, match="HTTP 503"):
        source.decode(message(555), None)
    wrong = sources.source_for("confluent-avro", registry_url=with_credentials(registry.url, "wrong"),
                               registry_timeout=5)
    with pytest.raises(SourceUnavailableError, match="HTTP 401"):
        wrong.decode(message(RUBIN_SCHEMA_ID), None)
    anonymous = sources.source_for("confluent-avro", registry_url=registry.url, registry_timeout=5)
    with pytest.raises(SourceUnavailableError, match="HTTP 401"):
        anonymous.decode(message(RUBIN_SCHEMA_ID), None)


def test_a_registry_with_basic_auth_through_the_broker_and_its_password_shown_nowhere(
    kafka: KafkaBroker, make_config: Callable[..., Path], consumers: Consumers, registry: SchemaRegistry,
) -> None:
    topic = unique("lsst-auth")
    kafka.create_topic(topic)
    alerts = rubin_alerts(3)
    registry.answer_status(777, 400)
    good = [avro_samples.confluent_message(rubin_schema(), RUBIN_SCHEMA_ID, a) for a in alerts]
    kafka.produce(topic, [good[0], message(999), good[1], message(777), message(999), good[2]])
    config_path = make_config(
        kafka={"bootstrap_servers": kafka.bootstrap, "group_id": unique("g"), "topics": [topic],
               "schema_registry_url": with_credentials(registry.url)},
        kafka__formats={topic: "confluent-avro"})
    home = config_path.parent
    db = consume_all(consumers, config_path, topic, alerts=3, rejected=3)
    conn = sqlite3.connect(db)
    reasons = [r[0] for r in conn.execute("SELECT reason FROM rejected ORDER BY kafka_offset")]
    assert reasons == ["schema id 999 is unknown to the schema registry (404)",
                       "schema id 777 is refused by the schema registry (400)",
                       "schema id 999 is unknown to the schema registry (404)"]
    assert registry.requests(999) == 1 and registry.requests(777) == 1 and registry.requests(RUBIN_SCHEMA_ID) == 1
    assert [r[0] for r in conn.execute("SELECT registry FROM avro_schemas")] == [registry.url]
    shown = [subprocess.run(ztfd_command(config_path, *args), capture_output=True, text=True, env=child_env(),
                            timeout=60) for args in (("config",), ("status",), ("status", "--json"))]
    assert shown[0].returncode == 0 and f"http://{USER}:***@127.0.0.1:{registry.port}" in shown[0].stdout
    texts = [r.stdout + r.stderr for r in shown] + [p.read_text() for p in (home / "logs").iterdir()]
    for text in texts:
        assert ENCODED not in text and PASSWORD not in text
