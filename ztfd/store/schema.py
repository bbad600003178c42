"""The store's tables: the one place their shape is written down."""

SCHEMA_VERSION = 1

SCHEMA = """
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
CREATE INDEX IF NOT EXISTS alerts_received ON alerts (topic, received_at);

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
-- the alert (``stamps``). state: ready | leased | done | failed (store.jobs.JobState). waiting says why a ready
-- job has a not_before in the future: 'retry' after a failure, 'unavailable' while the service does not have
-- the alert yet. force: refetch files already valid on disk (``ztfd replay --force``).
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    alert_id INTEGER NOT NULL,
    force INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'ready',
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
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (not_before, id) WHERE state = 'ready';
CREATE INDEX IF NOT EXISTS jobs_leased ON jobs (lease_until) WHERE state = 'leased';
CREATE INDEX IF NOT EXISTS jobs_failed ON jobs (updated_at) WHERE state = 'failed';
CREATE INDEX IF NOT EXISTS jobs_batch ON jobs (batch) WHERE batch IS NOT NULL;
-- At most one waiting or running job per dedupe key (see store.jobs.enqueue).
CREATE UNIQUE INDEX IF NOT EXISTS jobs_dedupe ON jobs (dedupe_key)
    WHERE dedupe_key IS NOT NULL AND state IN ('ready', 'leased');

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

-- The sync manifest: every file ztfd writes under data/ and images/. state: pending | done.
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
);
CREATE INDEX IF NOT EXISTS manifest_pending ON manifest (path) WHERE state = 'pending';
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
    state TEXT NOT NULL DEFAULT 'starting',
    last_exit TEXT
);

-- Shared politeness limits (ztfd.ratelimit): the time from which the next request may go, per limit name.
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

# --- added by the seams change (sources and stamp providers) ---------------------------------------------------------
# Columns added to existing tables, applied after SCHEMA by ``db._migrate`` when a table lacks them (idempotent, so
# a store created before them gains them on its next open). For the store's migration mechanism to take over.
ADDED_COLUMNS = (
    # The survey of the alert (its stamp provider is ``stamps.<survey>_provider``) and the detection its message
    # names (Avro packets name their candid; Lasair rows none): what a stamp job needs beyond the columns above.
    ("alerts", "survey", "TEXT NOT NULL DEFAULT 'ztf'"),
    ("alerts", "detection_id", "TEXT"),
)

# --- Avro streams (issue 14): registry schemas, job kinds, the detections cache ---------------------------------
# Kept apart from the tables above. ``avro_schemas`` (ztfd.store.schemas): the schemas a Confluent schema registry
# served, by registry URL and schema id, so that each is fetched once, ever (Confluent ids are immutable).
# ``detections`` (ztfd.store.detections): ALeRCE detections lists shared by the stamp workers for a short time (a
# catch-up has several alerts of an object queued; one list serves them all). ``jobs.kind``: 'stamps' (fetch the
# stamps, then draw the preview) or 'preview' (the stamps came in the alert packet: only draw the preview).
SCHEMA += """
CREATE TABLE IF NOT EXISTS avro_schemas (
    registry TEXT NOT NULL,
    schema_id INTEGER NOT NULL,
    schema TEXT NOT NULL,
    fetched_at REAL NOT NULL,
    PRIMARY KEY (registry, schema_id)
);

CREATE TABLE IF NOT EXISTS detections (
    object_id TEXT PRIMARY KEY,
    body BLOB NOT NULL,
    fetched_at REAL NOT NULL
);
"""
ADDED_COLUMNS += (("jobs", "kind", "TEXT NOT NULL DEFAULT 'stamps'"),)
