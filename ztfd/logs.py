"""Logging for many processes writing the same files under ``<home>/logs/``.

Files: ``ztfd.log`` (every event), ``errors.log`` (warnings and errors only), ``sync.log`` (the syncer), and
``<topic>.log`` (one line per alert, written by that topic's consumer through ``AlertLog``; a topic name too
long for ``<topic>.log.lock`` gets a shortened name, see ``log_file_name``). Every line is one line: control
characters from message content are escaped (``ztfd.text``).

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
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ztfd.text import escape_controls, escape_controls_but_lines, mask_url_secrets

FORMAT = "%(asctime)s %(levelname)s %(processName)s[%(process)d] %(name)s: %(message)s"
# The longest file name the file systems ztfd runs on accept (ext4, xfs, btrfs: 255 bytes).
NAME_MAX = 255
# What a log file's name may get after it: ``.lock`` (rotation's lock) and ``.<n>`` (a rotated copy).
LOG_SUFFIX_ROOM = len(".lock") + len(".99")


def log_file_name(stem: str, suffix: str = ".log") -> str:
    """``<stem><suffix>``, shortened when it would leave no room for ``.lock`` or ``.<n>`` within ``NAME_MAX``:
    a Kafka topic name may be 249 characters, and ``<topic>.log.lock`` is then too long. A long stem becomes its
    start, ``~`` and 16 hex digits of its SHA-256, so each topic keeps a name of its own, the same in every
    process."""
    name = f"{stem}{suffix}"
    if len(name.encode()) + LOG_SUFFIX_ROOM <= NAME_MAX:
        return name
    digest = hashlib.sha256(stem.encode()).hexdigest()[:16]
    room = NAME_MAX - LOG_SUFFIX_ROOM - len(suffix) - len(digest) - 1
    return f"{stem.encode()[:room].decode('utf-8', 'ignore')}~{digest}{suffix}"


class SafeFormatter(logging.Formatter):
    """One record, one line: control characters in the message (which may quote a message's content) are
    escaped (``ztfd.text``); a traceback keeps its lines but loses any other control character. The password
    of a URL (``https://user:password@host``) never reaches a log."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        return mask_url_secrets(escape_controls(super().formatMessage(record)))

    def formatException(self, ei: object) -> str:  # noqa: N802
        return mask_url_secrets(escape_controls_but_lines(super().formatException(ei)))  # type: ignore[arg-type]

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return mask_url_secrets(escape_controls_but_lines(super().formatStack(stack_info)))


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
                rotate(self.path, self.backup_count)
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


def rotate(path: Path, backup_count: int) -> None:
    """Shift ``path`` to ``<path>.1`` (``.1`` to ``.2`` and so on, keeping ``backup_count`` old files); with no
    backups, empty it. The caller makes sure that no other process rotates ``path`` at the same time."""
    for index in range(backup_count - 1, 0, -1):
        older = path.with_name(f"{path.name}.{index}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{index + 1}"))
    if backup_count > 0:
        os.replace(path, path.with_name(f"{path.name}.1"))
    else:
        os.truncate(path, 0)


class Throttle(logging.Filter):
    """A recurring condition logged at most once per ``every`` seconds, with the count of repeats held back.

    librdkafka reports the same failure about every 50 ms while a broker is down: without this a day's outage
    would fill the logs. Call it (``throttle(key, level, text, *args)``, logged through ``logger``), or add it to
    a logger as a filter, where each distinct message (its first argument, if any) is a key of its own.
    """

    def __init__(self, logger: logging.Logger | None = None, every: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.logger = logger or logging.getLogger(__name__)
        self.every = every
        self.clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def admit(self, key: str) -> int | None:
        """How many repeats of ``key`` were held back since it last went through; None: hold this one too."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)

    def __call__(self, key: str, level: int, text: str, *args: object) -> None:
        held = self.admit(key)
        if held is not None:
            self.logger.log(level, text + _held_note(held), *args)

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.args[0]) if isinstance(record.args, tuple) and record.args else str(record.msg)
        held = self.admit(key)
        if held:
            record.msg = f"{record.msg}{_held_note(held)}"
        return held is not None


def _held_note(held: int) -> str:
    return f" ({held} repeats not shown)" if held else ""


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
    formatter = SafeFormatter(FORMAT)
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
        self.handler = SharedRotatingFileHandler(logs_dir / log_file_name(topic), max_bytes, backup_count)

    def write(self, lines: list[str]) -> None:
        if not lines:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        block = "".join(f"{stamp} {escape_controls(line)}\n" for line in lines)
        self.handler.write_block(block.encode("utf-8", "replace"))

    def close(self) -> None:
        self.handler.close()
