"""Steps from one schema version to the next: ``STEPS[n]`` turns a version-n store into version n+1.

Each step runs inside the one transaction of ``db.connect``'s migration, before ``schema.SCHEMA`` (which then
creates tables and indexes the step did not), so a step only has to reshape or move what exists.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from ztfd.store.schema import ADDED_COLUMNS, FAILING_SCHEMA, RECEIVED_SCHEMA


def _v1_to_v2(conn: sqlite3.Connection) -> None:
    """Jobs refer to their alert instead of carrying a JSON payload, and what a finished job learned moves from
    its JSON result to the alert's stamp record (the latest done job of each alert wins, as replay read it); the
    manifest becomes a WITHOUT ROWID table."""
    conn.execute(
        "CREATE TABLE stamps (alert_id INTEGER PRIMARY KEY, detection_id TEXT NOT NULL, detection_mjd REAL, "
        "fetched INTEGER NOT NULL DEFAULT 0, preview INTEGER NOT NULL DEFAULT 0, worker TEXT, done_at REAL NOT NULL)"
    )
    conn.execute(
        "INSERT OR REPLACE INTO stamps (alert_id, detection_id, detection_mjd, fetched, preview, worker, done_at) "
        "SELECT json_extract(payload, '$.alert_id'), CAST(json_extract(result, '$.candid') AS TEXT), "
        "json_extract(result, '$.mjd'), "
        "(SELECT coalesce(sum(CASE value WHEN 'science' THEN 1 WHEN 'template' THEN 2 WHEN 'difference' THEN 4 "
        "  ELSE 0 END), 0) FROM json_each(result, '$.fetched')), "
        "coalesce(json_extract(result, '$.preview'), 0), json_extract(result, '$.worker'), updated_at "
        "FROM jobs WHERE state = 'done' AND json_valid(payload) AND json_valid(result) "
        "AND json_type(payload, '$.alert_id') = 'integer' AND json_extract(result, '$.candid') IS NOT NULL "
        "ORDER BY id"
    )
    conn.execute(
        "CREATE TABLE jobs_v2 (id INTEGER PRIMARY KEY, alert_id INTEGER NOT NULL, force INTEGER NOT NULL DEFAULT 0, "
        "state TEXT NOT NULL DEFAULT 'ready', attempts INTEGER NOT NULL DEFAULT 0, not_before REAL NOT NULL DEFAULT 0, "
        "waiting TEXT, unavailable_since REAL, lease_until REAL, owner TEXT, last_error TEXT, batch TEXT, "
        "dedupe_key TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL)"
    )
    # A job without a usable alert reference (none were ever written) would stay unclaimable: it is dropped.
    conn.execute(
        "INSERT INTO jobs_v2 (id, alert_id, force, state, attempts, not_before, waiting, unavailable_since, "
        "lease_until, owner, last_error, batch, dedupe_key, created_at, updated_at) "
        "SELECT id, json_extract(payload, '$.alert_id'), coalesce(json_extract(payload, '$.force'), 0), state, "
        "attempts, not_before, waiting, unavailable_since, lease_until, owner, last_error, batch, dedupe_key, "
        "created_at, updated_at FROM jobs "
        "WHERE json_valid(payload) AND json_type(payload, '$.alert_id') = 'integer'"
    )
    conn.execute("DROP TABLE jobs")
    conn.execute("ALTER TABLE jobs_v2 RENAME TO jobs")
    # The manifest keeps its rows, now in a WITHOUT ROWID table (the path stored once, not also in an index).
    conn.execute(
        "CREATE TABLE manifest_v2 (path TEXT PRIMARY KEY, size INTEGER NOT NULL, md5 TEXT NOT NULL, "
        "state TEXT NOT NULL DEFAULT 'pending', recorded_at REAL NOT NULL, uploaded_at REAL, etag TEXT, "
        "attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT) WITHOUT ROWID"
    )
    conn.execute("INSERT INTO manifest_v2 SELECT path, size, md5, state, recorded_at, uploaded_at, etag, attempts, "
                 "last_error FROM manifest")
    conn.execute("DROP TABLE manifest")
    conn.execute("ALTER TABLE manifest_v2 RENAME TO manifest")


def add_missing_columns(conn: sqlite3.Connection) -> None:
    """Add each column of ``schema.ADDED_COLUMNS`` a table lacks (version 3: the alert's survey and the detection
    its message names). Also run after ``SCHEMA`` in a new store, whose ``CREATE TABLE`` does not list them."""
    for table, column, declaration in ADDED_COLUMNS:
        if column not in {row["name"] for row in conn.execute(f"PRAGMA table_info({table})")}:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")


def _v4_to_v5(conn: sqlite3.Connection) -> None:
    """Alerts are counted once per batch by the store (the per-row trigger goes), and the alerts received per
    day come from ``counter_received``, seeded here from the alerts kept, instead of an index on every alert; a
    forgotten manifest row keeps its file counted."""
    conn.execute("DROP TRIGGER IF EXISTS count_alert")
    conn.execute("DROP TRIGGER IF EXISTS count_file_delete")  # SCHEMA creates its version-5 form
    conn.execute("DROP INDEX IF EXISTS alerts_received")
    conn.execute(RECEIVED_SCHEMA)
    conn.execute(
        "INSERT INTO counter_received (day, topic, alerts) SELECT date(received_at, 'unixepoch'), topic, count(*) "
        "FROM alerts GROUP BY 1, 2 ON CONFLICT (day, topic) DO UPDATE SET alerts = excluded.alerts")


def _v5_to_v6(conn: sqlite3.Connection) -> None:
    """The pending files' index is ordered by record time instead of path (``SCHEMA`` creates its new form)."""
    conn.execute("DROP INDEX IF EXISTS manifest_pending")


