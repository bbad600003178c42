"""The alerts dataset's own columns: their names, pinned Arrow types and meanings (kept in the Parquet metadata).

The message's fields follow these columns, each under its own name; one that would take a name of this list (or a
Hive partition's, ``night`` and ``topic``) is written as ``msg_<name>``.
"""

from __future__ import annotations

import pyarrow as pa

UTC_TIME = pa.timestamp("us", tz="UTC")

# name -> (type, what it means). Every file holds every one of these, in this order, with these types.
ALERT_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "object_id": (pa.string(), "the object's id, exact text (Rubin's exceed 2^53)"),
    "survey": (pa.string(), "ztf or lsst"),
    "partition": (pa.int32(), "the Kafka partition the message came from"),
    "generation": (pa.int32(), "how often that partition's offsets restarted (a recreated topic)"),
    "offset": (pa.int64(), "the Kafka offset; (topic, partition, generation, offset) names one message"),
    "detection_id": (pa.string(), "the detection the message names (ZTF candid, LSST diaSourceId), exact text"),
    "observed_at": (UTC_TIME, "the observation time of the message's newest detection, UTC"),
    "received_at": (UTC_TIME, "when ztfd received the message, UTC"),
    "ra": (pa.float64(), "right ascension, degrees (candidate, diaSource, ra, ramean, whichever the message has)"),
    "dec": (pa.float64(), "declination, degrees (candidate, diaSource, dec, decmean or decl)"),
    "_healpix_29": (pa.int64(), "nested HEALPix index at order 29 of (ra, dec), as HATS/LSDB name it; null without "
                                "a position"),
    "file": (pa.string(), "the alert file under the ztfd home that keeps the message"),
    "message": (pa.binary(), "the Kafka message's value, byte for byte as received"),
}
PARTITION_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "night": (pa.date32(), "the night ztfd files the alert under (the UTC date for ZTF, dayObs for Rubin)"),
    "topic": (pa.string(), "the Kafka topic"),
}
RESERVED = frozenset(ALERT_COLUMNS) | frozenset(PARTITION_COLUMNS)
MESSAGE_FIELD = "field of the message as sent"

STAMP_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "object_id": (pa.string(), "the object's id (the folder under images/<night>/)"),
    "detection_id": (pa.string(), "the detection the stamp belongs to, exact text"),
    "kind": (pa.string(), "science, template, difference, preview or packet"),
    "path": (pa.string(), "the file, relative to the ztfd home"),
    "bytes": (pa.int64(), "its size"),
    "md5": (pa.string(), "its MD5, hex"),
    "written_at": (UTC_TIME, "when it was written (its modification time), UTC"),
}


def field(name: str, dtype: pa.DataType, description: str) -> pa.Field:
    """A nullable field whose meaning travels in the Parquet metadata (``description``)."""
    return pa.field(name, dtype, metadata={"description": description})


def fixed_schema(columns: dict[str, tuple[pa.DataType, str]]) -> pa.Schema:
    return pa.schema([field(name, dtype, text) for name, (dtype, text) in columns.items()])


def column_name(message_field: str) -> str:
    """The column of a message field: its own name, unless one of ours has it."""
    return f"msg_{message_field}" if message_field in RESERVED else message_field
