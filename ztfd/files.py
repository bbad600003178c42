"""Files as ztfd writes them: atomically (temporary file + rename), so no reader ever sees half a file; the
consumer's alert files, which nothing reads before the store records them, under their final name
(``create_new``, with the writer's journal: ``ztfd.ingest.journal``).

Temporary files are named ``.<name>.<pid>-<thread id>.tmp`` in the target folder (``…-<random>.tmp`` when that
name is taken); the syncer and ``sync --full`` skip anything that starts with a dot or ends in ``.tmp`` (see
``is_temporary``). A kill -9 in the middle of a write leaves its temporary behind; ``remove_stale_temporaries``
clears those of dead processes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import threading
from pathlib import Path

from ztfd.daemon.procs import pid_alive

TMP_SUFFIX = ".tmp"
# A temporary is always a new file, never one that was there (O_EXCL), and never reached through a symlink.
TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
TMP_ATTEMPTS = 8


def atomic_write(path: str | os.PathLike[str], data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename.

    The temporary name carries the pid and thread id, so concurrent writers of the same path (two workers whose
    leases overlapped) never share one. It is created with ``O_EXCL | O_NOFOLLOW``: whatever already stands at
    that name (a leftover of a dead process whose pid was reused, or a symlink planted there) is neither followed
    nor overwritten; the write takes another name (``.<name>.<pid>-<thread>-<random>.tmp``) instead.
    Folders are created only when the open fails: the common case costs one open, write, close and rename.
    ``fsync`` also flushes the file to the disk before the rename; without it the write survives any process
    crash (the page cache keeps it) but not a power cut. The store remains the source of truth either way.
    """
    folder, name = os.path.split(os.fspath(path))  # plain strings: this runs once per alert and per stamp
    tmp, fd = _create_temporary(folder, name)
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


NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def create_new(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` under its final name when nothing is there yet (an open, a write and a close:
    about half the kernel's work of ``atomic_write``'s temporary file and rename); else through ``atomic_write``,
    which replaces what is there (a file a killed writer left torn, written again).

    A reader may see the file while it is being written, and a kill -9 or a full disk may leave it torn: only for
    files nobody reads before the store records them, whose writer lists them first (``ztfd.ingest.journal``),
    which removes what a failed batch left. A failed write removes nothing itself: by then the name may hold
    another writer's whole file (two consumers of a topic)."""
    try:
        fd = _open_new(path)
    except FileExistsError:
        atomic_write(path, data)
        return
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def _open_new(path: str) -> int:
    try:
        return os.open(path, NEW_FLAGS, 0o644)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return os.open(path, NEW_FLAGS, 0o644)


def _create_temporary(folder: str, name: str) -> tuple[str, int]:
    """A new temporary file for ``folder/name``: its path and a descriptor open for writing."""
    folder = folder or "."
    stem = f"{folder}/.{name}.{os.getpid()}-{threading.get_ident()}"
    tmp = stem + TMP_SUFFIX
    for _attempt in range(TMP_ATTEMPTS):
        try:
            return tmp, os.open(tmp, TMP_FLAGS, 0o644)
        except FileNotFoundError:
            os.makedirs(folder, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                return tmp, os.open(tmp, TMP_FLAGS, 0o644)
        except FileExistsError:
            pass
        tmp = f"{stem}-{secrets.token_hex(4)}{TMP_SUFFIX}"  # the usual name is taken: one nobody can guess
    raise FileExistsError(errno.EEXIST, f"no free temporary name after {TMP_ATTEMPTS} attempts", stem + TMP_SUFFIX)


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
