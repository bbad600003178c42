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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ztfd.archive import columns, sky
from ztfd.archive.layout import COMMON_METADATA, Layout

FORMATS = ("table", "csv", "json")


class QueryError(Exception):
    """A question the dataset cannot answer; ``str()`` is one line."""


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
    return ds.dataset(root, schema=schema, format="parquet", partitioning=partitioning(), filesystem=filesystem)


def stamps_dataset(root: str | Path, filesystem: Any = None) -> ds.Dataset:
    schema = columns.fixed_schema(columns.STAMP_COLUMNS).append(
        columns.field("night", pa.date32(), columns.PARTITION_COLUMNS["night"][1]))
    fields = pa.schema([pa.field("night", pa.date32())])
    return ds.dataset(str(root), schema=schema, format="parquet",
                      partitioning=ds.partitioning(fields, flavor="hive"), filesystem=filesystem)


@dataclass
class Archive:
    """The two datasets of a home (or of an S3 copy), as pyarrow datasets and DuckDB tables."""

    alerts: ds.Dataset
    stamps: ds.Dataset

    @classmethod
    def of_home(cls, home: str | Path) -> Archive:
        layout = Layout(Path(home))
        for folder in (layout.alerts, layout.stamps):
            folder.mkdir(parents=True, exist_ok=True)
        return cls(alerts_dataset(layout.alerts), stamps_dataset(layout.stamps))

    def to_table(self) -> pa.Table:
        """Every alert as one Arrow table."""
        return self.alerts.to_table()

    def to_pandas(self) -> Any:
        """Every alert as a pandas DataFrame with Arrow-backed columns: 64-bit integers stay integers even where
        a value is null (the default conversion would make them floats), NaN stays NaN."""
        import pandas as pd

        return self.alerts.to_table().to_pandas(types_mapper=pd.ArrowDtype)

    def sql(self, text: str) -> pa.Table:
        """Run ``text`` with ``alerts`` and ``stamps`` as tables; ``QueryError`` (one line) if DuckDB refuses it."""
        import duckdb

        con = duckdb.connect()
        try:
            con.register("alerts", self.alerts)
            con.register("stamps", self.stamps)
            relation = con.sql(text)
            return pa.table({}) if relation is None else relation.to_arrow_table()
        except duckdb.Error as exc:
            raise QueryError(str(exc).strip().splitlines()[0]) from None
        finally:
            con.close()

    def object_rows(self, object_id: str) -> pa.Table:
        """Every alert of ``object_id``, oldest first, each with its stamps (a list of structs) inside the row."""
        return self.sql(OBJECT_SQL.replace("$object", _literal(object_id)))

    def cone(self, ra: float, dec: float, radius_arcsec: float) -> pa.Table:
        """Alerts within ``radius_arcsec`` of (ra, dec): pruned by ``_healpix_29`` ranges, then the true angular
        distance (haversine), nearest first."""
        if not (math.isfinite(ra) and math.isfinite(dec) and -90 <= dec <= 90 and radius_arcsec > 0):
            raise QueryError("cone needs RA in degrees, DEC in [-90, 90] and a radius above 0 arcsec")
        ranges = sky.cone_ranges(ra, dec, radius_arcsec)
        where = " OR ".join(f"_healpix_29 BETWEEN {low} AND {high}" for low, high in ranges) or "false"
        return self.sql(CONE_SQL.format(ra=float(ra), dec=float(dec), where=where, radius=float(radius_arcsec)))


OBJECT_SQL = """
SELECT a.observed_at, a.received_at, a.topic, a.night, a.partition, a.generation, a."offset", a.detection_id,
       a.ra, a.dec, a.file,
       (SELECT list({'kind': s.kind, 'path': s.path, 'bytes': s.bytes} ORDER BY s.path) FROM stamps s
        WHERE s.object_id = a.object_id AND s.detection_id = a.detection_id) AS stamps
FROM alerts a WHERE a.object_id = $object
ORDER BY a.observed_at NULLS LAST, a.received_at
"""

CONE_SQL = """
SELECT * FROM (
  SELECT object_id, topic, night, observed_at, detection_id, ra, dec, file,
         degrees(2 * asin(sqrt(pow(sin(radians(dec - {dec}) / 2), 2)
           + cos(radians({dec})) * cos(radians(dec)) * pow(sin(radians(ra - {ra}) / 2), 2)))) * 3600 AS distance_arcsec
  FROM alerts WHERE ({where})
) WHERE distance_arcsec <= {radius} ORDER BY distance_arcsec, object_id, observed_at
"""


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# --- output ---------------------------------------------------------------------------------------------------


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
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, list | dict):
        return json.dumps(_plain(value))
    return str(_plain(value))
