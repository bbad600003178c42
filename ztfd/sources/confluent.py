"""``confluent-avro``: Confluent's wire format, as Rubin's alert stream writes it: byte 0 is 0, bytes 1-4 a
big-endian schema id, the rest one schemaless Avro record of that schema.

Schemas come from ``kafka.schema_registry_url`` (``GET <url>/schemas/ids/<id>`` answers ``{"schema": "<the
schema's JSON as a string>"}``), fetched once per id and kept in the store (``ztfd.store.avro_schemas``) and in memory.
An id the registry does not know (404) rejects the message; a registry that cannot be reached, or answers 5xx,
is not the message's fault (``SourceUnavailableError``: the consumer stops without storing the batch, and is
restarted to read it again).
"""

from __future__ import annotations

import json
import logging
import struct
import time
import urllib.error
import urllib.request
from typing import Any

from ztfd.sources import Alert, InvalidMessageError, SourceUnavailableError, register
from ztfd.sources.avro import SchemaCache, read_schemaless
from ztfd.sources.packets import alert_of

log = logging.getLogger(__name__)

HEADER = struct.Struct(">bI")
MAGIC = 0
TRIES = 3  # registry requests per schema before giving up for now
MAX_SCHEMA_BYTES = 4 * 1024 * 1024


def fetch_schema(registry_url: str, schema_id: int, timeout: float) -> str:
    """The schema text the registry serves for ``schema_id``."""
    url = f"{registry_url.rstrip('/')}/schemas/ids/{schema_id}"
    problem = ""
    for attempt in range(1, TRIES + 1):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                body = response.read(MAX_SCHEMA_BYTES + 1)
            return _schema_text(body, schema_id)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise InvalidMessageError(f"schema id {schema_id} is unknown to the schema registry (404)") from None
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

    def __init__(self, registry_url: str = "", schema_cache: Any = None, registry_timeout: float = 30.0,
                 **_settings: Any) -> None:
        if not registry_url:
            raise ValueError("format confluent-avro needs kafka.schema_registry_url")
        self.registry = registry_url.rstrip("/")
        self.stored: Any = schema_cache  # ztfd.store.avro_schemas.StoredSchemas, or None
        self.timeout = registry_timeout
        self.parsed = SchemaCache()
        self.by_id: dict[int, Any] = {}

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
        text = self.stored.get(self.registry, schema_id) if self.stored is not None else None
        if text is None:
            text = fetch_schema(self.registry, schema_id, self.timeout)
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
