"""Manifest-driven upload to S3: ``ztfd sync`` (the daemon's syncer) and ``ztfd sync --once`` (cron).

Why a manifest: after a year the archive holds millions of small files, and a sync that lists the bucket or walks
the tree (``aws s3 sync``, rclone) costs time in proportion to everything ever stored. Every file ztfd writes is
recorded in the store's ``manifest`` table when it is on disk (``store.record_files``), so a pass reads only the
rows in state ``pending`` (a partial index) and costs nothing when there is nothing new. It never lists the bucket;
only ``--full`` walks ``data/`` and ``images/`` to pick up files added, changed or removed by hand.

Each upload is verified before its row says ``done``: a single PUT carries ``Content-MD5`` (S3 rejects a body
that does not match) and its ETag must equal the MD5; a multipart upload sends each part with its MD5 and the
final ETag must equal S3's composite MD5 (else the object's size is checked with a HEAD). Each row is marked done
the moment its upload is verified (one small autocommit UPDATE, negligible beside a PUT), and at most
``s3.concurrency`` uploads are in flight, so a kill -9 re-sends at most those, and never a file marked done.
One pass at a time holds ``<home>/state/sync.lock`` (flock), so ``sync --once`` beside the daemon never uploads
twice or interleaves manifest updates.

States of a manifest row: ``pending`` (to upload), ``done`` (verified on S3), ``archived`` (verified on S3 and
deleted locally by retention, ``s3.delete_local_after_days``).
"""

from __future__ import annotations

import base64
import concurrent.futures as futures
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from ztfd import __version__, files, lifecycle, store
from ztfd.config import Config
from ztfd.units import human_bytes

log = logging.getLogger(__name__)

PENDING, DONE, ARCHIVED = "pending", "done", "archived"
SYNCED_DIRS = ("data", "images")  # everything else under home (state, logs) is never uploaded
WAIT_SECONDS = 0.5  # how often the pass looks at SIGTERM while uploads are in flight
RETENTION_PAGE = 64  # manifest rows looked at (and archived) per retention transaction
APPLY_CHUNK = 500  # --full applies its plan in transactions of this many rows: the write lock is held briefly
OUTAGE_AFTER = 3  # files in a row failing with 5xx/throttling (after retries): S3 is down, not those files
THROTTLING_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "ServiceUnavailable",
                    "InternalError", "RequestTimeout", "TooManyRequests"}
IN_MEMORY_MAX = 8 * 1024 * 1024  # single-part uploads up to this size are read into memory; larger ones stream
PAGE_ROWS = 2000
PART_SIZE = 16 * 1024 * 1024  # multipart part size (at most), S3 allows at most 10,000 parts of at least 5 MiB
MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PARTS = 10_000
HEARTBEAT_SECONDS = 5.0
RETRY_AFTER_FAILURE = 60.0  # the daemon retries a failed pass after this, doubling up to s3.interval
STATUS_LAST_PASS, STATUS_LAST_ERROR = "sync.last_pass", "sync.last_error"
CONTENT_TYPES = {".json": "application/json", ".png": "image/png", ".gz": "application/gzip",
                 ".fits": "application/fits"}
CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                    "TokenRefreshRequired", "AuthorizationHeaderMalformed", "InvalidClientTokenId"}


class FatalError(Exception):
    """Ends the pass for every file: a missing bucket, refused credentials, denied access."""


class OutageError(Exception):
    """S3 cannot be reached: end the pass without blaming any file, try again later."""


class FileError(Exception):
    """This file could not be uploaded or verified; the others go on."""


class ServerError(FileError):
    """S3 answered 5xx or throttled even after botocore's retries: this file, or S3 as a whole if it persists."""


class UploadInterruptedError(Exception):
    """The pass is stopping (SIGTERM, or another upload hit a fatal error) before this file was finished."""


@dataclass(frozen=True)
class Item:
    path: str
    size: int
    md5: str


@dataclass(frozen=True)
class Uploaded:
    """What was really uploaded: the bytes read at upload time, which are what the manifest then records."""

    path: str
    recorded_md5: str
    size: int
    md5: str
    etag: str


@dataclass
class PassResult:
    files: int = 0
    bytes: int = 0
    failures: int = 0
    pending: int = 0  # rows still pending after the pass
    seconds: float = 0.0
    error: str | None = None
    interrupted: bool = False
    deleted_local: int = 0
    reconciled: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failures and not self.interrupted and not self.pending


