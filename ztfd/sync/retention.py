"""Retention (``s3.delete_local_after_days`` > 0): delete local files uploaded and verified more than N days ago.

Before deleting, the local file must still have the uploaded size and MD5 (else it changed: leave it for
``--full``) and S3 must still hold an object of that size (a HEAD; a lifecycle rule may have expired it). The
row becomes ``archived`` before the file goes, so a crash in between leaves a file that ``--full`` marks done
again rather than a row that claims a file which is gone; and only rows the archiving UPDATE really changed
(still done with the checked MD5) are deleted, and only if the file was not replaced since it was hashed.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

from ztfd import files, store
from ztfd.config import Config
from ztfd.store import manifest
from ztfd.store.manifest import OldUpload
from ztfd.sync.reconcile import SYNCED_DIRS
from ztfd.sync.s3 import FileError, classified_errors, is_not_found, s3_key

log = logging.getLogger(__name__)

RETENTION_PAGE = 64  # manifest rows looked at (and archived) per retention transaction


class Identity(NamedTuple):
    """What tells a rewrite (atomic_write renames a new inode over the path)."""

    inode: int
    device: int
    size: int
    mtime_ns: int


def identity(path: Path) -> Identity | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return Identity(st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


class Retention:
    """One retention run over the old uploads, a page (one transaction) at a time."""

    def __init__(self, conn: sqlite3.Connection, cfg: Config, client: Any, stop: threading.Event) -> None:
        self.conn = conn
        self.cfg = cfg
        self.client = client
        self.stop = stop
        self.deleted = 0

    def run(self) -> int:
        """Returns how many local files were deleted."""
        cutoff = time.time() - self.cfg.s3.delete_local_after_days * 86400
        after: tuple[float, str] = (float("-inf"), "")
        while not self.stop.is_set():
            rows = manifest.old_uploads(self.conn, cutoff, after, RETENTION_PAGE)
            if not rows:
                break
            after = (rows[-1].uploaded_at, rows[-1].path)
            self._archive({row.path: (row.md5, seen) for row in rows if (seen := self.may_delete(row))})
        if self.deleted:
            log.info("sync retention: deleted %d local files uploaded more than %g days ago", self.deleted,
                     self.cfg.s3.delete_local_after_days)
        return self.deleted

    def may_delete(self, row: OldUpload) -> Identity | bool:
        """The identity of the local file (True when it is already gone) when it is what was uploaded and S3
        still holds it; False to keep it."""
        local = self.cfg.home / row.path
        seen = identity(local)
        if seen is None:
            return True  # already gone: archived all the same
        try:
            if seen.size != row.size or files.md5_file(local) != row.md5 or identity(local) != seen:
                log.warning("sync retention: %s changed since its upload; kept (run --full)", row.path)
                return False
        except FileNotFoundError:
            return True
        return seen if self._s3_holds(row) else False

    def _s3_holds(self, row: OldUpload) -> bool:
        """One HEAD: True when S3 holds the upload; requeues the file if S3 lost it."""
        try:
            with classified_errors(self.cfg.s3.bucket, self.cfg.s3.endpoint_url):
                head = self._head(s3_key(self.cfg, row.path))
        except FileError as exc:
            log.warning("sync retention: cannot check %s on S3 (%s); kept", row.path, exc)
            return False
        stored = None if head is None else head["ContentLength"]
        if stored != row.size:
            log.warning("sync retention: S3 does not hold %s as uploaded (%s bytes); kept and queued for upload",
                        row.path, stored)
            manifest.requeue(self.conn, row.path)
            return False
        return True

    def _head(self, key: str) -> dict[str, Any] | None:
        """S3's answer to a HEAD of ``key``, or None when it says there is no such object."""
        try:
            return self.client.head_object(Bucket=self.cfg.s3.bucket, Key=key)
        except Exception as exc:
            if not is_not_found(exc):
                raise
            return None

    def _archive(self, checked: dict[str, tuple[str, Identity | bool]]) -> None:
        """Mark the checked rows archived in one transaction, then delete their files (unless rewritten)."""
        with store.transaction(self.conn):
            archived = [path for path, (md5, _) in checked.items() if manifest.archive(self.conn, path, md5)]
        for path in archived:
            md5, seen = checked[path]
            self._delete(path, md5, seen)

    def _delete(self, path: str, md5: str, seen: Identity | bool) -> None:
        local = self.cfg.home / path
        now_seen = identity(local)
        if now_seen is None:
            return  # already gone: archived all the same
        if seen is not True and now_seen != seen:  # rewritten since it was hashed: keep it
            log.warning("sync retention: %s was rewritten while being archived; kept", path)
            manifest.unarchive(self.conn, path, md5)
            return
        with contextlib.suppress(FileNotFoundError):
            local.unlink()
            self.deleted += 1
        remove_empty_parents(local.parent, self.cfg.home)


def apply_retention(conn: sqlite3.Connection, cfg: Config, client: Any, stop: threading.Event) -> int:
    """Run retention once; returns how many local files were deleted."""
    return Retention(conn, cfg, client, stop).run()


def remove_empty_parents(folder: Path, home: Path) -> None:
    stops = {home / top for top in SYNCED_DIRS}
    while folder not in stops and home in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (or busy): stop climbing
        folder = folder.parent
