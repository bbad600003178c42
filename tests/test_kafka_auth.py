"""SASL/SCRAM and SSL through ``[kafka.options]`` (secrets from the environment), against the local Tansu broker.

Tansu's SCRAM does not work in this build (its handshake refuses every mechanism, SCRAM-SHA-512 included), so no
test can log in with SCRAM here. What is tested: the options of the file and of the environment reach librdkafka
(the connection fails in the SASL handshake, not for a configuration error), the password never appears in a log
or in ``ztfd config``, and options librdkafka refuses stop ``ztfd consume`` with exit 2 naming the option only.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import child_env, wait_until, ztfd_command
from tests.test_consumer import terminate, unique
from ztfd.embedded.kafka import KafkaBroker

SECRET = "s3cr3t-hunter2-never-logged"


def logs_text(home: Path) -> str:
    return "".join(path.read_text(errors="replace") for path in (home / "logs").glob("*") if path.is_file())


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_scram_options_reach_librdkafka_and_the_password_stays_secret(
    kafka: KafkaBroker, make_config: Callable[..., Path], mechanism: str
) -> None:
    topic = unique("fink_scram")
    config_path = make_config(
        kafka={"bootstrap_servers": kafka.bootstrap, "group_id": unique("g"), "topics": [topic]},
        kafka__options={"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": mechanism, "sasl.username": "ztfd"})
    home = config_path.parent
    env = child_env(ZTFD_KAFKA_OPTIONS_SASL_PASSWORD=SECRET)
    proc = subprocess.Popen(ztfd_command(config_path, "consume", "--topic", topic), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: f"SASL {mechanism} mechanism handshake failed" in logs_text(home), 60,
                   "librdkafka's SASL handshake with the broker")
        assert proc.poll() is None, "the options were taken for a configuration error"
    finally:
        assert terminate(proc) == 0
    shown = subprocess.run(ztfd_command(config_path, "config"), capture_output=True, text=True, env=env, timeout=60)
    assert shown.returncode == 0 and '"sasl.password": "***"' in shown.stdout
    assert SECRET not in logs_text(home) + shown.stdout + shown.stderr + proc.stderr.read().decode()  # type: ignore[union-attr]


@pytest.mark.parametrize(("options", "message"), [
    ({"sasl.mechanismz": "SCRAM-SHA-512"}, "kafka.options: librdkafka has no option sasl.mechanismz"),
    ({"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": SECRET},
     "kafka.options: librdkafka: Unsupported SASL mechanism: ***"),
    ({"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512"},
     "kafka.options: librdkafka: sasl.username and sasl.password must be set"),
    ({"security.protocol": "SSL", "ssl.ca.location": "/nonexistent/ca.pem"},
     "kafka.options: librdkafka: ssl.ca.location failed"),
])
def test_options_librdkafka_refuses_exit_2_naming_the_option(
    kafka: KafkaBroker, make_config: Callable[..., Path], options: dict[str, str], message: str
) -> None:
    topic = unique("t")
    config_path = make_config(kafka={"bootstrap_servers": kafka.bootstrap, "group_id": unique("g"), "topics": [topic]},
                              kafka__options=options)
    done = subprocess.run(ztfd_command(config_path, "consume", "--topic", topic), capture_output=True, text=True,
                          env=child_env(), timeout=60)
    assert done.returncode == 2
    assert message in done.stderr and SECRET not in done.stderr
