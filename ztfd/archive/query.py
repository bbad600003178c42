"""Questions to the dataset: ``ztfd query``, ``ztfd object``, ``ztfd cone``, and ``ztfd.archive.open``.

DuckDB runs the SQL; it scans pyarrow datasets (``alerts``, ``stamps``) registered under those names, so the same
code reads a local home or S3 (pyarrow's S3 filesystem) and needs no DuckDB extension (``httpfs`` cannot be
installed offline). The alerts dataset is opened with its schema file (``_common_metadata``): a column that
appeared in a later file is null in the earlier ones instead of missing from the table.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ztfd.archive import columns, sky
from ztfd.archive.layout import COMMON_METADATA, Layout, overlapping, superseded

FORMATS = ("table", "csv", "json")


class QueryError(Exception):
    """A question the dataset cannot answer; ``str()`` is one line."""


class _FileGoneError(Exception):
    """DuckDB's word that a file of a dataset it scanned could not be opened (``str()`` is its one line)."""


T = TypeVar("T")
log = logging.getLogger(__name__)


def partitioning() -> ds.Partitioning:
    fields = [pa.field(name, dtype) for name, (dtype, _) in columns.PARTITION_COLUMNS.items()]
    return ds.partitioning(pa.schema(fields), flavor="hive")


def alerts_dataset(root: str | Path, filesystem: Any = None) -> ds.Dataset:
    """The alerts dataset at ``root`` (a folder, or ``bucket/prefix/archive/alerts`` with ``filesystem``)."""
    root = str(root)
    try:
        schema = pq.read_schema(f"{root}/{COMMON_METADATA}", filesystem=filesystem)
    except (FileNotFoundError, OSError):
        schema = columns.fixed_schema(columns.ALERT_COLUMNS)
    for name, (dtype, text) in columns.PARTITION_COLUMNS.items():
        schema = schema.append(columns.field(name, dtype, text))
    dataset = _dataset(root, schema, partitioning(), filesystem)
    folded = _folded_files(dataset.files)
    if not folded:
        return dataset
    return ds.dataset([path for path in dataset.files if path not in folded], schema=schema, format="parquet",
                      partitioning=partitioning(), partition_base_dir=root, filesystem=filesystem)


def _folded_files(paths: list[str]) -> set[str]:
    """The files whose offsets another file of their folder holds too: parts a compaction has folded and not yet
    deleted (``ztfd.archive.compaction``). Left out, so no row is read twice."""
    return _picked_per_folder(paths, superseded)


def overlapping_files(paths: list[str]) -> set[str]:
    """The files whose offsets partly meet another's of their folder (``layout.overlapping``): in a fleet, rows an
    old holder of a partition uploaded after its successor had looked. Their rows are counted once."""
    return _picked_per_folder(paths, overlapping)


def _picked_per_folder(paths: list[str], pick: Callable[[list[str]], set[str]]) -> set[str]:
    by_folder: dict[str, list[str]] = {}
    for path in paths:
        folder, _, name = path.rpartition("/")
        by_folder.setdefault(folder, []).append(name)
    return {f"{folder}/{name}" for folder, names in by_folder.items() if len(names) > 1 for name in pick(names)}


ALERT_IDENTITY = ["topic", "partition", "generation", "offset"]  # names one message: one row each


def once_per_alert(table: pa.Table) -> pa.Table:
    """The rows of ``table`` with the first of each (topic, partition, generation, offset), in their order."""
    numbered = table.select(ALERT_IDENTITY).append_column("_row", pa.array(range(table.num_rows), pa.int64()))
    first = numbered.group_by(ALERT_IDENTITY, use_threads=False).aggregate([("_row", "min")])["_row_min"]
    return table if len(first) == table.num_rows else table.take(first.take(pc.sort_indices(first)))


def _files_dataset(dataset: ds.Dataset, keep: Callable[[str], bool]) -> ds.Dataset:
    """The part of a file dataset whose files ``keep`` says."""
    fragments = [fragment for fragment in dataset.get_fragments() if keep(fragment.path)]
    return ds.FileSystemDataset(fragments, dataset.schema, dataset.format, dataset.filesystem)


def stamps_dataset(root: str | Path, filesystem: Any = None) -> ds.Dataset:
    schema = columns.fixed_schema(columns.STAMP_COLUMNS).append(
        columns.field("night", pa.date32(), columns.PARTITION_COLUMNS["night"][1]))
    fields = pa.schema([pa.field("night", pa.date32())])
    return _dataset(str(root), schema, ds.partitioning(fields, flavor="hive"), filesystem)