# --- entry point ---------------------------------------------------------------------------------------------


def run(cfg: Config, once: bool, dry_run: bool, full: bool, name: str) -> int:
    """``ztfd sync``: exit 0 when everything pending was uploaded, 1 when not, 2 when there is no bucket."""
    if not cfg.s3.bucket:
        click.echo("ztfd: config: s3.bucket is empty: nothing to sync to", err=True)
        return 2
    conn = store.connect(cfg.db_path)
    if dry_run:
        return dry_run_listing(conn, cfg, full)
    stop = lifecycle.Stop().install()  # the first SIGTERM finishes the uploads in flight; a second exits at once
    if once:
        result = locked_pass(conn, cfg, stop, full=full, wait=cfg.s3.lock_timeout, show_progress=True)
        _report_once(result)
        return 0 if result.ok else 1
    return run_daemon(conn, cfg, stop, name, full)


def run_daemon(conn: sqlite3.Connection, cfg: Config, stop: threading.Event, name: str, full: bool) -> int:
    """The syncer: a pass now, then every ``s3.interval`` seconds (sooner after a failed pass) until SIGTERM."""
    beating = threading.Event()
    beat = threading.Thread(target=_heartbeat_loop, args=(cfg.db_path, name, beating), name="heartbeat", daemon=True)
    beat.start()
    log.info("syncer %s started: bucket %s, every %.0f s", name, cfg.s3.bucket, cfg.s3.interval)
    failed_in_a_row = 0
    after_failure = lifecycle.Backoff(RETRY_AFTER_FAILURE, cfg.s3.interval)
    try:
        while not stop.is_set():
            result = locked_pass(conn, cfg, stop, full=full, wait=None, show_progress=False)
            full = False  # --full applies to the first pass only
            failed_in_a_row = 0 if result.ok or result.interrupted else failed_in_a_row + 1
            delay = cfg.s3.interval
            if failed_in_a_row:
                delay = after_failure.delay(failed_in_a_row)
                log.info("sync: next pass in %.0f s after a failed pass", delay)
            stop.wait(delay)
    finally:
        beating.set()
        beat.join(HEARTBEAT_SECONDS + 1)
    log.info("syncer %s stopped", name)
    return 0


def _heartbeat_loop(db_path: Path, name: str, stop: threading.Event) -> None:
    """Heartbeat from a thread of its own, so that a long upload or a wait for the lock never looks like a hang."""
    conn = store.connect(db_path)
    try:
        while True:
            try:
                store.heartbeat(conn, name, "syncer")
            except sqlite3.Error as exc:
                log.warning("sync: heartbeat failed: %s", exc)
            if stop.wait(HEARTBEAT_SECONDS):
                return
    finally:
        conn.close()


def _report_once(result: PassResult) -> None:
    summary = (f"ztfd sync: {result.files} files, {human_bytes(result.bytes)} uploaded in {result.seconds:.1f} s; "
               f"{result.failures} failed; {result.pending} pending")
    if result.deleted_local:
        summary += f"; {result.deleted_local} local files deleted (retention)"
    click.echo(summary)
    if result.error:
        click.echo(f"ztfd: sync: {result.error}", err=True)
    elif result.interrupted:
        click.echo("ztfd: sync: interrupted; the rest goes in the next pass", err=True)
    elif result.failures:
        click.echo(f"ztfd: sync: {result.failures} files failed; see logs/sync.log (they are retried next pass)",
                   err=True)


# --- one pass ------------------------------------------------------------------------------------------------


def locked_pass(conn: sqlite3.Connection, cfg: Config, stop: threading.Event, full: bool, wait: float | None,
                show_progress: bool) -> PassResult:
    """Hold ``state/sync.lock`` for one pass. ``wait``: seconds to wait for another pass (``None``: until stop)."""
    started = time.time()
    with pass_lock(cfg.state_dir / "sync.lock", wait, stop) as held:
        if not held:
            result = PassResult(interrupted=stop.is_set())
            if not stop.is_set():
                result.error = (f"another sync pass holds {cfg.state_dir / 'sync.lock'} "
                                f"(waited {wait:.0f} s, s3.lock_timeout); try again later")
            return result
        result = one_pass(conn, cfg, stop, full, show_progress)
    _record_status(conn, result, started, full)
    return result


