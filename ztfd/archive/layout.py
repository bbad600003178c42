"""Where the archive's files are under a ztfd home (``archive/``), and the alerts dataset's schema file."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ztfd import files

ARCHIVE = "archive"
COMMON_METADATA = "_common_metadata"


class Layout:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.root = home / ARCHIVE
        self.alerts = self.root / "alerts"
        self.stamps = self.root / "stamps"
        self.schemas = self.root / "schemas"
        self.lock = self.root / ".lock"

    def alerts_night(self, date: str) -> Path:
        return self.alerts / f"night={date}"

    def alerts_file(self, date: str, topic: str, name: str) -> Path:
        return self.alerts_night(date) / f"topic={topic}" / name

    def stamps_file(self, date: str) -> Path:
        return self.stamps / f"night={date}" / "stamps.parquet"

    def schema_file(self, schema: dict[str, Any]) -> Path:
        """``archive/schemas/<sha256 of the schema's canonical JSON, 16 hex>.avsc``."""
        text = json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()
        return self.schemas / f"{hashlib.sha256(text).hexdigest()[:16]}.avsc"

    @property
    def alerts_schema_path(self) -> Path:
        return self.alerts / COMMON_METADATA

    def read_alerts_schema(self) -> pa.Schema | None:
        try:
            return pq.read_schema(self.alerts_schema_path)
        except FileNotFoundError:
            return None

    def write_alerts_schema(self, schema: pa.Schema) -> tuple[str, int, str]:
        """Write the dataset's schema file; its manifest row."""
        buffer = io.BytesIO()
        pq.write_metadata(schema, buffer)
        data = buffer.getvalue()
        files.atomic_write(self.alerts_schema_path, data)
        return files.relative_to_home(self.home, self.alerts_schema_path), len(data), files.md5_hex(data)
