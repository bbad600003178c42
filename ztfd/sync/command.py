"""The ``ztfd sync`` command: which mode runs, and the exit code.

Exit 0 when everything pending was uploaded, 1 when not (failures, an outage, bad bucket or credentials, lock
timeout, interrupted), 2 when there is no bucket to sync to. A first SIGTERM or SIGINT lets the uploads in flight
finish (``lifecycle.Stop``); a second one exits at once.
"""

from __future__ import annotations

from ztfd import store
from ztfd.config import Config
from ztfd.daemon import lifecycle
from ztfd.sync import dryrun, report
from ztfd.sync.daemon import run_daemon
from ztfd.sync.passes import locked_pass


def run(cfg: Config, once: bool, dry_run: bool, full: bool, name: str) -> int:
    if not cfg.s3.bucket:
        report.error("config: s3.bucket is empty: nothing to sync to")
        return 2
    conn = store.connect(cfg.db_path)
    if dry_run:
        report.print_dry_run(dryrun.dry_run(conn, cfg, full), cfg)
        return 0
    stop = lifecycle.Stop().install()  # the first SIGTERM finishes the uploads in flight; a second exits at once
    if once:
        result = locked_pass(conn, cfg, stop, full=full, wait=cfg.s3.lock_timeout, progress=report.progress_bar)
        report.print_pass(result)
        return 0 if result.ok else 1
    return run_daemon(conn, cfg, stop, name, full)

