"""Retention (``s3.delete_local_after_days`` > 0): delete local files uploaded and verified more than N days ago.

A file goes only when three things agree: its row is done with an upload older than N days; the local file still
has the uploaded size and MD5 (else it changed: leave it for ``--full``); and a HEAD shows S3 still holds that
upload: the size, and the ETag S3 answered at upload (a single PUT's ETag is the MD5, a multipart upload's the
MD5 of its parts' MD5s; both were checked against the bytes at upload, so the same ETag means the same bytes).
What S3 answers decides the fate of the others:

- no such object (404), or another size or ETag: queued for upload again at once;
- 403, or another error: S3 would not say. S3 answers 403 for a missing object to credentials without
  ``s3:ListBucket``, so "kept" would keep a lost copy lost forever: the file is kept and counted (per upload, in
  ``retention_checks``), and after ``UNVERIFIED_PASSES`` passes that could not verify it, queued for upload again.

The row becomes ``archived`` before the file goes, so a crash in between leaves a file that ``--full`` marks
done again rather than a row that claims a file which is gone; and only rows the archiving UPDATE really changed
(still done with the checked MD5) are deleted, and only if the file was not replaced since it was hashed.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
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
UNVERIFIED_PASSES = 3  # passes that could not verify a file's S3 copy before it is uploaded again


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


@dataclass
class RetentionOutcome:
    deleted: int = 0  # local files deleted
    unverified: int = 0  # files whose S3 copy could not be verified: kept
    requeued: int = 0  # files queued for upload again
    unverified_reason: str | None = None  # the first reason S3 gave, for the pass's warning

    @property
    def warning(self) -> str | None:
        if not self.unverified:
            return None
        return f"retention could not verify {self.unverified} files on S3 ({self.unverified_reason}); kept"


class Retention:
    """One retention run over the old uploads, a page (one transaction) at a time."""

    def __init__(self, conn: sqlite3.Connection, cfg: Config, client: Any, stop: threading.Event) -> None:
        self.conn = conn
        self.cfg = cfg
        self.client = client
        self.stop = stop
        self.outcome = RetentionOutcome()

    def run(self) -> RetentionOutcome:
        cutoff = time.time() - self.cfg.s3.delete_local_after_days * 86400
        after: tuple[float, str] = (float("-inf"), "")
        while not self.stop.is_set():
            rows = manifest.old_uploads(self.conn, cutoff, after, RETENTION_PAGE)
            if not rows:
                break
            after = (rows[-1].uploaded_at, rows[-1].path)
            self._archive({row.path: (row.md5, seen) for row in rows if (seen := self.may_delete(row))})
        if self.outcome.deleted:
            log.info("sync retention: deleted %d local files uploaded more than %g days ago", self.outcome.deleted,
                     self.cfg.s3.delete_local_after_days)
        if self.outcome.warning:
            log.warning("sync %s", self.outcome.warning)
        return self.outcome

    def may_delete(self, row: OldUpload) -> Identity | bool:
        """The identity of the local file (True when it is already gone) when it is what was uploaded and S3
        still holds it; False to keep it."""
        if row.path.startswith("archive/"):
            return False  # the Parquet dataset stays on disk: it is what ztfd query reads, and small
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
        """One HEAD: True when S3 holds the upload; else the file is kept, and queued again or counted."""
        try:
            with classified_errors(self.cfg.s3.bucket, self.cfg.s3.endpoint_url):
                head = self._head(s3_key(self.cfg, row.path))
        except FileError as exc:
            self._unverified(row, str(exc))
            return False
        difference = upload_difference(row, head)
        if difference is None:
            return True
        log.warning("sync retention: %s: %s; kept and queued for upload", row.path, difference)
        self._requeue(row, difference)
        return False

    def _head(self, key: str) -> dict[str, Any] | None:
        return head_object(self.client, self.cfg.s3.bucket, key)

    def _unverified(self, row: OldUpload, reason: str) -> None:
        self.outcome.unverified += 1
        self.outcome.unverified_reason = self.outcome.unverified_reason or reason
        passes = manifest.note_unverified(self.conn, row, reason)
        if passes < UNVERIFIED_PASSES:
            log.info("sync retention: cannot verify %s on S3 (%s); kept (%d of %d passes before it is uploaded "
                     "again)", row.path, reason, passes, UNVERIFIED_PASSES)
            return
        log.warning("sync retention: cannot verify %s on S3 in %d passes (%s); kept and queued for upload again",
                    row.path, passes, reason)
        self._requeue(row, f"S3 copy not verifiable in {passes} retention passes: {reason}")

    def _requeue(self, row: OldUpload, reason: str) -> None:
        manifest.requeue(self.conn, row.path, reason)
        self.outcome.requeued += 1

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
            self.outcome.deleted += 1
        remove_empty_parents(local.parent, self.cfg.home)


def head_object(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    """S3's answer to a HEAD of ``key``, or None when it says there is no such object."""
    try:
        return client.head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        if not is_not_found(exc):
            raise
        return None


def upload_difference(row: OldUpload, head: dict[str, Any] | None) -> str | None:
    """How S3's copy differs from the upload (None: it is the upload)."""
    if head is None:
        return "S3 no longer holds it"
    if head.get("ContentLength") != row.size:
        return f"S3 holds {head.get('ContentLength')} bytes, the upload had {row.size}"
    etag = str(head.get("ETag", "")).strip('"')
    expected = row.etag or row.md5
    if etag and etag != expected:  # (a store that sends no ETag leaves the size as the only check)
        return f"S3's copy has ETag {etag}, the upload had {expected}: other bytes"
    return None


def apply_retention(conn: sqlite3.Connection, cfg: Config, client: Any, stop: threading.Event) -> RetentionOutcome:
    return Retention(conn, cfg, client, stop).run()


def remove_empty_parents(folder: Path, home: Path) -> None:
    stops = {home / top for top in SYNCED_DIRS}
    while folder not in stops and home in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (or busy): stop climbing
        folder = folder.parent
