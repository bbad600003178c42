"""Sync's facts for ``ztfd status``: what each pass records, and the summary status reads back.

A pass stores ``sync.last_pass`` (JSON of its figures) and ``sync.last_error`` (JSON ``{"at", "message"}``, or
NULL after a clean pass) in the store's ``status`` table; the manifest gives the counts per state.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from typing import Any

from ztfd import store
from ztfd.store import deletions, manifest
from ztfd.store.manifest import FileState
from ztfd.sync.result import PassResult

log = logging.getLogger(__name__)

STATUS_LAST_PASS, STATUS_LAST_ERROR = "sync.last_pass", "sync.last_error"


def record_pass(conn: sqlite3.Connection, result: PassResult, started: float, full: bool) -> None:
    """Store ``sync.last_pass`` and ``sync.last_error`` (left as it was after an incomplete pass with no error)."""
    record = {"started_at": started, "finished_at": time.time(), "files": result.files, "bytes": result.bytes,
              "seconds": round(result.seconds, 3), "failures": result.failures, "pending": result.pending,
              "deleted_local": result.deleted_local, "deleted_remote": result.deleted_remote,
              "unverified": result.unverified, "requeued": result.requeued,
              "full": full, "ok": result.ok, "error": result.error}
    problem = result.error or (f"{result.failures} files failed" if result.failures else None) or result.warning
    try:
        with store.transaction(conn):
            store.set_status(conn, STATUS_LAST_PASS, json.dumps(record))
            if problem or result.ok:
                store.set_status(conn, STATUS_LAST_ERROR,
                                 json.dumps({"at": time.time(), "message": problem}) if problem else None)
    except sqlite3.Error as exc:
        log.warning("sync: cannot record the pass status: %s", exc)


def summary(conn: sqlite3.Connection) -> dict[str, Any]:
    """Pending files and bytes, done/archived counts, failing and unverified files, replaced archive files still to
    delete from S3, last pass, last error."""
    totals = manifest.state_totals(conn)
    return {
        "pending": totals[FileState.PENDING].files, "pending_bytes": totals[FileState.PENDING].bytes,
        "done": totals[FileState.DONE].files, "done_bytes": totals[FileState.DONE].bytes,
        "archived": totals[FileState.ARCHIVED].files, "failing": manifest.count_failing(conn),
        "unverified": manifest.count_unverified(conn), "deleting": deletions.count(conn),
        "last_pass": _status_json(conn, STATUS_LAST_PASS), "last_error": _status_json(conn, STATUS_LAST_ERROR),
    }


def _status_json(conn: sqlite3.Connection, key: str) -> Any:
    found = store.get_status(conn, key)
    if found is None or found[0] is None:
        return None
    try:
        return json.loads(found[0])
    except ValueError:
        return found[0]
