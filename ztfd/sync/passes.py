"""One sync pass, under the pass lock: reconcile (``--full``), upload everything pending, then retention."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from ztfd.config import Config
from ztfd.store import archive_marks, deletions, manifest
from ztfd.sync import reconcile, replaced, retention, shared_keys
from ztfd.sync.lock import pass_lock
from ztfd.sync.pending import PendingUploads, Progress
from ztfd.sync.result import PassResult
from ztfd.sync.s3 import FatalError, OutageError, make_client
from ztfd.sync.status import record_pass
from ztfd.units import human_bytes

log = logging.getLogger(__name__)

ProgressFactory = Callable[[int], Progress | None]  # files to upload -> a display, or None for none


def locked_pass(conn: sqlite3.Connection, cfg: Config, stop: threading.Event, full: bool, wait: float | None,
                progress: ProgressFactory | None = None) -> PassResult:
    """Hold ``state/sync.lock`` for one pass. ``wait``: seconds to wait for another pass (``None``: until stop)."""
    started = time.time()
    lock_path = cfg.state_dir / "sync.lock"
    with pass_lock(lock_path, wait, stop) as held:
        if not held:
            result = PassResult(interrupted=stop.is_set())
            if not stop.is_set():
                result.error = (f"another sync pass holds {lock_path} "
                                f"(waited {wait:.0f} s, s3.lock_timeout); try again later")
            return result
        result = one_pass(conn, cfg, stop, full, progress)
    record_pass(conn, result, started, full)
    return result


def one_pass(conn: sqlite3.Connection, cfg: Config, stop: threading.Event, full: bool,
             progress: ProgressFactory | None = None) -> PassResult:
    """Call with the lock held."""
    clock = time.monotonic()
    result = PassResult()
    _drop_handed_back(conn, cfg)
    if full:
        result.reconciled = reconcile.run_full(conn, cfg)
    client = None
    if cfg.kafka.group_mode:
        client = make_client(cfg)
        try:
            shared_keys.reassert_shared(conn, cfg, client)
        except (FatalError, OutageError) as exc:  # the uploads meet it too, and say so
            log.warning("sync: cannot check the fleet's shared files in the bucket: %s", exc)
    client = _upload_pending(conn, cfg, stop, result, progress, client)
    if result.error is None and not stop.is_set() and deletions.count(conn):
        client = client or make_client(cfg)
        result.deleted_remote, result.warning = replaced.delete_replaced(conn, cfg, client, stop)
    if cfg.s3.delete_local_after_days > 0 and result.error is None and not stop.is_set():
        try:
            kept = retention.apply_retention(conn, cfg, client or make_client(cfg), stop)
        except (FatalError, OutageError) as exc:
            result.error = f"retention: {exc}"
        else:
            result.deleted_local, result.unverified, result.requeued = kept.deleted, kept.unverified, kept.requeued
            result.warning = kept.warning or result.warning
    result.pending = manifest.count_pending(conn)
    result.interrupted = result.interrupted or (stop.is_set() and result.pending > 0)
    result.seconds = time.monotonic() - clock
    log.log(logging.INFO if result.ok else logging.WARNING,
            "sync pass: %d files, %d bytes in %.1f s; %d failed; %d pending%s", result.files, result.bytes,
            result.seconds, result.failures, result.pending, f"; error: {result.error}" if result.error else "")
    return result


def _drop_handed_back(conn: sqlite3.Connection, cfg: Config) -> None:
    """Fleet mode: before anything is uploaded, take off this host the archive files of partitions it handed back
    that may hold rows past their commit (``ztfd.archive.handedback``; pyarrow only then)."""
    if archive_marks.handed_back(conn) or archive_marks.dropping(conn):
        from ztfd.archive import handedback

        handedback.drop(conn, cfg.home)


def _upload_pending(conn: sqlite3.Connection, cfg: Config, stop: threading.Event, result: PassResult,
                    progress: ProgressFactory | None, client: Any = None) -> Any:
    """Upload what is pending; returns the S3 client if one was made or given (retention reuses it)."""
    totals = manifest.pending_totals(conn)
    if not totals.files:
        return client
    log.info("sync: %d files (%s) pending", totals.files, human_bytes(totals.bytes))
    try:
        client = client or make_client(cfg)
        PendingUploads(conn, cfg, client, stop, result, progress(totals.files) if progress else None).run()
    except FatalError as exc:
        result.error = str(exc)
    return client
