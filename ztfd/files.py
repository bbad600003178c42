"""Files as ztfd writes them: atomically (temporary file + rename), so no reader ever sees half a file.

Temporary files are named ``.<name>.<pid>-<thread id>.tmp`` in the target folder; the syncer and ``sync --full``
skip anything that starts with a dot or ends in ``.tmp`` (see ``is_temporary``). A kill -9 in the middle of a write
leaves its temporary behind; ``remove_stale_temporaries`` clears those of dead processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from pathlib import Path

from ztfd.procs import pid_alive

TMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike[str], data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename.

    The temporary name carries the pid and thread id, so concurrent writers of the same path (two workers whose
    leases overlapped) never share one; a leftover of a dead process with a reused pid is simply overwritten.
    Folders are created only when the open fails: the common case costs one open, write, close and rename.
    ``fsync`` also flushes the file to the disk before the rename; without it the write survives any process
    crash (the page cache keeps it) but not a power cut. The store remains the source of truth either way.
    """
    folder, name = os.path.split(os.fspath(path))  # plain strings: this runs once per alert and per stamp
    tmp = f"{folder}/.{name}.{os.getpid()}-{threading.get_ident()}{TMP_SUFFIX}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        fd = os.open(tmp, flags, 0o644)
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(tmp, flags, 0o644)
    try:
        try:
            write_all(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a single call may write fewer)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def remove_stale_temporaries(folder: Path, name: str | None = None) -> int:
    """Delete the temporaries in ``folder`` (of ``name`` only, if given) whose writing process is gone.

    A live process's temporary is left alone: another worker may be writing the same file right now.
    """
    removed = 0
    for leftover in folder.glob(f".{name or '*'}.*{TMP_SUFFIX}"):
        pid_part = leftover.name[: -len(TMP_SUFFIX)].rsplit(".", 1)[-1].split("-", 1)[0]
        if pid_part.isdigit() and pid_alive(int(pid_part)):
            continue
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
            removed += 1
    return removed


def is_temporary(name: str) -> bool:
    """True for ztfd's own in-progress files (and any hidden file), which are never synced."""
    return name.startswith(".") or name.endswith(TMP_SUFFIX)


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def md5_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def relative_to_home(home: Path, path: Path) -> str:
    """The manifest's and S3's name for a file: its path under ``home`` with forward slashes."""
    return path.relative_to(home).as_posix()
