"""How far the Parquet dataset (``ztfd.archive``) is written: per partition generation, the highest offset in it.

The dataset writer reads the alerts above each mark, rewrites the files they belong to and then advances the mark
in the transaction that records those files in the manifest. A writer killed in between leaves the mark where it
was: the next pass writes the same files again (deterministic names), and nothing is counted twice.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from typing import NamedTuple

from ztfd.store.alerts import _COLUMNS, StoredAlert, _stored
from ztfd.store.status_facts import get_status, set_status


class PartitionKey(NamedTuple):
    topic: str
    partition: int
    generation: int


def marks(conn: sqlite3.Connection) -> dict[PartitionKey, int]:
    """Every partition generation's mark: the highest offset whose alert is in the dataset."""
    rows = conn.execute("SELECT topic, partition, generation, written_through FROM archive_marks")
    return {PartitionKey(row[0], row[1], row[2]): row[3] for row in rows}


def partitions_to_look_at(conn: sqlite3.Connection) -> list[PartitionKey]:
    """The partition generations that may hold alerts above their mark: the ones being read (``offsets``) and the
    ones already marked (an older generation may still have alerts written late). Two small tables, no alert read."""
    rows = conn.execute(
        "SELECT topic, partition, generation FROM offsets UNION SELECT topic, partition, generation FROM archive_marks")
    return sorted(PartitionKey(*row) for row in rows)


def all_partitions(conn: sqlite3.Connection) -> list[PartitionKey]:
    """Every partition generation that has a stored alert (a rebuild; one walk of the alerts' unique index)."""
    rows = conn.execute("SELECT DISTINCT topic, partition, generation FROM alerts")
    return sorted(PartitionKey(*row) for row in rows)


def alerts_above(conn: sqlite3.Connection, key: PartitionKey, offset: int, limit: int) -> list[StoredAlert]:
    """Up to ``limit`` alerts of one partition generation above ``offset``, by offset (an indexed range read)."""
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM alerts WHERE topic = ? AND partition = ? AND generation = ? AND kafka_offset > ? "
        "ORDER BY kafka_offset LIMIT ?", (*key, offset, limit))
    return [_stored(row) for row in rows]


UNFOLDED = "archive.unfolded"  # status fact: the (night, topic) folders that may hold part files to fold


def note_unfolded(conn: sqlite3.Connection, nights: Iterable[tuple[str, str]]) -> None:
    """The writer added part files to these (night, topic) folders (inside its transaction)."""
    known = set(unfolded(conn))
    added = known | set(nights)
    if added != known:
        set_status(conn, UNFOLDED, json.dumps(sorted(added)))


