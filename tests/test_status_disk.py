"""``ztfd status`` shows free inodes beside free bytes, measured on a real (small) file system."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import child_env, ztfd_command

INODES = 300


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of its own with few inodes (root is needed to mount it)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=4m,nr_inodes={INODES}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_status_reports_free_inodes_of_the_homes_file_system(
    small_fs: Path, make_config: Callable[..., Path]
) -> None:
    config_path = make_config(home=small_fs / "home")
    for n in range(100):  # a hundred small files: a hundred inodes, a few bytes
        (small_fs / f"f{n}").write_bytes(b"x")
    result = subprocess.run(ztfd_command(config_path, "status", "--json"), capture_output=True, text=True,
                            env=child_env(), timeout=60)
    assert result.returncode == 3, result.stderr  # nothing runs
    disk = json.loads(result.stdout)["disk"]
    now = os.statvfs(small_fs)
    assert disk["total_inodes"] == now.f_files == INODES
    assert disk["free_inodes"] == now.f_favail <= INODES - 100
    assert disk["free_inodes_percent"] == round(100 * now.f_favail / INODES, 1)
    assert disk["free_bytes"] > 0 and disk["path"] == str(small_fs / "home")

    table = subprocess.run(ztfd_command(config_path, "status"), capture_output=True, text=True, env=child_env(),
                           timeout=60).stdout
    assert f"{disk['free_inodes']:,} of {INODES:,} inodes free" in table
