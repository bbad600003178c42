"""What the hosts of a fleet must agree on, kept in the broker: a topic of the fleet's own.

In fleet mode (``kafka.assignment = "group"``, docs/fleet.md) a partition moves between hosts, and a new host has an
empty store; yet the generation of a recreated topic is part of every S3 key (``sources.file_stem``), so it must mean
the same on every host, or redone work would write other keys than the first. Kafka's commit metadata would be the
natural place for it, but the test broker drops it (docs/kafka-groups.md). So the fleet keeps it in
``<group_id>.ztfd-fleet``: one partition, compacted, read to its end with the last value per key winning, written by
the host that holds the partition. It works on any broker.

Keys (values are JSON):
- ``generation/<topic>/<partition>``: ``{"generation": g, "topic_id": id or null}``, the generation a partition is
  read in and the broker's topic id it was read under (KIP-516; null where the broker reports none);
- ``member/<topic>/<member>``: ``{"host", "member", "client_id", "topic", "partitions", "at", "left"}`` (member: host
  and home; client_id: its consumer's Kafka ``client.id``), the partitions a member holds, for ``ztfd status``
  (Tansu's describe lists no members), said again every ``COUNT_EVERY`` s as the member's heartbeat (``at``: its
  clock); a member that stops publishes an empty list and ``left``;
- ``progress/<topic>/<partition>``: ``{"stored", "durable", "member", "at"}``, written by the partition's holder
  with its member record and once more as it hands the partition back: the next offset its store holds and its
  durable frontier (every offset below it is durable in S3). Any host's ``ztfd status`` shows from it how far each
  partition's durability is behind, and a host taking a partition over how much of it it redoes;
- ``column/<dataset>/<column>/<member>/<hash of the type>``: ``{"column", "type", "member", "at"}``, a member's
  proposal of a dataset column's Arrow type (``ztfd.archive.fleetschema``: the first proposal of a column in the
  log pins its type for every host, later ones only add struct fields). Each key is written once, by one member,
  with one type: compaction keeps a key's last record, so a key written again would move to a later offset and
  could take a column's pin from the proposal that won it. The writes are idempotent (``kafka.write_log_topic``),
  so a request retried after a lost answer writes no second copy. A key's offset is its *last* record's, as
  compaction keeps it: taking its first would give readers before and after a compaction different orders.

The live membership (``live_members``, which ``stamps.rate_limit`` is shared by) is read from those records: every
member that said it is there within ``LIVE_FOR`` s and has not left, holding partitions or not (more hosts than
partitions: the idle ones still fetch their own stamp jobs), except one whose partitions have all been claimed since
by others (killed with -9: it stops counting as soon as its partitions are taken over). Only a stop says ``left``:
a consumer that exits otherwise (an idle pattern topic's, one that crashed) leaves its host's fetchers running, so
the host must go on counting for the others until its word is ``LIVE_FOR`` s old; by then its own count has stopped
standing (``ztfd.stamps.ratelimit.COUNT_STANDS_FOR``) and its fetchers wait until it is counted again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from ztfd.config import KafkaConfig
from ztfd.ingest import kafka

log = logging.getLogger(__name__)

SUFFIX = ".ztfd-fleet"
COUNT_EVERY = 30.0  # seconds between counts of the live members (the fleet's share of ``stamps.rate_limit``)
RECOUNT_AFTER = 3.0  # seconds after a rebalance to count again (the other members publish their new holdings)
LIVE_FOR = 3 * COUNT_EVERY  # seconds a member's last word keeps it counted (clocks a little apart, a heartbeat late)


def fleet_topic(group_id: str) -> str:
    return f"{group_id}{SUFFIX}"


def member_id(home: Path) -> str:
    """A member's name in the fleet topic: its host and home (two homes may share a machine)."""
    return f"{socket.gethostname()}:{home}"


