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
from ztfd.store.status_facts import get_status, set_status, statuses_with_prefix


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
    its mark (one indexed look-up each; offsets come in the order they are received), the oldest of them. A
    partition handed back is not this host's to write any more (fleet mode)."""
    marked = marks(conn)
    given_up = handed_back(conn)
    oldest = None
    for key in partitions_to_look_at(conn):
        if key in given_up:
            continue
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


HANDED_BACK = "archive.handed_back:"  # status fact per topic: partitions handed back cleanly, and their commits


def note_handed_back(conn: sqlite3.Connection, topic: str, commits: dict[int, tuple[int, int]]) -> None:
    """Fleet mode: this host handed ``commits``' partitions of ``topic`` back, each ``(generation, committed
    offset)`` (inside the caller's transaction). Its archive rows of that generation at or past the offset are the
    next holder's to write: this host no longer writes, folds or uploads them (``ztfd.archive.handedback``)."""
    if not commits:
        return
    known = _handed_back_of(conn, topic)
    known.update(commits)
    _set_handed_back(conn, topic, known)


def note_handed_in(conn: sqlite3.Connection, topic: str, partitions: Iterable[int]) -> None:
    """Fleet mode: ``partitions`` of ``topic`` are this host's again (inside the caller's transaction): what it
    had given up of them is its own again."""
    known = _handed_back_of(conn, topic)
    left = {partition: value for partition, value in known.items() if partition not in set(partitions)}
    if left != known:
        _set_handed_back(conn, topic, left)


def handed_back(conn: sqlite3.Connection) -> dict[PartitionKey, int]:
    """Every partition generation this host handed back and does not hold again: the offset committed then (its
    rows from there on are not this host's to write, fold or upload). None outside fleet mode."""
    found = {}
    for topic, (value, _) in statuses_with_prefix(conn, HANDED_BACK).items():
        for partition, (generation, offset) in json.loads(value).items():
            found[PartitionKey(topic, int(partition), generation)] = offset
    return found


def _handed_back_of(conn: sqlite3.Connection, topic: str) -> dict[int, tuple[int, int]]:
    fact = get_status(conn, HANDED_BACK + topic)
    if fact is None or fact[0] is None:
        return {}
    return {int(p): (generation, offset) for p, (generation, offset) in json.loads(fact[0]).items()}


def _set_handed_back(conn: sqlite3.Connection, topic: str, commits: dict[int, tuple[int, int]]) -> None:
    set_status(conn, HANDED_BACK + topic, json.dumps({str(p): list(v) for p, v in sorted(commits.items())})
               if commits else None)


def marks_held(conn: sqlite3.Connection) -> dict[PartitionKey, int]:
    """The marks, each below its partition's commit if this host handed it back: the rows compaction and a rebuild
    may take (those from the commit on are the next holder's)."""
    given_up = handed_back(conn)
    return {key: min(mark, given_up[key] - 1) if key in given_up else mark for key, mark in marks(conn).items()}


def lower(conn: sqlite3.Connection, key: PartitionKey, written_through: int) -> None:
    """Move a mark down to ``written_through`` if it is above (inside the caller's transaction): the rows above it
    are no longer in this host's files (a partition handed back, ``ztfd.archive.handedback``), so that, should the
    partition come back, the writer writes them again where no other host's file holds them. The count of alerts
    written stays: this host is done with them."""
    conn.execute("UPDATE archive_marks SET written_through = ? WHERE topic = ? AND partition = ? AND generation = ? "
                 "AND written_through > ?", (written_through, *key, written_through))


DROPPING = "archive.dropping"  # status fact: files of partitions handed back taken off the manifest, to delete


def note_dropping(conn: sqlite3.Connection, paths: Iterable[str]) -> None:
    """The files at ``paths`` were taken off the manifest and are to be deleted from disk (inside the transaction
    that took them off; none: they are deleted)."""
    listed = sorted(paths)
    set_status(conn, DROPPING, json.dumps(listed) if listed else None)


def dropping(conn: sqlite3.Connection) -> list[str]:
    """The files taken off the manifest and not yet known to be deleted from disk."""
    fact = get_status(conn, DROPPING)
    return [] if fact is None or fact[0] is None else json.loads(fact[0])
