"""``ztfd demo``: the whole pipeline on embedded local services, in a throwaway home, in about a minute.

It starts a Tansu Kafka broker, a moto S3 server and the local ALeRCE-like stamp service (``ztfd.embedded``),
writes a demo configuration, runs the real daemon (``ztfd start --foreground`` in a child process), produces a
Lasair-like stream built from the sample packets (the documented message shapes plus two poison messages), shows
progress until every alert is stored, every stamp job finished and every file uploaded, then prints the status
table, what was written, the S3 keys and a preview PNG. Everything it starts is stopped again, also on Ctrl-C.

The pieces (``EmbeddedServices``, ``write_config``, ``Daemon``) are also what ``bin/bench`` drives.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from ztfd import store
from ztfd.daemon import lifecycle
from ztfd.embedded.net import free_port
from ztfd.store import jobs
from ztfd.store.alerts import count_alerts
from ztfd.store.manifest import FileState, state_totals
from ztfd.store.rejected import rejected_counts

# Options for local brokers: a short metadata refresh notices new topics fast (see docs/testing.md).
FAST_KAFKA_OPTIONS: dict[str, Any] = {
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 500,
    "topic.metadata.refresh.interval.ms": 1000,
}
# Dummy credentials for the local moto S3 server; set in the children's environment, never real ones.
LOCAL_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "ztfd-local",
    "AWS_SECRET_ACCESS_KEY": "ztfd-local",
    "AWS_DEFAULT_REGION": "us-east-1",
}
SN_TOPIC = "lasair_2SN-likecandidates"
HEARTBEAT_TOPIC = "lasair_1Lightweight"
LSST_TOPIC = "lasair_3LSST-transients"  # a Lasair-LSST filter: real Rubin alerts in full, lite and plain output
AVRO_TOPIC = "ztf_20210901_programid1"  # ZTF's own packets (format ztf-avro): the stamps come inside
LSST_MODES = ("full", "lite", "plain")  # full first: its jobs know the diaSourceId; the others ask ALeRCE
BUCKET = "ztfd-demo"
DEADLINE_SECONDS = 110.0


# --- configuration -----------------------------------------------------------------------------------------


def _toml_key(key: str) -> str:
    """A bare key when TOML allows one, else quoted (``"session.timeout.ms"``, a ``"^ztf_"`` pattern)."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def write_config(path: Path, home: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write a ztfd TOML config; ``sections`` maps a section name (``kafka``, ``kafka.options``…) to its keys."""
    lines = [f"home = {_toml_value(str(home))}", ""]
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(
            f"{_toml_key(key)} = {_toml_value(value)}" for key, value in values.items()
        )
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# --- embedded services ---------------------------------------------------------------------------------------


class EmbeddedServices(contextlib.ExitStack):
    """Tansu Kafka, moto S3 and the local stamp service on 127.0.0.1, stopped together on exit."""

    def __init__(self, workdir: Path, stamp_latency: float = 0.0, kafka: bool = True, s3: bool = True,
                 stamps: bool = True) -> None:
        super().__init__()
        self.workdir = workdir
        self.stamp_latency = stamp_latency
        self.want = {"kafka": kafka, "s3": s3, "stamps": stamps}
        self.kafka: Any = None
        self.s3: Any = None
        self.stamps: Any = None

    def __enter__(self) -> EmbeddedServices:
        super().__enter__()
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            if self.want["kafka"]:
                from ztfd.embedded.kafka import KafkaBroker

                self.kafka = self.enter_context(KafkaBroker(log_path=self.workdir / "tansu.log"))
            if self.want["s3"]:
                from ztfd.embedded.s3 import S3Server

                self.s3 = self.enter_context(S3Server())
            if self.want["stamps"]:
                from ztfd.embedded.alerce import StampService

                self.stamps = self.enter_context(StampService(latency=self.stamp_latency))
        except BaseException:
            self.close()
            raise
        return self

    def kill_now(self) -> None:
        """For a cold stop: SIGKILL the services that run as processes (the stamp service is a thread of ours)."""
        processes = [self.kafka.process if self.kafka else None, self.s3.process if self.s3 else None]
        lifecycle.kill_now([p for p in processes if p is not None], group=True)

    def s3_client(self) -> Any:
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.s3.endpoint_url, region_name=LOCAL_AWS_ENV["AWS_DEFAULT_REGION"],
            aws_access_key_id=LOCAL_AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=LOCAL_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        )