def _dataset(root: str, schema: pa.Schema, hive: ds.Partitioning, filesystem: Any) -> ds.FileSystemDataset:
    """The Parquet files under ``root``; none if it does not exist (an S3 prefix nothing was uploaded under yet:
    a home without stamps)."""
    try:
        return ds.dataset(root, schema=schema, format="parquet", partitioning=hive, filesystem=filesystem)
    except FileNotFoundError:
        return ds.dataset([], schema=schema, format="parquet", filesystem=filesystem)


RELISTED_ERROR = "Could not open Parquet input source"  # how pyarrow (also inside DuckDB) says a listed file went


@dataclass
class Archive:
    """The two datasets of a home (or of its copy in S3), as pyarrow datasets and DuckDB tables.

    A dataset lists its files once, when it is made; a file replaced afterwards (the archiver rewrites a file with a
    late alert, sync uploads the new version under the same key) is then read at its old size, and a file deleted
    is not there: in S3, pyarrow fails with ``Parquet magic bytes not found`` or ``NO_SUCH_KEY``. The reading
    methods here (``to_table``, ``to_pandas``, ``sql``, ``object_rows``, ``cone``) then list the files again
    (``listing``) and read once more; a second failure is raised. ``.alerts`` and ``.stamps`` read directly do not.

    The same methods count a row once where file names overlap partly (``overlapping_files``: in a fleet, rows an
    old holder of a partition uploaded late); ``.alerts`` read directly has such rows twice."""

    alerts: ds.Dataset
    stamps: ds.Dataset
    listing: Callable[[], tuple[ds.Dataset, ds.Dataset]] | None = None
    _overlap: tuple[ds.Dataset, set[str]] | None = field(default=None, repr=False)

    @classmethod
    def of_home(cls, home: str | Path, filesystem: Any = None) -> Archive:
        """The archive of a home; with a pyarrow ``filesystem`` (S3), ``home`` is where sync mirrors the home,
        ``bucket/<s3.prefix>``, whose ``archive/…`` is the home's."""
        layout = Layout(Path(home))

        def listing() -> tuple[ds.Dataset, ds.Dataset]:
            if filesystem is None:
                for folder in (layout.alerts, layout.stamps):
                    folder.mkdir(parents=True, exist_ok=True)
            return (alerts_dataset(layout.alerts, filesystem=filesystem),
                    stamps_dataset(layout.stamps, filesystem=filesystem))

        return cls(*listing(), listing=listing)

    def to_table(self) -> pa.Table:
        """Every alert as one Arrow table."""
        return self._read(self._alerts_table)

    def _alerts_table(self) -> pa.Table:
        overlap = self._overlapping()
        if not overlap:
            return self.alerts.to_table()
        apart = _files_dataset(self.alerts, lambda path: path not in overlap).to_table()
        met = _files_dataset(self.alerts, lambda path: path in overlap).to_table()
        return pa.concat_tables([apart, once_per_alert(met)])

    def _overlapping(self) -> set[str]:
        """The alerts files whose names overlap partly (none, mostly), found once per listing."""
        if self._overlap is None or self._overlap[0] is not self.alerts:
            self._overlap = (self.alerts, overlapping_files(getattr(self.alerts, "files", [])))
        return self._overlap[1]

    def _shared_nights(self) -> set[str]:
        """The stamps files of nights that have more than one (a fleet's hosts each write their own, and a stamp
        fetched again by the host that took a lost host's partition over has a row in both); none on one host."""
        by_night: dict[str, list[str]] = {}
        for path in getattr(self.stamps, "files", []):
            by_night.setdefault(path.rsplit("/", 1)[0], []).append(path)
        return {path for paths in by_night.values() if len(paths) > 1 for path in paths}

    def to_pandas(self) -> Any:
        """Every alert as a pandas DataFrame with Arrow-backed columns: 64-bit integers stay integers even where
        a value is null (the default conversion would make them floats), NaN stays NaN."""
        import pandas as pd

        return self.to_table().to_pandas(types_mapper=pd.ArrowDtype)

    def sql(self, text: str, **tables: Any) -> pa.Table:
        """Run ``text`` with ``alerts`` and ``stamps`` (or the ``tables`` given) as tables; ``QueryError`` (one
        line) if DuckDB refuses it."""
        try:
            return self._read(lambda: self._sql(text, tables))
        except _FileGoneError as exc:
            raise QueryError(str(exc)) from None

    def _sql(self, text: str, tables: dict[str, Any]) -> pa.Table:
        import duckdb

        con = duckdb.connect()
        try:
            named = {"alerts": self.alerts, "stamps": self.stamps} | tables
            overlap = set() if "alerts" in tables else self._overlapping()
            if overlap:  # the rows of files that overlap partly, once each
                con.register("_alerts_apart", _files_dataset(self.alerts, lambda path: path not in overlap))
                con.register("_alerts_met", _files_dataset(self.alerts, lambda path: path in overlap))
                con.execute(ONCE_VIEW)
                del named["alerts"]
            shared = set() if "stamps" in tables else self._shared_nights()
            if shared:  # a fleet's nights that more than one host's stamps files list: each path once
                con.register("_stamps_apart", _files_dataset(self.stamps, lambda path: path not in shared))
                con.register("_stamps_met", _files_dataset(self.stamps, lambda path: path in shared))
                con.execute(STAMPS_ONCE_VIEW)
                del named["stamps"]
            for name, table in named.items():
                con.register(name, table)
            relation = con.sql(text)
            return pa.table({}) if relation is None else relation.to_arrow_table()
        except duckdb.Error as exc:
            line = str(exc).strip().splitlines()[0]
            if RELISTED_ERROR in line:
                raise _FileGoneError(line) from None
            raise QueryError(line) from None
        finally:
            con.close()

    def _read(self, read: Callable[[], T]) -> T:
        """``read()``; if a file it was listed with is gone or changed, list the files again and read once more."""
        try:
            return read()
        except (OSError, pa.ArrowInvalid, _FileGoneError) as exc:
            if self.listing is None:
                raise
            log.info("archive: a file changed while it was read, listing the files again: %s", exc)
            self.alerts, self.stamps = self.listing()
            return read()

    def object_rows(self, object_id: str) -> pa.Table:
        return self._read(lambda: self._object_rows(object_id))

    def _object_rows(self, object_id: str) -> pa.Table:
        """Every alert of ``object_id``, oldest first, each with its stamps (a list of structs) inside the row.

        pyarrow picks the object's rows out of both datasets (``matching_rows``); the few stamps are then put
        into their alerts' rows here (a DuckDB join of two tiny tables costs more in setting it up)."""
        wanted = ds.field("object_id") == object_id
        alerts = matching_rows(self.alerts, "object_id", wanted, OBJECT_COLUMNS)
        if self._overlapping():
            alerts = once_per_alert(alerts)
        stamps = matching_rows(self.stamps, "object_id", wanted, ["detection_id", "kind", "path", "bytes"])
        by_detection: dict[str | None, list[dict[str, Any]]] = {}
        seen: set[str] = set()  # in a fleet, a stamp fetched again by a host that took a partition over has a row
        for stamp in sorted(stamps.to_pylist(), key=lambda row: row["path"]):  # in each host's file: shown once
            if stamp["path"] in seen:
                continue
            seen.add(stamp["path"])
            detection = stamp.pop("detection_id")
            by_detection.setdefault(detection, []).append(stamp)
        inside = [by_detection.get(detection, []) for detection in alerts["detection_id"].to_pylist()]
        alerts = alerts.drop_columns(["object_id"]).append_column("stamps", pa.array(inside, STAMPS_INSIDE))
        return alerts.sort_by([("observed_at", "ascending"), ("received_at", "ascending")])

    def night_rows(self, date: str, topic: str | None = None) -> pa.Table:
        """Every alert row of night ``date`` (of ``topic`` only, if given), as stored: the fleet's night report
        reads the fleet's night from them (``reporting.fleet_night``)."""
        where = f"night = DATE {_sql_text(date)}" + (f" AND topic = {_sql_text(topic)}" if topic else "")
        return self.sql(f"SELECT * FROM alerts WHERE {where}")

    def night_stamp_paths(self, date: str) -> pa.Table:
        """``object_id`` and ``path`` of every file of night ``date`` in the stamps dataset, each once."""
        return self.sql(f"SELECT DISTINCT object_id, path FROM stamps WHERE night = DATE {_sql_text(date)}")

    def cone(self, ra: float, dec: float, radius_arcsec: float) -> pa.Table:
        """Alerts within ``radius_arcsec`` of (ra, dec), nearest first: the rows whose ``_healpix_29`` falls in the
        ranges that cover the cone (pyarrow, as the column is read), then the true angular distance (haversine,
        DuckDB)."""
        if not (math.isfinite(ra) and math.isfinite(dec) and -90 <= dec <= 90 and radius_arcsec > 0):
            raise QueryError("cone needs RA in degrees, DEC in [-90, 90] and a radius above 0 arcsec")
        cells = ds.field("_healpix_29")
        near = None
        for low, high in sky.cone_ranges(ra, dec, radius_arcsec):
            term = (cells >= low) & (cells <= high)
            near = term if near is None else near | term
        candidates = self._read(lambda: self._cone_candidates(near))
        return self.sql(CONE_SQL.format(ra=float(ra), dec=float(dec), radius=float(radius_arcsec)),
                        alerts=candidates)

    def _cone_candidates(self, near: ds.Expression | None) -> pa.Table:
        """The rows in the cone's cells; each message once (its identity read only where file names overlap)."""
        if not self._overlapping():
            return matching_rows(self.alerts, "_healpix_29", near, CONE_COLUMNS)
        return once_per_alert(matching_rows(self.alerts, "_healpix_29", near, [*CONE_COLUMNS, "partition",
                                                                                "generation", "offset"]))


