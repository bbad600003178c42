"""The consumer's last error reaching Kafka, kept where ``ztfd status`` reads it.

librdkafka says why a broker cannot be reached (``Connect to ipv4#127.0.0.1:9 failed: Connection refused``) only
through the consumer's error callback, which logs it (throttled) to ``logs/errors.log``. Status runs in another
process and could otherwise only say "unreachable". So the consumer also keeps the error as the status fact
``kafka_error:<process name>`` (JSON: the brokers, librdkafka's reason and error name, when it began and when it
was last seen), and clears it once the broker answers again. The fact is rewritten at most every
``RECORD_EVERY`` seconds while the same error repeats (librdkafka repeats it every few milliseconds).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from typing import Any

from ztfd import store

log = logging.getLogger(__name__)

STATUS_PREFIX = "kafka_error:"
RECORD_EVERY = 5.0
# librdkafka's summary that adds nothing to the error before it: it never replaces a specific reason.
SUMMARY_CODES = {"_ALL_BROKERS_DOWN"}


class BrokerErrors:
    """One consumer's broker trouble, as a status fact."""

    def __init__(self, name: str, brokers: str) -> None:
        self.key = STATUS_PREFIX + name
        self.brokers = brokers
        self.record: dict[str, Any] | None = None
        self.written_at = 0.0

    def failed(self, conn: sqlite3.Connection, code: str, reason: str) -> None:
        """librdkafka reported an error: keep it (its first time is when errors.log got its line)."""
        now = time.time()
        if self.record is not None and code in SUMMARY_CODES and self.record["code"] not in SUMMARY_CODES:
            code, reason = self.record["code"], self.record["reason"]
        changed = self.record is None or (self.record["code"], self.record["reason"]) != (code, reason)
        since = now if self.record is None else self.record["since"]
        self.record = {"brokers": self.brokers, "code": code, "reason": reason, "since": since, "at": now}
        if changed or now - self.written_at >= RECORD_EVERY:
            self._write(conn, json.dumps(self.record))

    def answered(self, conn: sqlite3.Connection) -> None:
        """The broker answered: the trouble is over."""
        if self.record is None:
            return
        log.info("kafka: %s answers again (after %s)", self.brokers, self.record["reason"])
        self.record = None
        self._write(conn, None)

    def _write(self, conn: sqlite3.Connection, value: str | None) -> None:
        try:
            store.set_status(conn, self.key, value)
            self.written_at = time.time()
        except sqlite3.Error as exc:  # a locked or full store: the log has the error; the stream goes on
            log.debug("could not record %s: %s", self.key, exc)