@contextlib.contextmanager
def pass_lock(path: Path, wait: float | None, stop: threading.Event) -> Iterator[bool]:
    """An exclusive ``flock``: yields True once held, False if ``wait`` ran out or ``stop`` was set first.

    flock dies with its holder, so a pass killed with -9 never leaves a stale lock behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = None if wait is None else time.monotonic() + wait
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if stop.is_set() or (deadline is not None and time.monotonic() >= deadline):
                    yield False
                    return
                if not announced:
                    log.info("sync: another pass holds %s; waiting", path)
                    announced = True
                stop.wait(0.2)  # polling a lock held by another process: there is no event to wait on
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def one_pass(conn: sqlite3.Connection, cfg: Config, stop: threading.Event, full: bool,
             show_progress: bool) -> PassResult:
    """Reconcile (``--full``), upload everything pending, then apply retention. Call with the lock held."""
    clock = time.monotonic()
    result = PassResult()
    if full:
        plan = reconcile(conn, cfg)
        apply_plan(conn, plan)
        result.reconciled = plan.counts()
        log.info("sync --full: %s", ", ".join(f"{n} {what}" for what, n in result.reconciled.items()))
    count, size = conn.execute(
        "SELECT count(*), coalesce(sum(size), 0) FROM manifest WHERE state = 'pending'").fetchone()
    client = None
    if count:
        log.info("sync: %d files (%s) pending", count, human_bytes(size))
        try:
            client = make_client(cfg)
            upload_pending(conn, cfg, client, stop, result, count, show_progress)
        except FatalError as exc:
            result.error = str(exc)
    if cfg.s3.delete_local_after_days > 0 and result.error is None and not stop.is_set():
        try:
            result.deleted_local = apply_retention(conn, cfg, client or make_client(cfg), stop)
        except (FatalError, OutageError) as exc:
            result.error = f"retention: {exc}"
    result.pending = conn.execute("SELECT count(*) FROM manifest WHERE state = 'pending'").fetchone()[0]
    result.interrupted = result.interrupted or (stop.is_set() and result.pending > 0)
    result.seconds = time.monotonic() - clock
    log_level = logging.INFO if result.ok else logging.WARNING
    log.log(log_level, "sync pass: %d files, %d bytes in %.1f s; %d failed; %d pending%s", result.files,
            result.bytes, result.seconds, result.failures, result.pending,
            f"; error: {result.error}" if result.error else "")
    return result


def _record_status(conn: sqlite3.Connection, result: PassResult, started: float, full: bool) -> None:
    """``sync.last_pass`` (JSON of the pass) and ``sync.last_error`` (JSON, or NULL after a clean pass)."""
    record = {"started_at": started, "finished_at": time.time(), "files": result.files, "bytes": result.bytes,
              "seconds": round(result.seconds, 3), "failures": result.failures, "pending": result.pending,
              "deleted_local": result.deleted_local, "full": full, "ok": result.ok, "error": result.error}
    problem = result.error or (f"{result.failures} files failed" if result.failures else None)
    try:
        with store.transaction(conn):
            store.set_status(conn, STATUS_LAST_PASS, json.dumps(record))
            if problem or result.ok:
                store.set_status(conn, STATUS_LAST_ERROR,
                                 json.dumps({"at": time.time(), "message": problem}) if problem else None)
    except sqlite3.Error as exc:
        log.warning("sync: cannot record the pass status: %s", exc)


# --- uploads -------------------------------------------------------------------------------------------------


def make_client(cfg: Config) -> Any:
    """A boto3 S3 client: standard credential chain, ``endpoint_url``/``region`` when set, standard retries.

    Checksums are computed only where S3 requires them: ztfd sends ``Content-MD5`` itself, and the newer
    aws-chunked CRC trailers cost CPU on every small file and are refused by some S3-compatible stores.
    """
    import boto3
    from botocore.config import Config as BotoConfig

    boto_config = BotoConfig(
        retries={"max_attempts": cfg.s3.max_attempts, "mode": "standard"},
        max_pool_connections=cfg.s3.concurrency + 2, connect_timeout=10, read_timeout=120,
        request_checksum_calculation="when_required", response_checksum_validation="when_required",
        user_agent_extra=f"ztfd/{__version__}",
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=cfg.s3.endpoint_url or None, region_name=cfg.s3.region or None, config=boto_config)


def s3_key(cfg: Config, path: str) -> str:
    return cfg.s3.prefix + path


def upload_pending(conn: sqlite3.Connection, cfg: Config, client: Any, stop: threading.Event, result: PassResult,
                   count: int, show_progress: bool) -> None:
    """Upload every pending row with ``s3.concurrency`` threads; the manifest is written by this thread only."""
    abort = threading.Event()  # set on SIGTERM or a fatal/outage error: the pass winds down
    uploader = Uploader(cfg, client, abort)
    bar = _progress(count) if show_progress and sys.stderr.isatty() else None
    # 5xx/throttling failures not yet blamed on their files: OUTAGE_AFTER in a row means S3 is down, and then
    # none of them is (their rows keep their attempts); anything else in between means they were the files'.
    server_errors: list[tuple[str, str, str]] = []

    def blame_server_errors() -> None:
        if server_errors:
            mark_uploaded(conn, [], server_errors)
            server_errors.clear()

    def collect(future: futures.Future[Uploaded], item: Item) -> None:
        try:
            uploaded = future.result()
        except (FatalError, OutageError) as exc:
            if not abort.is_set():
                result.error = str(exc)
                log.error("sync: %s", exc)
            abort.set()
        except (UploadInterruptedError, futures.CancelledError):
            pass
        except ServerError as exc:
            if abort.is_set():
                return  # the pass is ending (an outage already): blame no file
            result.failures += 1
            server_errors.append((item.path, item.md5, str(exc)))
            log.warning("sync: %s: %s", item.path, exc)
            if len(server_errors) >= OUTAGE_AFTER:
                result.error = (f"S3 keeps failing ({len(server_errors)} files in a row, last: {exc}); "
                                "treated as an outage, the rest goes in the next pass")
                log.error("sync: %s", result.error)
                result.failures -= len(server_errors)
                server_errors.clear()
                abort.set()
            return
        except FileError as exc:
            blame_server_errors()
            result.failures += 1
            mark_uploaded(conn, [], [(item.path, item.md5, str(exc))])
            log.warning("sync: %s: %s", item.path, exc)
        except Exception as exc:  # a bug or an unforeseen botocore error: report this file, keep going
            blame_server_errors()
            result.failures += 1
            mark_uploaded(conn, [], [(item.path, item.md5, f"{type(exc).__name__}: {exc}")])
            log.warning("sync: %s: %s", item.path, exc, exc_info=True)
        else:
            blame_server_errors()
            mark_uploaded(conn, [uploaded], [])  # at once: a kill -9 must not re-send a verified upload
            result.files += 1
            result.bytes += uploaded.size
            if bar is not None:
                bar.update(1)

    inflight: dict[futures.Future[Uploaded], Item] = {}
    with futures.ThreadPoolExecutor(cfg.s3.concurrency, thread_name_prefix="upload") as pool:
        try:
            for item in iter_pending(conn):
                if stop.is_set():
                    abort.set()
                if abort.is_set():
                    break
                # No more submitted than threads: every upload not yet marked done is one really in flight.
                while len(inflight) >= cfg.s3.concurrency:
                    finished, _ = futures.wait(inflight, timeout=WAIT_SECONDS, return_when=futures.FIRST_COMPLETED)
                    for future in finished:
                        collect(future, inflight.pop(future))
                inflight[pool.submit(uploader.upload, item)] = item
            if stop.is_set():
                abort.set()
            while inflight:
                if abort.is_set():
                    for future in inflight:
                        future.cancel()
                finished, _ = futures.wait(inflight, timeout=WAIT_SECONDS, return_when=futures.FIRST_COMPLETED)
                for future in finished:
                    collect(future, inflight.pop(future))
                if stop.is_set():
                    abort.set()
        finally:
            blame_server_errors()
            if bar is not None:
                bar.render_finish()
    if stop.is_set():
        result.interrupted = True


def _progress(count: int) -> Any:
    bar = click.progressbar(length=count, label="uploading", file=sys.stderr, show_pos=True, show_eta=True)
    bar.render_progress()
    return bar


def iter_pending(conn: sqlite3.Connection) -> Iterator[Item]:
    """Pending rows in path order, a page at a time (keyset pagination on the partial index; never the table)."""
    after = ""
    while True:
        rows = conn.execute(
            "SELECT path, size, md5 FROM manifest WHERE state = 'pending' AND path > ? ORDER BY path LIMIT ?",
            (after, PAGE_ROWS)).fetchall()
        if not rows:
            return
        for row in rows:
            yield Item(row["path"], row["size"], row["md5"])
        after = rows[-1]["path"]


def mark_uploaded(conn: sqlite3.Connection, done: list[Uploaded], failed: list[tuple[str, str, str]]) -> None:
    """Write outcomes in one transaction (the pass calls it for each upload as it is verified).

    A row is marked done only if it still describes what was uploaded: if a writer recorded new content for the
    path meanwhile (another MD5), the row stays pending and the new content goes in the next pass.
    """
    if not done and not failed:
        return
    now = time.time()
    with store.transaction(conn):
        conn.executemany(
            "UPDATE manifest SET state = 'done', size = ?, md5 = ?, etag = ?, uploaded_at = ?, last_error = NULL "
            "WHERE path = ? AND state = 'pending' AND md5 IN (?, ?)",
            [(u.size, u.md5, u.etag, now, u.path, u.recorded_md5, u.md5) for u in done])
        conn.executemany(
            "UPDATE manifest SET attempts = attempts + 1, last_error = ? WHERE path = ? AND md5 = ?",
            [(error[:500], path, md5) for path, md5, error in failed])
    for uploaded in done:
        if uploaded.md5 != uploaded.recorded_md5:
            log.warning("sync: %s changed on disk since it was recorded; uploaded and recorded its current "
                        "content (%d bytes, md5 %s)", uploaded.path, uploaded.size, uploaded.md5)


class Uploader:
    """Uploads one manifest row (called from the pool's threads; the boto3 client is thread-safe)."""

    def __init__(self, cfg: Config, client: Any, abort: threading.Event) -> None:
        self.cfg = cfg
        self.client = client
        self.abort = abort
        self.bucket = cfg.s3.bucket

    def upload(self, item: Item) -> Uploaded:
        if self.abort.is_set():
            raise UploadInterruptedError
        local = self.cfg.home / item.path
        key = s3_key(self.cfg, item.path)
        try:
            size = local.stat().st_size
            with classified_errors(self.bucket, self.cfg.s3.endpoint_url):
                if size < self.cfg.s3.multipart_threshold:
                    return self._single(item, local, key)
                return self._multipart(item, local, key)
        except FileNotFoundError:
            raise FileError("missing on disk (`ztfd sync --once --full` drops it from the manifest)") from None
        except OSError as exc:
            raise FileError(f"cannot read: {exc.strerror or exc}") from None

    def _single(self, item: Item, local: Path, key: str) -> Uploaded:
        """One PUT with Content-MD5. Up to ``IN_MEMORY_MAX`` the file is read once into memory; a larger one is
        hashed, then streamed from an open handle (memory stays small with ``s3.concurrency`` threads). Should it
        change in between, S3 rejects the body (BadDigest) and the file goes again next pass."""
        with local.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size <= IN_MEMORY_MAX:
                body: Any = handle.read()
                digest = hashlib.md5(body, usedforsecurity=False)
                size = len(body)
            else:
                digest = hashlib.md5(usedforsecurity=False)
                while block := handle.read(1 << 20):
                    digest.update(block)
                size = handle.tell()
                handle.seek(0)
                body = handle
            md5 = digest.hexdigest()
            response = self.client.put_object(
                Bucket=self.bucket, Key=key, Body=body, ContentLength=size,
                ContentMD5=base64.b64encode(digest.digest()).decode(), ContentType=content_type(item.path))
        etag = response.get("ETag", "").strip('"')
        # With SSE-KMS the ETag is not the MD5; S3 has then checked Content-MD5 against the body it received.
        if etag != md5 and response.get("ServerSideEncryption") != "aws:kms":
            raise FileError(f"S3 answered ETag {etag!r} for content with MD5 {md5}")
        return Uploaded(item.path, item.md5, size, md5, etag)

    def _multipart(self, item: Item, local: Path, key: str) -> Uploaded:
        upload_id = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=key, ContentType=content_type(item.path))["UploadId"]
        completed = False
        try:
            whole = hashlib.md5(usedforsecurity=False)
            part_digests: list[bytes] = []
            parts: list[dict[str, Any]] = []
            total = 0
            with local.open("rb") as handle:
                part_size = max(MIN_PART_SIZE, min(PART_SIZE, self.cfg.s3.multipart_threshold),
                                -(-local.stat().st_size // MAX_PARTS))
                while chunk := handle.read(part_size):
                    if self.abort.is_set():
                        raise UploadInterruptedError
                    digest = hashlib.md5(chunk, usedforsecurity=False)
                    whole.update(chunk)
                    number = len(parts) + 1
                    response = self.client.upload_part(
                        Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk,
                        ContentMD5=base64.b64encode(digest.digest()).decode())
                    parts.append({"PartNumber": number, "ETag": response["ETag"]})
                    part_digests.append(digest.digest())
                    total += len(chunk)
            response = self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
            completed = True
        finally:
            if not completed:
                with contextlib.suppress(Exception):
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        etag = response.get("ETag", "").strip('"')
        expected = f"{hashlib.md5(b''.join(part_digests), usedforsecurity=False).hexdigest()}-{len(parts)}"
        if etag != expected:
            stored = self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
            if stored != total:
                raise FileError(f"S3 holds {stored} bytes after a multipart upload of {total}")
        return Uploaded(item.path, item.md5, total, whole.hexdigest(), etag)


def content_type(path: str) -> str:
    return CONTENT_TYPES.get(os.path.splitext(path)[1], "application/octet-stream")


@contextlib.contextmanager
def classified_errors(bucket: str, endpoint_url: str) -> Iterator[None]:
    """Turn botocore's errors (after its own retries) into fatal, outage or per-file failures, in one line each.

    Messages name the bucket and the error code, never a credential.
    """
    from botocore import exceptions as bx

    try:
        yield
    except (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError) as exc:
        raise FatalError(f"no usable AWS credentials ({type(exc).__name__}): set AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with an instance role") from None
    except (bx.EndpointConnectionError, bx.ConnectionClosedError, bx.ConnectTimeoutError, bx.ReadTimeoutError,
            bx.ProxyConnectionError, bx.HTTPClientError) as exc:
        where = endpoint_url or "S3"
        raise OutageError(f"S3 unreachable ({where}): {type(exc).__name__}") from None
    except bx.ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "?"))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            raise FatalError(f"bucket {bucket!r} does not exist (s3.bucket)") from None
        if code in CREDENTIAL_CODES:
            raise FatalError(f"S3 refused the credentials ({code}): check AWS_ACCESS_KEY_ID / AWS_PROFILE "
                             "or the instance role") from None
        if code in ("AccessDenied", "AllAccessDisabled", "AccountProblem"):
            raise FatalError(f"access denied to bucket {bucket!r} ({code}): the credentials need s3:PutObject "
                             "on it") from None
        if code in ("PermanentRedirect", "IllegalLocationConstraintException") or status == 301:
            raise FatalError(f"bucket {bucket!r} is in another region ({code}): set s3.region") from None
        message = f"S3 error {code} (HTTP {status}): {error.get('Message', '')}".strip()
        if code in THROTTLING_CODES or (isinstance(status, int) and status >= 500):
            raise ServerError(message) from None
        raise FileError(message) from None
    except bx.BotoCoreError as exc:
        raise FileError(f"{type(exc).__name__}: {exc}") from None


