"""``ztfd status`` shows free inodes beside free bytes, measured on a real (small) file system."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.conftest import child_env, small_fs, ztfd_command

INODES = 300


def test_status_reports_free_inodes_of_the_homes_file_system(
    tmp_path: Path, make_config: Callable[..., Path]
) -> None:
    with small_fs(tmp_path / "fs", "4m", nr_inodes=INODES) as fs:  # a tmpfs of its own with few inodes
        config_path = make_config(home=fs / "home")
        for n in range(100):  # a hundred small files: a hundred inodes, a few bytes
            (fs / f"f{n}").write_bytes(b"x")
        result = subprocess.run(ztfd_command(config_path, "status", "--json"), capture_output=True, text=True,
                                env=child_env(), timeout=60)
        assert result.returncode == 3, result.stderr  # nothing runs
        disk = json.loads(result.stdout)["disk"]
        now = os.statvfs(fs)
        assert disk["total_inodes"] == now.f_files == INODES
        assert disk["free_inodes"] == now.f_favail <= INODES - 100
        assert disk["free_inodes_percent"] == round(100 * now.f_favail / INODES, 1)
        assert disk["free_bytes"] > 0 and disk["path"] == str(fs / "home")

        table = subprocess.run(ztfd_command(config_path, "status"), capture_output=True, text=True,
                               env=child_env(), timeout=60).stdout
        assert f"{disk['free_inodes']:,} of {INODES:,} inodes free" in table
