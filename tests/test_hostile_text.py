"""Identity and text from hostile messages: ids match in full, control characters never reach a log, the store's
reasons or the terminal, and a topic of Kafka's longest name (249 characters) works, its logs included."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests import test_consumer
from tests.avro_support import produce_keyed
from tests.conftest import child_env, ztfd_command
from tests.test_avro_streams import consume_all, stored_alerts
from tests.test_consumer import Consumers
from ztfd import logs, sources
from ztfd.embedded import avro_samples
from ztfd.embedded.kafka import KafkaBroker
from ztfd.embedded.samples import packets
from ztfd.text import escape_controls

consumers = test_consumer.consumers  # the fixture: ``ztfd consume`` children stopped after the test

# What a terminal obeys: C0/C1 controls, DEL, and the bidi overrides.
CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
TITLE_ESCAPE = "x\x1b]0;pwned\x07"



def test_ids_match_in_full_with_no_trailing_newline() -> None:
    assert sources.PLAIN_ID.match("ZTF18abcdefg")
    for bad in ("ZTF18abcdefg\n", "ZTF18abcdefg\r\n", "\nZTF18abcdefg", "ZTF18 abcdefg"):
        assert not sources.PLAIN_ID.match(bad), repr(bad)


def test_escape_controls_makes_one_harmless_line() -> None:
    assert escape_controls(f"field {TITLE_ESCAPE}\nnext\u202eevil") == "field x\\x1b]0;pwned\\x07\\x0anext\\u202eevil"
    assert escape_controls("plain text, é and ü kept") == "plain text, é and ü kept"
    assert escape_controls(escape_controls("\x1b")) == "\\x1b"


def test_log_records_stay_one_line_and_tracebacks_keep_their_lines(tmp_path: Path) -> None:
    logs.setup(tmp_path, console=False)
    try:
        logging.getLogger("t").warning("rejected: %s", f"{TITLE_ESCAPE}\nforged line")
        try:
            raise ValueError(f"bad {TITLE_ESCAPE}")
        except ValueError:
            logging.getLogger("t").exception("failed")
    finally:
        logs.setup(None, console=False)
    text = (tmp_path / "ztfd.log").read_text()
    assert not CONTROLS.search(text)
    assert "rejected: x\\x1b]0;pwned\\x07\\x0aforged line" in text
    assert "Traceback (most recent call last):\n" in text  # a traceback keeps its lines


def test_long_topic_names_get_short_deterministic_log_names() -> None:
    short = "lasair_topic"
    assert logs.log_file_name(short) == "lasair_topic.log"
    longest = "t" * 248
    names = {logs.log_file_name(longest + c) for c in "ab"}
    assert len(names) == 2, "two long topics never share a log"
    for name in names:
        assert len(f"{name}.lock".encode()) <= logs.NAME_MAX and len(f"{name}.99".encode()) <= logs.NAME_MAX
        assert name.startswith("t" * 100) and name.endswith(".log")
    assert logs.log_file_name(longest + "a") == logs.log_file_name(longest + "a")


def test_the_alert_log_of_a_249_character_topic_rotates(tmp_path: Path) -> None:
    topic = "t" * 249
    alert_log = logs.AlertLog(tmp_path, topic, max_bytes=200, backup_count=2)
    for index in range(6):
        alert_log.write([f"ZTF18aaaaaa{index} line of a stored alert {TITLE_ESCAPE}"])
    alert_log.close()
    name = logs.log_file_name(topic)
    assert {p.name for p in tmp_path.iterdir()} == {name, f"{name}.1", f"{name}.2", f"{name}.lock"}
    assert "ZTF18aaaaaa5" in (tmp_path / name).read_text()
    assert not CONTROLS.search((tmp_path / name).read_text())


def test_a_249_character_topic_with_hostile_ids_and_names_rejects_them_and_stores_the_rest(
    kafka: KafkaBroker, make_config: Callable[..., Path], consumers: Consumers, tmp_path: Path,
) -> None:
    """Through the broker and the CLI: a trailing newline in an objectId and a terminal escape in a field name
    are rejected; the store's reasons, ``ztfd rejected``, and the logs carry no control character; the topic's
    alert log rotates under its shortened name."""
    topic = "fink_" + "x" * 236 + tmp_path.name[-8:].replace("_", "x").ljust(8, "x")
    assert len(topic) == 249
    kafka.create_topic(topic)
    good = [dataclasses.replace(p, object_id=f"ZTF99text{chr(97 + i) * 3}", candid=2000 + i)
            for i, p in enumerate(packets()[:2])]
    newline = dataclasses.replace(packets()[2], object_id="ZTF18abcdefg\n", candid=2100)
    hostile_schema = {"type": "record", "name": "a", "fields": [{"name": TITLE_ESCAPE, "type": "int"}]}
    hostile = (avro_samples.schemaless(hostile_schema, {TITLE_ESCAPE: 1}), json.dumps(hostile_schema).encode())
    ztf_schema = avro_samples.ztf_schema()
    produce_keyed(kafka.bootstrap, topic, [
        avro_samples.fink_message(ztf_schema, avro_samples.ztf_record(good[0])),
        avro_samples.fink_message(ztf_schema, avro_samples.ztf_record(newline)),
        hostile,
        avro_samples.fink_message(ztf_schema, avro_samples.ztf_record(good[1])),
    ])
    config_path = make_config(kafka={"bootstrap_servers": kafka.bootstrap, "group_id": "g-text", "topics": [topic]},
                              kafka__formats={topic: "fink"}, logging={"max_bytes": 100_000})
    home = config_path.parent
    db = consume_all(consumers, config_path, topic, alerts=2, rejected=2)
    assert [row["object_id"] for row in stored_alerts(db)] == [p.object_id for p in good]
    reasons = [row[0] for row in sqlite3.connect(db).execute("SELECT reason FROM rejected ORDER BY kafka_offset")]
    assert "not a plain identifier" in reasons[0]
    for reason in reasons:
        assert not CONTROLS.search(reason) and "\n" not in reason, reason
    listing = subprocess.run(ztfd_command(config_path, "rejected"), capture_output=True, text=True, env=child_env(),
                             timeout=60)
    assert listing.returncode == 0 and len(listing.stdout.splitlines()) == 2, listing.stdout
    assert not CONTROLS.search(listing.stdout)
    for path in (home / "logs").iterdir():
        assert not CONTROLS.search(path.read_text(errors="replace")), path
        assert len(path.name.encode()) <= logs.NAME_MAX
    alert_logs = sorted(p.name for p in (home / "logs").iterdir() if p.name.startswith("fink_x"))
    assert all(name.startswith(logs.log_file_name(topic)) for name in alert_logs), alert_logs
    lines = "".join((home / "logs" / name).read_text() for name in alert_logs).splitlines()
    assert sorted(line.split()[2] for line in lines if " ZTF99text" in line) == [p.object_id for p in good]


def test_a_249_character_topic_has_a_file_writer_journal_of_its_own(tmp_path: Path) -> None:
    """The consumer's file-writer journal is named by its topic and writer pid: a 249-character topic and the
    largest pid Linux allows still make a name within 255 bytes, distinct from another long topic's."""
    from ztfd.ingest import journal

    first, second = "t" * 249, "t" * 248 + "u"
    names = []
    for topic in (first, second):
        writer = journal.WriteJournal(tmp_path, topic, 4_194_304)  # /proc/sys/kernel/pid_max can be 2**22
        writer.begin([(0, 0, 7, f"data/2021-09-01/{topic}/ZTF18abcdefg_p0-o7.json")])
        names.append(writer.path.name)
        writer.stored()
        writer.end()
    assert all(len(name.encode()) <= logs.NAME_MAX for name in names) and names[0] != names[1]
    assert not list(tmp_path.glob("t*.4194304"))  # stored, then ended: gone
