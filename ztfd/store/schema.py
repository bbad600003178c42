"""The store's tables: the one place their shape is written down.

``SCHEMA`` is the current layout, created as a whole in a new store. A store records the version of its layout
in ``meta``; opening an older one runs the steps of ``ztfd.store.migrations`` up to ``SCHEMA_VERSION`` and then
``SCHEMA`` (which creates what is new), all in one transaction. To change the layout: edit ``SCHEMA``, bump
``SCHEMA_VERSION``, and add the step that turns the previous layout into the new one (new tables and indexes
need no step: ``SCHEMA`` adds them). Version 1 is the layout before the store owned its schema (jobs carried
JSON payloads and results).
"""

from ztfd.store.states import FailureClass, JobKind, JobState, ProcessState, Waiting, literal

_READY, _LEASED, _DONE, _FAILED = map(literal, (JobState.READY, JobState.LEASED, JobState.DONE, JobState.FAILED))

SCHEMA_VERSION = 11  # 3: alerts.survey, detection_id, band (ADDED_COLUMNS), the observability block; 4: the Avro block;
# 5: alerts counted per batch (no count_alert trigger), counter_received instead of the alerts_received index,
# uploaded files forgotten (count_file_delete counts pending rows only); 6: manifest_pending ordered by record time;
# 7: jobs.failure, the class of a failed attempt (ADDED_COLUMNS), which count_stamp_failure counts;
# 8: counter_failing (pending files whose last upload failed), kept by triggers; 9: the crash-loop breaker's
# decode_marks and decode_deaths; 10: archive_marks (the Parquet dataset's progress, issue 22); 11:
# archive_marks.alerts_written (how many alerts the dataset holds, for ``ztfd status``), s3_deletions

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- One row per accepted Kafka message, inserted once its file is on disk. (topic, partition, generation, offset)
-- is the message's identity: generation counts how often the partition's offsets restarted (Lasair deletes and
-- recreates a topic when its filter is edited).
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    kafka_offset INTEGER NOT NULL,
    object_id TEXT NOT NULL,
    date TEXT NOT NULL,
    obs_mjd REAL,
    path TEXT NOT NULL,
    received_at REAL NOT NULL,
    UNIQUE (topic, partition, generation, kafka_offset)
);
CREATE INDEX IF NOT EXISTS alerts_date ON alerts (date, topic);

-- Messages that could not be accepted, kept with their raw bytes and the reason.
CREATE TABLE IF NOT EXISTS rejected (
    id INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    kafka_offset INTEGER NOT NULL,
    received_at REAL NOT NULL,
    reason TEXT NOT NULL,
    raw BLOB,
    UNIQUE (topic, partition, generation, kafka_offset)
);

-- The next offset to read per partition, written in the same transaction as the alerts it follows.
CREATE TABLE IF NOT EXISTS offsets (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    next_offset INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (topic, partition)
);

-- The stamp job queue (see ztfd.store.jobs). A job refers to its alert; what a finished job learned is kept with
-- the alert (``stamps``). state: store.states.JobState. waiting (store.states.Waiting) says why a ready job has
-- a not_before in the future: a retry after a failure, or the service does not have the alert yet. force: refetch
-- files already valid on disk (``ztfd replay --force``). failure (ADDED_COLUMNS): the class of the last failed
-- attempt (store.states.FailureClass), carried on the error that ended it.
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    alert_id INTEGER NOT NULL,
    force INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT {_READY},
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    waiting TEXT,
    unavailable_since REAL,
    lease_until REAL,
    owner TEXT,
    last_error TEXT,
    batch TEXT,
    dedupe_key TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (not_before, id) WHERE state = {_READY};
