"""The fleet's night, for the night report in fleet mode (docs/fleet.md, "The night report").

Each host of a fleet stores the alerts of the partitions it holds; the bucket holds every host's. The report's
writer (the holder of partition 0, ``reporting.fleet.ReportTurn``) therefore reads the night from the bucket, through
the archive's reader on the home's mirror (``ztfd.archive.open("<bucket>/<s3.prefix>", filesystem=S3)``):

- the alerts: every row of the night in the alerts dataset, whichever host wrote it. Each row's ``message`` (the
  Kafka value as received) is decoded by its topic's source, as the consumer did, so that a card shows the same
  columns and UTC times as on one host; a message its source cannot decode now gives its card the row's message
  columns instead;
- the stamps and previews: the fleet's stamps index of the night, written first from a listing of the bucket's
  images of the night (``archive.fleet_stamps``: every stamp any host made durable, once), the stamps dataset (every
  host's file of the night, and the index as last uploaded), and this host's own image files. They are linked by
  their paths relative to the home, which resolve in the bucket's mirror whether or not the file is on this host's
  disk;
- why an object has no preview: this host's stamp jobs say it for the objects it stored itself; for the others the
  page says what the bucket holds ("not in the fleet's stamps dataset") and nothing more.

A night is due when its files in the bucket (the alerts' and stamps' datasets of that night, but the stamps index,
which the writer itself makes from the night's report) changed since its last report and none changed for
``report.after_quiet`` seconds; which files the last report was written from is a status fact of the store
(``report_fleet:<date>``). Rejected messages are counted from every host's exports in the bucket
(``rejected_in_bucket``); one exported after the night's last report is counted at its next.

A listing the bucket refuses (a policy without ``s3:ListBucket`` on those prefixes) does not stop the report: it is
written without the index and with this host's rejected count, and says so in its note.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import posixpath
import sqlite3
import urllib.parse
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
from pyarrow import fs

from ztfd import config, store
from ztfd.archive import QueryError, fleet_stamps
from ztfd.archive import open as open_archive
from ztfd.archive.columns import ALERT_COLUMNS, PARTITION_COLUMNS, RESERVED
from ztfd.archive.layout import STAMPS_FILE
from ztfd.files import relative_to_home
from ztfd.ingest import nights
from ztfd.reporting.night_report import (
    LOOKBACK_DAYS,
    Card,
    ReportError,
    choose_stamps,
    image_files_of_night,
    missing_reason,
    mjd_of,
    new_card,
    night_counts,
    read_alert,
    report_dir,
    stamp_outcomes,
    survey_of,
)
from ztfd.sources import Alert, Source
from ztfd.store import manifest
from ztfd.store import report as night
from ztfd.store.alerts import StoredAlert, alerts_on
from ztfd.store.manifest import FileState
from ztfd.store.rejected import REJECTED_PREFIX
from ztfd.store.status_facts import get_status, set_status, statuses_with_prefix
from ztfd.sync.s3 import FatalError, FileError, OutageError, classified_errors, folders, listed
from ztfd.units import UNIX_EPOCH

log = logging.getLogger(__name__)

REPORTED = "report_fleet:"  # status fact + date: the bucket's files of the night its last report was written from
NOT_IN_DATASET = "not in the fleet's stamps dataset"
NO_PREVIEW = "no preview in the fleet's stamps dataset"
FROM_THE_FLEET = ("every host's alerts of the night, from the fleet's Parquet dataset in the bucket; rejected "
                  "messages: every host's exports in the bucket")
FROM_THE_FLEET_HERE = ("every host's alerts of the night, from the fleet's Parquet dataset; rejected messages: this "
                       "host's only")
MESSAGE_PREFIX = "msg_"  # a message field whose name is one of the dataset's own columns (``columns.column_name``)


def bucket_filesystem(s3: config.S3Config) -> fs.S3FileSystem:
    """pyarrow's S3 filesystem on the configured endpoint and region; credentials from the usual AWS chain (the
    environment, the shared files, the instance's role), as sync's."""
    options: dict[str, Any] = {}
    if s3.endpoint_url:
        url = urllib.parse.urlsplit(s3.endpoint_url)
        options.update(endpoint_override=url.netloc + url.path.rstrip("/"), scheme=url.scheme or "https")
    if s3.region:
        options["region"] = s3.region
    return fs.S3FileSystem(**options)


def mirror_root(s3: config.S3Config) -> str:
    """The home's mirror in the bucket, as pyarrow names it: ``<bucket>/<s3.prefix>`` without its last slash (in group
    mode the prefix is empty or ends with "/", ``config._check_fleet``: sync's keys are then this folder's files)."""
    return f"{s3.bucket}/{s3.prefix}".rstrip("/")


def is_page(folder: str, path: str) -> bool:
    """A report's page (``index.html``, ``page-<n>.html``), directly in its folder."""
    return posixpath.dirname(path) == folder and path.endswith(".html")


