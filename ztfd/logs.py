"""Logging for many processes writing the same files under ``<home>/logs/``.

Files: ``ztfd.log`` (every event), ``errors.log`` (warnings and errors only), ``sync.log`` (the syncer), and
``<topic>.log`` (one line per alert, written by that topic's consumer through ``AlertLog``).

Several processes append to one file, so ``logging.handlers.RotatingFileHandler`` (which renames under its own
feet and keeps writing to the renamed file in other processes) is not safe. ``SharedRotatingFileHandler``:
- writes each record with one ``write()`` on an ``O_APPEND`` descriptor, so lines from different processes
  never interleave;
- rotates under an ``flock`` on ``<file>.lock``, re-checking the size once it holds the lock, so exactly one
  process rotates;
- reopens whenever the path no longer names the file it has open, so every process follows a rotation; a line
  written just before it notices lands at the end of ``<file>.1``: late, but not lost.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import time
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(processName)s[%(process)d] %(name)s: %(message)s"


class SharedRotatingFileHandler(logging.Handler):
    def __init__(self, path: Path, max_bytes: int, backup_count: int, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backup_count = backup_count
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None
        self._ino: int | None = None

    def _open(self) -> int:
        if self._fd is not None:
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == self._ino:
                return self._fd
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._ino = os.fstat(self._fd).st_ino
        return self._fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_block((self.format(record) + "\n").encode("utf-8", "replace"))
        except Exception:
            self.handleError(record)

    def write_block(self, block: bytes) -> None:
        """Append whole lines with one ``write()`` (rotating first when they would not fit)."""
        with self.lock:  # type: ignore[union-attr]
            fd = self._open()
            if self.max_bytes and os.fstat(fd).st_size + len(block) > self.max_bytes:
                self._rotate(len(block))
                fd = self._open()
            os.write(fd, block)

    def _rotate(self, incoming: int) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                # Another process may have rotated while we waited for the lock (the same test as emit's, so a
                # file never grows past max_bytes but by lines of processes that had not yet seen a rotation).
                size = os.stat(self.path).st_size
                if size == 0 or size + incoming <= self.max_bytes:
                    return
                for index in range(self.backup_count - 1, 0, -1):
                    older = self.path.with_name(f"{self.path.name}.{index}")
                    if older.exists():
                        os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
                if self.backup_count > 0:
                    os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
                else:
                    os.truncate(self.path, 0)
            except FileNotFoundError:
                pass
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def close(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        super().close()


def setup(
    logs_dir: Path | None,
    level: str = "INFO",
    max_bytes: int = 10 * 1024 * 1024,
    backup_count: int = 5,
    main_file: str = "ztfd.log",
    console: bool = True,
) -> None:
    """Configure the root logger of this process: ``ztfd.log`` (or ``main_file``), ``errors.log``, stderr."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level.upper())
    formatter = logging.Formatter(FORMAT)
    handlers: list[logging.Handler] = []
    if logs_dir is not None:
        handlers.append(SharedRotatingFileHandler(logs_dir / main_file, max_bytes, backup_count))
        if main_file != "ztfd.log":
            handlers.append(SharedRotatingFileHandler(logs_dir / "ztfd.log", max_bytes, backup_count))
        handlers.append(SharedRotatingFileHandler(logs_dir / "errors.log", max_bytes, backup_count, logging.WARNING))
    if console:
        stream = logging.StreamHandler(sys.stderr)
        handlers.append(stream)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    # librdkafka and botocore are chatty at INFO; their warnings still reach errors.log.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "matplotlib", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class AlertLog:
    """The per-topic alert log, ``<home>/logs/<topic>.log``: one line per stored alert, nothing else.

    A consumer stores alerts a batch at a time, so it logs them the same way: one ``write()`` per batch rather
    than a logging record per alert (which cost more than writing the alert files themselves).
    """

    def __init__(self, logs_dir: Path, topic: str, max_bytes: int, backup_count: int) -> None:
        self.handler = SharedRotatingFileHandler(logs_dir / f"{topic}.log", max_bytes, backup_count)

    def write(self, lines: list[str]) -> None:
        if not lines:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.handler.write_block("".join(f"{stamp} {line}\n" for line in lines).encode("utf-8", "replace"))

    def close(self) -> None:
        self.handler.close()