def matching_rows(dataset: ds.Dataset, key: str, wanted: ds.Expression | None, wanted_columns: list[str]) -> pa.Table:
    """The ``wanted`` rows of a dataset, in two reads: the ``key`` column of every file (filtered as it is read)
    says which files hold such rows; only those are read with every column asked for. Reading all the columns of
    every file and filtering afterwards decodes them for rows that are thrown away (several times slower)."""
    holding = {}
    for tagged in dataset.scanner(columns=[key], filter=wanted).scan_batches():
        if tagged.record_batch.num_rows:
            holding[tagged.fragment.path] = tagged.fragment
    found = ds.FileSystemDataset(list(holding.values()), dataset.schema, dataset.format, dataset.filesystem)
    return found.to_table(columns=wanted_columns, filter=wanted)


OBJECT_COLUMNS = ["observed_at", "received_at", "topic", "night", "partition", "generation", "offset",
                  "object_id", "detection_id", "ra", "dec", "file"]
STAMPS_INSIDE = pa.list_(pa.struct([("kind", pa.string()), ("path", pa.string()), ("bytes", pa.int64())]))

CONE_COLUMNS = ["object_id", "topic", "night", "observed_at", "detection_id", "ra", "dec", "file"]
ONCE_VIEW = """
CREATE VIEW alerts AS
SELECT * FROM _alerts_apart
UNION ALL
SELECT DISTINCT ON ("topic", "partition", "generation", "offset") * FROM _alerts_met
"""
# One row per stamp file: in a fleet two hosts' files of a night may both list a path (the earliest written kept).
# Only those nights go through the window; partitioned by night too, so a filter on night still reaches the scan.
STAMPS_ONCE_VIEW = """
CREATE VIEW stamps AS
SELECT * FROM _stamps_apart
UNION ALL
SELECT * FROM _stamps_met QUALIFY row_number() OVER (PARTITION BY night, path ORDER BY written_at, md5) = 1
"""
CONE_SQL = """
SELECT * FROM (
  SELECT object_id, topic, night, observed_at, detection_id, ra, dec, file,
         degrees(2 * asin(sqrt(pow(sin(radians(dec - {dec}) / 2), 2)
           + cos(radians({dec})) * cos(radians(dec)) * pow(sin(radians(ra - {ra}) / 2), 2)))) * 3600 AS distance_arcsec
  FROM alerts
) WHERE distance_arcsec <= {radius} ORDER BY distance_arcsec, object_id, observed_at
"""


# --- output ---------------------------------------------------------------------------------------------------


def _sql_text(value: str) -> str:
    """``value`` as an SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def render(table: pa.Table, fmt: str) -> str:
    """The rows as a text table, CSV, or JSON (one array of row objects)."""
    rows = table.to_pylist()
    if fmt == "json":
        return json.dumps([{k: _plain(v) for k, v in row.items()} for row in rows], indent=1)
    cells = [[_cell(row[name]) for name in table.column_names] for row in rows]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(table.column_names)
        writer.writerows(cells)
        return out.getvalue().rstrip("\n")
    widths = [max([len(name), *(len(row[i]) for row in cells)]) for i, name in enumerate(table.column_names)]
    lines = ["  ".join(name.ljust(w) for name, w in zip(table.column_names, widths, strict=True))]
    lines += ["  ".join(value.ljust(w) for value, w in zip(row, widths, strict=True)) for row in cells]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(line.rstrip() for line in lines)


def _plain(value: Any) -> Any:
    """A value JSON can carry: times as ISO 8601, bytes as their size, NaN as null, nested values walked."""
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, list | dict):
        return json.dumps(_plain(value))
    return str(_plain(value))
