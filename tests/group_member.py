"""A bare Kafka consumer-group member, run as its own process by the group characterisation tests.

It subscribes to one topic in one group and prints one JSON line per event on stdout: ``assigned`` and
``revoked`` (the partitions), ``message`` (partition, offset, value), ``committed``. It commits each message's
offset synchronously after printing it, so that what a restarted member reads again is exactly what it had not
committed. It runs until SIGTERM (then closes cleanly: a clean leave) or SIGKILL.

    python -m tests.group_member BOOTSTRAP TOPIC GROUP [STRATEGY] [SESSION_TIMEOUT_MS] [INSTANCE_ID]
"""

from __future__ import annotations

import json
import signal
import sys

from confluent_kafka import Consumer, TopicPartition


def say(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def main() -> None:
    bootstrap, topic, group = sys.argv[1:4]
    strategy = sys.argv[4] if len(sys.argv) > 4 else "cooperative-sticky"
    session_timeout = sys.argv[5] if len(sys.argv) > 5 else "6000"
    instance = sys.argv[6] if len(sys.argv) > 6 else ""  # static membership: a close sends no LeaveGroup
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
        "auto.offset.reset": "earliest", "session.timeout.ms": int(session_timeout),
        "heartbeat.interval.ms": 500, "partition.assignment.strategy": strategy,
        "topic.metadata.refresh.interval.ms": 1000,
        **({"group.instance.id": instance} if instance else {}),
    })

    def on_assign(_c: Consumer, partitions: list[TopicPartition]) -> None:
        say("assigned", partitions=sorted(p.partition for p in partitions))

    def on_revoke(_c: Consumer, partitions: list[TopicPartition]) -> None:
        say("revoked", partitions=sorted(p.partition for p in partitions))

    consumer.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke)
    say("started")
    while not stopping:
        message = consumer.poll(0.2)
        if message is None or message.error():
            continue
        say("message", partition=message.partition(), offset=message.offset(), value=message.value().decode())
        consumer.commit(message=message, asynchronous=False)
    consumer.close()
    say("closed")


if __name__ == "__main__":
    main()