CREATE INDEX IF NOT EXISTS jobs_leased ON jobs (lease_until) WHERE state = {_LEASED};
CREATE INDEX IF NOT EXISTS jobs_failed ON jobs (updated_at) WHERE state = {_FAILED};
-- Done jobs are forgotten a day after they finished (ztfd.daemon.housekeeping): what they learned is in ``stamps``.
CREATE INDEX IF NOT EXISTS jobs_done ON jobs (updated_at) WHERE state = {_DONE};
CREATE INDEX IF NOT EXISTS jobs_batch ON jobs (batch) WHERE batch IS NOT NULL;
-- At most one waiting or running job per dedupe key (see store.jobs.enqueue).
CREATE UNIQUE INDEX IF NOT EXISTS jobs_dedupe ON jobs (dedupe_key)
    WHERE dedupe_key IS NOT NULL AND state IN ({_READY}, {_LEASED});

-- What is known about an alert's stamps, written when its stamp job finishes: the survey's id of the detection
-- chosen (ZTF candid, LSST diaSourceId; TEXT so that 64-bit ids stay exact) and its MJD, when, which stamp kinds
-- that run fetched (bit i = store.stamps.KINDS[i]), whether it drew the preview, and which worker. ``ztfd replay``
-- reuses the detection id (no lookup) and checks the files it names; nothing reads job rows for it.
CREATE TABLE IF NOT EXISTS stamps (
    alert_id INTEGER PRIMARY KEY,
    detection_id TEXT NOT NULL,
    detection_mjd REAL,
    fetched INTEGER NOT NULL DEFAULT 0,
    preview INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    done_at REAL NOT NULL
);

-- The sync manifest: the files ztfd writes under data/ and images/, until a day after they are safe in S3 when
-- retention is off (then ``ztfd prune`` forgets them: see ztfd.store.manifest). state: pending | done | archived.
-- WITHOUT ROWID: the path, its key, is stored once (a rowid table kept it twice, in the table and in its index).
CREATE TABLE IF NOT EXISTS manifest (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    md5 TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    recorded_at REAL NOT NULL,
    uploaded_at REAL,
    etag TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
) WITHOUT ROWID;
-- Pending files oldest first: new rows go at the index's end. Keyed by path, every file written was an insert at a
-- random place in a second path-ordered B-tree, ~40% of what recording a file cost (issue 11).
CREATE INDEX IF NOT EXISTS manifest_pending ON manifest (recorded_at, path) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS manifest_uploaded ON manifest (uploaded_at, path) WHERE state = 'done';

-- Liveness of every ztfd process, written by the processes themselves and read by the supervisor and status.
CREATE TABLE IF NOT EXISTS processes (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    topic TEXT,
    pid INTEGER,
    started_at REAL,
    heartbeat_at REAL,
    restarts INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT {literal(ProcessState.STARTING)},
    last_exit TEXT
);

-- Shared politeness limits (ztfd.stamps.ratelimit): the time from which the next request may go, per limit name.
CREATE TABLE IF NOT EXISTS rate_limits (
    name TEXT PRIMARY KEY,
    next_at REAL NOT NULL
);

-- Small named facts: last sync pass, last sync error, and similar.
CREATE TABLE IF NOT EXISTS status (
    key TEXT PRIMARY KEY,
    value TEXT,
    updated_at REAL NOT NULL
);

