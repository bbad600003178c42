"""Fleet: group mode against one host, and a host lost with its disk (``kafka.assignment = "group"``, docs/fleet.md).

Every figure has its baseline run beside it, on the same messages, in the same run:

- **ingest**: ``ztfd consume`` (stamps off) of a four-partition topic in group mode (with the moto bucket that
  group mode requires) against ``assignment = "all"`` on the same messages, first received to last file recorded
  (``bench.ingest.consume_rate``), the order alternating between runs;
- **a host lost**: two hosts (homes on this machine, ``ztfd start --foreground`` each: consumer, fetchers against the
  local stamp stand-in, syncer into moto) share a four-partition topic while messages arrive at a steady rate, each
  about an object of its own (one triplet each). Once the group has settled (the fleet topic shows both hosts
  holding partitions, and both have stored alerts), one host is killed with -9 (its supervisor and every child,
  each process group) and its home deleted. The figure is the time from the kill until the survivor has stored an
  alert of every partition the lost host held (its ``received_at``), against ``session.timeout.ms`` + 15 s.
  Messages go on arriving a few seconds more, then the bench waits until the bucket holds every alert once, and the
  survivor has settled every stamp job and uploaded every file;
- **stamp requests per triplet** across that loss, counted by the stand-in, beside one host's (``assignment =
  "all"``, the same messages, the same configuration otherwise);
- **S3 PUTs per alert** (PUT-class requests: PUT and the multipart ones, counted by the S3 proxy in front of moto)
  of the fleet with its loss against that one host's, and the bytes per alert the bucket ends with.

The design keeps clear of the test broker's quirks (docs/kafka-groups.md): no member ever leaves while the group
rebalances (the hosts join, the group settles, then the host lost is killed with -9, which sends no LeaveGroup; the
survivor is stopped alone, holding everything); no subscribed topic is ever deleted (librdkafka 2.16 dies of
SIGSEGV on Tansu when one is): every run has topics, groups and buckets of its own, left in place until the
section's services stop; and each run's group id is fresh, so a group wedged in one run cannot hold up the next.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.common import Results, Row, RssSampler, Settings, median, ratio, wait_until
from bench.ingest import consume_rate
from bench.stamps import synthetic_packets
from ztfd import config, store
from ztfd.daemon import lifecycle
from ztfd.embedded.demo import FAST_KAFKA_OPTIONS, Daemon, write_config
from ztfd.ingest.fleet import FleetBook, holders
from ztfd.store import jobs
from ztfd.store.alerts import StoredAlert, iter_alerts
from ztfd.store.manifest import count_pending

PARTITIONS = 4
RATE = 20.0  # messages/s produced while the fleet runs
TAIL = 5.0  # seconds messages go on arriving once the lost partitions flow again
LATENCY = 0.05  # the stamp stand-in answers after 50 ms
HOSTS = 2
STAMP_WORKERS = 2
PREFIX = "fleet/"
SESSION_TIMEOUT_MS = int(FAST_KAFKA_OPTIONS["session.timeout.ms"])
HANDOVER_GOAL = SESSION_TIMEOUT_MS / 1000 + 15.0
ALERT_KEY = re.compile(rf"^{PREFIX}data/.+_(g\d+-)?p\d+-o\d+\.json$")
WRITE_KINDS = ("PUT", "COPY", "CREATE_MULTIPART", "UPLOAD_PART", "COMPLETE_MULTIPART")  # billed as PUTs


def run(settings: Settings, results: Results) -> None:
    import logging

    from ztfd.embedded.alerce import StampService
    from ztfd.embedded.kafka import KafkaBroker
    from ztfd.embedded.s3 import S3Server
    from ztfd.embedded.samples import message_stream

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    work = settings.workdir / "fleet"
    ingest_count = settings.size(50_000, 5_000)
    target = settings.size(2_400, 600)  # messages of a loss run: 120 s (30 s) at RATE, longer if the handover is late
    most = target + int(RATE * 300)  # enough distinct objects for the longest loss run
    packets = synthetic_packets(most)
    work.mkdir(parents=True, exist_ok=True)
    ingest: dict[str, list[float]] = {"all": [], "group": []}
    losses: list[Loss] = []
    singles: list[Uploads] = []
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(KafkaBroker(log_path=work / "tansu.log"))
        s3 = stack.enter_context(S3Server(log_path=work / "moto.log"))
        stamps = stack.enter_context(StampService(packets=packets, latency=LATENCY, include_previous=False))
        services = Services(broker, s3, stamps)

        topic = "bench-fleet-ingest"
        broker.create_topic(topic, partitions=PARTITIONS)
        broker.produce(topic, (json.dumps(m).encode() for m in message_stream(ingest_count)))
        s3.create_bucket("bench-fleet-ingest")
        for run_index in range(settings.runs):
            for mode in ("all", "group") if run_index % 2 == 0 else ("group", "all"):
                os.sync()  # as in bench.ingest: no run pays for the writeback of the one before
                ingest[mode].append(consume_rate(
                    broker.bootstrap, ingest_count, work / f"ingest-{mode}-{run_index}", results, topic=topic,
                    sections={"kafka": {"assignment": mode}, "s3": s3_section(s3, "bench-fleet-ingest")}))
            print(f"  ingest run {run_index + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in ingest.items()),
                  flush=True)

        for run_index in range(settings.runs):
            loss = lose_a_host(services, packets, target, work / f"loss-{run_index}", results)
            losses.append(loss)
            single = one_host(services, packets[:loss.uploads.alerts], work / f"single-{run_index}", results)
            singles.append(single)
            print(f"  loss run {run_index + 1}: partitions {loss.lost} flowing again after {loss.handover:.1f}s, "
                  f"{loss.redone} alerts redone; requests per triplet {loss.uploads.requests_per_triplet:.2f} "
                  f"(one host {single.requests_per_triplet:.2f}); PUTs per alert {loss.uploads.puts_per_alert:.2f} "
                  f"(one host {single.puts_per_alert:.2f})", flush=True)
    report(settings, results, ingest_count, ingest, losses, singles)


def report(settings: Settings, results: Results, ingest_count: int, ingest: dict[str, list[float]],
           losses: list[Loss], singles: list[Uploads]) -> None:
    group, everything = median(ingest["group"]), median(ingest["all"])
    # The median of the runs' own ratios: each pair ran back to back, so a burst of load from other jobs on the
    # machine weighs on both sides of one ratio rather than on one side of the medians.
    paired = median([ratio(g, a) for g, a in zip(ingest["group"], ingest["all"], strict=True)])
    handover = median([loss.handover for loss in losses])
    per_triplet = median([loss.uploads.requests_per_triplet for loss in losses])
    single_per_triplet = median([s.requests_per_triplet for s in singles])
    puts, single_puts = median([loss.uploads.puts_per_alert for loss in losses]), median([s.puts_per_alert
                                                                                          for s in singles])
    size, single_size = median([loss.uploads.bytes_per_alert for loss in losses]), median([s.bytes_per_alert
                                                                                           for s in singles])
    alerts = median([loss.uploads.alerts for loss in losses])
    results.raw["fleet"] = {
        "ingest_messages": ingest_count, "partitions": PARTITIONS, "ingest_alerts_per_s": ingest,
        "session_timeout_ms": SESSION_TIMEOUT_MS, "hosts": HOSTS, "rate": RATE,
        "losses": [loss.to_json() for loss in losses], "one_host": [s.to_json() for s in singles],
    }
    results.add(
        Row("fleet", "ztfd consume, assignment = group", group, "alerts/s",
            f"{ingest_count:,} msgs, {PARTITIONS} partitions, median of {settings.runs}"),
        Row("fleet", "group mode vs assignment = all", paired, "x",
            f"all {everything:,.0f}/s; median of the runs' ratios", ">= 0.9x", paired >= 0.9),
        Row("fleet", "host lost (kill -9, home deleted) -> its partitions flowing again", handover, "s",
            f"session.timeout.ms {SESSION_TIMEOUT_MS}, {HOSTS} hosts, {RATE:.0f} msgs/s",
            f"<= {HANDOVER_GOAL:.0f} s", handover <= HANDOVER_GOAL),
        Row("fleet", "alerts redone after the loss", median([loss.redone for loss in losses]), "alerts",
            f"of ~{alerts:,.0f}; stored by the lost host, not yet durable"),
        Row("fleet", "stamp requests per triplet across a host loss", per_triplet, "requests",
            f"one host: {single_per_triplet:.2f}", "<= 2.2", per_triplet <= 2.2),
        Row("fleet", "S3 PUTs per alert, fleet with a host lost", puts, "PUTs",
            f"one host: {single_puts:.2f} ({ratio(puts, single_puts):.2f}x)"),
        Row("fleet", "bytes per alert in the bucket", size, "B", f"one host: {single_size:,.0f} B"),
    )


@dataclass
class Services:
    broker: Any
    s3: Any
    stamps: Any


@dataclass
class Uploads:
    """What a run left in its bucket and asked of the stamp service, per alert."""

    alerts: int
    puts: int
    bytes: int
    stamp_requests: int

    @property
    def puts_per_alert(self) -> float:
        return ratio(self.puts, self.alerts)

    @property
    def bytes_per_alert(self) -> float:
        return ratio(self.bytes, self.alerts)

    @property
    def requests_per_triplet(self) -> float:
        return ratio(self.stamp_requests, self.alerts)  # one object, hence one triplet, per alert

    def to_json(self) -> dict[str, Any]:
        return {"alerts": self.alerts, "puts": self.puts, "bytes": self.bytes, "stamp_requests": self.stamp_requests}


@dataclass
class Loss:
    handover: float
    lost: list[int]
    redone: int
    uploads: Uploads

    def to_json(self) -> dict[str, Any]:
        return {"handover_s": self.handover, "lost_partitions": self.lost, "redone": self.redone,
                **self.uploads.to_json()}


def messages(packets: list) -> list[dict[str, Any]]:
    """Lasair-shaped messages (SN-like filter), one about each of ``packets``' objects."""
    from ztfd.embedded.samples import lasair_message

    found = []
    for seq, packet in enumerate(packets):
        message = lasair_message(packet, "sn")
        message["seq"] = seq
        found.append(message)
    return found


