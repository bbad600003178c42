"""The files under etc/: the example config documents every key, and real supervisord runs etc/supervisord.conf."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from tests.conftest import child_env, wait_until, ztfd_command
from ztfd import config
from ztfd.daemon import lifecycle
from ztfd.daemon.supervisor import pid_alive
from ztfd.embedded.kafka import KafkaBroker
from ztfd.embedded.samples import message_stream

ETC = Path(__file__).resolve().parent.parent / "etc"
# The topic etc/supervisord.conf ships a consumer program for.
CONF_TOPIC = "lasair_2SN-likecandidates"


def test_example_config_loads_and_documents_every_key() -> None:
    cfg = config.load(ETC / "ztfd.toml", environ={})
    text = (ETC / "ztfd.toml").read_text()
    for section, cls in config.SECTIONS.items():
        assert f"[{section}]" in text
        for fld in dataclasses.fields(cls):
            if fld.name == "options":
                assert "[kafka.options]" in text
                continue
            assert re.search(rf"^{fld.name} = ", text, re.MULTILINE), f"{section}.{fld.name} is not in etc/ztfd.toml"
            if fld.default is not dataclasses.MISSING and fld.name != "bootstrap_servers":
                assert getattr(getattr(cfg, section), fld.name) == fld.default, f"{section}.{fld.name} default"


def supervisorctl_status(env: dict[str, str]) -> dict[str, tuple[str, int | None]]:
    """Program -> (state, pid). (``supervisorctl status`` exits 3 when any program is not running: ignored.)"""
    ctl = Path(sys.executable).parent / "supervisorctl"
    out = subprocess.run([str(ctl), "-c", str(ETC / "supervisord.conf"), "status"], capture_output=True, text=True,
                         env=env, timeout=30).stdout
    result = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            pid = re.search(r"pid (\d+)", line)
            result[parts[0]] = (parts[1], int(pid.group(1)) if pid else None)
    return result



def test_real_supervisord_restarts_a_killed_program(kafka: KafkaBroker, make_config: Callable[..., Path],
                                                    tmp_path: Path) -> None:
    home = tmp_path / "home"
    cfg_path = make_config(
        home, kafka={"bootstrap_servers": kafka.bootstrap, "group_id": f"svd-{uuid.uuid4().hex[:8]}",
                     "topics": [CONF_TOPIC]},
    )
    (home / "logs").mkdir(parents=True, exist_ok=True)
    (home / "state").mkdir(parents=True, exist_ok=True)
    env = child_env(ZTFD_HOME=str(home), ZTFD_CONFIG=str(cfg_path), ZTFD_PYTHON=sys.executable)
    program = f"ztfd:consumer-{CONF_TOPIC}"
    supervisord = subprocess.Popen(
        [str(Path(sys.executable).parent / "supervisord"), "-n", "-c", str(ETC / "supervisord.conf")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    pids: list[int] = []
    try:
        _state, first = wait_until(lambda: (s := supervisorctl_status(env).get(program)) and s[0] == "RUNNING" and s,
                                60, "the consumer program to run")
        pids.append(first)
        kafka.produce(CONF_TOPIC, message_stream(10))

        def report() -> dict:
            return json.loads(subprocess.run(ztfd_command(cfg_path, "status", "--json"), capture_output=True,
                                             text=True, env=child_env(), timeout=60).stdout)

        up = wait_until(lambda: (r := report()) and r["topics"][0]["alerts_total"] == 10 and r, 60, "alerts stored")
        consumer = next(p for p in up["processes"] if p["role"] == "consumer")
        assert consumer["name"] == f"consumer:{CONF_TOPIC}" and consumer["pid"] == first
        assert up["running"] is True and up["mode"] == "external"  # no ztfd supervisor, but live consumers

        os.kill(first, signal.SIGKILL)
        _state, second = wait_until(
            lambda: (s := supervisorctl_status(env).get(program)) and s[0] == "RUNNING" and s[1] != first and s,
            60, "supervisord to restart the killed consumer",
        )
        pids.append(second)
        assert not pid_alive(first) and pid_alive(second)
        assert (home / "logs" / f"consumer-{CONF_TOPIC}.out").exists()
        assert (home / "logs" / "supervisord.log").exists()
        assert "exited: consumer" in (home / "logs" / "supervisord.log").read_text()
    finally:
        lifecycle.terminate([supervisord], 90)
    assert supervisord.returncode == 0
    wait_until(lambda: not any(pid_alive(p) for p in pids), 30, "the programs to stop with supervisord")


def documented_keys(page: Path) -> dict[str, dict[str, str]]:
    """Section -> key -> default, from the tables of the docs' configuration page (``## `[section]``` headings)."""
    keys: dict[str, dict[str, str]] = {}
    section = ""
    for line in page.read_text().splitlines():
        if heading := re.match(r"^## `\[([a-z0-9.]+)\]`$", line):
            section = heading.group(1)
        elif row := re.match(r"^\| (`[^|]+`) \| ([^|]+) \|", line):
            names = re.findall(r"`([a-z_]+)`", row.group(1))
            defaults = [d.strip() for d in row.group(2).split(",")] if len(names) > 1 else [row.group(2).strip()]
            for name, default in zip(names, defaults, strict=True):
                keys.setdefault(section, {})[name] = default
    return keys


def test_the_configuration_page_documents_every_key_with_its_default() -> None:
    page = ETC.parent / "docs" / "configuration.md"
    documented = documented_keys(page)
    assert documented[""]["home"] == "`.`"
    for section, cls in config.SECTIONS.items():
        for fld in dataclasses.fields(cls):
            where = f"{section}.{fld.name}"
            if fld.name == "options":
                assert f"## `[{section}.options]`" in page.read_text(), where
                continue
            assert fld.name in documented.get(section, {}), f"{where} is not in docs/configuration.md"
            if fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
                assert documented[section][fld.name] == "*required*", where
                continue
            default = fld.default_factory() if fld.default is dataclasses.MISSING else fld.default
            shown = ("true" if default else "false") if isinstance(default, bool) else (
                f"{default:g}" if isinstance(default, float) else ('""' if default == "" else str(default)))
            assert documented[section][fld.name] == f"`{shown}`", \
                f"{where}: documented default {documented[section][fld.name]}, the code's {shown}"
