"""Files as ztfd writes them: atomically (temporary file + rename), so no reader ever sees half a file.

Temporary files are named ``.<name>.<random>.tmp`` in the target folder; the syncer and ``sync --full`` skip
anything that starts with a dot or ends in ``.tmp`` (see ``is_temporary``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

TMP_SUFFIX = ".tmp"


def atomic_write(path: Path, data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename.

    ``fsync`` also flushes the file to the disk before the rename; without it the write survives any process
    crash (the page cache keeps it) but not a power cut. The store remains the source of truth either way.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