def s3_section(s3: Any, bucket: str) -> dict[str, Any]:
    return {"bucket": bucket, "prefix": PREFIX, "endpoint_url": s3.endpoint_url, "region": "us-east-1",
            "interval": 1.0}


class Host:
    """A host of the bench's fleet: a home of its own under ``ztfd start --foreground`` (its log outside the home,
    which a loss deletes)."""

    def __init__(self, home: Path, sections: dict[str, dict[str, Any]], log_dir: Path) -> None:
        self.home = home
        self.config_path = write_config(home / "ztfd.toml", home, sections)
        self.cfg = config.load(self.config_path)
        self.daemon = Daemon(self.config_path, log_dir)

    def start(self, sampler: RssSampler) -> None:
        self.daemon.start()
        for popen in self.daemon.processes:
            sampler.watch(popen.pid)

    def connect(self) -> sqlite3.Connection:
        return store.connect(self.cfg.db_path)

    def stored(self) -> list[StoredAlert]:
        if not self.cfg.db_path.exists():
            return []
        conn = self.connect()
        try:
            return list(iter_alerts(conn))
        finally:
            conn.close()

    def settled(self) -> bool:
        """Every stamp job finished and every file uploaded."""
        conn = self.connect()
        try:
            return jobs.counts(conn).unfinished == 0 and count_pending(conn) == 0
        finally:
            conn.close()

    def kill(self) -> None:
        """kill -9 of the supervisor and every child (each its own process group). All are frozen first
        (SIGSTOP, the supervisor first): a child that outlived its supervisor by a moment would get its
        ``PR_SET_PDEATHSIG`` SIGTERM and stop cleanly, handing its partitions over, which a lost host never does."""
        tree = self.daemon.tree()
        for proc in tree:
            with contextlib.suppress(psutil.Error):
                proc.suspend()
        lifecycle.kill_now([proc.pid for proc in tree], group=True)
        for popen in self.daemon.processes:
            popen.wait(30)

    def lose_disk(self) -> None:
        shutil.rmtree(self.home)

    def stop(self) -> None:
        self.daemon.stop()