# --- the daemon ----------------------------------------------------------------------------------------------


def ztfd_argv(config_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "ztfd", "--config", str(config_path), *args]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(LOCAL_AWS_ENV)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Daemon:
    """``ztfd start --foreground`` as a child in its own session; ``stop`` leaves nothing of it running."""

    config_path: Path
    log_dir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    seen: dict[int, Any] = field(default_factory=dict)  # pid -> psutil.Process, every descendant ever seen

    def start(self) -> Daemon:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / "child-0.out").open("ab") as output:
            self.processes.append(subprocess.Popen(
                ztfd_argv(self.config_path, "start", "--foreground"), stdout=output, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=child_env(), start_new_session=True,
            ))
        return self

    def tree(self) -> list[Any]:
        """Every live process of the daemon (children and their descendants), remembered for ``stop``."""
        import psutil

        found = []
        for popen in self.processes:
            try:
                root = psutil.Process(popen.pid)
                members = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for proc in members:
                self.seen.setdefault(proc.pid, proc)
                found.append(proc)
        return found

    def exited(self) -> list[int]:
        return [p.returncode for p in self.processes if p.poll() is not None]

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the children, wait, then SIGKILL whatever of the whole tree is still alive."""
        self.tree()
        stop_tree(self.processes, list(self.seen.values()), timeout)

    def kill_now(self) -> None:
        """For a cold stop: SIGKILL every child's process group, waiting for nothing. (The supervisor's own
        children get their SIGTERM from its death.)"""
        lifecycle.kill_now(self.processes, group=True)


def stop_tree(children: Sequence[subprocess.Popen[bytes]], descendants: Sequence[Any], timeout: float) -> None:
    """Terminate children started in sessions of their own (their process groups), then whatever of their
    ``descendants`` (``psutil.Process`` objects seen while they ran) outlived them, within ``timeout`` in all."""
    deadline = time.monotonic() + timeout
    lifecycle.terminate(children, timeout, group=True)
    # Grandchildren (the supervisor's children) must be gone too: they had their SIGTERM from the supervisor or
    # its death; what is still there after the rest of the timeout is killed.
    leftovers = [proc.pid for proc in descendants if _alive(proc)]
    lifecycle.terminate(leftovers, max(0.5, deadline - time.monotonic()))


def _alive(proc: Any) -> bool:
    import psutil

    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


# --- the stream ----------------------------------------------------------------------------------------------


def demo_messages(sn_count: int, heartbeat_count: int) -> dict[str, list[bytes]]:
    """The demo's topics: SN-like rows (with nulls) and topic_refresh rows, a heartbeat topic, plus poison; and a
    Lasair-LSST topic of the real Rubin samples in the three output modes (bare NaN included)."""
    import json

    from ztfd.embedded import lsst_samples
    from ztfd.embedded.samples import message_stream

    sn = [json.dumps(m).encode() for m in message_stream(sn_count, shapes=("sn", "sn", "refresh"))]
    heartbeat = [json.dumps(m).encode() for m in message_stream(heartbeat_count, shapes=("heartbeat",))]
    # Two poison messages: kept in the rejected store with a reason, and the stream goes on.
    sn.insert(len(sn) // 3, b"{this is not json")
    heartbeat.insert(len(heartbeat) // 2, json.dumps({"objectId": "../../etc/passwd", "UTC": "2021-09-01"}).encode())
    lsst = lsst_samples.message_stream(len(lsst_samples.object_alerts()) * len(LSST_MODES), LSST_MODES)
    return {SN_TOPIC: sn, HEARTBEAT_TOPIC: heartbeat, LSST_TOPIC: lsst, AVRO_TOPIC: avro_packets()}


def avro_packets() -> list[bytes]:
    """The real ZTF packets as ZTF's brokers send them, under objectIds of their own (``ZTF21avro…``), so that
    the report can show that not one stamp of theirs was asked of the stamp service."""
    import dataclasses

    from ztfd.embedded.avro_samples import ztf_packet_bytes
    from ztfd.embedded.samples import packets

    return [ztf_packet_bytes(dataclasses.replace(p, object_id=avro_object_id(i))) for i, p in enumerate(packets())]


def avro_object_id(index: int) -> str:
    return "ZTF21avro" + "".join(chr(ord("a") + (index // 26 ** k) % 26) for k in (2, 1, 0))


def produce_steadily(bootstrap: str, topic: str, values: Sequence[bytes], per_second: float) -> None:
    """Produce ``values`` at about ``per_second``, so that progress can be watched."""
    from ztfd.embedded.kafka import produce

    chunk = max(1, int(per_second / 5))
    start = time.monotonic()
    for index in range(0, len(values), chunk):
        produce(bootstrap, topic, values[index:index + chunk])
        due = start + (index + chunk) / per_second
        time.sleep(max(0.0, due - time.monotonic()))


# --- progress ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    alerts: int
    rejected: int
    jobs_total: int
    jobs_finished: int
    jobs_failed: int
    files: int
    files_uploaded: int

    def pending(self) -> str:
        """What is not done yet, in words."""
        open_jobs = self.jobs_total - self.jobs_finished
        files = self.files - self.files_uploaded
        parts = [f"{open_jobs} stamp jobs open" if open_jobs else "",
                 f"{files} files not uploaded yet" if files else ""]
        return ", ".join(p for p in parts if p) or "the alerts still to arrive"

    def line(self, elapsed: float, produced: int) -> str:
        return (
            f"{elapsed:5.1f}s  alerts {self.alerts + self.rejected}/{produced} received ({self.rejected} rejected)"
            f"  stamps {self.jobs_finished}/{self.jobs_total} jobs"
            f"  s3 {self.files_uploaded}/{self.files} files uploaded"
        )


def read_progress(conn: sqlite3.Connection) -> Progress:
    queue = jobs.counts(conn)
    files = state_totals(conn)
    return Progress(
        alerts=count_alerts(conn),
        rejected=sum(rejected_counts(conn).values()),
        jobs_total=queue.total,
        jobs_finished=queue.finished,
        jobs_failed=queue.failed,
        files=sum(t.files for t in files.values()),
        files_uploaded=files[FileState.DONE].files,
    )


# --- the demo ------------------------------------------------------------------------------------------------


class DemoInterruptedError(Exception):
    """SIGTERM or SIGINT arrived: stop everything and exit 130."""


def _check(stop: lifecycle.Stop) -> None:
    """Between two steps of the demo: leave (stopping everything) if a signal asked for it."""
    if stop.is_set():
        name = lifecycle.signal_name(stop.signum or signal.SIGINT)
        click.echo(f"\nztfd demo: interrupted ({name}), stopping everything (again to stop at once)", err=True)
        raise DemoInterruptedError(name)


def run(keep: bool = False, home: Path | None = None, sn_count: int = 150, heartbeat_count: int = 60) -> int:
    """Run the demo; 0 when every alert, stamp and upload arrived, 1 when not, 130 when interrupted."""
    started = time.monotonic()
    made_home = home is None
    home = Path(tempfile.mkdtemp(prefix="ztfd-demo-")) if home is None else home.expanduser().resolve()
    if home.exists() and any(home.iterdir()) and not made_home:
        click.echo(f"ztfd demo: --home {home} is not empty; give a new or empty folder", err=True)
        return 2
    home.mkdir(parents=True, exist_ok=True)
    click.echo(f"ztfd demo: home {home}")
    daemon: Daemon | None = None
    services = EmbeddedServices(home / "services", stamp_latency=0.05)

    def kill_now() -> None:  # a second Ctrl-C: nothing the demo started may outlive it
        if daemon is not None:
            daemon.kill_now()
        services.kill_now()

    try:
        with lifecycle.stop_on_signals(on_cold_stop=kill_now) as stop, services:
            _check(stop)
            click.echo(f"  kafka (tansu) {services.kafka.bootstrap}   s3 (moto) {services.s3.endpoint_url}"
                       f"   stamps (local ALeRCE) {services.stamps.url}")
            services.s3_client().create_bucket(Bucket=BUCKET)
            messages = demo_messages(sn_count, heartbeat_count)
            for topic in messages:
                services.kafka.create_topic(topic)
            config_path = write_config(home / "ztfd.toml", home, demo_sections(services))
            _check(stop)
            daemon = Daemon(config_path, home / "services").start()
            services.callback(daemon.stop)  # the daemon stops first, while the services it talks to still run
            click.echo(f"  daemon: ztfd start --foreground (config {config_path})")
            click.echo(f"  metrics: {metrics_url(config_path)} (Prometheus text format, while the demo runs)")
            outcome = _flow(services, daemon, config_path, messages, started, stop)
            _report(services, config_path, home, outcome.report)
            if not keep:
                click.echo(f"  (the demo home goes at the end; `{ztfd_command()} demo --keep` keeps it to browse)")
            return 0 if outcome.ok else 1
    except DemoInterruptedError:
        return 130
    finally:
        if keep:
            click.echo(f"ztfd demo: kept the demo home to browse: {home}; inspect it with\n"
                       f"  {ztfd_command()} --config {shlex.quote(str(home / 'ztfd.toml'))} status\n"
                       f"  {ztfd_command()} --config {shlex.quote(str(home / 'ztfd.toml'))} report")
        elif made_home:
            shutil.rmtree(home, ignore_errors=True)
        click.echo(f"ztfd demo: done in {time.monotonic() - started:.0f}s, everything it started is stopped")


def demo_sections(services: EmbeddedServices, **overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    sections: dict[str, dict[str, Any]] = {
        "kafka": {"bootstrap_servers": services.kafka.bootstrap, "group_id": "ztfd-demo",
                  "topics": [SN_TOPIC, HEARTBEAT_TOPIC, LSST_TOPIC, AVRO_TOPIC]},
        "kafka.formats": {AVRO_TOPIC: "ztf-avro"},
        "kafka.options": dict(FAST_KAFKA_OPTIONS),
        "stamps": {"enabled": True, "workers": 2, "previews": True, "alerce_stamp_url": services.stamps.url,
                   "alerce_api_url": services.stamps.url, "timeout": 10.0, "rate_limit": 0.0,
                   "lsst_provider": "alerce", "alerce_lsst_url": services.stamps.url,
                   "lasair_lsst_url": services.stamps.url},
        "s3": {"bucket": BUCKET, "prefix": "ztf/", "endpoint_url": services.s3.endpoint_url,
               "region": LOCAL_AWS_ENV["AWS_DEFAULT_REGION"], "interval": 2.0},
        "supervisor": {"heartbeat_timeout": 60.0, "stop_timeout": 20.0},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "archive": {"enabled": True, "interval": 2.0},
    }
    for name, values in overrides.items():
        sections.setdefault(name.replace("__", "."), {}).update(values)
    return sections


@dataclass(frozen=True)
class FlowOutcome:
    """How the demo's pipeline ended: all done without a failed stamp job, and the report line (if written)."""

    ok: bool
    report: str | None