@dataclass(frozen=True)
class FleetGeneration:
    """A partition's generation as the fleet knows it, and the topic id it was read under."""

    generation: int
    topic_id: str | None


class Progress(NamedTuple):
    """A partition as its holder last told the fleet: the next offset its store holds, its durable frontier, and
    who said it when (filled in by ``FleetBook.publish_member``)."""

    stored: int
    durable: int
    member: str = ""
    at: float = 0.0

    @property
    def not_durable(self) -> int:
        """Offsets stored by the holder and not yet durable in S3: what a takeover now would redo."""
        return max(0, self.stored - self.durable)


class ColumnProposal(NamedTuple):
    """A member's proposal of a dataset column's type: its offset in the fleet topic orders it."""

    offset: int
    key: str
    column: str
    type_text: str


def proposal_key(dataset: str, column: str, member: str, type_text: str) -> str:
    """``column/<dataset>/<column>/<member>/<hash of the type>``: a key no other member, and no other type, writes
    (a compacted topic keeps the last record of a key: one rewritten would move to a later offset)."""
    digest = hashlib.sha256(type_text.encode()).hexdigest()[:16]
    return f"column/{dataset}/{column}/{member}/{digest}"


class FleetBook:
    """The fleet topic of one group, as a consumer reads and writes it."""

    def __init__(self, settings: KafkaConfig, member: str) -> None:
        self.settings = settings
        self.topic = fleet_topic(settings.group_id)
        self.member = member
        self._ready = False

    def _records(self) -> dict[str, tuple[int, Any]]:
        """Every key's last value (JSON) and its offset."""
        if not self._ready:
            kafka.ensure_log_topic(self.settings, self.topic)
            self._ready = True
        found = {}
        for key, (offset, value) in kafka.read_log_records(self.settings, self.topic).items():
            try:
                found[key] = (offset, json.loads(value))
            except ValueError:
                log.warning("%s: key %s holds no JSON: ignored", self.topic, key)
        return found

    def _read(self) -> dict[str, Any]:
        return {key: value for key, (_offset, value) in self._records().items()}

    def _write(self, entries: dict[str, Any]) -> None:
        if not self._ready:
            kafka.ensure_log_topic(self.settings, self.topic)
            self._ready = True
        kafka.write_log_topic(self.settings, self.topic,
                              {key: json.dumps(value, sort_keys=True).encode() for key, value in entries.items()})

    def generations(self, topic: str) -> dict[int, FleetGeneration]:
        """The fleet's generation of each partition of ``topic`` it has one for."""
        prefix = f"generation/{topic}/"
        found = {}
        for key, value in self._read().items():
            if key.startswith(prefix) and key[len(prefix):].isdigit() and isinstance(value, dict):
                found[int(key[len(prefix):])] = FleetGeneration(int(value.get("generation", 0)),
                                                                value.get("topic_id"))
        return found

    def save_generations(self, topic: str, generations: dict[int, FleetGeneration]) -> None:
        self._write({f"generation/{topic}/{partition}": {"generation": g.generation, "topic_id": g.topic_id}
                     for partition, g in generations.items()})

    def publish_member(self, topic: str, partitions: list[int], left: bool = False, client_id: str | None = None,
                       progress: dict[int, Progress] | None = None) -> None:
        """Say which partitions of ``topic`` this host holds now (``ztfd status`` shows the fleet from these), and
        that it is alive (or, ``left``, that it stopped); with its consumer's ``client_id`` and the ``progress`` of
        partitions it holds or has just handed back."""
        now = time.time()
        entries: dict[str, Any] = {f"member/{topic}/{self.member}": {
            "host": socket.gethostname(), "member": self.member, "client_id": client_id, "topic": topic,
            "partitions": sorted(partitions), "at": now, "left": left}}
        for partition, told in sorted((progress or {}).items()):
            entries[f"progress/{topic}/{partition}"] = {"stored": told.stored, "durable": told.durable,
                                                        "member": self.member, "at": now}
        self._write(entries)

    def progress(self) -> dict[tuple[str, int], Progress]:
        """Each (topic, partition) as its holder last told the fleet (``Progress``)."""
        found = {}
        for key, value in self._read().items():
            kind, _, rest = key.partition("/")
            topic, _, partition = rest.rpartition("/")
            if kind != "progress" or not topic or not partition.isdigit() or not isinstance(value, dict):
                continue
            numbers = [value.get(name) for name in ("stored", "durable", "at")]
            if all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers):
                found[(topic, int(partition))] = Progress(int(numbers[0]), int(numbers[1]), str(value.get("member")),
                                                          float(numbers[2]))
        return found

    def column_proposals(self, dataset: str) -> list[ColumnProposal]:
        """Every proposal of a column type of ``dataset`` the topic holds, in the log's order."""
        prefix = f"column/{dataset}/"
        found = [ColumnProposal(offset, key, str(value["column"]), str(value["type"]))
                 for key, (offset, value) in self._records().items()
                 if key.startswith(prefix) and isinstance(value, dict) and "column" in value and "type" in value]
        return sorted(found)

    def propose_columns(self, dataset: str, types: dict[str, str]) -> list[str]:
        """Propose a type (its text, ``ztfd.archive.fleetschema.type_text``) for each column of ``dataset``, each
        under a key of this member's and that type's own; the keys written."""
        entries = {proposal_key(dataset, column, self.member, text): {
            "column": column, "type": text, "member": self.member, "at": time.time()}
            for column, text in types.items()}
        self._write(entries)
        return list(entries)

    def members(self) -> list[dict[str, Any]]:
        """What every member last said it holds, those holding something first."""
        found = [value for key, value in self._read().items() if key.startswith("member/") and isinstance(value, dict)]
        return sorted(found, key=lambda m: (not m.get("partitions"), str(m.get("member")), str(m.get("topic"))))


