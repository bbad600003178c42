"""A real S3 API on 127.0.0.1: moto's server, behind an optional counting proxy that can be cut.

Tests must see what a *child* ``ztfd sync`` process sends (a second pass must send no PUT and no LIST), and must
make S3 unreachable for a while and then come back with its objects intact. Neither is possible from the client
side of another process, so ``S3Server`` puts ``S3Proxy`` in front of moto: every request that passes is counted
by kind (``PUT``, ``LIST``, ``HEAD``, ``UPLOAD_PART``…), ``cut()`` closes the listener and every open connection
(clients get "connection refused", as with a network outage), ``restore()`` listens again on the same port,
``delay`` slows every request (to kill a pass midway), ``fail_with`` answers every request with an S3 error, and
``missing_keys_forbidden`` answers 403 for a missing object, as S3 does to credentials without ``s3:ListBucket``.
``proxy=False`` leaves moto exposed directly, for benchmarks where the proxy's CPU would distort the figures.

moto runs as a subprocess by default (its CPU does not compete with the caller's GIL, and ``INITIAL_NO_AUTH_*``
style settings go through its environment); ``mode="thread"`` uses moto's ``ThreadedMotoServer`` in-process.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from ztfd.daemon import lifecycle
from ztfd.embedded.net import QuietHTTPServer, free_port, wait_for_port

log = logging.getLogger(__name__)

REGION = "us-east-1"
ACCESS_KEY = "ztfd-test-access-key"
SECRET_KEY = "ztfd-test-secret-key"
# Headers that describe one hop of HTTP and must not be forwarded (RFC 9110 §7.6.1), plus Expect, which the
# proxy answers itself.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "expect", "proxy-authorization", "proxy-authenticate"}


def request_kind(method: str, path: str, query: str, headers: Any = None) -> tuple[str, str, str]:
    """Classify a path-style S3 request: ``(kind, bucket, key)``, e.g. ``("PUT", "b", "data/x.json")``."""
    bucket, _, key = urllib.parse.unquote(path.lstrip("/")).partition("/")
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    if not key:
        if method == "GET":
            is_list = not params or {"list-type", "prefix", "delimiter", "marker", "uploads", "versions"} & set(params)
            return ("LIST" if is_list else "GET_BUCKET"), bucket, ""
        return {"HEAD": "HEAD_BUCKET", "PUT": "CREATE_BUCKET", "DELETE": "DELETE_BUCKET",
                "POST": "DELETE_OBJECTS" if "delete" in params else "POST_BUCKET"}.get(method, method), bucket, ""
    if method == "PUT":
        if "uploadId" in params:
            return "UPLOAD_PART", bucket, key
        if headers is not None and headers.get("x-amz-copy-source"):
            return "COPY", bucket, key
        return "PUT", bucket, key
    if method == "POST":
        return ("CREATE_MULTIPART" if "uploads" in params else "COMPLETE_MULTIPART"), bucket, key
    if method == "DELETE":
        return ("ABORT_MULTIPART" if "uploadId" in params else "DELETE"), bucket, key
    return method, bucket, key


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyHTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.connections.add(self.connection)
        self._backend: http.client.HTTPConnection | None = None

    def finish(self) -> None:
        self.server.connections.discard(self.connection)
        if self._backend is not None:
            self._backend.close()
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("s3 proxy: " + format, *args)

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self) -> None:
        proxy = self.server.proxy
        body = self._read_body()
        path, _, query = self.path.partition("?")
        kind = request_kind(self.command, path, query, self.headers)
        proxy.record(kind)
        if proxy.delay:
            time.sleep(proxy.delay)  # simulated latency, not synchronisation
        if proxy.failure is not None:  # a server-side outage: S3 answers, but with an error
            self._send_error(*proxy.failure)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        for attempt in range(2):  # a kept-alive backend connection may have been closed by moto
            if self._backend is None:
                self._backend = http.client.HTTPConnection("127.0.0.1", proxy.backend_port, timeout=120)
            try:
                self._backend.request(self.command, self.path, body=body or None, headers=headers)
                response = self._backend.getresponse()
                data = response.read()
                break
            except (ConnectionError, http.client.HTTPException, OSError):
                self._backend.close()
                self._backend = None
                if attempt:
                    self.close_connection = True
                    return
        if proxy.missing_keys_forbidden and response.status == 404 and kind[0] in ("HEAD", "GET"):
            self._send_error(403, "AccessDenied")  # what S3 answers credentials without s3:ListBucket
            return
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() in HOP_BY_HOP or (name.lower() == "content-length" and self.command != "HEAD"):
                continue
            self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_error(self, status: int, code: str) -> None:
        """An S3 error answer (no body for HEAD, as S3 does: the client then sees only the status)."""
        data = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>answered by the test proxy</Message></Error>").encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(data) if self.command != "HEAD" else 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward  # noqa: N815 - http.server's naming


class _ProxyHTTPServer(QuietHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, proxy: S3Proxy) -> None:
        self.proxy = proxy
        self.connections: set[socket.socket] = set()
        super().__init__(("127.0.0.1", port), _Handler)


class S3Proxy:
    """Forwards HTTP to ``backend_port``, counting requests; ``cut()``/``restore()`` simulate an outage."""

    def __init__(self, backend_port: int, port: int | None = None) -> None:
        self.backend_port = backend_port
        self.port = port or free_port()
        self.delay = 0.0
        self.failure: tuple[int, str] | None = None  # (HTTP status, S3 error code) answered to every request
        # True: a HEAD or GET of a missing object gets 403 AccessDenied instead of 404, as S3 answers credentials
        # that lack s3:ListBucket (moto answers 404 whatever the policy).
        self.missing_keys_forbidden = False
        self.requests: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._server: _ProxyHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def record(self, kind: tuple[str, str, str]) -> None:
        with self._lock:
            self.requests.append(kind)

    def counts(self, bucket: str | None = None) -> collections.Counter[str]:
        """Requests seen so far by kind (of one bucket when given), e.g. ``{"PUT": 12, "HEAD": 1}``."""
        with self._lock:
            return collections.Counter(kind for kind, b, _ in self.requests if bucket in (None, b))

    def keys(self, kind: str = "PUT", bucket: str | None = None) -> collections.Counter[str]:
        """How many requests of ``kind`` each key received (e.g. PUTs per key, to prove no double upload)."""
        with self._lock:
            return collections.Counter(key for k, b, key in self.requests if k == kind and bucket in (None, b))

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()

    def fail_with(self, status: int | None = 503, code: str = "SlowDown") -> None:
        """Answer every request with this S3 error (e.g. 503 SlowDown, 500 InternalError); ``None`` stops it."""
        self.failure = None if status is None else (status, code)

    @property
    def is_cut(self) -> bool:
        return self._server is None

    def start(self) -> S3Proxy:
        self._server = _ProxyHTTPServer(self.port, self)
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-proxy", daemon=True)
        self._thread.start()
        return self

    restore = start

    def cut(self) -> None:
        """Stop listening and drop every open connection: clients now get "connection refused"."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        for connection in list(server.connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(10)

    stop = cut