def host_sections(services: Services, topic: str, group: str, bucket: str, assignment: str) -> dict[str, dict]:
    return {
        "kafka": {"bootstrap_servers": services.broker.bootstrap, "group_id": group, "topics": [topic],
                  "assignment": assignment, "commit_every": 1.0},
        "kafka.options": {**FAST_KAFKA_OPTIONS, "auto.offset.reset": "earliest"},
        "stamps": {"enabled": True, "workers": STAMP_WORKERS, "previews": True, "alerce_stamp_url": services.stamps.url,
                   "alerce_api_url": services.stamps.url, "rate_limit": 0.0, "timeout": 30.0},
        "s3": s3_section(services.s3, bucket),
        "supervisor": {"restart_backoff_max": 2},
    }


class SteadyProducer(threading.Thread):
    """Messages about ``packets``' objects, one each, at ``RATE`` a second, round robin over the partitions, until
    stopped (or the objects run out)."""

    def __init__(self, bootstrap: str, topic: str, packets: list) -> None:
        super().__init__(name="steady-producer", daemon=True)
        self.bootstrap, self.topic, self.packets = bootstrap, topic, packets
        self.produced = 0
        self.halt = threading.Event()

    def run(self) -> None:
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5, "enable.idempotence": False})
        start = time.monotonic()
        for seq, message in enumerate(messages(self.packets)):
            if self.halt.wait(max(0.0, start + seq / RATE - time.monotonic())):
                break
            producer.produce(self.topic, value=json.dumps(message).encode(), partition=seq % PARTITIONS)
            producer.poll(0)
            self.produced = seq + 1
        if producer.flush(60):
            raise RuntimeError(f"messages to {self.topic} were not delivered")

    def finish(self) -> int:
        self.halt.set()
        self.join(90)
        return self.produced


