"""A consumer's decode pool: a batch's messages decoded on every core (``kafka.decode_workers``).

Decoding an Avro packet is most of a consumer's work (docs/performance.md), and it is the same work for every
message, independent of the others: the batch is cut into contiguous slices, the consumer decodes the first
itself and each worker process one of the others, and the outcomes come back in offset order. Nothing else of the
batch changes: it is dated, named, written and stored by the consumer and its file writer as before, so the
promise holds as it did (batches stored in order, offsets only after their files).

- The workers are forked from the consumer once its source is built (they have it as it is: parsed schemas and
  all) and die with it (``PR_SET_PDEATHSIG``): a worker never outlives a consumer killed with -9. They ignore
  SIGINT and SIGTERM; they end when the consumer closes their pipe.
- What a worker sends back is compact: the alert without its raw bytes (the consumer has them) and with its JSON
  view already rendered (``sources.view_json``: a dict of a ZTF packet costs several times more to pickle than
  its JSON). The files made of it are byte for byte those of the consumer's own decoding.
- A worker that dies (or hangs past ``SLICE_TIMEOUT``) while it holds a slice raises ``DecoderDiedError``: the
  crash-loop breaker (``ztfd.ingest.breaker``) counts it as a death of the batch, as if the consumer had died,
  and decodes the batch again; after two, one message at a time in a child, which finds and rejects the culprit.
  A dead worker is replaced at the next batch.

A source whose decoding reads or writes the store (``confluent-avro``: its schema cache) sets ``decodes_alone =
False`` and is always decoded in the consumer: a forked SQLite connection must not be used.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from ztfd.daemon import lifecycle
from ztfd.daemon.procs import die_with_parent
from ztfd.ingest.breaker import DecoderDiedError, exit_described, picklable
from ztfd.sources import Alert, Source, SourceUnavailableError, rendered_view

log = logging.getLogger(__name__)

SLICE_TIMEOUT = 120.0  # seconds a worker may take over one slice of a batch before it is taken for hung
CLOSE_TIMEOUT = 5.0  # seconds a worker may take to finish its slice and exit once its pipe is closed
AUTO = "auto"

Message = tuple[bytes | None, bytes | None]
Outcome = Alert | BaseException
Decode = Callable[[bytes | None, bytes | None], Alert]


def workers_for(configured: int | str, source: Source, cores: int | None = None) -> int:
    """How many worker processes decode beside the consumer: ``kafka.decode_workers`` (``auto``: two fewer than
    the cores for the sources that set ``pooled_by_default``, the Avro ones, so that the consumer and its file
    writer keep a core each; none for the others), none for a source that cannot decode outside the consumer.

    Why two fewer: on 2 cores the consumer and its file writer already keep both busy, and a worker only added
    its pipe's cost (``bin/bench avro``: the pool at 0.83x the consumer decoding alone on a quiet machine)."""
    if not getattr(source, "decodes_alone", True):
        return 0
    if configured == AUTO:
        return max(0, (cores or os.cpu_count() or 1) - 2) if getattr(source, "pooled_by_default", False) else 0
    return int(configured)