class FleetNight:
    """The night's cards from the fleet's data in the bucket (``night_report.Night``)."""

    # the bucket unreachable, refusing, or a file of it unreadable: tried again later
    transient = (OSError, QueryError, FatalError, FileError, OutageError)

    def __init__(self, cfg: config.Config, conn: sqlite3.Connection, filesystem: Any = None,
                 root: str | None = None) -> None:
        """``filesystem`` and ``root`` default to the bucket's (``bucket_filesystem``, ``mirror_root``); a local
        filesystem and folder read a dataset on disk the same way, without what only the bucket's listing gives
        (``in_bucket``): the stamps index, and the fleet's rejected messages (this host's are counted instead)."""
        self.cfg, self.conn = cfg, conn
        self.in_bucket = filesystem is None and root is None
        self.filesystem = filesystem if filesystem is not None else bucket_filesystem(cfg.s3)
        self.root = root if root is not None else mirror_root(cfg.s3)
        self.sources: dict[str, Source | None] = {}
        self._client: Any = None  # boto3's, for ``check_uploads`` and the stamps index

    def _s3(self) -> Any:
        """boto3's client, made once, when first needed (a report that reads only its dataset never makes one)."""
        from ztfd.sync.s3 import make_client

        self._client = self._client or make_client(self.cfg)
        return self._client

    # --- the cards ---------------------------------------------------------------------------------------------

    def gather(self, date: str, topic: str | None) -> tuple[list[Card], dict[str, Any]]:
        listable = self.in_bucket
        indexed: list[dict[str, Any]] = []
        if listable:
            try:
                indexed = self.write_stamps_index(date)
            except FatalError as exc:  # refused for good (permissions): the report goes on without what it lists
                log.warning("report %s: cannot list the bucket (%s): no stamps index, and this host's rejected "
                            "messages only", date, exc)
                listable = False
        archive = open_archive(self.root, filesystem=self.filesystem)
        rows = archive.night_rows(date, topic)
        if not rows.num_rows:
            raise ReportError(f"no alert of {date}{f' ({topic})' if topic else ''} in the fleet's dataset "
                              f"({self.root}/archive/alerts) yet")
        alerts = _unique(rows)
        messages = self._messages(alerts, rows)
        stamps = archive.night_stamp_paths(date)
        images: dict[str, set[str]] = {}
        for object_id, path in zip(stamps["object_id"].to_pylist(), stamps["path"].to_pylist(), strict=True):
            images.setdefault(object_id, set()).add(path)
        for row in indexed:  # what the bucket holds now (the index's upload may still be pending)
            images.setdefault(row["object_id"], set()).add(row["path"])
        for path in image_files_of_night(self.conn, self.cfg.home, date):  # this host's, perhaps not listed yet
            images.setdefault(path.split("/")[2], set()).add(path)
        here = self._stored_here(date, topic)
        by_object: dict[str, list[int]] = {}
        for index, alert in enumerate(alerts):  # oldest first: the last of each object is its newest
            by_object.setdefault(alert["object_id"], []).append(index)
        cards = []
        for object_id, seen in by_object.items():
            message: dict[str, Any] = {}
            times_utc: dict[str, str] = {}
            for index in seen:
                message.update(messages[index][0])
                times_utc.update(messages[index][1])
            newest = alerts[seen[-1]]
            survey = survey_of(object_id, {"survey": newest["survey"]})
            observed = [_mjd(alerts[i]["observed_at"]) for i in seen if alerts[i]["observed_at"] is not None]
            card = new_card(object_id, survey, [alerts[i]["topic"] for i in seen], _mjd(newest["observed_at"]),
                            newest["received_at"].timestamp(), newest["file"], message, times_utc,
                            messages[seen[-1]][2], observed)
            outcome = here.get(object_id)
            candid = outcome.candid if outcome is not None and outcome.candid else newest["detection_id"]
            choose_stamps(card, sorted(images.get(object_id, ())), candid)
            if card.preview is None:
                card.missing = self._missing(card, object_id in here, outcome, survey)
            cards.append(card)
        if listable:
            try:
                return night_counts(cards, [a["topic"] for a in alerts], self.rejected_in_bucket(date, topic),
                                    FROM_THE_FLEET)
            except FatalError as exc:
                log.warning("report %s: cannot list the bucket's rejected messages (%s): this host's only", date, exc)
        return night_counts(cards, [a["topic"] for a in alerts], night.night_rejected(self.conn, date, topic),
                            FROM_THE_FLEET_HERE)

    def _messages(self, alerts: list[dict[str, Any]], rows: pa.Table) -> list[tuple[dict[str, Any], dict[str, str],
                                                                                  str | None]]:
        """Each alert's message, its time fields in UTC and what dated it: decoded by its topic's source as the
        consumer did; else (a source that needs more than the value, such as Fink's schema in the key) from the
        alert file's JSON view, on this disk or in the bucket; else the row's message columns, without times."""
        decoded: list[Alert | None] = [self._decode(a["topic"], a["message"]) for a in alerts]
        converted = _times([alert for alert in decoded if alert is not None])
        found: list[tuple[dict[str, Any], dict[str, str], str | None]] = []
        for alert, row in zip(decoded, alerts, strict=True):
            if alert is not None:
                times = next(converted)
                found.append((_message_of(alert), times.times_utc, times.observation_key))
                continue
            message, meta = read_alert(self._read, row["file"]) if row["file"] else ({}, {})
            if message:
                found.append((message, meta.get("times_utc") or {}, meta.get("dated_by")))
            else:
                found.append((_message_columns(rows.slice(row["_row"], 1).to_pylist()[0]), {}, None))
        return found

    def _read(self, path: str) -> bytes:
        """A file of the home: from this disk if this host's store records it (an unrecorded one may be a batch's
        file cut short, ``ztfd.ingest.journal``), else from the bucket's mirror."""
        if manifest.recorded_file(self.conn, path) is not None:
            try:
                return (self.cfg.home / path).read_bytes()
            except FileNotFoundError:
                pass  # uploaded and removed by retention: the bucket has it
        with self.filesystem.open_input_stream(f"{self.root}/{path}") as stream:
            return bytes(stream.read())

    def _decode(self, topic: str, value: bytes | None) -> Alert | None:
        if topic not in self.sources:
            from ztfd.ingest.batch import topic_source
            from ztfd.store.avro_schemas import StoredSchemas

            try:
                self.sources[topic] = topic_source(self.cfg, topic, StoredSchemas(self.conn))
            except Exception as exc:  # a bad format of a topic this host never read: its rows' columns will do
                log.warning("report: no source for topic %s: %s", topic, exc)
                self.sources[topic] = None
        source = self.sources[topic]
        if source is None or value is None:
            return None
        try:
            return source.decode(value, None)
        except Exception:
            return None

    def write_stamps_index(self, date: str) -> list[dict[str, Any]]:
        """The night's stamps index (``archive.fleet_stamps``) from a listing of the bucket's images of the night,
        written and queued for upload when it changed; its rows."""
        with classified_errors(self.cfg.s3.bucket, self.cfg.s3.endpoint_url):
            rows = fleet_stamps.listed_rows(self._s3(), self.cfg.s3.bucket, self.cfg.s3.prefix, date)
        fleet_stamps.write_index(self.cfg.home, self.conn, date, rows)
        return rows

    def rejected_in_bucket(self, date: str, topic: str | None) -> int:
        """The fleet's messages rejected on UTC day ``date`` (of ``topic``, or of every topic): in fleet mode each is
        exported at once as a file of its own, named by its Kafka identity (``store.rejected.export_path``) and
        uploaded before its partition's commit passes it, so the bucket's keys count each once, whichever host
        rejected it. A listing of the day's topic folders, then of each one's ``rejected-`` keys."""
        day, bucket = f"{self.cfg.s3.prefix}data/{date}/", self.cfg.s3.bucket
        with classified_errors(bucket, self.cfg.s3.endpoint_url):
            client = self._s3()
            topics = [f"{day}{topic}/"] if topic else folders(client, bucket, day)
            return sum(1 for folder in topics for _ in listed(client, bucket, f"{folder}{REJECTED_PREFIX}"))

    def _stored_here(self, date: str, topic: str | None) -> dict[str, night.StampOutcome | None]:
        """object_id -> the outcome of its stamp jobs on this host, for the objects this host stored that night."""
        by_object: dict[str, list[StoredAlert]] = {}
        for alert in alerts_on(self.conn, date, topic):
            by_object.setdefault(alert.object_id, []).append(alert)
        outcomes = stamp_outcomes(self.conn, date, topic, by_object)
        return {object_id: outcomes.get(object_id) for object_id in by_object}

    def _missing(self, card: Card, stored_here: bool, outcome: night.StampOutcome | None, survey: str) -> str:
        """What can be said of an object without a preview: for an object this host stored, what its own stamp job
        says (its image files are among those looked at); for the others, what the bucket holds."""
        if stored_here:
            return missing_reason(outcome, survey, self.cfg.stamps.previews)
        return NO_PREVIEW if card.stamps else NOT_IN_DATASET

    # --- which nights are due ----------------------------------------------------------------------------------

    def due(self, now: float) -> list[tuple[str, Any]]:
        """Nights whose files in the bucket changed since their last report and have been quiet for
        ``report.after_quiet`` seconds, busy within ``LOOKBACK_DAYS``: (date, a digest of the files listed)."""
        found = []
        for date, files in sorted(self._listing().items()):
            newest = max(mtime for _, _, mtime in files)
            if not now - LOOKBACK_DAYS * 86400 < newest <= now - self.cfg.report.after_quiet:
                continue
            version = hashlib.sha256(json.dumps(sorted(files)).encode()).hexdigest()[:16]
            said = get_status(self.conn, REPORTED + date)
            if said is None or said[0] != version:
                found.append((date, version))
        return found

    def reported(self, date: str, version: Any) -> None:
        with store.transaction(self.conn):
            set_status(self.conn, REPORTED + date, str(version))

    def check_uploads(self, now: float) -> None:
        """The writer, each round: for each night it reported within ``LOOKBACK_DAYS``, whether the bucket holds
        each of its report's pages and its stamps index as this host uploaded them (a HEAD each, up to the first
        that differs); when another host's late upload replaced one (the previous holder of partition 0
        had its report pending), the night's report files, or its index, are queued again."""
        from ztfd.sync.shared_keys import upload_differs

        oldest = dt.datetime.fromtimestamp(now - LOOKBACK_DAYS * 86400, dt.UTC).date().isoformat()
        for date in statuses_with_prefix(self.conn, REPORTED):
            if date < oldest:
                continue
            folder = relative_to_home(self.cfg.home, report_dir(self.cfg, date, None))
            # the pages only (not the light curves beside them: one HEAD each would be thousands a round)
            uploaded = sorted(path for path, state in manifest.states_under(self.conn, f"{folder}/").items()
                              if state == FileState.DONE and is_page(folder, path))
            difference = next((found for path in uploaded
                               if (found := upload_differs(self.conn, self.cfg, self._s3(), path)) is not None), None)
            if difference is not None:
                count = manifest.requeue_folder(self.conn, f"{folder}/", f"another host's report in S3: {difference}")
                log.warning("report %s: %s (another host's upload came last): its %d files queued for upload again",
                            date, difference, count)
            index = relative_to_home(self.cfg.home, fleet_stamps.index_path(self.cfg.home, date))
            difference = upload_differs(self.conn, self.cfg, self._s3(), index)
            if difference is not None:
                manifest.requeue(self.conn, index, f"another host's stamps index in S3: {difference}")
                log.warning("stamps index %s: %s (another host's upload came last): queued for upload again", date,
                            difference)

    def _listing(self) -> dict[str, list[tuple[str, int, float]]]:
        """night -> (path, size, modification time) of each of its files in both datasets (one listing of each: a
        few requests for a season's files, which compaction keeps to a few per night, topic and partition). Not the
        stamps index: the writer makes it from the night's report, and its upload must not make the night due again."""
        found: dict[str, list[tuple[str, int, float]]] = {}
        for dataset in ("alerts", "stamps"):
            selector = fs.FileSelector(f"{self.root}/archive/{dataset}", recursive=True, allow_not_found=True)
            for info in self.filesystem.get_file_info(selector):
                night_dir = next((part for part in info.path.split("/") if part.startswith("night=")), None)
                if self.in_bucket and dataset == "stamps" and info.base_name == STAMPS_FILE:
                    continue
                if info.type == fs.FileType.File and night_dir is not None:
                    found.setdefault(night_dir.removeprefix("night="), []).append(
                        (info.path, info.size, _seconds(info.mtime)))
        return found