def holders(members: list[dict[str, Any]]) -> dict[tuple[str, int], str]:
    """Who holds each (topic, partition): the newest claim wins (a member killed with -9 keeps its last word in the
    topic until the partitions it held are claimed again by the members they moved to)."""
    held: dict[tuple[str, int], str] = {}
    for entry in sorted(members, key=lambda e: e.get("at") if isinstance(e.get("at"), int | float) else 0):
        for partition in entry.get("partitions") or []:
            if isinstance(partition, int):
                held[(str(entry.get("topic")), partition)] = str(entry.get("member"))
    return held


def live(members: list[dict[str, Any]], now: float | None = None) -> set[str]:
    """The members alive: said so within ``LIVE_FOR`` s, not left, and not superseded (every partition one claims
    claimed since by another member)."""
    now = time.time() if now is None else now
    held = holders(members)
    found = set()
    for entry in members:
        name, at = str(entry.get("member")), entry.get("at")
        if entry.get("left") or not isinstance(at, int | float) or now - at > LIVE_FOR:
            continue
        claimed = [p for p in entry.get("partitions") or [] if isinstance(p, int)]
        if claimed and all(held.get((str(entry.get("topic")), p)) != name for p in claimed):
            continue
        found.add(name)
    return found


def live_members(members: list[dict[str, Any]], me: str, now: float | None = None) -> int:
    """How many members are alive (``live``), this host ``me`` always among them: never fewer than 1 + the others
    live. This host's fetchers run whatever its own last word says (not said yet, or an idle pattern topic's
    consumer that handed its partitions back), so the share they take must count them."""
    return len(live(members, now) | {me})


def report_writer(members: list[dict[str, Any]]) -> str | None:
    """The member that writes the fleet's night reports, chosen without a coordinator: the one holding partition 0
    of the lowest-named topic held (newest claim wins, as in ``holders``); None while nobody holds one."""
    held = holders(members)
    firsts = sorted(topic for topic, partition in held if partition == 0)
    return held[(firsts[0], 0)] if firsts else None
