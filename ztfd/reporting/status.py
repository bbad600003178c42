"""``ztfd status``: what runs, how far each topic is, the stamp queue, sync and disk, in one look.

``collect`` builds one JSON-ready dict (``ztfd status --json``; docs/status.md documents its fields, every time in
it ISO 8601 UTC); ``render`` turns it into the table a person reads. ``problems`` says what is wrong and why, one
entry per thing (a broker a consumer cannot reach, a stamp service failing, S3 failing, local trouble), each with
its reason and the log file and time of its line; ``healthy`` is false when ztfd is not running or has problems
(the exit code stays LSB: 0 while it runs, problems or not). Both work when nothing runs and when the store does
not exist yet. Nothing here writes to the store or to Kafka: the store is opened read-only (``connect_readonly``: no
migration, no wait for a writer's lock, fine for a user who may only read home) and the Kafka lag is read with a
throwaway consumer that never joins the group or commits (``ztfd.ingest.kafka.end_offsets``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

from ztfd import config, store
from ztfd.daemon import pidfile
from ztfd.daemon.localtrouble import STATUS_PREFIX as LOCAL_TROUBLE_PREFIX
from ztfd.daemon.procs import pid_alive
from ztfd.ingest import seen_ends, topics
from ztfd.ingest.broker_errors import STATUS_PREFIX as KAFKA_ERROR_PREFIX
from ztfd.ingest.quota import near_quota
from ztfd.sources import LSST
from ztfd.stamps.providers import service_url
from ztfd.store import archive_marks, counters, jobs
from ztfd.store import gaps as store_gaps
from ztfd.store import quota as store_quota
from ztfd.store.alerts import count_received_on, utc_day
from ztfd.store.db import StoreNotCreatedError, connect_readonly
from ztfd.store.offsets import topics_with_offsets
from ztfd.store.processes import process, processes
from ztfd.store.states import ProcessState, Role
from ztfd.store.status_facts import statuses_with_prefix
from ztfd.units import human_bytes

log = logging.getLogger(__name__)

CHILD_ROLES = tuple(role for role in Role if role is not Role.SUPERVISOR)
AT_REST = (ProcessState.BACKOFF, ProcessState.STOPPED, ProcessState.IDLE)  # no live pid, and rightly so
KAFKA_TIMEOUT = 3.0
LAST_FAILURES = 5
ARCHIVE_BEHIND_INTERVALS = 3  # a stored alert older than this many ``archive.interval``s not in the dataset: a problem


def collect(cfg: config.Config, kafka_timeout: float = KAFKA_TIMEOUT, lag: bool = True) -> dict[str, Any]:
    """The report; ``lag=False`` leaves out the Kafka lag (what ``bin/bench store`` times: the store's part)."""
    now = time.time()
    sup_pid = pidfile.running_pid(cfg)
    report: dict[str, Any] = {
        "time": _iso(now),
        "home": str(cfg.home),
        "config": str(cfg.path),
        "supervisor": {"running": sup_pid is not None, "pid": sup_pid},
        "processes": [],
        "topics": [],
        "queue": jobs.JobCounts().as_dict(),
        "failures": [],
        "sync": {"enabled": bool(cfg.s3.bucket), "bucket": cfg.s3.bucket or None, "pending": 0, "pending_bytes": 0,
                 "done": 0, "last_pass": None, "last_error": None},
        "rejected": {},
        "gaps": [],
        "local_trouble": {},
        "kafka_errors": {},
        "stamp_errors": {},
        "archive": {"enabled": cfg.archive.enabled, "interval": cfg.archive.interval, "written": 0, "pending": 0,
                    "oldest_pending": None, "oldest_pending_age": None},
        "disk": _disk(cfg.home),
        "store": str(cfg.db_path) if cfg.db_path.exists() else None,
    }
    seen: dict[str, tuple[dict[int, int], float]] = {}
    conn = _open_store(cfg)
    try:
        if conn is not None:
            report["processes"] = _processes(conn, cfg, now)
            report["topics"] = _topics(conn, cfg, now)
            report["queue"] = jobs.counts(conn, now).as_dict()
            report["failures"] = _failures(conn)
            report["sync"].update(_sync(conn))
            report["rejected"] = _rejected(conn, cfg)
            report["gaps"] = _gaps(conn)
            report["local_trouble"] = {
                name: {"reason": reason, "at": _iso(at)}
                for name, (reason, at) in statuses_with_prefix(conn, LOCAL_TROUBLE_PREFIX).items()}
            report["kafka_errors"] = _kafka_errors(conn)
            report["stamp_errors"] = _stamp_errors(conn, cfg)
            seen = seen_ends.fresh(conn, now)
            lost = store_gaps.missing_by_topic(conn)
            report["archive"].update(_archive(conn, report["topics"], now))
            for info in report["topics"]:
                info["rejected"] = report["rejected"].get(info["topic"], 0)
                info["lost_upstream"] = lost.get(info["topic"], 0)
            row = process(conn, pidfile.SUPERVISOR_NAME)
            if row is not None and sup_pid is not None and row.started_at:
                report["supervisor"]["uptime"] = round(now - row.started_at, 1)
        else:
            report["topics"] = [_empty_topic(t) for t in topics.explicit(cfg.kafka.topics)]
    finally:
        if conn is not None:
            conn.close()
    report["kafka_client_error"] = add_lag(cfg, report["topics"], seen, kafka_timeout) if lag else None
    if lag and cfg.kafka.group_mode:
        from ztfd.reporting import fleet  # librdkafka: only when the broker is asked

        report["fleet"] = fleet.fleet_section(cfg, report["topics"], kafka_timeout)
    # Running: our supervisor, or (under supervisord or systemd units of the single roles) live consumers.
    externally = any(p["alive"] and p["role"] == Role.CONSUMER and p["fresh"] for p in report["processes"])
    report["running"] = sup_pid is not None or externally
    report["mode"] = "supervisor" if sup_pid is not None else ("external" if externally else "stopped")
    report["problems"] = problems(cfg, report)
    report["healthy"] = report["running"] and not report["problems"]
    return report


# --- problems: what is wrong, why, and where the log says it ------------------------------------------------------


def _kafka_errors(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    """Per consumer process, the Kafka error it keeps (``ztfd.ingest.broker_errors``), times in ISO."""
    found = {}
    for name, (value, _at) in statuses_with_prefix(conn, KAFKA_ERROR_PREFIX).items():
        try:
            record = json.loads(value)
        except ValueError:
            continue
        if isinstance(record, dict):
            found[name] = {"brokers": str(record.get("brokers")), "reason": str(record.get("reason")),
                           "code": record.get("code"), "since": _iso(_number(record.get("since"))),
                           "at": _iso(_number(record.get("at")))}
    return found


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _stamp_errors(conn: sqlite3.Connection, cfg: config.Config) -> dict[str, dict[str, Any]]:
    """Per cause (retry, unavailable, failed), the newest reason the stamp jobs gave and the service they asked."""
    return {cause: {"service": service_url(cfg.stamps, e.survey), "reason": e.reason, "at": _iso(e.at)}
            for cause, e in jobs.last_errors(conn).items()}


def problems(cfg: config.Config, report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each thing that is wrong now: ``{"kind", "thing", "reason", "since", "log": {"file", "at"}}``."""
    logs = cfg.logs_dir
    found: list[dict[str, Any]] = []

    def add(kind: str, thing: str, reason: str, since: str | None, log_file: str, at: str | None) -> None:
        found.append({"kind": kind, "thing": thing, "reason": reason, "since": since,
                      "log": {"file": str(logs / log_file), "at": since or at}})

    for name, error in sorted(report.get("kafka_errors", {}).items()):
        add("broker", f"Kafka broker {error['brokers']} (from {name})", error["reason"], error["since"], "errors.log",
            error["at"])
    if not report.get("kafka_errors"):
        unreachable = sorted({t["topic"] for t in report["topics"] if t.get("broker") == "unreachable"})
        if unreachable and report.get("running"):
            add("broker", f"Kafka broker {cfg.kafka.bootstrap_servers}",
                f"no answer to status within {KAFKA_TIMEOUT:g} s (topics {', '.join(unreachable)})", None,
                "errors.log", report["time"])
    queue = report["queue"]
    retry = report.get("stamp_errors", {}).get("retry")
    if retry and queue.get("retry_waiting"):
        add("stamps", f"stamp service {retry['service']}",
            f"{retry['reason']} ({queue['retry_waiting']} jobs waiting to retry)", None, "errors.log", retry["at"])
    last_error = report["sync"].get("last_error")
    if isinstance(last_error, dict) and last_error.get("message"):
        add("s3", f"S3 bucket {report['sync'].get('bucket')}", str(last_error["message"]), None, "sync.log",
            last_error.get("at"))
    elif report["sync"].get("failing"):
        add("s3", f"S3 bucket {report['sync'].get('bucket')}",
            f"{report['sync']['failing']} files failed their last upload", None, "sync.log", report["time"])
    archive = report.get("archive") or {}
    behind_after = ARCHIVE_BEHIND_INTERVALS * cfg.archive.interval
    if archive.get("enabled") and (archive.get("oldest_pending_age") or 0) > behind_after:
        add("archive", "the Parquet archive (archiver)",
            f"{archive['pending']} stored alerts not in the dataset yet, the oldest received "
            f"{_age(archive['oldest_pending_age'])} ago (more than {ARCHIVE_BEHIND_INTERVALS} x archive.interval, "
            f"{behind_after:g} s)", archive["oldest_pending"], "archive.log", report["time"])
    for name, trouble in sorted(report.get("local_trouble", {}).items()):
        add("local", f"{name} on this machine", trouble["reason"], trouble["at"], "errors.log", trouble["at"])
    return found


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _open_store(cfg: config.Config) -> sqlite3.Connection | None:
    if not cfg.db_path.exists():
        return None
    try:
        return connect_readonly(cfg.db_path)
    except StoreNotCreatedError:  # `ztfd start` is creating it this very moment: as if there were none yet
        return None
    except sqlite3.Error as exc:
        log.warning("cannot open the store %s: %s", cfg.db_path, exc)
        return None


def _disk(home: Path) -> dict[str, Any]:
    probe = home
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    # A year of small files can run out of inodes before bytes. Some file systems (btrfs) have no fixed number
    # and report 0: then the inode fields are null.
    fs = os.statvfs(probe)
    free_inodes, total_inodes = (fs.f_favail, fs.f_files) if fs.f_files else (None, None)
    return {"path": str(probe), "free_bytes": usage.free, "total_bytes": usage.total,
            "free_percent": round(100 * usage.free / usage.total, 1) if usage.total else None,
            "free_inodes": free_inodes, "total_inodes": total_inodes,
            "free_inodes_percent": round(100 * fs.f_favail / fs.f_files, 1) if fs.f_files else None}


def _processes(conn: sqlite3.Connection, cfg: config.Config, now: float) -> list[dict[str, Any]]:
    result = []
    for row in processes(conn, CHILD_ROLES):
        alive = row.pid is not None and pid_alive(row.pid)
        age = None if row.heartbeat_at is None else round(now - row.heartbeat_at, 1)
        result.append({
            "name": row.name,
            "role": row.role,
            "topic": row.topic,
            "pid": row.pid,
            "alive": alive,
            "state": row.state if alive or row.state in AT_REST else "dead",
            "uptime": round(now - row.started_at, 1) if alive and row.started_at else None,
            "restarts": row.restarts,
            "heartbeat_age": age,
            "fresh": age is not None and age <= cfg.supervisor.heartbeat_timeout,
            "last_exit": row.last_exit,
        })
    return result


def _empty_topic(topic: str) -> dict[str, Any]:
    return {"topic": topic, "survey": None, "alerts_today": 0, "alerts_total": 0, "last_alert": None,
            "last_alert_age": None, "rejected": 0, "lost_upstream": 0, "partitions": {}, "lag": None,
            "lag_from": None, "lag_at": None, "lasair_day": None, "archive_pending": 0}


def _lasair_day(day: store_quota.DayBytes | None, quota: int, now: float) -> dict[str, Any]:
    """The topic's traffic on the current Lasair quota day, against ``kafka.lasair_byte_quota``."""
    nid = store_quota.nid_of(dt.datetime.fromtimestamp(now, dt.UTC))
    if day is None or day.nid != nid:
        day = store_quota.DayBytes("", nid, day.survey if day else None, 0, 0, now)
    quota = quota if day.survey == LSST else 0  # Lasair-LSST's filters have a byte quota, Lasair-ZTF's none
    return {"day": day.day, "nid": nid, "bytes": day.bytes, "messages": day.messages, "quota": quota or None,
            "percent": round(100.0 * day.bytes / quota, 1) if quota else None, "warning": near_quota(day, quota)}


def _topics(conn: sqlite3.Connection, cfg: config.Config, now: float) -> list[dict[str, Any]]:
    today = utc_day(now)
    everything = counters.topic_totals(conn)
    result = []
    days, surveys = store_quota.latest_days(conn), store_quota.surveys(conn)
    for topic in topics.wanted(cfg.kafka.topics, topics_with_offsets(conn)):  # listed, or stored and matched
        info = _empty_topic(topic)
        info["survey"] = surveys.get(topic)
        info["lasair_day"] = _lasair_day(days.get(topic), cfg.kafka.lasair_byte_quota, now)
        totals = everything.get(topic, counters.TopicTotals(0, 0, None))
        last = totals.last_alert_at
        info["alerts_total"] = totals.stored
        info["last_alert"] = _iso(last)
        info["last_alert_age"] = None if last is None else round(now - last, 1)
        info["alerts_today"] = count_received_on(conn, topic, today)
        info["partitions"] = {
            str(p): {"next_offset": o.next_offset, "generation": o.generation}
            for p, o in sorted(store.stored_offsets(conn, topic).items())
        }
        result.append(info)
    return result


def _failures(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    return [{"job": f.id, "object_id": f.object_id, "date": f.date, "attempts": f.attempts, "reason": f.reason,
             "at": _iso(f.at)} for f in jobs.failures(conn, LAST_FAILURES)]


def _sync(conn: sqlite3.Connection) -> dict[str, Any]:
    """Pending files and bytes, last pass and last error (``ztfd.sync.summary``), their times in ISO 8601."""
    from ztfd import sync

    summary = dict(sync.summary(conn))
    summary.setdefault("pending", 0)
    for key in ("last_pass", "last_error"):
        record = summary.get(key)
        if isinstance(record, dict):
            summary[key] = {k: _iso(_number(v)) if k.endswith("_at") or k == "at" else v for k, v in record.items()}
    return summary


def _rejected(conn: sqlite3.Connection, cfg: config.Config) -> dict[str, int]:
    """Rejected messages per topic, all there ever were (also those exported and forgotten)."""
    found = {topic: totals.rejected for topic, totals in counters.topic_totals(conn).items() if totals.rejected}
    return {**{t: 0 for t in topics.explicit(cfg.kafka.topics)}, **found}


def _archive(conn: sqlite3.Connection, topic_infos: list[dict[str, Any]], now: float) -> dict[str, Any]:
    """How far the Parquet dataset is behind the store: alerts stored but not yet in a dataset file (the stored
    count minus the archiver's, both counters), and when the oldest of them came; each topic gets its own count
    (``archive_pending``)."""
    written = archive_marks.written_per_topic(conn)
    pending = {topic: max(0, totals.stored - written.get(topic, 0))
               for topic, totals in counters.topic_totals(conn).items()}
    for info in topic_infos:
        info["archive_pending"] = pending.get(info["topic"], 0)
    oldest = archive_marks.oldest_unwritten_at(conn) if any(pending.values()) else None
    return {"written": sum(written.values()), "pending": sum(pending.values()), "oldest_pending": _iso(oldest),
            "oldest_pending_age": None if oldest is None else round(now - oldest, 1)}


def _gaps(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """The newest gaps: offsets the broker no longer had when ztfd came to read them (see ztfd.ingest.partitions)."""
    return [{"topic": g.topic, "partition": g.partition, "generation": g.generation, "first_offset": g.first_offset,
             "last_offset": g.last_offset, "missing": g.missing, "detected_at": _iso(g.detected_at)}
            for g in store_gaps.recent_gaps(conn)]


def add_lag(cfg: config.Config, topics: list[dict[str, Any]], seen: dict[str, tuple[dict[int, int], float]],
             timeout: float) -> str | None:
    """Kafka lag per topic: the end of each partition minus ztfd's stored next offset.

    The ends come from the topic's running consumer while what it heard is fresh (``ztfd.ingest.seen_ends``:
    ``lag_from`` "consumer", ``lag_at`` when it heard them); otherwise from the broker, asked within ``timeout``
    (``ztfd.ingest.kafka.end_offsets``; ``lag_from`` "broker"), when it answers in time. In fleet mode the
    consumer's figures are of the partitions this host holds (its share; the hosts' shares add up to the fleet's
    lag), and a host whose consumer is not running holds none: its lag is then unknown (null), the broker is
    still asked whether it answers, and the ``fleet`` section has the fleet's lag per partition.

    Returns why no Kafka client could be built (librdkafka refused the options: a SASL password that lives in
    the daemon's environment only), else None; the lag is then unknown, and nothing else is missing.
    """
    asked = []
    for info in topics:
        if info["topic"] in seen:
            ends, at = seen[info["topic"]]
            _set_lag(info, "ok", ends)
            info["lag_from"], info["lag_at"] = "consumer", _iso(at)
        else:
            asked.append(info)
    if not asked:
        return None
    try:
        from ztfd.ingest import kafka  # librdkafka: only when the broker must be asked
    except ImportError:  # pragma: no cover - confluent-kafka is a dependency
        return None
    try:
        said = kafka.end_offsets(cfg.kafka, [info["topic"] for info in asked], timeout)
    except kafka.ClientRefusedError as exc:
        for info in asked:
            info["lag"], info["broker"] = None, "no Kafka client"
        return str(exc)
    for info in asked:
        broker, ends = said[info["topic"]]
        _set_lag(info, broker, None if cfg.kafka.group_mode else ends)
        info["lag_from"], info["lag_at"] = "broker", None
    return None


def _set_lag(info: dict[str, Any], broker: str, ends: dict[int, int] | None) -> None:
    info["broker"] = broker
    if broker == "no such topic":
        info["lag"] = None
    elif ends is not None:
        stored = info["partitions"]
        info["lag"] = sum(max(0, high - (stored[str(p)]["next_offset"] if str(p) in stored else 0))
                          for p, high in ends.items())


# --- the table -----------------------------------------------------------------------------------------------


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [[str("-" if v is None else v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return ["  " + line for line in lines]


def _describe_day(day: dict[str, Any] | None) -> str:
    """Bytes received on the current Lasair day, with the share of the quota for LSST topics."""
    if not day:
        return "-"
    share = f" ({day['percent']:.0f}%)" if day.get("percent") is not None and day["bytes"] else ""
    return human_bytes(day["bytes"]) + share


def _describe_pass(last: Any) -> str:
    if not isinstance(last, dict):
        return str(last) if last else "-"
    when = last.get("finished_at") or "?"
    outcome = "ok" if last.get("ok") else "incomplete"
    size = human_bytes(last.get("bytes"))
    return f"{when}: {last.get('files', 0)} files, {size} in {last.get('seconds', 0)} s, {outcome}"


def _describe_error(error: Any) -> str:
    if not isinstance(error, dict):
        return str(error) if error else "-"
    return f"{error.get('message')} (at {error.get('at')})"


def render(report: dict[str, Any]) -> str:
    sup = report["supervisor"]
    if sup["running"]:
        head = f"ztfd is running (supervisor pid {sup['pid']}, up {_age(sup.get('uptime'))})"
    elif report["running"]:
        head = "ztfd is running without its supervisor (supervisord or systemd units)"
    else:
        head = "ztfd is not running"
    count = len(report.get("problems", []))
    healthy = "" if report.get("healthy") or not report["running"] else f", with {count} problem{'s' * (count != 1)}"
    out = [head + healthy, f"config {report['config']}", f"home {report['home']}", ""]
    if report.get("problems"):
        out.append("Problems")
        for problem in report["problems"]:
            since = f" since {problem['since']}" if problem.get("since") else ""
            out.append(f"  {problem['thing']}: {problem['reason']}{since}")
            out.append(f"    see {problem['log']['file']} at {problem['log']['at']}")
        out.append("")

    out.append("Processes")
    if report["processes"]:
        out += _table(
            ["role", "topic", "pid", "state", "uptime", "restarts", "heartbeat", "last exit"],
            [[p["role"] if p["role"] == Role.CONSUMER else p["name"], p["topic"], p["pid"] if p["alive"] else "-",
              p["state"], _age(p["uptime"]), p["restarts"],
              _age(p["heartbeat_age"]) + (" ago" if p["heartbeat_age"] is not None else ""), p["last_exit"]]
             for p in report["processes"]],
        )
    else:
        out.append("  none recorded")
    out.append("")

    out.append("Topics")
    out += _table(
        ["topic", "survey", "received today (UTC day of receipt)", "total", "last alert", "lag", "rejected",
         "Lasair quota (day 20:00–20:00 UTC)"],
        [[t["topic"], t.get("survey") or "-", t["alerts_today"], t["alerts_total"],
          f"{t['last_alert']} ({_age(t['last_alert_age'])} ago)" if t["last_alert"] else "-",
          t["lag"] if t["lag"] is not None else f"? ({t.get('broker', 'unknown')})",
          report["rejected"].get(t["topic"], 0), _describe_day(t.get("lasair_day"))]
         for t in report["topics"]],
    )
    for t in report["topics"]:
        day = t.get("lasair_day") or {}
        if day.get("warning"):
            out.append(f"  WARNING {t['topic']}: {human_bytes(day['bytes'])} received on Lasair day {day['day']}, "
                       f"{day['percent']:.0f}% of kafka.lasair_byte_quota ({human_bytes(day['quota'])}); Lasair stops "
                       "sending this filter's messages at 100% until the day ends (20:00 UTC)")
    for gap in report.get("gaps", []):
        out.append(f"  LOST UPSTREAM {gap['topic']}[{gap['partition']}]: offsets {gap['first_offset']}.."
                   f"{gap['last_offset']} ({gap['missing']} alerts) were gone from the broker when ztfd came to "
                   f"read them (found {gap['detected_at']})")
    if report.get("fleet"):
        from ztfd.reporting import fleet

        out += fleet.render(report["fleet"])
    if report.get("kafka_client_error"):
        out.append(f"  Kafka: no client, lag unknown: {report['kafka_client_error']} (kafka.options, or "
                   "ZTFD_KAFKA_OPTIONS_* in the daemon's environment)")
    out.append("")

    q = report["queue"]
    out.append("Stamp queue")
    out.append(f"  ready {q['ready']}  leased {q['leased']}  retry-waiting {q['retry_waiting']}  "
               f"not-yet-available {q['unavailable']}  failed {q['failed']}  done {q['done']}")
    for failure in report["failures"]:
        out.append(f"  failed {failure['object_id']} ({failure['date']}) after {failure['attempts']} attempts: "
                   f"{failure['reason']}")
    out.append("")

    s = report["sync"]
    out.append("Sync")
    if not s.get("enabled"):
        out.append("  off (s3.bucket is not set)")
    else:
        deleting = f", {s['deleting']} replaced archive files to delete" if s.get("deleting") else ""
        out.append(f"  bucket {s.get('bucket')}: pending {s['pending']} files ({human_bytes(s.get('pending_bytes'))}), "
                   f"uploaded {s.get('done', '-')}{deleting}")
    out.append(f"  last pass {_describe_pass(s.get('last_pass'))}; last error {_describe_error(s.get('last_error'))}")
    out.append("")

    a = report.get("archive") or {}
    if a.get("enabled") or a.get("written"):  # a home that never had a dataset: nothing to say
        state = "on" if a.get("enabled") else "off (archive.enabled is false)"
        oldest = (f", the oldest received {a['oldest_pending']} ({_age(a['oldest_pending_age'])} ago)"
                  if a.get("oldest_pending") else "")
        out.append(f"Archive (Parquet dataset): {state}, every {a.get('interval', 0):g} s; {a.get('written', 0)} "
                   f"alerts in it, {a.get('pending', 0)} stored alerts not in it yet{oldest}")
        out.append("")

    d = report["disk"]
    inodes = (f", {d['free_inodes']:,} of {d['total_inodes']:,} inodes free ({d['free_inodes_percent']}%)"
              if d.get("total_inodes") else "")
    out.append(f"Disk: {human_bytes(d['free_bytes'])} free of {human_bytes(d['total_bytes'])} ({d['free_percent']}%)"
               f"{inodes} under {d['path']}")
    for name, trouble in report.get("local_trouble", {}).items():
        out.append(f"Local trouble: {name} cannot write, paused (last try {trouble['at']}): {trouble['reason']}")
    return "\n".join(out)