def lose_a_host(services: Services, packets: list, target: int, work: Path, results: Results) -> Loss:
    """Two hosts share a topic; one is killed with -9 and its home deleted once the group has settled. Messages
    arrive until ``target`` are sent and for ``TAIL`` seconds at least after the lost partitions flow again."""
    stamp = f"{time.time_ns()}"
    topic, group, bucket = f"bench-fleet-{stamp}", f"bench-fleet-{stamp}", f"bench-fleet-{stamp}"
    services.broker.create_topic(topic, partitions=PARTITIONS)
    services.s3.create_bucket(bucket)
    sections = host_sections(services, topic, group, bucket, "group")
    hosts = [Host(work / f"host-{index}", sections, work / f"host-{index}-logs") for index in range(HOSTS)]
    book = FleetBook(hosts[0].cfg.kafka, "bench")
    services.stamps.reset_log()
    producer = SteadyProducer(services.broker.bootstrap, topic, packets)
    with RssSampler() as sampler:
        try:
            for host in hosts:
                host.start(sampler)
            producer.start()
            held = wait_until(lambda: settled_holders(book, topic, hosts), timeout=300, interval=1.0,
                              what="every host to hold partitions")
            doomed, survivor = hosts[-1], hosts[0]
            lost = sorted(p for p, home in held.items() if home == doomed.home.resolve())
            already = len(doomed.stored())
            wait_until(lambda: len(doomed.stored()) >= already + 2 * RATE / HOSTS, timeout=120, interval=0.5,
                       what="the host to be lost to store a few seconds of alerts more")
            killed_at = time.time()
            doomed.kill()
            stored_there = {p: max((a.kafka_offset for a in doomed.stored() if a.partition == p), default=-1)
                            for p in lost}
            doomed.lose_disk()
            first_again = wait_until(lambda: flowing_again(survivor, lost, killed_at), timeout=300, interval=0.2,
                                     what="the lost host's partitions to flow again on the survivor")
            handover = max(first_again.values()) - killed_at
            resumed = {p: min(a.kafka_offset for a in survivor.stored()
                              if a.partition == p and a.received_at >= killed_at) for p in lost}
            redone = sum(max(0, stored_there[p] + 1 - resumed[p]) for p in lost)
            tail_end = time.monotonic() + TAIL
            wait_until(lambda: producer.produced >= target and time.monotonic() >= tail_end, timeout=600,
                       interval=0.5, what=f"{target} messages sent")
            produced = producer.finish()
            wait_until(lambda: alert_keys(services.s3, bucket) >= produced and survivor.settled(), timeout=600,
                       interval=1.0, what="every alert in the bucket and the survivor settled")
        finally:
            producer.finish()
            for host in hosts:
                host.stop()
    results.note_rss(sampler)
    return Loss(handover, lost, redone, uploads(services, bucket, produced))


