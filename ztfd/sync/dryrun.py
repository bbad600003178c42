"""``sync --dry-run``: what a pass would upload (and, with ``--full``, what reconciling would change).

It changes nothing and takes no lock; ``report.print_dry_run`` shows it.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field

from ztfd.config import Config
from ztfd.store import manifest
from ztfd.sync.reconcile import reconcile


@dataclass
class DryRun:
    changes: list[tuple[str, str]] = field(default_factory=list)  # (added | changed | removed, path) with --full
    uploads: dict[str, int] = field(default_factory=dict)  # path -> size


def dry_run(conn: sqlite3.Connection, cfg: Config, full: bool) -> DryRun:
    found = DryRun()
    extra: list[tuple[str, int, str]] = []
    if full:
        plan = reconcile(conn, cfg)
        for what, paths in (("added", [p for p, _, _ in plan.added]), ("changed", [p for p, _, _ in plan.changed]),
                            ("removed", plan.removed)):
            found.changes.extend((what, path) for path in paths)
        extra = plan.added + plan.changed
    found.uploads = {item.path: item.size for item in manifest.iter_pending(conn)}
    found.uploads.update({path: size for path, size, _ in extra})
    return found
