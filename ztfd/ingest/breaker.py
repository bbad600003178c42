"""The crash-loop breaker: a message that kills the decoding process cannot stop its topic.

Bounds (``ztfd.sources.avro_bounds``) refuse what is known to be hostile, but a C extension may still crash, or the
kernel kill for memory. The consumer would then restart, read the same batch and die again, forever: nothing
rejected, nothing logged, the good alerts of the batch never stored. So the consumer decodes each batch through
``Breaker.decode``:

1. before decoding, it marks where it is: the batch's offsets per partition (``ztfd.store.decode_marks``); the
   mark is deleted once the batch is decoded, so a mark found at the next batch is a death while decoding;
2. a batch that overlaps ``DEATHS_BEFORE_ISOLATING`` deaths is not trusted: its messages are decoded one by one
   in a child process (forked: it has the topic's source as it is). A message during which the child dies is
   rejected with the reason ``crashed the decoder (signal 11, SIGSEGV)`` (or ``exit status N``; a message that
   takes longer than ``ISOLATED_TIMEOUT`` is ``hung the decoder``), and a new child goes on with the next one;
   the deaths are then forgotten;
3. the rest of the batch goes on as usual: stored once with the rejected message, offsets past it.

A worker of the consumer's decode pool (``ztfd.ingest.decodepool``) that dies holding part of a batch raises
``DecoderDiedError``: that is a death too, counted at once (the mark becomes a death), and the batch is decoded
again, isolated after the second, without the consumer restarting.

Nothing is lost or stored twice: the batch is the same batch, only decoded elsewhere; until it is stored the
store's offsets do not move, and Kafka delivers it again.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import pickle
import signal
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from ztfd.logs import Throttle
from ztfd.sources import Alert, InvalidMessageError, SourceUnavailableError
from ztfd.store import decode_marks

log = logging.getLogger(__name__)

DEATHS_BEFORE_ISOLATING = 2
ISOLATED_TIMEOUT = 60.0  # seconds one message may take to decode in the child

Decode = Callable[[bytes | None, bytes | None], Alert]
Position = tuple[int, int, int]  # partition, generation, offset
Outcome = Alert | BaseException
# A batch's messages (value, key) -> each one's outcome, in order (the consumer's decode pool, ``decodepool``).
DecodeBatch = Callable[[Sequence[tuple[bytes | None, bytes | None]]], list[Outcome]]


class DecoderDiedError(Exception):
    """A process decoding part of the batch for the consumer (a decode pool's worker) died or hung: a death of
    the batch, counted as if the consumer had died."""


def spans_of(positions: Sequence[Position]) -> dict[str, list[int]]:
    """The batch's offsets as ``{"<partition>:<generation>": [first, last]}``."""
    spans: dict[tuple[int, int], list[int]] = {}
    for partition, generation, offset in positions:  # once per message: plain comparisons, the text at the end
        span = spans.get((partition, generation))
        if span is None:
            spans[(partition, generation)] = [offset, offset]
        elif offset < span[0]:
            span[0] = offset
        elif offset > span[1]:
            span[1] = offset
    return {f"{partition}:{generation}": span for (partition, generation), span in spans.items()}


def overlaps(one: dict[str, list[int]], other: dict[str, list[int]]) -> bool:
    return any(key in other and one[key][0] <= other[key][1] and other[key][0] <= one[key][1] for key in one)


class Breaker:
    """Decodes a topic's batches, in the consumer's process while it lives, one by one in a child after it died
    twice over the same messages."""

    def __init__(self, conn: sqlite3.Connection, topic: str, decode: Decode,
                 alive: Callable[[], None] = lambda: None, decode_batch: DecodeBatch | None = None) -> None:
        self.conn = conn
        self.topic = topic
        self.decode_one = decode
        # A batch decoded while it is trusted: in this process, or spread over the decode pool's workers.
        self.decode_batch: DecodeBatch = decode_batch or self._in_process
        self.alive = alive  # called between isolated messages (the consumer's heartbeat)
        self.throttled = Throttle(log)

    def decode(self, positions: Sequence[Position], messages: Sequence[tuple[bytes | None, bytes | None]]
               ) -> list[Outcome]:
        """Each message's alert, or what it raised (its rejection). ``SourceUnavailableError`` is raised: the
        batch cannot be judged now."""
        if not messages:
            return []
        spans = spans_of(positions)
        try:
            deaths = decode_marks.enter(self.conn, self.topic, json.dumps(spans))
        except sqlite3.Error as exc:  # a store locked or full: decode without the safety net rather than stop
            self.throttled("mark", logging.WARNING, "could not mark the batch being decoded: %s", exc)
            return self._in_process(messages)
        try:
            while True:
                suspected = [death for death in deaths if overlaps(spans, json.loads(death.spans))]
                if len(suspected) >= DEATHS_BEFORE_ISOLATING:
                    break
                try:
                    return self.decode_batch(messages)
                except DecoderDiedError as exc:  # the mark left becomes a death, as if this process had died
                    log.error("%s: %s decoding offsets %s", self.topic, exc, _described(spans))
                    deaths = decode_marks.enter(self.conn, self.topic, json.dumps(spans))
            log.warning("%s: the consumer died %d times decoding offsets %s: decoding them one by one in a child "
                        "process", self.topic, len(suspected), _described(spans))
            outcomes = isolated(self.decode_one, messages, self.alive)
            unavailable = [outcome for outcome in outcomes if isinstance(outcome, SourceUnavailableError)]
            if unavailable:
                raise unavailable[0]
            try:
                decode_marks.forget_deaths(self.conn, [death.id for death in suspected])
            except sqlite3.Error as exc:  # they are counted again: this batch is isolated again, no worse
                self.throttled("mark", logging.WARNING, "could not forget the deaths explained: %s", exc)
            return outcomes
        finally:
            try:
                decode_marks.leave(self.conn, self.topic)
            except sqlite3.Error as exc:  # the mark stays: at worst one death too many is counted
                self.throttled("mark", logging.WARNING, "could not clear the batch's mark: %s", exc)

    def _in_process(self, messages: Sequence[tuple[bytes | None, bytes | None]]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for value, key in messages:
            try:
                outcomes.append(self.decode_one(value, key))
            except SourceUnavailableError:
                raise
            except Exception as exc:
                outcomes.append(exc)
        return outcomes


def _described(spans: dict[str, list[int]]) -> str:
    return ", ".join(f"[{key.split(':')[0]}] {first}..{last}" for key, (first, last) in sorted(spans.items()))


def isolated(decode: Decode, messages: Sequence[tuple[bytes | None, bytes | None]],
             alive: Callable[[], None] = lambda: None) -> list[Outcome]:
    """Every message decoded in a forked child, in order; a message during which the child dies (or hangs) is
    rejected for it, and a new child takes the next one."""
    context = multiprocessing.get_context("fork")
    outcomes: list[Outcome] = []
    while len(outcomes) < len(messages):
        receiving, sending = context.Pipe(duplex=False)
        child = context.Process(target=_decode_from, args=(decode, messages, len(outcomes), sending), daemon=True)
        child.start()
        sending.close()
        try:
            while len(outcomes) < len(messages):
                alive()
                if not receiving.poll(ISOLATED_TIMEOUT):
                    child.kill()
                    outcomes.append(InvalidMessageError(
                        f"hung the decoder (more than {ISOLATED_TIMEOUT:g}s in an isolated child)"))
                    log.error("message %d of the batch %s", len(outcomes) - 1, outcomes[-1])
                    break
                try:
                    outcomes.append(receiving.recv())
                except EOFError:  # the child died during this message
                    child.join()
                    outcomes.append(InvalidMessageError(f"crashed the decoder ({exit_described(child.exitcode)})"))
                    log.error("message %d of the batch %s", len(outcomes) - 1, outcomes[-1])
                    break
        finally:
            receiving.close()
            child.join(5)
            if child.is_alive():
                child.kill()
                child.join()
    return outcomes


def _decode_from(decode: Decode, messages: Sequence[tuple[bytes | None, bytes | None]], start: int,
                 sending: Any) -> None:
    """The child: decode from ``start`` on, sending each outcome as soon as it is known."""
    for value, key in messages[start:]:
        try:
            outcome: Outcome = decode(value, key)
        except Exception as exc:
            outcome = exc
        sending.send(picklable(outcome))
    sending.close()


def picklable(outcome: Outcome) -> Outcome:
    try:
        pickle.dumps(outcome)
    except Exception as exc:
        if isinstance(outcome, BaseException):
            return InvalidMessageError(f"{outcome.__class__.__name__}: {str(outcome)[:200]}")
        return InvalidMessageError(f"its alert cannot leave the isolated decoder: {exc.__class__.__name__}")
    return outcome


def exit_described(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {-code}, {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"