def one_host(services: Services, packets: list, work: Path, results: Results) -> Uploads:
    """The same messages through one host (``assignment = "all"``, everything else alike): the baseline."""
    stamp = f"{time.time_ns()}"
    topic, bucket = f"bench-single-{stamp}", f"bench-single-{stamp}"
    services.broker.create_topic(topic, partitions=PARTITIONS)
    services.s3.create_bucket(bucket)
    from ztfd.embedded.kafka import produce

    services.stamps.reset_log()
    host = Host(work / "host", host_sections(services, topic, f"bench-single-{stamp}", bucket, "all"),
                work / "host-logs")
    with RssSampler() as sampler:
        try:
            host.start(sampler)
            produce(services.broker.bootstrap, topic, (json.dumps(m).encode()
                                                        for m in messages(packets)))
            wait_until(lambda: alert_keys(services.s3, bucket) >= len(packets) and host.settled(), timeout=600,
                       interval=1.0, what="every alert of one host in the bucket")
        finally:
            host.stop()
    results.note_rss(sampler)
    return uploads(services, bucket, len(packets))


def settled_holders(book: FleetBook, topic: str, hosts: list[Host]) -> dict[int, Path] | None:
    """Each partition's holder's home once every partition is held and every host holds some and has stored
    alerts; else None."""
    homes = {host.home.resolve() for host in hosts}
    held = {p: Path(member.split(":", 1)[1]).resolve() for (t, p), member in holders(book.members()).items()
            if t == topic}
    if set(held) != set(range(PARTITIONS)) or set(held.values()) != homes:
        return None
    return held if all(host.stored() for host in hosts) else None


def flowing_again(survivor: Host, lost: list[int], since: float) -> dict[int, float] | None:
    """When the survivor stored its first alert of each lost partition after ``since``, once it has one of each."""
    first: dict[int, float] = {}
    for alert in survivor.stored():
        if alert.partition in lost and alert.received_at >= since:
            first[alert.partition] = min(first.get(alert.partition, alert.received_at), alert.received_at)
    return first if set(first) == set(lost) else None


def alert_keys(s3: Any, bucket: str) -> int:
    """How many alert files the bucket holds; more than were produced would be an alert twice under two keys."""
    return sum(1 for key in s3.objects(bucket) if ALERT_KEY.match(key))


def uploads(services: Services, bucket: str, alerts: int) -> Uploads:
    keys = alert_keys(services.s3, bucket)
    if keys != alerts:
        raise RuntimeError(f"{bucket} holds {keys} alert files for {alerts} alerts produced")
    counts = services.s3.proxy.counts(bucket)
    return Uploads(alerts=alerts, puts=sum(counts[kind] for kind in WRITE_KINDS),
                   bytes=sum(size for size, _ in services.s3.objects(bucket).values()),
                   stamp_requests=services.stamps.arrivals())
