"""Stand-ins for confluent-kafka's message and consumer, to drive a consumer's batch by hand (no broker).

No ztfd import here: ``fixtures/make_store_v1.py`` uses them against an older ztfd.
"""

from __future__ import annotations


class FakeMessage:
    """What confluent-kafka hands the consumer, for driving one batch by hand (no broker needed)."""

    def __init__(self, value: bytes, offset: int, partition: int = 0) -> None:
        self._value, self._offset, self._partition = value, offset, partition

    def error(self) -> None:
        return None

    def value(self) -> bytes:
        return self._value

    def key(self) -> None:
        return None

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def timestamp(self) -> tuple[int, int]:
        return (1, 1630475000000)


class NoKafka:
    def commit(self, **_: object) -> None:
        pass

    def close(self) -> None:
        pass