def _flow(services: EmbeddedServices, daemon: Daemon, config_path: Path, messages: dict[str, list[bytes]],
          started: float, stop: lifecycle.Stop) -> FlowOutcome:
    from ztfd import config

    cfg = config.load(config_path)
    produced = sum(len(values) for values in messages.values())
    errors: list[BaseException] = []

    def produce_all() -> None:
        try:
            for topic, values in messages.items():
                produce_steadily(services.kafka.bootstrap, topic, values, per_second=60)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    producer = threading.Thread(target=produce_all, name="demo-producer", daemon=True)
    producer.start()
    click.echo(f"  producing {produced} Lasair-shaped messages (ZTF: SN-like, topic_refresh, heartbeat, 2 poison; "
               f"LSST: real Rubin alerts in full, lite and plain output; ZTF's own Avro packets)")
    conn = store.connect(cfg.db_path)
    interactive = sys.stdout.isatty()
    report: str | None = None
    last_line, last_print = "", 0.0
    deadline = started + DEADLINE_SECONDS
    try:
        while True:
            progress = read_progress(conn)
            line = progress.line(time.monotonic() - started, produced)
            now = time.monotonic()
            if interactive:
                click.echo("\r  " + line, nl=False)
            elif line.split("  ", 1)[1] != last_line.split("  ", 1)[-1] and now - last_print >= 2:
                click.echo("  " + line)
                last_print = now
            last_line = line
            if errors:
                raise errors[0]
            if daemon.exited():
                click.echo(f"\nztfd demo: the daemon exited early ({daemon.exited()}); see {daemon.log_dir}", err=True)
                return FlowOutcome(False, report)
            settled = (not producer.is_alive() and progress.alerts + progress.rejected >= produced
                       and progress.jobs_finished == progress.jobs_total)
            if settled and report is None:
                # The report is written before the last sync pass the demo waits for, so that "uploaded" is true
                # of it too (written after, it stayed pending in the status shown below).
                report = write_report(config_path)
                continue
            if settled and progress.files and progress.files_uploaded == progress.files:
                click.echo(("\r  " if interactive else "  ") + line)
                click.echo("  everything stored, fetched and uploaded, the night report included")
                return FlowOutcome(progress.jobs_failed == 0, report)
            if now > deadline:
                click.echo(f"\nztfd demo: not finished after {DEADLINE_SECONDS:.0f}s: {progress.pending()}", err=True)
                return FlowOutcome(False, report)
            stop.wait(0.25)
            _check(stop)
    finally:
        conn.close()


