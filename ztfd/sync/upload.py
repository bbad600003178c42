"""One file to S3, verified: what the upload pool's threads run (the boto3 client is thread-safe).

A file below ``s3.multipart_threshold`` goes as one PUT with ``Content-MD5`` (S3 rejects a body that does not
match) and its ETag must equal the MD5 (with SSE-KMS, where the ETag is not an MD5, S3's Content-MD5 check
stands). A larger one goes as a multipart upload, each part with its MD5; the final ETag must equal S3's
composite MD5 (``<md5 of the part md5s>-<parts>``), else the object's size is checked with a HEAD.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ztfd.config import Config
from ztfd.store.manifest import FileRecord, UploadedFile
from ztfd.sync.s3 import FileError, UploadInterruptedError, classified_errors, content_type, s3_key

IN_MEMORY_MAX = 8 * 1024 * 1024  # single-part uploads up to this size are read into memory; larger ones stream
PART_SIZE = 16 * 1024 * 1024  # multipart part size (at most), S3 allows at most 10,000 parts of at least 5 MiB
MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PARTS = 10_000


def part_size(file_size: int, multipart_threshold: int) -> int:
    """The part size of a multipart upload of ``file_size`` bytes (S3: 5 MiB at least, 10,000 parts at most)."""
    return max(MIN_PART_SIZE, min(PART_SIZE, multipart_threshold), -(-file_size // MAX_PARTS))


def md5_base64(digest: Any) -> str:
    return base64.b64encode(digest.digest()).decode()


@dataclass
class _Parts:
    """The parts of a multipart upload sent so far, and the hashes that verify the whole."""

    whole: Any = field(default_factory=lambda: hashlib.md5(usedforsecurity=False))
    digests: list[bytes] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    size: int = 0

    def add(self, chunk: bytes, digest: Any, etag: str) -> None:
        self.whole.update(chunk)
        self.digests.append(digest.digest())
        self.sent.append({"PartNumber": len(self.sent) + 1, "ETag": etag})
        self.size += len(chunk)

    @property
    def composite_etag(self) -> str:
        return f"{hashlib.md5(b''.join(self.digests), usedforsecurity=False).hexdigest()}-{len(self.digests)}"


class Uploader:
    """Uploads one manifest row; ``abort`` set by the pass makes a running upload stop at its next part."""

    def __init__(self, cfg: Config, client: Any, abort: threading.Event) -> None:
        self.cfg = cfg
        self.client = client
        self.abort = abort
        self.bucket = cfg.s3.bucket

    def upload(self, item: FileRecord) -> UploadedFile:
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

    def _single(self, item: FileRecord, local: Path, key: str) -> UploadedFile:
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
                Bucket=self.bucket, Key=key, Body=body, ContentLength=size, ContentMD5=md5_base64(digest),
                ContentType=content_type(item.path))
        etag = response.get("ETag", "").strip('"')
        # With SSE-KMS the ETag is not the MD5; S3 has then checked Content-MD5 against the body it received.
        if etag != md5 and response.get("ServerSideEncryption") != "aws:kms":
            raise FileError(f"S3 answered ETag {etag!r} for content with MD5 {md5}")
        return UploadedFile(item.path, item.md5, size, md5, etag)

    def _multipart(self, item: FileRecord, local: Path, key: str) -> UploadedFile:
        upload_id = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=key, ContentType=content_type(item.path))["UploadId"]
        completed = False
        try:
            parts = self._send_parts(local, key, upload_id)
            response = self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts.sent})
            completed = True
        finally:
            if not completed:
                with contextlib.suppress(Exception):
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        etag = response.get("ETag", "").strip('"')
        if etag != parts.composite_etag:
            stored = self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
            if stored != parts.size:
                raise FileError(f"S3 holds {stored} bytes after a multipart upload of {parts.size}")
        return UploadedFile(item.path, item.md5, parts.size, parts.whole.hexdigest(), etag)

    def _send_parts(self, local: Path, key: str, upload_id: str) -> _Parts:
        parts = _Parts()
        with local.open("rb") as handle:
            size = part_size(os.fstat(handle.fileno()).st_size, self.cfg.s3.multipart_threshold)
            while chunk := handle.read(size):
                if self.abort.is_set():
                    raise UploadInterruptedError
                digest = hashlib.md5(chunk, usedforsecurity=False)
                response = self.client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=len(parts.sent) + 1, Body=chunk,
                    ContentMD5=md5_base64(digest))
                parts.add(chunk, digest, response["ETag"])
        return parts
