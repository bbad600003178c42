"""The archive as a typed Parquet dataset you can ask questions (issue 22; docs/archive.md).

``archive/alerts/night=<date>/topic=<topic>/*.parquet`` (one row per stored alert, ``alerts``) and
``archive/stamps/night=<date>/stamps.parquet`` (one row per file under ``images/``, ``stamps``; in a fleet each host
writes its own, and the night report's writer the fleet's index from the bucket, ``fleet_stamps``), written by the
``archiver`` role (``role``), read by ``ztfd query``/``object``/``cone`` (``query``) and by ``open`` below.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ztfd.archive.query import Archive, QueryError, alerts_dataset, stamps_dataset

__all__ = ["Archive", "QueryError", "alerts_dataset", "open", "stamps_dataset"]


def open(home: str | Path, filesystem: Any = None) -> Archive:
    """The archive of a ztfd home: ``.alerts`` and ``.stamps`` are pyarrow datasets, ``.to_table()`` gives Arrow,
    ``.to_pandas()`` pandas, ``.sql("select …")`` answers SQL as an Arrow table. With a pyarrow ``filesystem``
    (``pyarrow.fs.S3FileSystem``), ``home`` is the home's mirror in the bucket, ``bucket/<s3.prefix>``. A file
    replaced or deleted while it is read (a rewrite the archiver made, uploaded by sync) is read again once the
    files are listed again."""
    from ztfd.archive.query import Archive

    return Archive.of_home(home, filesystem)


def __getattr__(name: str) -> Any:
    """The readers, imported when first asked for: ``ztfd.archive.query`` brings DuckDB, pyarrow and astropy
    (~120 MB and half a second), which a process that only needs the layout's names (the syncer) never uses."""
    if name in ("Archive", "QueryError", "alerts_dataset", "stamps_dataset"):
        return getattr(importlib.import_module("ztfd.archive.query"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
