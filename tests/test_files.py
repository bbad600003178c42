"""Atomic writes on a real file system: a temporary is always a new file, never one reached through a symlink."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from ztfd.files import atomic_write, remove_stale_temporaries


def usual_temporary(path: Path) -> Path:
    """The name ``atomic_write`` tries first for ``path`` in this thread (docs/layout.md)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")


def temporaries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_symlink_planted_at_the_temporary_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "data" / "a.json"
    target.parent.mkdir()
    planted = usual_temporary(target)
    planted.symlink_to(victim)
    atomic_write(target, b"alert")
    assert target.read_bytes() == b"alert" and not target.is_symlink()
    assert victim.read_bytes() == b"precious"
    assert planted.is_symlink() and os.readlink(planted) == str(victim)  # left as it was
    assert temporaries(target.parent) == [planted]  # the write's own temporary is gone


def test_a_dangling_symlink_at_the_temporary_name_creates_nothing_where_it_points(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    usual_temporary(target).symlink_to(tmp_path / "created-through-the-link")
    atomic_write(target, b"alert")
    assert target.read_bytes() == b"alert"
    assert not (tmp_path / "created-through-the-link").exists()


def test_an_existing_temporary_is_not_clobbered_and_another_name_is_used(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    theirs = usual_temporary(target)
    theirs.write_bytes(b"another writer's half file")
    names: list[str] = []
    real_replace = os.replace

    def spy(source: str, destination: str) -> None:
        names.append(os.path.basename(source))
        real_replace(source, destination)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", spy)
        atomic_write(target, b"alert")
    assert target.read_bytes() == b"alert"
    assert theirs.read_bytes() == b"another writer's half file"
    (used,) = names
    assert used != theirs.name and used.startswith(theirs.name.removesuffix(".tmp") + "-") and used.endswith(".tmp")


def test_a_symlink_at_the_target_is_replaced_not_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "a.json"
    target.symlink_to(victim)
    atomic_write(target, b"alert")
    assert not target.is_symlink() and target.read_bytes() == b"alert"
    assert victim.read_bytes() == b"precious"


def test_folders_are_created_and_no_temporary_is_left(tmp_path: Path) -> None:
    target = tmp_path / "2024-05-01" / "topic" / "a.json"
    atomic_write(str(target), b"{}")
    atomic_write(target, b"{ }")  # again: replaced
    assert target.read_bytes() == b"{ }"
    assert temporaries(target.parent) == []


def test_a_dead_writers_temporary_under_another_name_is_stale_too(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".a.json.{dead.pid}-1-0123abcd.tmp"
    live = tmp_path / f".a.json.{os.getpid()}-1-0123abcd.tmp"
    for path in (stale, live):
        path.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == 1
    assert not stale.exists() and live.exists()


def test_create_new_writes_under_the_final_name_and_replaces_what_is_there(tmp_path: Path) -> None:
    from ztfd.files import create_new

    target = tmp_path / "a" / "b" / "alert.json"
    create_new(str(target), b"first")  # its folders made on the way
    assert target.read_bytes() == b"first"
    create_new(str(target), b"second, whole")  # a torn leftover: replaced atomically
    assert target.read_bytes() == b"second, whole"
    assert [p.name for p in target.parent.iterdir()] == ["alert.json"]  # no temporary left


def test_create_new_leaves_a_failed_write_to_the_batch_written_again(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails halfway removes nothing (the name may already hold another writer's whole file); the
    batch written again replaces the torn file whole."""
    from ztfd import files

    target = tmp_path / "alert.json"
    write_all = files.write_all

    def half_then_full(fd: int, data: bytes) -> None:  # a disk that fills up in the middle of the write
        os.write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "write_all", half_then_full)
    with pytest.raises(OSError, match="No space"):
        files.create_new(str(target), b"0123456789")
    assert target.read_bytes() == b"01234"
    monkeypatch.setattr(files, "write_all", write_all)
    files.create_new(str(target), b"0123456789")
    assert target.read_bytes() == b"0123456789"