def unfolded(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """The (night, topic) folders that may hold part files to fold: the few written since they were last folded."""
    fact = get_status(conn, UNFOLDED)
    return [] if fact is None or fact[0] is None else [(night, topic) for night, topic in json.loads(fact[0])]


def note_folded(conn: sqlite3.Connection, nights: Iterable[tuple[str, str]]) -> None:
    """These folders hold one file per partition and block now."""
    left = set(unfolded(conn)) - set(nights)
    set_status(conn, UNFOLDED, json.dumps(sorted(left)))


def last_received(conn: sqlite3.Connection, night: str, topic: str) -> float | None:
    """When the newest alert of a night and topic was received (``counter_alerts``)."""
    row = conn.execute("SELECT last_received_at FROM counter_alerts WHERE date = ? AND topic = ?",
                       (night, topic)).fetchone()
    return None if row is None else row[0]


def dates_of(conn: sqlite3.Connection, topic: str | None = None) -> list[str]:
    """The partition dates with alerts (of ``topic``), from the per-night counters."""
    if topic is None:
        rows = conn.execute("SELECT DISTINCT date FROM counter_alerts WHERE alerts > 0 ORDER BY date")
    else:
        rows = conn.execute("SELECT date FROM counter_alerts WHERE topic = ? AND alerts > 0 ORDER BY date", (topic,))
    return [row[0] for row in rows]


def nights_touched_since(conn: sqlite3.Connection, since: float) -> set[str]:
    """Nights whose ``images/`` may have changed since ``since``: those that received alerts (cutouts come with
    packets; ``counter_alerts``) and those of stamp jobs done since (``jobs_done`` index). Both read only rows of
    the period."""
    received = conn.execute("SELECT date FROM counter_alerts WHERE last_received_at > ?", (since,))
    done = conn.execute(
        "SELECT DISTINCT a.date FROM jobs j JOIN alerts a ON a.id = j.alert_id "
        "WHERE j.state = 'done' AND j.updated_at > ?", (since,))
    return {row[0] for row in received} | {row[0] for row in done}


def advance(conn: sqlite3.Connection, key: PartitionKey, written_through: int, alerts: int) -> None:
    """Move a mark up (inside the caller's transaction); never down. ``alerts``: how many stored alerts the step
    wrote into the dataset (those above the old mark, up to the new one), added to the partition's count."""
    conn.execute(
        "INSERT INTO archive_marks (topic, partition, generation, written_through, written_at, alerts_written) "
        "VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (topic, partition, generation) DO UPDATE SET "
        "written_through = max(written_through, excluded.written_through), written_at = excluded.written_at, "
        "alerts_written = alerts_written + excluded.alerts_written",
        (*key, written_through, time.time(), alerts))


def written_per_topic(conn: sqlite3.Connection) -> dict[str, int]:
    """Alerts in the dataset per topic, from the marks' counts (a row per partition generation, no alert read):
    with the stored alerts per topic (``store.counters.topic_totals``), what the archiver has still to write."""
    rows = conn.execute("SELECT topic, sum(alerts_written) FROM archive_marks GROUP BY topic")
    return {row[0]: row[1] for row in rows}


def oldest_unwritten_at(conn: sqlite3.Connection) -> float | None:
    """When the oldest alert not yet in the dataset was received: per partition generation, the alert just above
    its mark (one indexed look-up each; offsets come in the order they are received), the oldest of them."""
    marked = marks(conn)
    oldest = None
    for key in partitions_to_look_at(conn):
        row = conn.execute(
            "SELECT received_at FROM alerts WHERE topic = ? AND partition = ? AND generation = ? "
            "AND kafka_offset > ? ORDER BY kafka_offset LIMIT 1", (*key, marked.get(key, -1))).fetchone()
        if row is not None and (oldest is None or row[0] < oldest):
            oldest = row[0]
    return oldest


def forget(conn: sqlite3.Connection) -> None:
    """Drop every mark, and the list of folders to fold (a full rebuild starts from the first alert)."""
    conn.execute("DELETE FROM archive_marks")
    set_status(conn, UNFOLDED, None)


MOVED = "archive.moved:"  # status fact per topic: how often each partition moved to or from this host (fleet mode)


def note_moved(conn: sqlite3.Connection, topic: str, partitions: Iterable[int]) -> None:
    """Fleet mode: the group handed ``partitions`` of ``topic`` in or took them back (inside the caller's
    transaction). Another host may have written, or may yet write, archive rows of their offsets: the archiver
    looks in the bucket again before it writes rows of them (``ztfd.archive.elsewhere``)."""
    counts = moves(conn, topic)
    for partition in partitions:
        counts[partition] = counts.get(partition, 0) + 1
    set_status(conn, MOVED + topic, json.dumps({str(p): n for p, n in sorted(counts.items())}))


def moves(conn: sqlite3.Connection, topic: str) -> dict[int, int]:
    """How often each partition of ``topic`` moved to or from this host; none outside fleet mode."""
    fact = get_status(conn, MOVED + topic)
    return {} if fact is None or fact[0] is None else {int(p): n for p, n in json.loads(fact[0]).items()}
