"""A Confluent-style schema registry on 127.0.0.1, read-only, for tests, the demo and the bench.

It answers the one route ztfd uses, as Rubin's registry does: ``GET /schemas/ids/<id>`` -> ``{"schema": "<the
schema's JSON as a string>"}`` (200), or ``{"error_code": 40403, "message": "Schema not found"}`` (404). It logs
every request (``requests``), so that tests can check a schema is fetched once, and it can be made to answer 503
for a while (``unavailable``), to answer a status of its choosing for an id (``answer_status``), and to require
HTTP basic auth (``credentials``: 401 without them).
Run it standalone with ``python -m ztfd.embedded.registry --schema ID=FILE``.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ztfd.daemon import lifecycle
from ztfd.embedded.net import free_port

log = logging.getLogger(__name__)

ROUTE = "/schemas/ids/"


class SchemaRegistry:
    """``start()``/``stop()`` or a ``with`` block; ``add`` a schema (a dict or its JSON text) under an id."""

    def __init__(self, schemas: dict[int, Any] | None = None, port: int | None = None,
                 credentials: tuple[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.credentials = credentials  # (user, password) basic auth must present, or None
        self.statuses: dict[int, int] = {}  # schema id -> the error status to answer for it
        self._schemas: dict[int, str] = {}
        self._lock = threading.Lock()
        self._log: list[int | None] = []  # schema id of every request (None: not a schema route)
        self.unavailable = 0  # requests still to answer 503
        self._server: ThreadingHTTPServer | None = None
        for schema_id, schema in (schemas or {}).items():
            self.add(schema_id, schema)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, schema_id: int, schema: Any) -> None:
        with self._lock:
            self._schemas[schema_id] = schema if isinstance(schema, str) else json.dumps(schema)

    def answer_status(self, schema_id: int, status: int) -> None:
        """Answer ``status`` (an error: 400, 422, 500…) for ``schema_id`` from now on."""
        with self._lock:
            self.statuses[schema_id] = status

    def authorized(self, header: str | None) -> bool:
        if self.credentials is None:
            return True
        expected = base64.b64encode(":".join(self.credentials).encode()).decode("ascii")
        return header == f"Basic {expected}"

    def requests(self, schema_id: int | None = None) -> int:
        """How many requests arrived (for ``schema_id`` only, when given)."""
        with self._lock:
            return sum(1 for seen in self._log if schema_id is None or seen == schema_id)

    def start(self) -> SchemaRegistry:
        handler = type("Handler", (_Handler,), {"registry": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="schema-registry", daemon=True).start()
        log.info("schema registry listening on %s (%d schemas)", self.url, len(self._schemas))
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> SchemaRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _answer(self, path: str, authorization: str | None) -> tuple[int, dict[str, Any]]:
        schema_id = int(path[len(ROUTE):]) if path.startswith(ROUTE) and path[len(ROUTE):].isdigit() else None
        with self._lock:
            self._log.append(schema_id)
            if not self.authorized(authorization):
                return 401, {"error_code": 401, "message": "Unauthorized"}
            if schema_id in self.statuses:
                return self.statuses[schema_id], {"error_code": self.statuses[schema_id], "message": "(injected)"}
            if self.unavailable > 0:
                self.unavailable -= 1
                return 503, {"error_code": 50301, "message": "unavailable (injected)"}
            text = self._schemas.get(schema_id) if schema_id is not None else None
        if text is None:
            return 404, {"error_code": 40403, "message": "Schema not found"}
        return 200, {"schema": text}


class _Handler(BaseHTTPRequestHandler):
    registry: SchemaRegistry
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        status, answer = self.registry._answer(self.path.split("?", 1)[0], self.headers.get("Authorization"))
        body = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main(argv: list[str] | None = None) -> int:
    """Serve the schemas given as ``--schema ID=FILE`` (an .avsc) until SIGINT/SIGTERM; print the URL."""
    parser = argparse.ArgumentParser(prog="python -m ztfd.embedded.registry", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--schema", action="append", default=[], metavar="ID=FILE", help="a schema to serve")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    schemas = {}
    for item in args.schema:
        schema_id, _, path = item.partition("=")
        schemas[int(schema_id)] = Path(path).read_text()
    with lifecycle.stop_on_signals() as stop, SchemaRegistry(schemas, port=args.port or None) as registry:
        print(registry.url, flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
