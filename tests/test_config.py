"""Configuration: the key contract, environment overrides, one-line errors that name the key, no secrets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import child_env, ztfd_command
from ztfd import config

MINIMAL = 'home = "h"\n[kafka]\ngroup_id = "g"\ntopics = ["lasair_1Lightweight"]\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ztfd.toml"
    path.write_text(text)
    return path


def test_defaults_and_relative_home(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, MINIMAL), environ={})
    assert cfg.home == (tmp_path / "h").resolve()
    assert cfg.kafka.bootstrap_servers == "kafka.lsst.ac.uk:9092"
    assert cfg.kafka.topics == ("lasair_1Lightweight",)
    assert cfg.stamps.alerce_stamp_url == "https://avro.alerce.online"
    assert cfg.stamps.alerce_api_url == "https://api.alerce.online"
    assert (cfg.stamps.retry_base, cfg.stamps.retry_max) == (2.0, 300.0)
    assert cfg.stamps.unavailable_give_up == 604800.0 and cfg.stamps.rate_limit == 10.0
    assert (cfg.s3.bucket, cfg.s3.interval, cfg.s3.concurrency) == ("", 7200.0, 16)
    assert cfg.s3.multipart_threshold == 64 * 1024 * 1024
    assert cfg.db_path == cfg.home / "state" / "ztfd.sqlite3"
    assert cfg.kafka.max_message_bytes == 10 * 1024 * 1024 and cfg.kafka.lasair_byte_quota == 100_000_000
    assert cfg.stamps.lsst_provider == "alerce"
    assert cfg.stamps.alerce_lsst_url == "https://api-lsst.alerce.online"
    assert cfg.stamps.lasair_lsst_url == "https://lasair-lsst.lsst.ac.uk"


def test_path_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZTFD_CONFIG", str(tmp_path / "from-env.toml"))
    assert config.resolve_path("explicit.toml") == Path("explicit.toml")
    assert config.resolve_path(None) == tmp_path / "from-env.toml"
    monkeypatch.delenv("ZTFD_CONFIG")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(config.ConfigError) as caught:
        config.resolve_path(None)
    assert "ztfd.toml" in str(caught.value) and ".config/ztfd/ztfd.toml" in str(caught.value)
    user = tmp_path / "user" / ".config" / "ztfd" / "ztfd.toml"
    user.parent.mkdir(parents=True)
    user.write_text(MINIMAL)
    assert config.resolve_path(None) == user
    (tmp_path / "ztfd.toml").write_text(MINIMAL)
    assert config.resolve_path(None) == Path("ztfd.toml")


def test_without_a_config_a_command_says_where_it_looked_in_one_line(tmp_path: Path) -> None:
    """No --config, no $ZTFD_CONFIG, none in the folder or the user's: exit 2, one line naming each place; a
    checkout's etc/ztfd.toml (an example) is not read."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "ztfd.toml").write_text(MINIMAL)
    env = child_env(HOME=str(tmp_path / "user"))
    env.pop("ZTFD_CONFIG", None)
    command = [sys.executable, "-m", "ztfd", "config"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "$ZTFD_CONFIG" in lines[0] and " ztfd.toml" in lines[0]
    assert str(tmp_path / "user" / ".config" / "ztfd" / "ztfd.toml") in lines[0]
    (tmp_path / "user" / ".config" / "ztfd").mkdir(parents=True)
    (tmp_path / "user" / ".config" / "ztfd" / "ztfd.toml").write_text(MINIMAL)
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "user" / ".config" / "ztfd" / "ztfd.toml") in result.stdout


def test_environment_overrides(tmp_path: Path) -> None:
    env = {
        "ZTFD_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092",
        "ZTFD_S3_BUCKET": "archive",
        "ZTFD_STAMPS_WORKERS": "2",
        "ZTFD_STAMPS_PREVIEWS": "false",
        "ZTFD_KAFKA_TOPICS": "a, b",
        "ZTFD_KAFKA_OPTIONS_SASL_PASSWORD": "hunter2",
        "ZTFD_HOME": str(tmp_path / "elsewhere"),
        "ZTFD_PROCESS_NAME": "not a config key",
    }
    cfg = config.load(write(tmp_path, MINIMAL), environ=env)
    assert cfg.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert cfg.s3.bucket == "archive"
    assert cfg.stamps.workers == 2 and cfg.stamps.previews is False
    assert cfg.kafka.topics == ("a", "b")
    assert cfg.kafka.options == {"sasl.password": "hunter2"}
    assert cfg.home == tmp_path / "elsewhere"
    assert cfg.masked()["kafka"]["options"]["sasl.password"] == "***"


