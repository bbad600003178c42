"""``confluent-avro``: Confluent's wire format, as Rubin's alert stream writes it: byte 0 is 0, bytes 1-4 a
big-endian schema id, the rest one schemaless Avro record of that schema.

Schemas come from ``kafka.schema_registry_url`` (``GET <url>/schemas/ids/<id>`` answers ``{"schema": "<the
schema's JSON as a string>"}``), fetched once per id and kept in the store (``ztfd.store.avro_schemas``) and in memory.
A registry that needs basic auth takes it in the URL (``https://user:password@host``, percent-encoded): it is sent
as an ``Authorization`` header, and the URL is kept and logged without it.

A 4xx answer is final for that id (404: unknown; 400, 422…): the message is rejected with the reason, and the
answer is remembered, so that the next messages of that id are rejected without asking again. Answers that say
nothing about the id are not final: 401, 403 and 407 (the credentials: a configuration to fix, not a bad message),
408 and 429 (slow down), 5xx, timeouts and an unreachable registry are not the message's fault
(``SourceUnavailableError``: the consumer stops without storing the batch, and is restarted to read it again).
"""

from __future__ import annotations

import base64
import json
import logging
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, NamedTuple

from ztfd.sources import Alert, InvalidMessageError, SourceUnavailableError, register
from ztfd.sources.avro import SchemaCache, read_schemaless
from ztfd.sources.packets import alert_of

log = logging.getLogger(__name__)

HEADER = struct.Struct(">bI")
MAGIC = 0
TRIES = 3  # registry requests per schema before giving up for now
MAX_SCHEMA_BYTES = 4 * 1024 * 1024


# 4xx answers that say nothing about the schema id: about our credentials, or asking us to slow down.
NOT_ABOUT_THE_ID = (401, 403, 407, 408, 429)


class Registry(NamedTuple):
    """A registry's URL without credentials (what is kept and shown), and its ``Authorization`` header, if any."""

    url: str
    authorization: str | None

    @classmethod
    def of(cls, configured: str) -> Registry:
        parts = urllib.parse.urlsplit(configured.rstrip("/"))
        if parts.username is None:
            return cls(configured.rstrip("/"), None)
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if parts.port is not None:
            netloc += f":{parts.port}"
        return cls(urllib.parse.urlunsplit(parts._replace(netloc=netloc)), f"Basic {token}")


def fetch_schema(registry: Registry, schema_id: int, timeout: float) -> str:
    """The schema text the registry serves for ``schema_id``."""
    request = urllib.request.Request(f"{registry.url}/schemas/ids/{schema_id}")
    if registry.authorization:
        request.add_header("Authorization", registry.authorization)
    problem = ""
    for attempt in range(1, TRIES + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read(MAX_SCHEMA_BYTES + 1)
            return _schema_text(body, schema_id)
        except urllib.error.HTTPError as exc:
            if 400 <= exc.code < 500 and exc.code not in NOT_ABOUT_THE_ID:
                what = "unknown to" if exc.code == 404 else "refused by"
                raise InvalidMessageError(f"schema id {schema_id} is {what} the schema registry ({exc.code})") from None
            problem = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            problem = str(getattr(exc, "reason", exc))
        if attempt < TRIES:
            time.sleep(0.5 * attempt)
    raise SourceUnavailableError(f"schema registry unreachable for schema id {schema_id}: {problem}")


def _schema_text(body: bytes, schema_id: int) -> str:
    if len(body) > MAX_SCHEMA_BYTES:
        raise SourceUnavailableError(f"schema registry sent more than {MAX_SCHEMA_BYTES} bytes for id {schema_id}")
    try:
        answer = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SourceUnavailableError(f"schema registry's answer for id {schema_id} is not JSON") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("schema"), str):
        raise SourceUnavailableError(f"schema registry's answer for id {schema_id} has no schema string")
    if answer.get("schemaType", "AVRO") != "AVRO":
        raise InvalidMessageError(f"schema id {schema_id} is a {answer['schemaType']} schema, not Avro")
    return answer["schema"]


@register("confluent-avro")
class ConfluentAvro:
    format = "confluent-avro"
    decodes_alone = False  # it reads and writes the store's schema cache: never decoded in a forked worker

    def __init__(self, registry_url: str = "", schema_cache: Any = None, registry_timeout: float = 30.0,
                 **_settings: Any) -> None:
        if not registry_url:
            raise ValueError("format confluent-avro needs kafka.schema_registry_url")
        self.source = Registry.of(registry_url)
        self.registry = self.source.url  # the store's key: never the credentials
        self.stored: Any = schema_cache  # ztfd.store.avro_schemas.StoredSchemas, or None
        self.timeout = registry_timeout
        self.parsed = SchemaCache()
        self.by_id: dict[int, Any] = {}
        self.refused: dict[int, str] = {}  # schema id -> the registry's final answer (a 4xx), as a reason

    def decode(self, value: bytes | None, key: bytes | None) -> Alert:
        if not value or len(value) <= HEADER.size:
            raise InvalidMessageError("shorter than the Confluent wire format's 5-byte header")
        magic, schema_id = HEADER.unpack_from(value)
        if magic != MAGIC:
            raise InvalidMessageError(f"not the Confluent wire format (first byte {value[0]}, not 0)")
        return alert_of(read_schemaless(value[HEADER.size:], self.schema(schema_id)), value)

    def schema(self, schema_id: int) -> Any:
        """The parsed schema of ``schema_id``: from memory, else the store, else the registry (then kept)."""
        parsed = self.by_id.get(schema_id)
        if parsed is not None:
            return parsed
        if schema_id in self.refused:
            raise InvalidMessageError(self.refused[schema_id])
        text = self.stored.get(self.registry, schema_id) if self.stored is not None else None
        if text is None:
            try:
                text = fetch_schema(self.source, schema_id, self.timeout)
            except InvalidMessageError as exc:
                self.refused[schema_id] = str(exc)
                raise
            log.info("schema id %d fetched from the schema registry", schema_id)
            self._keep(schema_id, text)
        try:
            parsed = self.parsed.get(text.encode())
        except ValueError as exc:
            raise InvalidMessageError(f"schema id {schema_id} is not an Avro schema: {exc}") from None
        self.by_id[schema_id] = parsed
        return parsed

    def _keep(self, schema_id: int, text: str) -> None:
        if self.stored is None:
            return
        try:
            self.stored.put(self.registry, schema_id, text)
        except Exception as exc:  # kept in memory all the same; the next start fetches it again
            log.warning("could not keep schema id %d in the store: %s", schema_id, exc)
