"""How far a partition is durable in S3: the offset a fleet host may commit to Kafka (``kafka.assignment =
"group"``, docs/fleet.md).

An alert is durable once everything the fleet keeps of it is in the bucket, so that a host lost with its disk
loses nothing of it:
- its files (the message's file, and embedded cutouts under ``images/<date>/<object_id>/``) are uploaded: their
  manifest rows are ``done`` or ``archived``, or forgotten (``ztfd prune`` forgets rows only after their upload);
- its stamps are settled: no stamp job of its object and observation time (``store.jobs.detection_key``, the key
  one job serves every alert of that detection by) waits or runs; a job done or failed for good is settled;
- the files its stamp job wrote (stamps and preview, under the same ``images/<date>/<object_id>/``) are uploaded.
  A job records each file in the manifest before it is settled, so a settled job's files are all in the manifest.
The archive's rows (the Parquet archive being built beside this) join the same list as one more ``EXISTS``
condition in ``NOT_DURABLE`` (its pending files, by the alert's partition and offset).

Rejected messages do not hold the frontier back: their raw bytes stay in this host's store (``ztfd rejected``) until
housekeeping exports them; a host lost with its disk loses them, and the new owner rejects them again only if it
reads them again (docs/fleet.md says so).
"""

from __future__ import annotations

import sqlite3

from ztfd.store.jobs import detection_key
from ztfd.store.states import JobState, literal

KEY_FUNCTION = "ztfd_detection_key"
_OPEN = f"{literal(JobState.READY)}, {literal(JobState.LEASED)}"

# An alert row ``a`` that is not yet durable. The folder range works because object ids are plain identifiers
# (letters, digits, _ and -): every path under ``images/<date>/<object_id>/`` sorts below ``…/<object_id>0``.
NOT_DURABLE = f"""(
    EXISTS (SELECT 1 FROM manifest m WHERE m.path = a.path AND m.state = 'pending')
    OR EXISTS (SELECT 1 FROM manifest m
               WHERE m.path >= 'images/' || a.date || '/' || a.object_id || '/'
                 AND m.path < 'images/' || a.date || '/' || a.object_id || '0' AND m.state = 'pending')
    OR EXISTS (SELECT 1 FROM jobs j WHERE j.dedupe_key = {KEY_FUNCTION}(a.object_id, a.obs_mjd, a.date)
               AND j.state IN ({_OPEN}))
)"""


def register_functions(conn: sqlite3.Connection) -> None:
    """Teach ``conn`` the job key of an alert, computed by the very function that keyed its job."""
    conn.create_function(KEY_FUNCTION, 3, detection_key, deterministic=True)


def durable_through(conn: sqlite3.Connection, topic: str, partition: int, generation: int, start: int,
                    end: int) -> int:
    """The first offset in ``start``..``end`` whose alert is not yet durable, else ``end``: every message of the
    partition generation from ``start`` up to the offset returned is in S3 (or was rejected, or is no alert), so
    Kafka may be told to resume there. ``end`` is the offset this host has stored up to (``store.offsets``).

    One indexed walk from ``start`` that stops at the first alert not durable: cheap when the frontier follows
    close behind the uploads, as a periodic committer keeps it."""
    if end <= start:
        return start
    register_functions(conn)
    row = conn.execute(
        "SELECT a.kafka_offset FROM alerts a WHERE a.topic = ? AND a.partition = ? AND a.generation = ? "
        f"AND a.kafka_offset >= ? AND a.kafka_offset < ? AND {NOT_DURABLE} ORDER BY a.kafka_offset LIMIT 1",
        (topic, partition, generation, start, end),
    ).fetchone()
    return end if row is None else int(row[0])