-- === sync (retention) =====================================================================================
-- Retention's S3 copies it could not verify (S3 answered 403, what it answers for a missing object to
-- credentials without s3:ListBucket, or another error): passes counts the retention passes that failed for
-- the upload of uploaded_at; after a few the file is uploaded again (ztfd.sync.retention). Only files in trouble
-- have a row; it goes when the file is archived or queued again. New table, so no migration step: SCHEMA
-- creates it when an older store is migrated.
CREATE TABLE IF NOT EXISTS retention_checks (
    path TEXT PRIMARY KEY,
    uploaded_at REAL NOT NULL,
    passes INTEGER NOT NULL,
    first_at REAL NOT NULL,
    last_at REAL NOT NULL,
    last_error TEXT NOT NULL
);
"""

# --- Lasair-LSST byte quota (ztfd.store.quota; written by the consumers, read by status) ---------------------------
# Kept apart from the tables above: added by the LSST work (issue 13). One row per topic per Lasair quota day (nid:
# days since 2017-01-01 of UTC + 4 h); ``survey`` is that of the topic's alerts (what ``ztfd status`` shows).
SCHEMA += """
CREATE TABLE IF NOT EXISTS topic_bytes (
    topic TEXT NOT NULL,
    nid INTEGER NOT NULL,
    survey TEXT,
    bytes INTEGER NOT NULL,
    messages INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (topic, nid)
);
"""


# === Observability (issue 15: metrics and night reports; owned by the "obs" work) ================================
# Counters kept incrementally by triggers, so that a Prometheus scrape and a night report read a few small rows
# instead of counting a year of alerts, jobs and files. Nothing else writes these tables; ``ztfd.store.counters``
# and ``ztfd.store.report`` read them. Counters never go down when the store forgets old rows (retention), except
# the gauges of open work (jobs waiting or running, files pending).
#
# A stamp job's bucket, as ``ztfd_stamp_jobs{state}`` shows it: ready jobs split by why they wait.
_JOB_BUCKET = (
    f"CASE WHEN {{row}}.state = {_READY} AND {{row}}.waiting = {literal(Waiting.UNAVAILABLE)} THEN 'unavailable' "
    f"WHEN {{row}}.state = {_READY} AND {{row}}.waiting = {literal(Waiting.RETRY)} THEN 'retry_waiting' "
    "ELSE {row}.state END"
)
# The class of a failed attempt (``ztfd_stamp_failures_total{reason}``): the ``failure`` column the code wrote with
# the reason (store.states.FailureClass; a row from before version 7 has none: other).
_FAILURE_CLASS = f"coalesce(NEW.failure, {literal(FailureClass.OTHER)})"

_ONCE = "(SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM meta WHERE key = 'counters_seeded')) AS once"

OBS_SCHEMA = f"""
-- Alerts stored and the newest receive time, per partition date and topic. Written by store.alerts.insert_alerts,
-- once per batch and (date, topic), not by a trigger: a trigger runs once per row, and at ~11 µs an alert it was
-- the largest single cost of storing a batch (bin/bench ingest).
CREATE TABLE IF NOT EXISTS counter_alerts (
    date TEXT NOT NULL,
    topic TEXT NOT NULL,
    alerts INTEGER NOT NULL DEFAULT 0,
    last_received_at REAL,
    PRIMARY KEY (date, topic)
) WITHOUT ROWID;

-- Rejected messages per UTC date of their receipt and topic (AFTER INSERT ON rejected).
CREATE TABLE IF NOT EXISTS counter_rejected (
    date TEXT NOT NULL,
    topic TEXT NOT NULL,
    rejected INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (date, topic)
) WITHOUT ROWID;

