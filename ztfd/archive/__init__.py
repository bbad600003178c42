"""The archive as a typed Parquet dataset you can ask questions (issue 22; docs/archive.md).

``archive/alerts/night=<date>/topic=<topic>/*.parquet`` (one row per stored alert, ``alerts``) and
``archive/stamps/night=<date>/stamps.parquet`` (one row per file under ``images/``, ``stamps``), written by the
``archiver`` role (``role``), read by ``ztfd query``/``object``/``cone`` (``query``) and by ``open`` below.
"""

from __future__ import annotations

from pathlib import Path

from ztfd.archive.query import Archive, QueryError, alerts_dataset, stamps_dataset

__all__ = ["Archive", "QueryError", "alerts_dataset", "open", "stamps_dataset"]


def open(home: str | Path) -> Archive:
    """The archive of a ztfd home: ``.alerts`` and ``.stamps`` are pyarrow datasets (``.to_table()`` for Arrow,
    ``.to_table().to_pandas()`` for pandas), ``.sql("select …")`` answers SQL as an Arrow table."""
    return Archive.of_home(home)
