"""ALeRCE detections lists (the raw answers) kept for a short time, shared by every stamp worker.

After downtime an object has several alerts queued at once, and its detections list (fetched to choose each one's
candid) is the same for all of them: the first worker to fetch it keeps it here, and the others use it while it is
fresh (``ztfd.stamps.providers.alerce_ztf``), whichever worker claimed them.
Rows older than the freshness are dropped on
the next save. (Not the ``detections`` table of ``store.report``, which keeps light curves for night reports.)
"""

from __future__ import annotations

import sqlite3
import time

from ztfd.store.db import transaction


def fresh_detections(
    conn: sqlite3.Connection, object_id: str, max_age: float, now: float | None = None
) -> bytes | None:
    """The object's detections body, if one was kept less than ``max_age`` seconds ago."""
    now = time.time() if now is None else now
    row = conn.execute("SELECT body FROM detection_lists WHERE object_id = ? AND fetched_at >= ?",
                       (object_id, now - max_age)).fetchone()
    return None if row is None else bytes(row[0])


def keep_detections(conn: sqlite3.Connection, object_id: str, body: bytes, max_age: float,
                    now: float | None = None) -> None:
    """Keep a fetched detections body (one transaction), and drop those older than ``max_age``."""
    now = time.time() if now is None else now
    with transaction(conn):
        conn.execute("INSERT INTO detection_lists (object_id, body, fetched_at) VALUES (?, ?, ?) "
                     "ON CONFLICT (object_id) DO UPDATE SET body = excluded.body, fetched_at = excluded.fetched_at",
                     (object_id, body, now))
        conn.execute("DELETE FROM detection_lists WHERE fetched_at < ?", (now - max_age,))
