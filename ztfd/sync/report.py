"""What ``ztfd sync`` prints: a progress bar on a terminal, then one summary line (stdout) and at most one error
line (stderr). The library modules log; only this module writes to the terminal."""

from __future__ import annotations

import sys

import click

from ztfd.config import Config
from ztfd.sync.dryrun import DryRun
from ztfd.sync.pending import Progress
from ztfd.sync.result import PassResult
from ztfd.sync.s3 import s3_key
from ztfd.units import human_bytes


def error(message: str) -> None:
    click.echo(f"ztfd: {message}", err=True)


def progress_bar(count: int) -> Progress | None:
    """A bar on stderr when it is a terminal; None (no display) otherwise."""
    if not sys.stderr.isatty():
        return None
    bar = click.progressbar(length=count, label="uploading", file=sys.stderr, show_pos=True, show_eta=True)
    bar.render_progress()
    return bar


def print_pass(result: PassResult) -> None:
    summary = (f"ztfd sync: {result.files} files, {human_bytes(result.bytes)} uploaded in {result.seconds:.1f} s; "
               f"{result.failures} failed; {result.pending} pending")
    if result.deleted_local:
        summary += f"; {result.deleted_local} local files deleted (retention)"
    if result.deleted_remote:
        summary += f"; {result.deleted_remote} objects deleted from S3 (replaced by files of other names)"
    if result.unverified:
        summary += f"; {result.unverified} not verified on S3 (kept)"
    if result.requeued:
        summary += f"; {result.requeued} queued for upload again (retention)"
    click.echo(summary)
    if result.error:
        error(f"sync: {result.error}")
    elif result.interrupted:
        error("sync: interrupted; the rest goes in the next pass")
    elif result.failures:
        error(f"sync: {result.failures} files failed; see logs/sync.log (they are retried next pass)")


def print_dry_run(found: DryRun, cfg: Config) -> None:
    for what, path in found.changes:
        click.echo(f"{what}\t{path}")
    for path in sorted(found.uploads):
        click.echo(f"{s3_key(cfg, path)}\t{found.uploads[path]}")
    click.echo(f"ztfd sync --dry-run: {len(found.uploads)} files, {human_bytes(sum(found.uploads.values()))} would be "
               f"uploaded to s3://{cfg.s3.bucket}/{cfg.s3.prefix}")
