"""S3 as the syncer uses it: the client, the object keys, and what each of S3's errors means for a pass.

An error ends the pass for every file (``FatalError``: a missing bucket, refused credentials, denied access),
ends it without blaming any file (``OutageError``: S3 unreachable), or is one file's (``FileError``; its
``ServerError`` kind, 5xx or throttling, becomes an outage when it persists). Messages name the bucket and the
error code, never a credential. A 403 with no such code (``ForbiddenError``) is ambiguous: S3 answers it for a
missing object to credentials without ``s3:ListBucket``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from ztfd import __version__
from ztfd.config import Config

THROTTLING_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "ServiceUnavailable",
                    "InternalError", "RequestTimeout", "TooManyRequests"}
CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                    "TokenRefreshRequired", "AuthorizationHeaderMalformed", "InvalidClientTokenId"}
NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
# Content-Type by the end of the file name, longest first, so that a browser shows a report rather than saving it.
# A stamp .fits.gz is a gzip file (Content-Encoding would make browsers save the inflated FITS under a .gz name).
CONTENT_TYPES = {
    ".fits.gz": "application/gzip", ".html": "text/html; charset=utf-8", ".json": "application/json",
    ".jsonl": "application/x-ndjson", ".png": "image/png", ".avro": "application/avro",
    ".parquet": "application/vnd.apache.parquet", ".gz": "application/gzip", ".fits": "application/fits",
}


class FatalError(Exception):
    """Ends the pass for every file: a missing bucket, refused credentials, denied access."""


class OutageError(Exception):
    """S3 cannot be reached: end the pass without blaming any file, try again later."""


class FileError(Exception):
    """This file could not be uploaded or verified; the others go on."""


class ServerError(FileError):
    """S3 answered 5xx or throttled even after botocore's retries: this file, or S3 as a whole if it persists."""


class ForbiddenError(FileError):
    """HTTP 403 without a code that names the cause (a HEAD has no body to carry one)."""


class UploadInterruptedError(Exception):
    """The pass is stopping (SIGTERM, or another upload hit a fatal error) before this file was finished."""


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


def listed(client: Any, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
    """Every object under ``prefix`` (``list_objects_v2``'s entries: Key, Size, ETag, LastModified), in key order,
    a page of 1,000 per request."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        yield from page.get("Contents", [])


def folders(client: Any, bucket: str, prefix: str) -> list[str]:
    """The "folders" directly under ``prefix`` (``prefix`` ends with "/"), each with its trailing "/": one request
    per 1,000 of them, however many objects they hold."""
    found = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        found += [entry["Prefix"] for entry in page.get("CommonPrefixes", [])]
    return found


def content_type(path: str) -> str:
    """The Content-Type an object is uploaded with, from its file name (``application/octet-stream`` if unknown)."""
    name = os.path.basename(path).lower()
    for ending in sorted(CONTENT_TYPES, key=len, reverse=True):
        if name.endswith(ending):
            return CONTENT_TYPES[ending]
    return "application/octet-stream"


def is_not_found(exc: BaseException) -> bool:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code")) in NOT_FOUND_CODES


@contextlib.contextmanager
def classified_errors(bucket: str, endpoint_url: str) -> Iterator[None]:
    """Turn botocore's errors (after its own retries) into fatal, outage or per-file failures, in one line each."""
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
        raise _classified(exc.response, bucket) from None
    except bx.BotoCoreError as exc:
        raise FileError(f"{type(exc).__name__}: {exc}") from None


def _classified(response: dict[str, Any], bucket: str) -> Exception:
    error = response.get("Error", {})
    code = str(error.get("Code", "?"))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code == "NoSuchBucket":
        return FatalError(f"bucket {bucket!r} does not exist (s3.bucket)")
    if code in CREDENTIAL_CODES:
        return FatalError(f"S3 refused the credentials ({code}): check AWS_ACCESS_KEY_ID / AWS_PROFILE "
                          "or the instance role")
    if code in ("AccessDenied", "AllAccessDisabled", "AccountProblem"):
        return FatalError(f"access denied to bucket {bucket!r} ({code}): the credentials need s3:PutObject on it")
    if code in ("PermanentRedirect", "IllegalLocationConstraintException") or status == 301:
        return FatalError(f"bucket {bucket!r} is in another region ({code}): set s3.region")
    if status == 403:
        what = "HTTP 403" if code == "403" else f"HTTP 403 {code}"
        return ForbiddenError(f"{what}: S3 answers 403 for a missing object to credentials without s3:ListBucket, "
                              "and for any object without s3:GetObject")
    message = f"S3 error {code} (HTTP {status}): {error.get('Message', '')}".strip()
    if code in THROTTLING_CODES or (isinstance(status, int) and status >= 500):
        return ServerError(message)
    return FileError(message)