class S3Server:
    """moto's S3 on 127.0.0.1 (``start()``/``stop()`` or a context manager); ``endpoint_url`` is what clients use.

    ``proxy`` (default on) counts requests and can be cut (see the module docstring); ``environ`` is added to the
    moto subprocess's environment (e.g. ``{"INITIAL_NO_AUTH_ACTION_COUNT": "1"}`` to make it check credentials
    after the first request).
    """

    def __init__(self, mode: str = "process", proxy: bool = True, log_path: Path | None = None,
                 environ: dict[str, str] | None = None) -> None:
        if mode not in ("process", "thread"):
            raise ValueError(f"mode must be 'process' or 'thread', not {mode!r}")
        self.mode = mode
        self.use_proxy = proxy
        self.log_path = log_path
        self.environ = dict(environ or {})
        self.backend_port = free_port()
        self.proxy: S3Proxy | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._thread_server: Any = None

    @property
    def endpoint_url(self) -> str:
        port = self.proxy.port if self.proxy is not None else self.backend_port
        return f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 30.0) -> S3Server:
        if self.mode == "process":
            output = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.backend_port)],
                stdout=output, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **self.environ},
            )
        else:
            from moto.server import ThreadedMotoServer

            self._thread_server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.backend_port, verbose=False)
            self._thread_server.start()
        try:
            wait_for_port(self.backend_port, timeout)
        except TimeoutError:
            self.stop()
            raise
        if self.use_proxy:
            self.proxy = S3Proxy(self.backend_port).start()
        log.info("s3 (moto) listening on %s", self.endpoint_url)
        return self

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        if self.process is not None:
            lifecycle.terminate([self.process], 10, group=True)
            self.process = None
        if self._thread_server is not None:
            self._thread_server.stop()
            self._thread_server = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """Environment for a child process that should reach this server with the dummy credentials only.

        Shared AWS config files are pointed away and the instance-metadata lookup is disabled, so nothing from
        the machine's real AWS set-up (or the network beyond 127.0.0.1) can leak into a test.
        """
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, direct: bool = False) -> Any:
        """A boto3 S3 client with the dummy credentials; ``direct`` bypasses the proxy (not counted, never cut)."""
        import boto3
        from botocore.config import Config

        url = f"http://127.0.0.1:{self.backend_port}" if direct else self.endpoint_url
        return boto3.session.Session().client(
            "s3", endpoint_url=url, region_name=REGION, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                          max_pool_connections=32),
        )

    def arrow_filesystem(self, direct: bool = False) -> Any:
        """pyarrow's S3 filesystem on this server with the dummy credentials (``direct`` as for ``client``)."""
        from pyarrow import fs

        url = f"http://127.0.0.1:{self.backend_port}" if direct else self.endpoint_url
        return fs.S3FileSystem(endpoint_override=url.removeprefix("http://"), scheme="http", region=REGION,
                               access_key=ACCESS_KEY, secret_key=SECRET_KEY)

    def create_bucket(self, name: str) -> None:
        self.client(direct=True).create_bucket(Bucket=name)

    def objects(self, bucket: str) -> dict[str, tuple[int, str]]:
        """Every object in ``bucket`` as ``{key: (size, etag)}``, read past the proxy (so it is not counted)."""
        client = self.client(direct=True)
        result: dict[str, tuple[int, str]] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                result[item["Key"]] = (item["Size"], item["ETag"].strip('"'))
        return result
