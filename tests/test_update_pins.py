"""constraints.txt and bin/update-pins: the pins cover every requirement, and an upgrade reports what changed."""

from __future__ import annotations

import configparser
import importlib.machinery
import importlib.util
import os
from pathlib import Path
from types import ModuleType

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def update_pins() -> ModuleType:
    """bin/update-pins as a module (it is a script without a .py suffix)."""
    loader = importlib.machinery.SourceFileLoader("update_pins", str(REPO / "bin" / "update-pins"))
    spec = importlib.util.spec_from_loader("update_pins", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def requirements() -> list[Requirement]:
    """install_requires and every extra of setup.cfg, as setuptools reads them (comments and %(extra)s included)."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in cfg["options.extras_require"]:
        lines += cfg["options.extras_require"][extra].splitlines()
    return [Requirement(line) for line in (raw.strip() for raw in lines) if line and not line.startswith("#")]


def constraints_in_use() -> Path:
    """The file this run installed with: bin/update-pins's candidate (ZTFD_CONSTRAINTS), else constraints.txt."""
    return Path(os.environ.get("ZTFD_CONSTRAINTS") or REPO / "constraints.txt")


def test_constraints_pin_every_requirement_within_its_range() -> None:
    module = update_pins()
    pins = module.parse_pins(constraints_in_use().read_text())
    assert {"pip", "setuptools", "wheel"} <= pins.keys()  # the installer and the build tools are pinned too
    extras = configparser.ConfigParser()
    extras.read(REPO / "setup.cfg")
    assert {"demo", "test", "bench", "docs"} <= set(extras["options.extras_require"])
    for requirement in requirements():
        name = module.normalized(requirement.name)
        assert name in pins, f"{requirement.name} is not in constraints.txt: run bin/update-pins"
        assert requirement.specifier.contains(pins[name], prereleases=True), (requirement, pins[name])


def test_pins_parse_normalized_and_round_trip() -> None:
    module = update_pins()
    pins = module.parse_pins("# header\nPyYAML==6.0.2\n\nmoto==5.2.5  # held\nzope.interface==8.0\n")
    assert pins == {"pyyaml": "6.0.2", "moto": "5.2.5", "zope-interface": "8.0"}
    assert module.parse_pins(module.constraints_text(pins, "2026-12-06", "3.11.7")) == pins


def test_a_line_that_is_not_a_pin_is_refused() -> None:
    module = update_pins()
    for bad in ["moto>=5.0", "boto3 @ file:///tmp/boto3.whl", "==1.0"]:
        try:
            module.parse_pins(bad)
        except ValueError as exc:
            assert bad in str(exc)
        else:
            raise AssertionError(f"{bad!r} was accepted")


def test_changes_name_each_package_old_and_new() -> None:
    module = update_pins()
    old = {"moto": "5.2.5", "boto3": "1.44.18", "gone": "1.0", "same": "2.0"}
    new = {"moto": "5.2.6", "boto3": "1.44.18", "added": "0.1", "same": "2.0"}
    assert module.changes(old, new) == ["added (none) -> 0.1", "gone 1.0 -> (none)", "moto 5.2.5 -> 5.2.6"]
    assert module.changes(new, new) == []


def test_failed_tests_are_read_from_pytest_summary() -> None:
    module = update_pins()
    log = """\
........F.E
=========================== short test summary info ============================
FAILED tests/test_sync.py::test_the_documented_iam_policy[None] - AssertionError: ztfd: sync: access denied
FAILED tests/test_sync.py::test_the_documented_iam_policy[s3:GetObject] - AssertionError
ERROR tests/test_status.py::test_status_json - RuntimeError: broker
2 failed, 414 passed, 1 error in 600.00s
"""
    assert module.failed_tests(log) == ["tests/test_sync.py::test_the_documented_iam_policy[None]",
                                        "tests/test_sync.py::test_the_documented_iam_policy[s3:GetObject]",
                                        "tests/test_status.py::test_status_json"]
    assert module.failed_tests("416 passed in 600.00s\n") == []