def ztfd_command() -> str:
    """How to run this ztfd from a shell: the console script beside this Python (a venv's, not on PATH after
    bin/demo), else ``python -m ztfd``."""
    script = Path(sys.executable).parent / "ztfd"
    if script.is_file() and os.access(script, os.X_OK):
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m ztfd"


def write_report(config_path: Path) -> str:
    """Write the report of the demo's busiest night (``ztfd report --date``); the line that says where it is."""
    from ztfd import config
    from ztfd.store import report as night

    conn = store.connect(config.load(config_path).db_path)
    try:
        date = night.busiest_night(conn)
    finally:
        conn.close()
    if date is None:
        return "no night has alerts: no report"
    result = subprocess.run(ztfd_argv(config_path, "report", "--date", date), capture_output=True, text=True,
                            env=child_env(), timeout=120)
    return (f"the night report of {date} (open it in a browser): "
            + (result.stdout.strip().removeprefix("ztfd report: ") or result.stderr.strip()))


def _report(services: EmbeddedServices, config_path: Path, home: Path, report: str | None) -> None:
    click.echo("\n$ ztfd status")
    result = subprocess.run(ztfd_argv(config_path, "status"), capture_output=True, text=True, env=child_env(),
                            timeout=60)
    click.echo(result.stdout.rstrip() or result.stderr.rstrip())
    click.echo("\nwritten under " + str(home))
    for top in ("data", "images"):
        _echo_tree(home / top, home)
    keys = [obj["Key"] for page in services.s3_client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for obj in page.get("Contents", [])]
    click.echo(f"\nS3 s3://{BUCKET}/ holds {len(keys)} objects, e.g.:")
    for kind in ("data/", "images/"):
        for key in sorted(k for k in keys if kind in k)[:3]:
            click.echo(f"  {key}")
    previews = sorted((home / "images").rglob("*.png"))
    if previews:
        click.echo(f"\na preview: {previews[0]}")
    _echo_lsst(home)
    _echo_avro(services, home)
    _show_metrics(config_path)
    if report:
        click.echo(f"\n{report}")
    _show_archive_query(config_path)