def test_log_level_short_form_wins(tmp_path: Path) -> None:
    env = {"ZTFD_LOGGING_LEVEL": "WARNING", "ZTFD_LOG_LEVEL": "debug"}
    assert config.load(write(tmp_path, MINIMAL), environ=env).logging.level == "debug"


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        (MINIMAL + "[stamps]\nworkerz = 3\n", {}, "unknown key stamps.workerz"),
        ("colour = 1\n" + MINIMAL, {}, "unknown key colour"),
        ('[kafka]\ntopics = ["t"]\n', {}, "missing required key kafka.group_id"),
        ('[kafka]\ngroup_id = "g"\n', {}, "missing required key kafka.topics"),
        (MINIMAL + "[stamps]\nworkers = \"four\"\n", {}, "stamps.workers must be an integer"),
        (MINIMAL + "[stamps]\nworkers = 0\n", {}, "stamps.workers must be greater than 0"),
        (MINIMAL + "[stamps]\nprevious = true\n", {}, "unknown key stamps.previous"),
        (MINIMAL + "[s3]\ninterval = true\n", {}, "s3.interval must be a number"),
        (MINIMAL.replace('["lasair_1Lightweight"]', "[]"), {}, "kafka.topics must be a non-empty list"),
        (MINIMAL, {"ZTFD_S3_BUKET": "x"}, "unknown key s3.buket (from environment variable ZTFD_S3_BUKET)"),
        (MINIMAL, {"ZTFD_STAMPS_TIMEOUT": "soon"}, "stamps.timeout must be a number"),
        ("[kafka\n", {}, "is not valid TOML"),
        (MINIMAL.replace("lasair_1Lightweight", "../x"), {}, "kafka.topics holds a name that is not a Kafka topic"),
        (MINIMAL + '[stamps]\npreview_renderer = "pyplot"\n', {},
         "stamps.preview_renderer must be one of fast, matplotlib"),
        (MINIMAL, {"ZTFD_LOGGING_LEVEL": "LOUD"}, "logging.level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        (MINIMAL, {"ZTFD_LOG_LEVEL": "LOUD"}, "logging.level must be one of"),
        (MINIMAL + '[stamps]\nlsst_provider = "fink"\n', {},
         "stamps.lsst_provider must be one of alerce, lasair, none"),
        (MINIMAL, {"ZTFD_STAMPS_LSST_PROVIDER": "1"}, "stamps.lsst_provider must be a string"),
        (MINIMAL + '[stamps]\nalerce_lsst_url = "api-lsst.alerce.online"\n', {},
         "stamps.alerce_lsst_url must be an http:// or https:// URL"),
        (MINIMAL, {"ZTFD_STAMPS_LASAIR_LSST_URL": "ftp://lasair"}, "stamps.lasair_lsst_url must be an http"),
        (MINIMAL.replace("[kafka]\n", "[kafka]\nlasair_byte_quota = -1\n"), {},
         "kafka.lasair_byte_quota must not be negative"),
        (MINIMAL.replace("[kafka]\n", "[kafka]\nlasair_byte_quota = 1.5e8\n"), {},
         "kafka.lasair_byte_quota must be an integer"),
        (MINIMAL.replace("[kafka]\n", "[kafka]\nmax_message_bytes = 0\n"), {},
         "kafka.max_message_bytes must be greater than 0"),
        (MINIMAL.replace("[kafka]\n", '[kafka]\nassignment = "fleet"\n'), {},
         "kafka.assignment must be one of all, group"),
    ],
)
def test_bad_configuration_names_the_key(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.load(write(tmp_path, text), environ=env)
    assert message in str(caught.value)


def test_cli_exits_2_with_one_line_and_no_secret(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + '[kafka.options]\n"sasl.password" = "hunter2"\n[s3]\nbucket = 12\n')
    result = subprocess.run(ztfd_command(path, "config"), capture_output=True, text=True,
                            env=child_env(), timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "ztfd: config: s3.bucket must be a string"
    assert "hunter2" not in result.stderr + result.stdout


def test_group_mode_needs_a_bucket_exit_2_naming_the_key(tmp_path: Path) -> None:
    """Fleet mode commits offsets once alerts are durable in S3: without a bucket there is nothing to commit after."""
    path = write(tmp_path, MINIMAL.replace("[kafka]\n", '[kafka]\nassignment = "group"\n'))
    result = subprocess.run(ztfd_command(path, "config"), capture_output=True, text=True, env=child_env(), timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == ('ztfd: config: s3.bucket is required with kafka.assignment = "group" '
                                     "(the fleet's durable store)")
    with_bucket = config.load(write(tmp_path, MINIMAL.replace("[kafka]\n", '[kafka]\nassignment = "Group"\n')
                                    + '[s3]\nbucket = "b"\n'), environ={})
    assert with_bucket.kafka.group_mode
    not_a_folder = write(tmp_path, MINIMAL.replace("[kafka]\n", '[kafka]\nassignment = "group"\n')
                         + '[s3]\nbucket = "b"\nprefix = "fleet"\n')
    with pytest.raises(config.ConfigError, match=r'^config: s3\.prefix must end with "/"'):
        config.load(not_a_folder, environ={})
    assert config.load(write(tmp_path, MINIMAL + '[s3]\nbucket = "b"\nprefix = "fleet"\n'), environ={}).s3.prefix
    assert not config.load(write(tmp_path, MINIMAL), environ={}).kafka.group_mode  # "all" by default


def test_cli_config_shows_secrets_masked(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    env = child_env(ZTFD_KAFKA_OPTIONS_SASL_PASSWORD="hunter2")
    result = subprocess.run(ztfd_command(path, "config"), capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout and '"sasl.password": "***"' in result.stdout


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = subprocess.run(ztfd_command(tmp_path / "nope.toml", "config"), capture_output=True, text=True,
                            env=child_env(), timeout=60)
    assert result.returncode == 2
    assert "file not found" in result.stderr and len(result.stderr.strip().splitlines()) == 1