# --- --full: reconcile manifest and tree ---------------------------------------------------------------------


@dataclass
class Plan:
    """What ``--full`` found: files to record (new or changed), rows to drop (removed), archived files back."""

    added: list[tuple[str, int, str]] = field(default_factory=list)
    changed: list[tuple[str, int, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"added": len(self.added), "changed": len(self.changed), "removed": len(self.removed),
                "restored": len(self.restored)}


def walk_synced(home: Path) -> Iterator[Path]:
    """Regular files under ``data/`` and ``images/``, skipping temporaries and hidden files and folders."""
    for top in SYNCED_DIRS:
        for folder, dirnames, filenames in os.walk(home / top):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if files.is_temporary(name):
                    continue
                path = Path(folder) / name
                if path.is_file() and not path.is_symlink():
                    yield path


def reconcile(conn: sqlite3.Connection, cfg: Config) -> Plan:
    """Compare the tree with the manifest (reads and hashes every file: ``--full`` is the expensive path)."""
    plan = Plan()
    for path in walk_synced(cfg.home):
        relpath = files.relative_to_home(cfg.home, path)
        row = conn.execute("SELECT size, md5, state FROM manifest WHERE path = ?", (relpath,)).fetchone()
        try:
            size, md5 = path.stat().st_size, files.md5_file(path)
        except FileNotFoundError:
            continue  # removed while we walked
        if row is None:
            plan.added.append((relpath, size, md5))
        elif row["size"] != size or row["md5"] != md5:
            plan.changed.append((relpath, size, md5))
        elif row["state"] == ARCHIVED:
            plan.restored.append(relpath)
    after = ""
    while True:
        rows = conn.execute("SELECT path FROM manifest WHERE state != 'archived' AND path > ? ORDER BY path LIMIT ?",
                            (after, PAGE_ROWS)).fetchall()
        if not rows:
            break
        plan.removed.extend(row["path"] for row in rows if not (cfg.home / row["path"]).is_file())
        after = rows[-1]["path"]
    return plan


def apply_plan(conn: sqlite3.Connection, plan: Plan) -> None:
    """Apply in transactions of ``APPLY_CHUNK`` rows: on a large tree one transaction would hold the write lock
    long enough for consumers and workers to time out. Each change stands alone, so a kill between chunks
    leaves a manifest that the next ``--full`` completes."""
    recorded = plan.added + plan.changed
    for start in range(0, len(recorded), APPLY_CHUNK):
        with store.transaction(conn):
            store.record_files(conn, recorded[start:start + APPLY_CHUNK])
    # A changed file whose row was archived or done with the same MD5 stays as record_files leaves it; a
    # different MD5 made it pending. An archived file back on disk with the uploaded content is done again.
    for start in range(0, len(plan.restored), APPLY_CHUNK):
        with store.transaction(conn):
            conn.executemany("UPDATE manifest SET state = 'done' WHERE path = ? AND state = 'archived'",
                             [(p,) for p in plan.restored[start:start + APPLY_CHUNK]])
    for start in range(0, len(plan.removed), APPLY_CHUNK):
        with store.transaction(conn):
            conn.executemany("DELETE FROM manifest WHERE path = ? AND state != 'archived'",
                             [(p,) for p in plan.removed[start:start + APPLY_CHUNK]])
    for path in plan.removed:
        log.info("sync --full: %s is gone from disk: dropped from the manifest (its S3 copy is kept)", path)


# --- --dry-run -----------------------------------------------------------------------------------------------


def dry_run_listing(conn: sqlite3.Connection, cfg: Config, full: bool) -> int:
    """Print what a pass would upload (path, size) and, with ``--full``, what reconciling would change."""
    extra: list[tuple[str, int, str]] = []
    if full:
        plan = reconcile(conn, cfg)
        for what, paths in (("added", [p for p, _, _ in plan.added]), ("changed", [p for p, _, _ in plan.changed]),
                            ("removed", plan.removed)):
            for path in paths:
                click.echo(f"{what}\t{path}")
        extra = plan.added + plan.changed
    pending = {item.path: item.size for item in iter_pending(conn)}
    pending.update({path: size for path, size, _ in extra})
    for path in sorted(pending):
        click.echo(f"{s3_key(cfg, path)}\t{pending[path]}")
    click.echo(f"ztfd sync --dry-run: {len(pending)} files, {human_bytes(sum(pending.values()))} would be uploaded "
               f"to s3://{cfg.s3.bucket}/{cfg.s3.prefix}")
    return 0


# --- retention -----------------------------------------------------------------------------------------------


def apply_retention(conn: sqlite3.Connection, cfg: Config, client: Any, stop: threading.Event) -> int:
    """Delete local files uploaded and verified more than ``s3.delete_local_after_days`` ago.

    Before deleting, the local file must still have the uploaded size and MD5 (else it changed: leave it for
    ``--full``) and S3 must still hold an object of that size (a HEAD; a lifecycle rule may have expired it).
    The row becomes ``archived`` before the file goes, so a crash in between leaves a file that ``--full`` marks
    done again rather than a row that claims a file which is gone.
    """
    cutoff = time.time() - cfg.s3.delete_local_after_days * 86400
    deleted = 0
    after: tuple[float, str] = (float("-inf"), "")
    while not stop.is_set():
        # Keyset pagination on the manifest_uploaded partial index: only old uploaded rows are read.
        rows = conn.execute(
            "SELECT path, size, md5, uploaded_at FROM manifest WHERE state = 'done' AND uploaded_at < ? "
            "AND (uploaded_at > ? OR (uploaded_at = ? AND path > ?)) ORDER BY uploaded_at, path LIMIT ?",
            (cutoff, after[0], after[0], after[1], RETENTION_PAGE)).fetchall()
        if not rows:
            break
        after = (rows[-1]["uploaded_at"], rows[-1]["path"])
        checked = {row["path"]: (row["md5"], seen) for row in rows if (seen := _may_delete(conn, cfg, client, row))}
        archived = []
        with store.transaction(conn):
            for path, (md5, _) in checked.items():
                # Only rows still describing the checked content: a writer may have recorded new bytes meanwhile.
                if conn.execute("UPDATE manifest SET state = 'archived' WHERE path = ? AND state = 'done' "
                                "AND md5 = ? RETURNING path", (path, md5)).fetchone():
                    archived.append(path)
        for path in archived:
            local = cfg.home / path
            md5, seen = checked[path]
            now_seen = _identity(local)
            if now_seen is None:
                continue  # already gone: archived all the same
            if seen is not True and now_seen != seen:  # rewritten since it was hashed: keep it
                log.warning("sync retention: %s was rewritten while being archived; kept", path)
                conn.execute("UPDATE manifest SET state = 'done' WHERE path = ? AND state = 'archived' AND md5 = ?",
                             (path, md5))
                continue
            with contextlib.suppress(FileNotFoundError):
                local.unlink()
                deleted += 1
            _remove_empty_parents(local.parent, cfg.home)
    if deleted:
        log.info("sync retention: deleted %d local files uploaded more than %g days ago", deleted,
                 cfg.s3.delete_local_after_days)
    return deleted


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    """What tells a rewrite (atomic_write renames a new inode over the path): inode, device, size, mtime."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns


def _may_delete(conn: sqlite3.Connection, cfg: Config, client: Any,
                row: sqlite3.Row) -> tuple[int, int, int, int] | bool:
    """The identity of the local file (or True when it is already gone) when it is what was uploaded and S3
    still holds it; False to keep it. Requeues the file if S3 lost it."""
    local = cfg.home / row["path"]
    seen = _identity(local)
    if seen is None:
        return True  # already gone: archived all the same
    try:
        if seen[2] != row["size"] or files.md5_file(local) != row["md5"] or _identity(local) != seen:
            log.warning("sync retention: %s changed since its upload; kept (run --full)", row["path"])
            return False
    except FileNotFoundError:
        return True
    try:
        with classified_errors(cfg.s3.bucket, cfg.s3.endpoint_url):
            try:
                stored = client.head_object(Bucket=cfg.s3.bucket, Key=s3_key(cfg, row["path"]))["ContentLength"]
            except Exception as exc:
                if not _is_not_found(exc):
                    raise
                stored = None
    except FileError as exc:
        log.warning("sync retention: cannot check %s on S3 (%s); kept", row["path"], exc)
        return False
    if stored != row["size"]:
        log.warning("sync retention: S3 does not hold %s as uploaded (%s bytes); kept and queued for upload",
                    row["path"], stored)
        conn.execute("UPDATE manifest SET state = 'pending' WHERE path = ? AND state = 'done'", (row["path"],))
        return False
    return seen


def _is_not_found(exc: BaseException) -> bool:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound")


def _remove_empty_parents(folder: Path, home: Path) -> None:
    stops = {home / top for top in SYNCED_DIRS}
    while folder not in stops and home in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (or busy): stop climbing
        folder = folder.parent


# --- status --------------------------------------------------------------------------------------------------


def summary(conn: sqlite3.Connection) -> dict[str, Any]:
    """Sync facts for ``ztfd status``: pending files and bytes, done/archived counts, last pass, last error."""
    counts = {state: (0, 0) for state in (PENDING, DONE, ARCHIVED)}
    for row in conn.execute("SELECT state, count(*) AS n, coalesce(sum(size), 0) AS b FROM manifest GROUP BY state"):
        counts[row["state"]] = (row["n"], row["b"])
    failing = conn.execute(
        "SELECT count(*) FROM manifest WHERE state = 'pending' AND attempts > 0").fetchone()[0]

    def status_json(key: str) -> Any:
        found = store.get_status(conn, key)
        if found is None or found[0] is None:
            return None
        try:
            return json.loads(found[0])
        except ValueError:
            return found[0]

    return {
        "pending": counts[PENDING][0], "pending_bytes": counts[PENDING][1],
        "done": counts[DONE][0], "done_bytes": counts[DONE][1],
        "archived": counts[ARCHIVED][0], "failing": failing,
        "last_pass": status_json(STATUS_LAST_PASS), "last_error": status_json(STATUS_LAST_ERROR),
    }