ARCHIVE_QUESTION = "SELECT night, topic, count(*) AS alerts FROM alerts GROUP BY night, topic ORDER BY night, topic"


def _show_archive_query(config_path: Path) -> None:
    """The Parquet dataset answering a question: the last alerts written (``ztfd archive --once``), then a query."""
    subprocess.run(ztfd_argv(config_path, "archive", "--once"), capture_output=True, env=child_env(), timeout=300)
    result = subprocess.run(ztfd_argv(config_path, "query", ARCHIVE_QUESTION), capture_output=True, text=True,
                            env=child_env(), timeout=120)
    click.echo(f'\n$ ztfd query "{ARCHIVE_QUESTION}"')
    for line in (result.stdout.rstrip() or result.stderr.rstrip()).splitlines():
        click.echo(f"  {line}")


def metrics_url(config_path: Path) -> str:
    from ztfd import config

    return f"http://{config.load(config_path).metrics.listen}/metrics"


def _show_metrics(config_path: Path) -> None:
    """A few lines of the running daemon's /metrics."""
    import urllib.request

    url = metrics_url(config_path)
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            lines = response.read().decode().splitlines()
    except OSError as exc:
        lines = [f"(not answering: {exc})"]
    click.echo(f"\n$ curl {url}   (excerpt)")
    shown = {"ztfd_alerts_stored_total": "", "ztfd_stamp_jobs": 'state="done"', "ztfd_sync_pending_files": "",
             "ztfd_process_up": 'name="consumer'}  # metric -> a label it must have (labels come sorted, host first)
    for line in lines:
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if (name in shown and shown[name] in line) or line.startswith("(not"):
            click.echo(f"  {line}")