class DecodePool:
    """``size`` forked workers and the consumer itself decoding a batch's slices (``decode``)."""

    def __init__(self, decode: Decode, size: int, alive: Callable[[], None] = lambda: None) -> None:
        self.decode_one = decode
        self.size = size
        self.alive = alive  # called while waiting for the workers (the consumer's heartbeat)
        self._context = multiprocessing.get_context("fork")
        self._workers: list[tuple[Any, Connection] | None] = [None] * size

    def start(self) -> None:
        """Fork the workers now (the consumer does before it opens Kafka: no client thread is copied)."""
        for index in range(self.size):
            self._worker(index)

    @property
    def pids(self) -> list[int]:
        return [worker[0].pid for worker in self._workers if worker is not None]

    def decode(self, messages: Sequence[Message]) -> list[Outcome]:
        """Each message's alert or what it raised, in order; ``SourceUnavailableError`` goes up, and
        ``DecoderDiedError`` when a worker died holding a slice."""
        slices = _slices(len(messages), self.size + 1)
        handed: list[tuple[int, range]] = []
        died: DecoderDiedError | None = None
        for index, span in enumerate(slices[1:]):
            if not span:
                continue
            try:
                self._worker(index)[1].send([messages[i] for i in span])
            except (OSError, EOFError, ValueError):  # it died since the last batch
                died = died or self._lost(index, "its pipe is closed")
                continue
            handed.append((index, span))
        try:
            outcomes: list[Outcome] = [_decoded_here(self.decode_one, *messages[i]) for i in slices[0]]
        finally:  # every answer is read, even when this raises: the next batch must not read this one's
            answers = [self._answer(index) for index, _ in handed]
        for answer in answers:
            if isinstance(answer, DecoderDiedError):
                died = died or answer
                continue
            outcomes.extend(answer)
        if died is not None:
            raise died
        unavailable = [outcome for outcome in outcomes if isinstance(outcome, SourceUnavailableError)]
        if unavailable:
            raise unavailable[0]
        return [outcome._replace(raw=value or b"") if isinstance(outcome, Alert) and outcome.raw is None else outcome
                for outcome, (value, _) in zip(outcomes, messages, strict=True)]

    def close(self) -> list[int | None]:
        """End the workers: their pipes closed, they exit; one that does not within ``CLOSE_TIMEOUT`` is killed.
        Their exit codes (0: ended by themselves)."""
        codes = []
        for index, worker in enumerate(self._workers):
            if worker is None:
                continue
            process, pipe = worker
            pipe.close()
            process.join(CLOSE_TIMEOUT)
            if process.is_alive():
                process.kill()
                process.join()
            codes.append(process.exitcode)
            self._workers[index] = None
        return codes

    def _worker(self, index: int) -> tuple[Any, Connection]:
        """Worker ``index``, started anew if it is not running: one that died between batches held nothing."""
        worker = self._workers[index]
        if worker is not None and worker[0].is_alive():
            return worker
        if worker is not None:
            log.warning("decode worker %s (pid %s) died between batches (%s): starting another", index,
                        worker[0].pid, exit_described(worker[0].exitcode))
            worker[1].close()
            worker[0].join()
            self._workers[index] = None
        ours, theirs = self._context.Pipe(duplex=True)
        # The worker closes its copies of the consumer's ends, its own and the other workers': while one is open
        # in any process, closing it here is no end of file there.
        inherited = [ours, *(worker[1] for worker in self._workers if worker is not None)]
        process = self._context.Process(target=_serve, args=(self.decode_one, theirs, inherited, os.getpid()),
                                        name=f"ztfd-decode-{index}", daemon=True)
        process.start()
        theirs.close()  # only the worker holds it now: its death is an end of file here
        self._workers[index] = (process, ours)
        return self._workers[index]  # type: ignore[return-value]

    def _answer(self, index: int) -> list[Outcome] | DecoderDiedError:
        process, pipe = self._workers[index]  # type: ignore[misc]
        waited = 0.0
        while not pipe.poll(1.0):
            self.alive()
            waited += 1.0
            if waited >= SLICE_TIMEOUT:
                process.kill()
                return self._lost(index, f"hung more than {SLICE_TIMEOUT:g}s")
        try:
            return pipe.recv()
        except (EOFError, OSError):
            process.join(5)
            return self._lost(index, exit_described(process.exitcode))

    def _lost(self, index: int, why: str) -> DecoderDiedError:
        process, pipe = self._workers[index]  # type: ignore[misc]
        pipe.close()
        process.join(5)
        self._workers[index] = None
        log.error("decode worker %s (pid %s) died holding part of a batch: %s", index, process.pid, why)
        return DecoderDiedError(f"a decode worker died ({why})")


def _slices(count: int, parts: int) -> list[range]:
    """``count`` positions in ``parts`` contiguous slices of nearly equal size, in order."""
    size, extra = divmod(count, parts)
    slices, start = [], 0
    for part in range(parts):
        end = start + size + (part < extra)
        slices.append(range(start, end))
        start = end
    return slices


def _decoded_here(decode: Decode, value: bytes | None, key: bytes | None) -> Outcome:
    try:
        return decode(value, key)
    except Exception as exc:
        return exc


def _serve(decode: Decode, pipe: Connection, inherited: list[Connection], parent: int) -> None:
    """A worker: decode each slice it is sent, answer with the compact outcomes, until its pipe closes."""
    lifecycle.ignore(lifecycle.STOP_SIGNALS)  # the consumer's stop ends us by closing the pipe
    if not die_with_parent(parent, signal.SIGKILL):
        os._exit(0)
    for end in inherited:
        end.close()
    while True:
        try:
            messages = pipe.recv()
        except (EOFError, OSError):
            return
        pipe.send([compact(_decoded_here(decode, value, key), value) for value, key in messages])


def compact(outcome: Outcome, value: bytes | None) -> Outcome:
    """What a worker sends back: an alert with its view rendered, and without its raw bytes when they are the
    message's (``raw=None``: the consumer has them); an exception that pickles."""
    if isinstance(outcome, BaseException):
        return picklable(outcome)
    rendered = None if outcome.view is None else rendered_view(outcome.view)
    raw = None if outcome.raw is value or outcome.raw == (value or b"") else outcome.raw
    return picklable(outcome._replace(raw=raw, view=rendered, body=None))
