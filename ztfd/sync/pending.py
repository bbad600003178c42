"""Upload every pending manifest row with ``s3.concurrency`` threads; the manifest is written by one thread only.

No more uploads are submitted than there are threads, so every upload not yet marked done is one really in
flight, and each is marked done the moment it is verified: a kill -9 re-sends at most ``s3.concurrency`` files.
A fatal error or an outage winds the pass down (uploads in flight finish or stop at their next part) without
blaming any file; so do ``OUTAGE_AFTER`` files in a row failing with 5xx or throttling.
"""

from __future__ import annotations

import concurrent.futures as futures
import logging
import sqlite3
import threading
from typing import Any, Protocol

from ztfd.config import Config
from ztfd.store import archive_marks, manifest
from ztfd.store.manifest import FailedUpload, FileRecord, UploadedFile
from ztfd.sync.result import PassResult
from ztfd.sync.s3 import FatalError, FileError, OutageError, ServerError, UploadInterruptedError
from ztfd.sync.upload import Uploader

log = logging.getLogger(__name__)

WAIT_SECONDS = 0.5  # how often the pass looks at SIGTERM while uploads are in flight
OUTAGE_AFTER = 3  # files in a row failing with 5xx/throttling (after retries): S3 is down, not those files


class Progress(Protocol):
    """A progress display (click's progress bar fits): one step per uploaded file."""

    def update(self, n_steps: int) -> None: ...

    def render_finish(self) -> None: ...


class PendingUploads:
    """One pass's uploads: the pool, the uploads in flight, and the outcomes written as they come."""

    def __init__(self, conn: sqlite3.Connection, cfg: Config, client: Any, stop: threading.Event,
                 result: PassResult, progress: Progress | None = None) -> None:
        self.conn = conn
        self.cfg = cfg
        self.stop = stop
        self.result = result
        self.progress = progress
        self.abort = threading.Event()  # set on SIGTERM or a fatal/outage error: the pass winds down
        self.uploader = Uploader(cfg, client, self.abort)
        self.inflight: dict[futures.Future[UploadedFile], FileRecord] = {}
        # 5xx/throttling failures not yet blamed on their files: OUTAGE_AFTER in a row means S3 is down, and then
        # none of them is (their rows keep their attempts); anything else in between means they were the files'.
        self.server_errors: list[FailedUpload] = []

    def run(self) -> None:
        with futures.ThreadPoolExecutor(self.cfg.s3.concurrency, thread_name_prefix="upload") as pool:
            try:
                self._submit_all(pool)
                self._drain()
            finally:
                self._blame_server_errors()
                if self.progress is not None:
                    self.progress.render_finish()
        if self.stop.is_set():
            self.result.interrupted = True

    def _submit_all(self, pool: futures.ThreadPoolExecutor) -> None:
        for item in manifest.iter_pending(self.conn):
            if self._withheld(item.path):
                continue
            self._follow_stop()
            if self.abort.is_set():
                return
            while len(self.inflight) >= self.cfg.s3.concurrency:
                self._collect_finished()
            self.inflight[pool.submit(self.uploader.upload, item)] = item

    def _withheld(self, path: str) -> bool:
        """Fleet mode: an archive file of a partition this host handed back, which may hold rows past its commit
        (the next holder's): never uploaded, the next pass drops it (``ztfd.archive.handedback``)."""
        if not path.startswith("archive/"):
            return False
        given_up = archive_marks.handed_back(self.conn)
        if not given_up:
            return False
        from ztfd.archive import handedback  # pyarrow: only in fleet mode, with partitions handed back

        return handedback.past_commit(path, given_up) is not None

    def _drain(self) -> None:
        self._follow_stop()
        while self.inflight:
            if self.abort.is_set():
                for future in self.inflight:
                    future.cancel()
            self._collect_finished()
            self._follow_stop()

    def _follow_stop(self) -> None:
        if self.stop.is_set():
            self.abort.set()

    def _collect_finished(self) -> None:
        finished, _ = futures.wait(self.inflight, timeout=WAIT_SECONDS, return_when=futures.FIRST_COMPLETED)
        for future in finished:
            self._collect(future, self.inflight.pop(future))

    def _collect(self, future: futures.Future[UploadedFile], item: FileRecord) -> None:
        try:
            uploaded = future.result()
        except (FatalError, OutageError) as exc:
            self._end_pass(str(exc))
        except (UploadInterruptedError, futures.CancelledError):
            pass
        except ServerError as exc:
            self._server_error(FailedUpload(item, str(exc)))
        except FileError as exc:
            self._failed(FailedUpload(item, str(exc)))
        except Exception as exc:  # a bug or an unforeseen botocore error: report this file, keep going
            self._failed(FailedUpload(item, f"{type(exc).__name__}: {exc}"), exc_info=True)
        else:
            self._uploaded(uploaded)

    def _end_pass(self, error: str) -> None:
        if not self.abort.is_set():
            self.result.error = error
            log.error("sync: %s", error)
        self.abort.set()

    def _uploaded(self, uploaded: UploadedFile) -> None:
        self._blame_server_errors()
        manifest.mark_uploaded(self.conn, [uploaded], [])  # at once: a kill -9 must not re-send a verified upload
        if uploaded.md5 != uploaded.recorded_md5:
            log.warning("sync: %s changed on disk since it was recorded; uploaded and recorded its current "
                        "content (%d bytes, md5 %s)", uploaded.path, uploaded.size, uploaded.md5)
        self.result.files += 1
        self.result.bytes += uploaded.size
        if self.progress is not None:
            self.progress.update(1)

    def _failed(self, failure: FailedUpload, exc_info: bool = False) -> None:
        self._blame_server_errors()
        self.result.failures += 1
        manifest.mark_uploaded(self.conn, [], [failure])
        log.warning("sync: %s: %s", failure.file.path, failure.error, exc_info=exc_info)

    def _server_error(self, failure: FailedUpload) -> None:
        if self.abort.is_set():
            return  # the pass is ending (an outage already): blame no file
        self.result.failures += 1
        self.server_errors.append(failure)
        log.warning("sync: %s: %s", failure.file.path, failure.error)
        if len(self.server_errors) >= OUTAGE_AFTER:
            self.result.failures -= len(self.server_errors)
            self._end_pass(f"S3 keeps failing ({len(self.server_errors)} files in a row, last: {failure.error}); "
                           "treated as an outage, the rest goes in the next pass")
            self.server_errors.clear()

    def _blame_server_errors(self) -> None:
        if self.server_errors:
            manifest.mark_uploaded(self.conn, [], self.server_errors)
            self.server_errors = []