def _echo_lsst(home: Path) -> None:
    """The Lasair-LSST topic beside the ZTF ones: its alerts under their dayObs, their Rubin cutouts and a preview."""
    alerts = sorted((home / "data").glob(f"*/{LSST_TOPIC}/*.json"))
    if not alerts:
        return
    days = sorted({path.parent.parent.name for path in alerts})
    where = days[0] if len(days) == 1 else "{" + ",".join(days) + "}"
    click.echo(f"\nLasair-LSST topic {LSST_TOPIC}: {len(alerts)} alerts under data/{where}/ "
               "(Rubin's dayObs: the TAI date 12 h before the observation)")
    objects = sorted({path.name.split("_")[0] for path in alerts})
    folders = [folder for day in days for name in objects if (folder := home / "images" / day / name).is_dir()]
    for folder in folders[:3]:
        click.echo(f"  {folder.relative_to(home)}/  " + "  ".join(sorted(p.name for p in folder.iterdir())))
    lsst_previews = sorted(png for folder in folders for png in folder.glob("*.png"))
    if lsst_previews:
        click.echo(f"  an LSST preview: {lsst_previews[0]}")


def _echo_avro(services: EmbeddedServices, home: Path) -> None:
    """The Avro topic beside the Lasair ones: each packet kept as received with a JSON view, its stamps from the
    packet, and no request to the stamp service for them."""
    kept = sorted((home / "data").glob(f"*/{AVRO_TOPIC}/*.avro"))
    if not kept:
        return
    asked = sum(1 for r in services.stamps.requests() if (r.object_id or "").startswith("ZTF21avro"))
    click.echo(f"\nZTF packet topic {AVRO_TOPIC} (format ztf-avro): {len(kept)} packets kept as received "
               f"(.avro, a .json view beside each); their stamps came in the packets: {asked} stamp requests")
    click.echo(f"  {kept[0].relative_to(home)}  {kept[0].with_suffix('.json').name}")
    folder = next((home / "images").glob(f"*/{kept[0].name.split('_')[0]}"), None)
    if folder is not None:
        click.echo(f"  {folder.relative_to(home)}/  " + "  ".join(sorted(p.name for p in folder.iterdir())))


def _echo_tree(root: Path, home: Path) -> None:
    """A short tree: each date/topic or date/object folder with its file count, at most a few of them."""
    if not root.exists():
        click.echo(f"  {root.relative_to(home)}/ (nothing)")
        return
    files = [p for p in root.rglob("*") if p.is_file()]
    click.echo(f"  {root.relative_to(home)}/  {len(files)} files")
    folders = sorted({p.parent for p in files})
    for folder in folders[:5]:
        names = sorted(p.name for p in folder.iterdir() if p.is_file())
        click.echo(f"    {folder.relative_to(home)}/  {len(names)} files, e.g. {names[0]}")
    if len(folders) > 5:
        click.echo(f"    … and {len(folders) - 5} more folders")