def _v6_to_v7(conn: sqlite3.Connection) -> None:
    """A job keeps the class of its last failed attempt (``jobs.failure``), and the failure counter counts that
    column instead of matching the reason's words: the old trigger goes (``SCHEMA`` creates the new one). Rows
    already failed keep no class; what they counted stays counted."""
    add_missing_columns(conn)
    conn.execute("DROP TRIGGER IF EXISTS count_stamp_failure")


def _v7_to_v8(conn: sqlite3.Connection) -> None:
    """Failing uploads are counted by triggers (``schema.FAILING_SCHEMA``, created after this step): the count
    starts from the rows."""
    conn.execute(FAILING_SCHEMA.split(";")[0])
    conn.execute("INSERT INTO counter_failing (id, files) SELECT 1, count(*) FROM manifest "
                 "WHERE state = 'pending' AND attempts > 0 ON CONFLICT (id) DO UPDATE SET files = excluded.files")


def _v9_to_v10(conn: sqlite3.Connection) -> None:
    """Nothing to reshape: ``archive_marks`` is new (``SCHEMA`` creates it) and starts empty, so the dataset writer
    begins with every stored alert."""


def _v10_to_v11(conn: sqlite3.Connection) -> None:
    """Each mark counts the alerts written through it (``archive_marks.alerts_written``): counted here once from
    the alerts at or below the mark (a version-9 store has no marks yet: ``SCHEMA`` creates the table whole)."""
    columns = {row["name"] for row in conn.execute("PRAGMA table_info(archive_marks)")}
    if not columns or "alerts_written" in columns:
        return
    conn.execute("ALTER TABLE archive_marks ADD COLUMN alerts_written INTEGER NOT NULL DEFAULT 0")
    conn.execute(
        "UPDATE archive_marks SET alerts_written = (SELECT count(*) FROM alerts a WHERE a.topic = archive_marks.topic "
        "AND a.partition = archive_marks.partition AND a.generation = archive_marks.generation "
        "AND a.kafka_offset <= archive_marks.written_through)")


STEPS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: _v1_to_v2,
    2: add_missing_columns,
    3: add_missing_columns,  # jobs.kind (issue 14); its tables come with SCHEMA
    4: _v4_to_v5,
    5: _v5_to_v6,
    6: _v6_to_v7,
    7: _v7_to_v8,
    8: lambda conn: None,  # the crash-loop breaker's tables come with SCHEMA
    9: _v9_to_v10,
    10: _v10_to_v11,
}