def _unique(rows: pa.Table) -> list[dict[str, Any]]:
    """The rows' own columns (``_row``: the row's index), each message once even if two files hold it (a part
    written again by the host that took its partition over), oldest received first."""
    own = [name for name in (*ALERT_COLUMNS, *PARTITION_COLUMNS) if name in rows.column_names]
    seen: set[tuple[Any, ...]] = set()
    kept = []
    for index, row in enumerate(rows.select(own).to_pylist()):
        key = (row["topic"], row["partition"], row["generation"], row["offset"])
        if key not in seen:
            seen.add(key)
            kept.append({**row, "_row": index})
    kept.sort(key=lambda r: (r["received_at"] or UNIX_EPOCH, r["topic"], r["partition"], r["generation"], r["offset"]))
    return kept


def _times(alerts: list[Alert]) -> Iterable[nights.ObservedTimes]:
    """The converted times of each alert, in one astropy call per kind of field; alert by alert if that fails."""
    try:
        yield from nights.convert_times(alerts)
        return
    except Exception:
        log.debug("converting the night's times failed; converting alert by alert", exc_info=True)
    for alert in alerts:
        try:
            yield from nights.convert_times([alert])
        except Exception:
            yield nights.ObservedTimes({})


def _message_of(alert: Alert) -> dict[str, Any]:
    """The message as the alert file's JSON keeps it: the decoded packet (its cutouts left out), or the JSON."""
    if isinstance(alert.body, dict):
        return alert.body
    try:
        message = json.loads(alert.raw)
    except ValueError:
        return {}
    return message if isinstance(message, dict) else {}


def _message_columns(row: dict[str, Any]) -> dict[str, Any]:
    """The message's fields among a row's columns, under their own names."""
    fields = {}
    for name, value in row.items():
        if name in RESERVED:
            continue
        original = name.removeprefix(MESSAGE_PREFIX)
        fields[original if original in RESERVED else name] = value
    return fields


def _seconds(moment: dt.datetime | None) -> float:
    """A listed file's modification time as Unix seconds (pyarrow gives UTC, naive for some filesystems)."""
    if moment is None:
        return 0.0
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)).timestamp()


def _mjd(moment: dt.datetime | None) -> float | None:
    return None if moment is None else mjd_of(moment.timestamp())
