"""The configuration keys of the Avro formats and topic patterns: defaults, checks that name the key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.avro_support import rubin_schema
from tests.conftest import child_env, ztfd_command
from ztfd import config
from ztfd.embedded import avro_samples

BASE = 'home = "h"\n[kafka]\ngroup_id = "g"\n'


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "ztfd.toml"
    path.write_text(BASE + text)
    return config.load(path, environ={})


def test_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'topics = ["t"]\n')
    assert (cfg.kafka.formats, cfg.kafka.schemas, cfg.kafka.schema_registry_url) == ({}, {}, "")
    assert (cfg.kafka.idle_topic_seconds, cfg.kafka.topic_scan_seconds) == (86400.0, 60.0)
    assert cfg.stamps.ztf_request == "get_avro"


def test_patterns_formats_and_schema_paths(tmp_path: Path) -> None:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "rubin.avsc").write_text(avro_samples.schema_json(rubin_schema()))
    cfg = load(tmp_path, 'topics = ["^ztf_[0-9]{8}_programid1$", "rubin"]\n'
                         'schema_registry_url = "http://127.0.0.1:8081"\n'
                         '[kafka.formats]\n"^ztf_" = "ztf-avro"\nrubin = "avro"\n"^fink_" = "fink"\n'
                         '"^lsst-alerts" = "confluent-avro"\n'
                         '[kafka.schemas]\nrubin = "schemas/rubin.avsc"\n')
    assert cfg.kafka.topics == ("^ztf_[0-9]{8}_programid1$", "rubin")
    assert cfg.kafka.schemas == {"rubin": str(tmp_path / "schemas" / "rubin.avsc")}


@pytest.mark.parametrize(("text", "message"), [
    ('topics = ["^ztf_(["]\n', "kafka.topics holds a pattern that is not a regular expression"),
    ('topics = ["t"]\n[kafka.formats]\nt = "json"\n', "kafka.formats.t must name a message format"),
    ('topics = ["t"]\n[kafka.formats]\n"bad/name" = "fink"\n', "kafka.formats.bad/name holds a name"),
    ('topics = ["t"]\n[kafka.formats]\nt = "avro"\n', "kafka.formats.t is avro but kafka.schemas names no schema"),
    ('topics = ["t"]\n[kafka.formats]\nt = "confluent-avro"\n',
     "kafka.formats.t is confluent-avro but kafka.schema_registry_url is empty"),
    ('topics = ["t"]\nschema_registry_url = "ftp://x"\n', "kafka.schema_registry_url must be an http"),
    ('topics = ["t"]\n[kafka.schemas]\nt = "missing.avsc"\n', "kafka.schemas.t: file not found"),
    ('topics = ["t"]\nidle_topic_seconds = 0\n', "kafka.idle_topic_seconds must be greater than 0"),
    ('topics = ["t"]\n[stamps]\nztf_request = "get_all"\n', "stamps.ztf_request must be one of get_avro, get_stamp"),
])
def test_bad_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load(tmp_path, text)


def test_a_schema_file_that_is_not_a_schema(tmp_path: Path) -> None:
    (tmp_path / "bad.avsc").write_text('{"type": "record", "name": "x", "fields": [{"name": "a"}]}')
    with pytest.raises(config.ConfigError, match=r"kafka\.schemas\.t: .* is not an Avro schema"):
        load(tmp_path, 'topics = ["t"]\n[kafka.schemas]\nt = "bad.avsc"\n')


def test_the_cli_exits_2_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "ztfd.toml"
    path.write_text(BASE + 'topics = ["t"]\n[kafka.formats]\nt = "avro"\n')
    done = subprocess.run(ztfd_command(path, "config"), capture_output=True, text=True, env=child_env(), timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == "ztfd: config: kafka.formats.t is avro but kafka.schemas names no schema for it"
