"""The alerts dataset's schema agreed by a fleet (``ztfd.archive.fleetschema``): the rule, then two members through
the real fleet topic (Tansu). The whole fleet, archivers and bucket included, is in tests/test_fleet.py."""

from __future__ import annotations

import uuid

import pyarrow as pa
import pytest

from ztfd import config
from ztfd.archive import columns
from ztfd.archive.fleetschema import FleetSchema, agreed_types, news, schema_of, text_type, type_text
from ztfd.embedded.kafka import KafkaBroker
from ztfd.embedded.net import free_port
from ztfd.ingest import kafka as kafka_adapter
from ztfd.ingest.fleet import FleetBook, fleet_topic


def message_columns(schema: pa.Schema) -> list[tuple[str, pa.DataType]]:
    return [(f.name, f.type) for f in schema if f.name not in columns.ALERT_COLUMNS]


def test_the_first_proposal_of_a_column_pins_its_type_for_everyone() -> None:
    assert agreed_types([("mag", pa.int64()), ("mag", pa.float64())]) == {"mag": pa.int64()}
    assert agreed_types([("mag", pa.float64()), ("mag", pa.int64())]) == {"mag": pa.float64()}


def test_columns_follow_ztfds_own_in_the_order_of_their_first_proposals() -> None:
    schema = schema_of(agreed_types([("b", pa.string()), ("a", pa.int64()), ("b", pa.string()), ("c", pa.bool_())]))
    assert schema.names[:len(columns.ALERT_COLUMNS)] == list(columns.ALERT_COLUMNS)
    assert message_columns(schema) == [("b", pa.string()), ("a", pa.int64()), ("c", pa.bool_())]
    assert schema.field("a").metadata == {b"description": columns.MESSAGE_FIELD.encode()}


def test_a_later_proposal_widens_a_struct_and_never_changes_a_leaf() -> None:
    first = pa.struct([pa.field("flux", pa.int64())])
    later = pa.struct([pa.field("flux", pa.float64()), pa.field("band", pa.string())])
    other = pa.struct([pa.field("exposure", pa.float64()), pa.field("band", pa.int64())])
    assert agreed_types([("src", first), ("src", later), ("src", other)]) == {"src": pa.struct(
        [pa.field("flux", pa.int64()), pa.field("band", pa.string()), pa.field("exposure", pa.float64())])}


def test_a_host_proposes_only_what_the_fleet_lacks() -> None:
    known = schema_of({"a": pa.int64(), "s": pa.struct([pa.field("x", pa.int64())])})
    wanted = schema_of({"a": pa.float64(), "s": pa.struct([pa.field("x", pa.float64()), pa.field("y", pa.string())]),
                        "new": pa.string()})
    assert news(known, wanted) == {"s": pa.struct([pa.field("x", pa.int64()), pa.field("y", pa.string())]),
                                   "new": pa.string()}
    assert news(known, known) == {}
    nested = pa.struct([pa.field("x", pa.list_(pa.float64()))])
    assert text_type(type_text("s", nested)) == nested


def test_two_members_that_pin_a_column_differently_agree_on_the_first_proposal(kafka: KafkaBroker) -> None:
    """Both decide to propose before either has read the other's proposal (the race); each reads after its own is
    acknowledged, so both end with the type proposed first in the log, and with the same columns in the same order.
    A member that has nothing new asks nothing more, and never writes a key again."""
    settings = config.KafkaConfig(group_id=f"schema-{uuid.uuid4().hex[:8]}", topics=("x",),
                                  bootstrap_servers=kafka.bootstrap, assignment="group")
    one, two = (FleetSchema(FleetBook(settings, name)) for name in ("one:/home", "two:/home"))
    empty = one.read()
    assert two.read() == empty == columns.fixed_schema(columns.ALERT_COLUMNS)
    agreed_by_one = one.agree(empty, schema_of({"mag": pa.int64(), "only_one": pa.string()}))
    agreed_by_two = two.agree(empty, schema_of({"extra": pa.bool_(), "mag": pa.float64()}))
    assert message_columns(agreed_by_one) == [("mag", pa.int64()), ("only_one", pa.string())]
    assert message_columns(agreed_by_two) == [("mag", pa.int64()), ("only_one", pa.string()),
                                              ("extra", pa.bool_())]
    assert one.read() == agreed_by_two  # the next pass's read: the same schema for both

    def records() -> dict[str, tuple[int, bytes]]:  # each key's last record, with its offset
        return kafka_adapter.read_log_records(settings, fleet_topic(settings.group_id))

    before = records()
    assert two.agree(agreed_by_two, schema_of({"mag": pa.float64()})) == agreed_by_two  # nothing new: no write
    assert two.agree(empty, schema_of({"extra": pa.bool_()})) == agreed_by_two  # proposed before: not again
    assert records() == before


def test_a_fleet_write_the_broker_never_acknowledged_raises_naming_its_key() -> None:
    """``flush`` returning 0 says only that the queue is empty: a message that failed (here: no broker within the
    messages' timeout) is found in its delivery report, and the proposal is not taken as written."""
    settings = config.KafkaConfig(group_id="nobody", topics=("x",), bootstrap_servers=f"127.0.0.1:{free_port()}",
                                  assignment="group", options={"message.timeout.ms": 300})
    with pytest.raises(kafka_adapter.KafkaException, match="column/alerts/mag"):
        kafka_adapter.write_log_topic(settings, "nobody.ztfd-fleet", {"column/alerts/mag": b"{}"}, timeout=1.0)


def test_a_fleet_topic_with_other_settings_is_refused_naming_what_is_wrong(
        kafka: KafkaBroker, caplog: pytest.LogCaptureFixture) -> None:
    """Only partition 0 is read (one order for every host), and the agreements must never expire: a fleet topic of
    several partitions or that deletes old records is refused; one whose policy the broker does not report (Tansu,
    for a topic created without it) is used with a warning."""
    from confluent_kafka.admin import NewTopic

    admin = kafka_adapter.admin_client(kafka.bootstrap, {})
    groups = {kind: f"{kind}-{uuid.uuid4().hex[:8]}" for kind in ("spread", "expiring", "unsaid")}
    created = admin.create_topics([
        NewTopic(fleet_topic(groups["spread"]), num_partitions=3, replication_factor=1,
                 config={"cleanup.policy": "compact"}),
        NewTopic(fleet_topic(groups["expiring"]), num_partitions=1, replication_factor=1,
                 config={"cleanup.policy": "compact,delete"}),
        NewTopic(fleet_topic(groups["unsaid"]), num_partitions=1, replication_factor=1)])
    for future in created.values():
        future.result(30)

    def book(kind: str) -> FleetBook:
        return FleetBook(config.KafkaConfig(group_id=groups[kind], topics=("x",), bootstrap_servers=kafka.bootstrap,
                                            assignment="group"), "one:/home")

    with pytest.raises(kafka_adapter.KafkaException, match=r"spread-\w+\.ztfd-fleet has 3 partitions"):
        book("spread").generations("x")
    with pytest.raises(kafka_adapter.KafkaException, match=r"cleanup\.policy=compact,delete"):
        book("expiring").publish_member("x", [0])
    assert book("unsaid").generations("x") == {}
    assert "does not report its cleanup.policy" in caplog.text
