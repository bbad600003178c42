"""``ztfd status``'s ``fleet`` section (fleet mode, docs/fleet.md): who holds what, and how far each partition is
committed, read, and durable.

The members come from the fleet topic (each member publishes the partitions it holds: the test broker's group
description lists no members), the committed offsets from the group (asked by a client that never joins it), the
ends from ``ztfd.ingest.kafka.end_offsets`` (already read for the topics' lag). How far each partition is stored and
durable comes from what its holder last said in the fleet topic (``ingest.fleet.Progress``, every ``COUNT_EVERY``
s): ``durable_behind`` is what it had stored and not yet made durable in S3, the work a takeover would redo.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from ztfd import config
from ztfd.ingest import kafka
from ztfd.ingest.fleet import FleetBook, fleet_topic, holders, live, member_id, report_writer

log = logging.getLogger(__name__)


class ReportTurn:
    """Fleet mode: whether this host writes the fleet's night reports now (``ingest.fleet.report_writer``: the
    holder of partition 0), asked of the fleet topic each time reports are due; the others write none, so that no
    two hosts upload different pages under one key. A change of writer is logged."""

    def __init__(self, cfg: config.Config) -> None:
        self.book = FleetBook(cfg.kafka, member_id(cfg.home))
        self.writer: str | None = None

    def mine(self) -> bool:
        try:
            writer = report_writer(self.book.members())
        except Exception as exc:  # the broker away: no report this round, the next one asks again
            log.warning("cannot read the fleet topic to know who writes the night reports: %s", exc)
            return False
        if writer != self.writer:
            self.writer = writer
            if writer == self.book.member:
                log.info("this host writes the fleet's night reports (it holds partition 0)")
            else:
                log.info("the fleet's night reports are written by %s (it holds partition 0), not here",
                         writer or "nobody yet")
        return writer == self.book.member


def _iso(ts: Any) -> str | None:
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def fleet_section(cfg: config.Config, topics: list[dict[str, Any]], timeout: float) -> dict[str, Any]:
    """``members`` (each with ``assignments``: topic -> partitions), ``partitions`` (committed, end, lag,
    durable_behind) and ``error`` when the broker could not say."""
    me = member_id(cfg.home)
    section: dict[str, Any] = {"group": cfg.kafka.group_id, "topic": fleet_topic(cfg.kafka.group_id), "me": me,
                               "members": [], "partitions": [], "error": None}
    try:
        book = FleetBook(cfg.kafka, me)
        said = book.members()
        progress = book.progress()
        ends = {topic: told.ends or {} for topic, told in
                kafka.end_offsets(cfg.kafka, [t["topic"] for t in topics], timeout).items()}
        committed = kafka.group_committed(cfg.kafka, {t: list(e) for t, e in ends.items()}, timeout)
    except Exception as exc:  # the broker unreachable or refusing: the section says so, the rest of status stands
        section["error"] = str(exc)
        return section
    members: dict[str, dict[str, Any]] = {}
    for entry in said:
        name = str(entry.get("member"))
        member = members.setdefault(name, {"member": name, "host": entry.get("host"), "client_ids": {},
                                           "assignments": {}, "at": None})
        partitions = [p for p in entry.get("partitions") or [] if isinstance(p, int)]
        if partitions:
            member["assignments"][str(entry.get("topic"))] = partitions
        if isinstance(entry.get("client_id"), str):
            member["client_ids"][str(entry.get("topic"))] = entry["client_id"]
        at = _iso(entry.get("at"))
        member["at"] = max(filter(None, (member["at"], at)), default=None)
    holder = holders(said)
    alive = live(said)
    section["members"] = [{**member, "live": member["member"] in alive} for member in members.values()]
    for info in topics:
        topic = info["topic"]
        for partition, end in sorted((ends.get(topic) or {}).items()):
            done = committed.get(topic, {}).get(partition)
            told = progress.get((topic, partition))
            section["partitions"].append({
                "topic": topic, "partition": partition, "held_by": holder.get((topic, partition)),
                "committed": done, "end": end, "lag": end - (done or 0),
                "durable": told.durable if told else None,
                "durable_behind": told.not_durable if told else None,
                "durable_said": ({"by": told.member, "at": _iso(told.at)} if told else None)})
    return section


def render(section: dict[str, Any]) -> list[str]:
    """The lines of the fleet section for a person."""
    out = [f"Fleet (group {section['group']}, fleet topic {section['topic']})"]
    if section.get("error"):
        out.append(f"  unknown: {section['error']}")
        return out
    for member in section["members"]:
        held = "; ".join(f"{topic} {', '.join(map(str, parts))}" for topic, parts in member["assignments"].items())
        you = " (this host)" if member["member"] == section["me"] else ""
        gone = "" if member.get("live", True) else ", not live"
        clients = ", ".join(sorted(set(member.get("client_ids", {}).values())))
        client = f", client id {clients}" if clients else ""
        out.append(f"  {member['member']}{you}: {held or 'nothing'} (said {member['at']}{client}{gone})")
    for p in section["partitions"]:
        said = p.get("durable_said") or {}
        durable = (f", durable through {p['durable']}, {p['durable_behind']} stored not yet durable"
                   f" (said by {said.get('by')} {said.get('at')})" if p["durable_behind"] is not None else "")
        out.append(f"  {p['topic']}[{p['partition']}] committed {p['committed']} of {p['end']} (lag {p['lag']})"
                   f"{durable}")
    return out
