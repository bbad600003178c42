"""The alerts dataset's schema in a fleet: each message column's type and the columns' order, agreed by the archivers
of every host through the fleet topic (``ztfd.ingest.fleet``), never in one host's store.

Why: each host pins a column's type from what *it* sees first (``arrowtypes``). Two hosts that see a new field first
as an int and as a float would write files that disagree on its type and cannot be read as one table
(fink-client#234), and each would upload its own ``_common_metadata`` under the one key of the bucket.

The rule (``agreed_types``): a host about to pin a new column, or to widen one (new struct fields), proposes the type
it would write in the fleet topic, under a key of its own and of that type (``fleet.proposal_key``), then reads the
topic to its end. Proposals count in the log's order, the same for every reader: a column's first proposal pins its
type; each later one only widens it (``arrowtypes.widen``: struct fields the agreed type lacks, never a leaf type);
the message columns follow ztfd's own in the order of their first proposals. A host reads the topic only once the
broker has acknowledged its proposals, so every proposal before them is in what it reads and no later one can change
the types it then writes. Every host writes ``_common_metadata`` from the agreed schema (the same bytes under the same
key) and conforms its rows to it: a value that does not fit the agreed type is null in that column (``message``
keeps it).

Round trips: one read of the fleet topic per archiver pass (``read``, the others' new columns), and, only when this
host's rows bring something the fleet has not agreed yet, one write and one read more. One host (``assignment =
"all"``) has no ``FleetSchema``: its schema is its own, and it asks the broker nothing.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import pyarrow as pa

from ztfd.archive import arrowtypes, columns
from ztfd.ingest import kafka
from ztfd.ingest.fleet import ColumnProposal, FleetBook, proposal_key

log = logging.getLogger(__name__)

DATASET = "alerts"
T = TypeVar("T")


class FleetUnreachableError(OSError):
    """The fleet topic could not be read or written: the archiver writes nothing and tries again at its next pass."""


def type_text(column: str, dtype: pa.DataType) -> str:
    """A column's type as text for the fleet topic: its Arrow IPC schema, base64 (exact, nested fields included)."""
    return base64.b64encode(pa.schema([pa.field(column, dtype)]).serialize().to_pybytes()).decode()


def text_type(text: str) -> pa.DataType:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text))).field(0).type


def agreed_types(proposals: Iterable[tuple[str, pa.DataType]]) -> dict[str, pa.DataType]:
    """Each column's agreed type from its proposals in the log's order: the first pins it, later ones add struct
    fields only; the columns in the order of their first proposals."""
    agreed: dict[str, pa.DataType] = {}
    for column, dtype in proposals:
        agreed[column] = arrowtypes.widen(agreed[column], dtype) if column in agreed else dtype
    return agreed


def schema_of(types: dict[str, pa.DataType]) -> pa.Schema:
    """The dataset's schema: ztfd's own columns, then the message columns in the agreed order."""
    schema = columns.fixed_schema(columns.ALERT_COLUMNS)
    for name, dtype in types.items():
        if name not in columns.ALERT_COLUMNS:
            schema = schema.append(columns.field(name, dtype, columns.MESSAGE_FIELD))
    return schema


def news(known: pa.Schema, wanted: pa.Schema) -> dict[str, pa.DataType]:
    """The message columns of ``wanted`` that ``known`` lacks, or whose struct fields it lacks: the types to propose
    (a known column widened by ``wanted``'s fields, a new one as ``wanted`` has it)."""
    found = {}
    for fld in wanted:
        if fld.name in columns.ALERT_COLUMNS:
            continue
        index = known.get_field_index(fld.name)
        proposed = fld.type if index < 0 else arrowtypes.widen(known.field(index).type, fld.type)
        if index < 0 or proposed != known.field(index).type:
            found[fld.name] = proposed
    return found


class FleetSchema:
    """The alerts dataset's schema as one host's archiver agrees it with the fleet."""

    def __init__(self, book: FleetBook) -> None:
        self.book = book
        self.keys: set[str] = set()  # the proposal keys the last read saw: none is ever written again
        self.agreed = schema_of({})  # the schema the last read gave

    def read(self) -> pa.Schema:
        """The schema the fleet has agreed so far (one read of the fleet topic)."""
        proposals = self._ask(self.book.column_proposals, DATASET)
        self.keys = {proposal.key for proposal in proposals}
        self.agreed = schema_of(agreed_types(_decoded(proposals)))
        return self.agreed

    def agree(self, known: pa.Schema, wanted: pa.Schema) -> pa.Schema:
        """The fleet's schema once it holds every column of ``wanted``: ``known`` (the last read) when it does,
        else after proposing what ``wanted`` adds and reading the topic again."""
        texts = {name: type_text(name, dtype) for name, dtype in news(known, wanted).items()}
        if not texts:
            return known
        texts = {name: text for name, text in texts.items()
                 if proposal_key(DATASET, name, self.book.member, text) not in self.keys}
        if not texts:  # proposed already, and read back: ``known`` was older than the last read
            return self.agreed
        self._ask(self.book.propose_columns, DATASET, texts)
        agreed = self.read()
        missing = [name for name in wanted.names if name not in agreed.names]
        if missing:
            raise FleetUnreachableError(f"{self.book.topic}: proposals of {', '.join(missing)} not read back")
        for name in texts:
            mine, theirs = wanted.field(name).type, agreed.field(name).type
            if not arrowtypes.fits(mine, theirs):
                log.info("archive: column %s is %s as the fleet agreed (this host saw %s first): values that do not "
                         "fit are null in it", name, theirs, mine)
        log.info("archive: proposed %d column type(s) to the fleet: %s", len(texts), ", ".join(texts))
        return agreed

    def _ask(self, call: Callable[..., T], *args: Any) -> T:
        try:
            return call(*args)
        except kafka.KafkaException as exc:
            raise FleetUnreachableError(f"{self.book.topic}: {exc}") from exc


def _decoded(proposals: list[ColumnProposal]) -> list[tuple[str, pa.DataType]]:
    found = []
    for proposal in proposals:
        try:
            found.append((proposal.column, text_type(proposal.type_text)))
        except (ValueError, pa.ArrowInvalid) as exc:
            log.warning("fleet topic: %s holds no Arrow type (%s): ignored", proposal.key, exc)
    return found