-- Stamp jobs per bucket (see _JOB_BUCKET). done and failed count every job that ended so, also once forgotten.
CREATE TABLE IF NOT EXISTS counter_jobs (
    state TEXT PRIMARY KEY,
    jobs INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- Failed stamp attempts per class (jobs.failure, store.states.FailureClass).
CREATE TABLE IF NOT EXISTS counter_stamp_failures (
    reason TEXT PRIMARY KEY,
    failures INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- Manifest files and bytes per state, and what the syncer uploaded in all (one row, id 1).
CREATE TABLE IF NOT EXISTS counter_files (
    state TEXT PRIMARY KEY,
    files INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counter_uploads (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    files INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0
);

-- The last time a file under images/<date>/ was recorded: with counter_alerts, when a night was last busy.
CREATE TABLE IF NOT EXISTS counter_images (
    date TEXT PRIMARY KEY,
    last_recorded_at REAL NOT NULL
) WITHOUT ROWID;

-- The detections a stamp provider fetched per object (light curves for reports): JSON [[mjd, band, value,
-- error], ...], value a magnitude or a flux (unit), the newest fetch replacing the one before.
CREATE TABLE IF NOT EXISTS detections (
    survey TEXT NOT NULL,
    object_id TEXT NOT NULL,
    unit TEXT NOT NULL,
    points TEXT NOT NULL,
    fetched_at REAL NOT NULL,
    PRIMARY KEY (survey, object_id)
) WITHOUT ROWID;

-- Night reports written: topic '' is the whole night. changed_at is the night's last activity the report saw.
CREATE TABLE IF NOT EXISTS reports (
    date TEXT NOT NULL,
    topic TEXT NOT NULL,
    generated_at REAL NOT NULL,
    changed_at REAL NOT NULL,
    pages INTEGER NOT NULL,
    PRIMARY KEY (date, topic)
) WITHOUT ROWID;

CREATE TRIGGER IF NOT EXISTS count_rejected AFTER INSERT ON rejected BEGIN
    INSERT INTO counter_rejected (date, topic, rejected)
    VALUES (date(NEW.received_at, 'unixepoch'), NEW.topic, 1)
    ON CONFLICT (date, topic) DO UPDATE SET rejected = rejected + 1;
END;

CREATE TRIGGER IF NOT EXISTS count_job_insert AFTER INSERT ON jobs BEGIN
    INSERT INTO counter_jobs (state, jobs) VALUES ({_JOB_BUCKET.format(row="NEW")}, 1)
    ON CONFLICT (state) DO UPDATE SET jobs = jobs + 1;
END;

CREATE TRIGGER IF NOT EXISTS count_job_update AFTER UPDATE OF state, waiting ON jobs
WHEN {_JOB_BUCKET.format(row="OLD")} IS NOT {_JOB_BUCKET.format(row="NEW")} BEGIN
    UPDATE counter_jobs SET jobs = jobs - 1 WHERE state = {_JOB_BUCKET.format(row="OLD")};
    INSERT INTO counter_jobs (state, jobs) VALUES ({_JOB_BUCKET.format(row="NEW")}, 1)
    ON CONFLICT (state) DO UPDATE SET jobs = jobs + 1;
END;

CREATE TRIGGER IF NOT EXISTS count_job_delete AFTER DELETE ON jobs
WHEN OLD.state NOT IN ({_DONE}, {_FAILED}) BEGIN
    UPDATE counter_jobs SET jobs = jobs - 1 WHERE state = {_JOB_BUCKET.format(row="OLD")};
END;

-- A failed attempt: a leased job given back to retry after a failure (waiting 'retry'), failed for good, or put
-- back because its lease ran out (its fetcher died or hung). Waiting for ALeRCE to catch up is no failure.
-- (Version 7 counts by NEW.failure instead of matching the reason's words: the step from 6 drops the older form.)
CREATE TRIGGER IF NOT EXISTS count_stamp_failure AFTER UPDATE OF last_error ON jobs
WHEN OLD.state = {_LEASED} AND NEW.last_error IS NOT NULL
    AND (NEW.state = {_FAILED} OR (NEW.state = {_READY}
         AND (NEW.waiting IS NOT {literal(Waiting.UNAVAILABLE)} OR NEW.not_before = OLD.not_before))) BEGIN
    INSERT INTO counter_stamp_failures (reason, failures) VALUES ({_FAILURE_CLASS}, 1)
    ON CONFLICT (reason) DO UPDATE SET failures = failures + 1;
END;

-- One trigger per manifest insert, not two: a trigger's call costs about as much as its statement.
CREATE TRIGGER IF NOT EXISTS count_file_insert AFTER INSERT ON manifest BEGIN
    INSERT INTO counter_files (state, files, bytes) VALUES (NEW.state, 1, NEW.size)
    ON CONFLICT (state) DO UPDATE SET files = files + 1, bytes = bytes + excluded.bytes;
    INSERT INTO counter_images (date, last_recorded_at)
    SELECT substr(NEW.path, 8, 10), NEW.recorded_at WHERE substr(NEW.path, 1, 7) = 'images/'
    ON CONFLICT (date) DO UPDATE SET last_recorded_at = max(last_recorded_at, excluded.last_recorded_at);
END;

CREATE TRIGGER IF NOT EXISTS count_file_update AFTER UPDATE OF state, size ON manifest
WHEN OLD.state IS NOT NEW.state OR OLD.size IS NOT NEW.size BEGIN
    UPDATE counter_files SET files = files - 1, bytes = bytes - OLD.size WHERE state = OLD.state;
    INSERT INTO counter_files (state, files, bytes) VALUES (NEW.state, 1, NEW.size)
    ON CONFLICT (state) DO UPDATE SET files = files + 1, bytes = bytes + excluded.bytes;
END;

-- Only a pending row leaves its count when it goes: done and archived count every file that reached the state,
-- also once ``ztfd prune`` has forgotten its row (schema version 5; the step from 4 drops the older trigger).
CREATE TRIGGER IF NOT EXISTS count_file_delete AFTER DELETE ON manifest WHEN OLD.state = 'pending' BEGIN
    UPDATE counter_files SET files = files - 1, bytes = bytes - OLD.size WHERE state = OLD.state;
END;

CREATE TRIGGER IF NOT EXISTS count_upload AFTER UPDATE OF state, uploaded_at ON manifest
WHEN NEW.state = 'done' AND (OLD.state IS NOT 'done' OR NEW.uploaded_at IS NOT OLD.uploaded_at) BEGIN
    INSERT INTO counter_uploads (id, files, bytes) VALUES (1, 1, NEW.size)
    ON CONFLICT (id) DO UPDATE SET files = files + 1, bytes = bytes + excluded.bytes;
END;

CREATE TRIGGER IF NOT EXISTS count_image_update AFTER UPDATE OF recorded_at ON manifest
WHEN substr(NEW.path, 1, 7) = 'images/' BEGIN
    INSERT INTO counter_images (date, last_recorded_at) VALUES (substr(NEW.path, 8, 10), NEW.recorded_at)
    ON CONFLICT (date) DO UPDATE SET last_recorded_at = max(last_recorded_at, excluded.last_recorded_at);
END;

-- Seeding, once per store (a store made before these counters existed): what the rows already say. The one-row
-- "once" table is empty after the first time, and as the outer loop of a CROSS JOIN it stops each statement
-- before any row is read (a plain WHERE NOT EXISTS would still scan).
INSERT OR IGNORE INTO counter_alerts (date, topic, alerts, last_received_at)
    SELECT date, topic, count(*), max(received_at) FROM {_ONCE} CROSS JOIN alerts GROUP BY date, topic;
INSERT OR IGNORE INTO counter_rejected (date, topic, rejected)
    SELECT date(received_at, 'unixepoch'), topic, count(*) FROM {_ONCE} CROSS JOIN rejected GROUP BY 1, 2;
INSERT OR IGNORE INTO counter_jobs (state, jobs)
    SELECT {_JOB_BUCKET.format(row="jobs")}, count(*) FROM {_ONCE} CROSS JOIN jobs GROUP BY 1;
INSERT OR IGNORE INTO counter_files (state, files, bytes)
    SELECT state, count(*), coalesce(sum(size), 0) FROM {_ONCE} CROSS JOIN manifest GROUP BY state;
INSERT OR IGNORE INTO counter_images (date, last_recorded_at)
    SELECT substr(path, 8, 10), max(recorded_at) FROM {_ONCE} CROSS JOIN manifest
    WHERE substr(path, 1, 7) = 'images/' GROUP BY 1;
INSERT OR IGNORE INTO meta (key, value) VALUES ('counters_seeded', '1');
"""
# === end of observability ========================================================================================

SCHEMA += OBS_SCHEMA

# --- Alerts received per UTC day (schema version 5; ztfd.store.alerts writes it with counter_alerts) ---------------
# What ``ztfd status`` shows as a topic's alerts today: one row per UTC day of receipt and topic. It replaced an
# index on alerts (topic, received_at) that cost ~45 bytes an alert for this one figure. The step from version 4
# (migrations._v4_to_v5) creates and seeds it from the alerts kept.
RECEIVED_SCHEMA = """
CREATE TABLE IF NOT EXISTS counter_received (
    day TEXT NOT NULL,
    topic TEXT NOT NULL,
    alerts INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, topic)
) WITHOUT ROWID;
"""
SCHEMA += RECEIVED_SCHEMA

# --- Kafka partitions: alerts lost upstream, and the identity of each topic (ztfd.ingest.partitions) ---
PARTITIONS_SCHEMA = """
-- Offsets the broker no longer had when ztfd came to read them (retention passed them): lost upstream, recorded
-- once each (the unique key makes a re-detection after a restart a no-op).
CREATE TABLE IF NOT EXISTS gaps (
    id INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    first_offset INTEGER NOT NULL,
    last_offset INTEGER NOT NULL,
    missing INTEGER NOT NULL,
    detected_at REAL NOT NULL,
    UNIQUE (topic, partition, generation, first_offset)
);

-- The Kafka topic id (KIP-516) ztfd last read each topic under: a different id is proof of recreation.
CREATE TABLE IF NOT EXISTS topic_ids (
    topic TEXT PRIMARY KEY,
    topic_id TEXT NOT NULL,
    seen_at REAL NOT NULL
);
"""
SCHEMA += PARTITIONS_SCHEMA
# --- added by the seams change (sources and stamp providers) ---------------------------------------------------------
# Columns added to existing tables (schema version 3): ``migrations.add_missing_columns`` adds each one a table
# lacks, after SCHEMA in a new store and as the step from version 2 in an older one.
ADDED_COLUMNS = (
    # The survey of the alert (its stamp provider is ``stamps.<survey>_provider``) and the detection its message
    # names (Avro packets name their candid; Lasair rows none): what a stamp job needs beyond the columns above.
    ("alerts", "survey", "TEXT NOT NULL DEFAULT 'ztf'"),
    ("alerts", "detection_id", "TEXT"),
    # LSST (issue 13): the band of the detection the message names (Lasair's lite and full output), for previews.
    ("alerts", "band", "TEXT"),
)

# --- Avro streams (issue 14): registry schemas, job kinds, the detections cache ---------------------------------
# Kept apart from the tables above. ``avro_schemas`` (ztfd.store.avro_schemas): the schemas a Confluent schema registry
# served, by registry URL and schema id, so that each is fetched once, ever (Confluent ids are immutable).
# ``detection_lists`` (ztfd.store.detection_lists): ALeRCE's detections answers shared by the stamp workers for a
# short time (a catch-up has several alerts of an object queued; one list serves them all). ``jobs.kind``:
# store.states.JobKind (fetch the stamps, then draw the preview; or only draw the preview of the stamps that came in
# the alert packet).
# Schema version 4: the step from 3 adds the column (migrations.add_missing_columns); SCHEMA creates the tables.
SCHEMA += """
CREATE TABLE IF NOT EXISTS avro_schemas (
    registry TEXT NOT NULL,
    schema_id INTEGER NOT NULL,
    schema TEXT NOT NULL,
    fetched_at REAL NOT NULL,
    PRIMARY KEY (registry, schema_id)
);

CREATE TABLE IF NOT EXISTS detection_lists (
    object_id TEXT PRIMARY KEY,
    body BLOB NOT NULL,
    fetched_at REAL NOT NULL
);
"""
ADDED_COLUMNS += (("jobs", "kind", f"TEXT NOT NULL DEFAULT {literal(JobKind.FETCH)}"),)
# Schema version 7: the class of a job's last failed attempt (store.states.FailureClass), what
# ``ztfd_stamp_failures_total{reason}`` counts; the step from 6 adds it (migrations.add_missing_columns).
ADDED_COLUMNS += (("jobs", "failure", "TEXT"),)

# --- Failing uploads (schema version 8; ztfd.store.manifest.count_failing) -------------------------------------------
# Pending files whose last upload attempt failed (state 'pending', attempts > 0), counted where they change, in the
# writer's transaction, like the other counters: ``ztfd status`` read them with a count over every pending row,
# which grew with the backlog (0.24 s at 100,000 pending files with S3 down). The step from version 7
# (migrations._v7_to_v8) seeds the count from the rows.
FAILING_SCHEMA = """
CREATE TABLE IF NOT EXISTS counter_failing (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    files INTEGER NOT NULL DEFAULT 0
);

CREATE TRIGGER IF NOT EXISTS count_failing_insert AFTER INSERT ON manifest
WHEN NEW.state = 'pending' AND NEW.attempts > 0 BEGIN
    INSERT INTO counter_failing (id, files) VALUES (1, 1) ON CONFLICT (id) DO UPDATE SET files = files + 1;
END;

CREATE TRIGGER IF NOT EXISTS count_failing_update AFTER UPDATE OF state, attempts ON manifest
WHEN (OLD.state = 'pending' AND OLD.attempts > 0) IS NOT (NEW.state = 'pending' AND NEW.attempts > 0) BEGIN
    INSERT INTO counter_failing (id, files)
    VALUES (1, CASE WHEN NEW.state = 'pending' AND NEW.attempts > 0 THEN 1 ELSE -1 END)
    ON CONFLICT (id) DO UPDATE SET files = files + excluded.files;
END;

CREATE TRIGGER IF NOT EXISTS count_failing_delete AFTER DELETE ON manifest
WHEN OLD.state = 'pending' AND OLD.attempts > 0 BEGIN
    UPDATE counter_failing SET files = files - 1 WHERE id = 1;
END;
"""
SCHEMA += FAILING_SCHEMA

# --- the crash-loop breaker (issue 21) -------------------------------------------------------------------------------
# ztfd.store.decode_marks, for ztfd.ingest.breaker. ``decode_marks``: per topic, the batch its consumer is decoding
# right now (its offsets per partition, JSON), written before the decoding and deleted after it: a mark found at
# the next start means the consumer died while decoding. ``decode_deaths``: those deaths, with the batch's offsets:
# two over the same messages and the consumer decodes them one by one in a child process. Schema version 9 (the
# step from 8 has nothing to change: SCHEMA creates the tables).
SCHEMA += """
CREATE TABLE IF NOT EXISTS decode_marks (
    topic TEXT PRIMARY KEY,
    spans TEXT NOT NULL,
    started_at REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS decode_deaths (
    id INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    spans TEXT NOT NULL,
    died_at REAL NOT NULL
);
"""

# --- the Parquet dataset (issue 22, ztfd.archive): how far each partition generation is written ------------------
# ``archive_marks`` (ztfd.store.archive_marks): per (topic, partition, generation), the highest offset whose alert
# is in the dataset. Advanced in the same transaction as the manifest rows of the files that hold them, so a writer
# killed before it only writes the same files again. Schema version 10 (SCHEMA creates it; no step reshapes anything).
# ``alerts_written`` (version 11): how many alerts of the partition generation the writer has put into the dataset,
# added in the same transaction as the mark moves, so that ``ztfd status`` tells how far the dataset is behind the
# store (stored alerts per topic minus these) without counting alerts; the step from 10 counts them once.
SCHEMA += """
CREATE TABLE IF NOT EXISTS archive_marks (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    written_through INTEGER NOT NULL,
    written_at REAL NOT NULL,
    alerts_written INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (topic, partition, generation)
) WITHOUT ROWID;
"""

# --- objects to delete from S3 (schema version 11; ztfd.store.deletions) -----------------------------------------
# Files a writer replaced by files of other names (the archive's part files folded into one): sync deletes each
# object once the file named in ``after`` is uploaded. Small: it empties at every sync pass. SCHEMA creates it.
SCHEMA += """
CREATE TABLE IF NOT EXISTS s3_deletions (
    path TEXT PRIMARY KEY,
    after TEXT,
    requested_at REAL NOT NULL
) WITHOUT ROWID;
"""
