"""Arrow types for message fields: pinned the first time a field is seen, then never changed, only widened by
new nested fields.

Why pinned: a dataset whose files disagree on a column's type cannot be read as one table (fink-client#234: an
all-null column typed ``null``; #243: ids read as floats). So:
- an Avro field's type comes from its schema (``avro_type``: int and long become int64, float and double float64,
  records structs, arrays lists, maps maps, enums strings, unions with null their other branch);
- a JSON field's type is inferred from its values (integers int64, numbers with a fraction float64, objects
  structs, arrays lists); a field whose values mix kinds is kept as its JSON text (string);
- a field never seen with a value is not written at all (a reader sees null): writing it as ``null`` or a guessed
  type would clash with the type it gets when a value comes;
- once pinned, a value that does not fit the type (a float in an int64 column, an int beyond 64 bits) is null in
  that column; the ``message`` column keeps it. Ids therefore never become floats, and NaN stays NaN.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pyarrow as pa

log = logging.getLogger(__name__)

_AVRO_PRIMITIVES: dict[str, pa.DataType] = {
    "boolean": pa.bool_(), "int": pa.int64(), "long": pa.int64(), "float": pa.float64(), "double": pa.float64(),
    "string": pa.string(), "bytes": pa.binary(), "null": pa.null(),
}
_AVRO_LOGICAL: dict[str, pa.DataType] = {
    "timestamp-millis": pa.timestamp("us", tz="UTC"), "timestamp-micros": pa.timestamp("us", tz="UTC"),
    "date": pa.date32(),
}


def avro_type(schema: Any, named: dict[str, pa.DataType] | None = None) -> pa.DataType:
    """The Arrow type of an Avro schema (parsed JSON, as fastavro's ``writer_schema`` gives it)."""
    named = {} if named is None else named
    if isinstance(schema, str):
        if schema in _AVRO_PRIMITIVES:
            return _AVRO_PRIMITIVES[schema]
        return named.get(schema) or named.get(schema.rsplit(".", 1)[-1]) or pa.string()
    if isinstance(schema, list):
        branches = [branch for branch in schema if branch != "null"]
        return avro_type(branches[0], named) if len(branches) == 1 else pa.string()
    kind = schema.get("type")
    logical = _AVRO_LOGICAL.get(schema.get("logicalType", ""))
    if logical is not None:
        return logical
    if kind == "record":
        dtype = pa.struct([pa.field(f["name"], avro_type(f["type"], named)) for f in schema.get("fields", [])])
    elif kind == "array":
        dtype = pa.list_(avro_type(schema["items"], named))
    elif kind == "map":
        dtype = pa.map_(pa.string(), avro_type(schema["values"], named))
    elif kind == "enum":
        dtype = pa.string()
    elif kind == "fixed":
        dtype = pa.binary()
    else:
        return avro_type(kind, named)
    if "name" in schema:
        named[schema["name"]] = dtype
        named[schema["name"].rsplit(".", 1)[-1]] = dtype
    return dtype


def infer(values: list[Any]) -> pa.DataType | None:
    """The type JSON values of one field suggest; None when they are all null (nothing to pin yet)."""
    return inferred_array(values)[1]


def inferred_array(values: list[Any]) -> tuple[pa.Array | None, pa.DataType | None]:
    """The values as pyarrow infers them (None if it cannot: mixed kinds) and the type they suggest (``infer``)."""
    try:
        array = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return None, pa.string()  # mixed kinds: kept as JSON text
    return array, None if pa.types.is_null(array.type) else _without_nulls(array.type)


def as_type(values: list[Any], inferred: pa.Array | None, dtype: pa.DataType) -> pa.Array:
    """``values`` as ``dtype``, from the array already inferred when it fits (one conversion from Python per
    column, not two: the writer's main cost with full Rubin alerts), else from the values (``to_array``)."""
    if inferred is not None and fits(_without_nulls(inferred.type), dtype):
        if inferred.type == dtype:
            return inferred
        try:
            return inferred.cast(dtype)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            pass
    return to_array(values, dtype)


def _without_nulls(dtype: pa.DataType) -> pa.DataType | None:
    """``dtype`` with nested all-null parts dropped (struct fields) or made strings (list items)."""
    if pa.types.is_null(dtype):
        return None
    if pa.types.is_struct(dtype):
        fields = [pa.field(f.name, t) for f in dtype if (t := _without_nulls(f.type)) is not None]
        return pa.struct(fields) if fields else None
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return pa.list_(_without_nulls(dtype.value_type) or pa.string())
    return dtype


def widen(pinned: pa.DataType, seen: pa.DataType | None) -> pa.DataType:
    """The pinned type plus any struct fields ``seen`` adds; a leaf type never changes."""
    if seen is None or pinned == seen:
        return pinned
    if pa.types.is_struct(pinned) and pa.types.is_struct(seen):
        known = {f.name for f in pinned}
        fields = [pa.field(f.name, widen(f.type, _child(seen, f.name)), metadata=f.metadata) for f in pinned]
        fields += [f for f in seen if f.name not in known]
        return pa.struct(fields)
    if pa.types.is_list(pinned) and pa.types.is_list(seen):
        return pa.list_(widen(pinned.value_type, seen.value_type))
    return pinned


def _child(dtype: pa.StructType, name: str) -> pa.DataType | None:
    index = dtype.get_field_index(name)
    return None if index < 0 else dtype.field(index).type


def to_array(values: list[Any], dtype: pa.DataType, seen: pa.DataType | None = None) -> pa.Array:
    """``values`` as an array of ``dtype``; a value that does not fit is null (the message keeps it). ``seen``:
    what ``infer`` made of the values, if the caller has it.

    pyarrow itself would truncate 2.5 to 2 in an int64 column: values whose own type does not fit are found first
    (``fits``), one at a time only when the batch as a whole does not fit."""
    if pa.types.is_string(dtype):
        values = [v if v is None or isinstance(v, str) else _json_text(v) for v in values]
    elif not fits(infer(values) if seen is None else seen, dtype):
        values = [v if v is None or fits(infer([v]), dtype) else None for v in values]
    try:
        return pa.array(values, type=dtype)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError):
        pass
    fitted = []
    for value in values:
        try:
            pa.array([value], type=dtype)
            fitted.append(value)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError):
            fitted.append(None)
    return pa.array(fitted, type=dtype)


def fits(seen: pa.DataType | None, pinned: pa.DataType) -> bool:
    """Whether values inferred as ``seen`` go into ``pinned`` without loss: an integer into a float, never a
    fraction into an integer; struct fields it does not know are fine (``widen`` adds them)."""
    if seen is None or seen == pinned or pa.types.is_null(seen):
        return True
    if pa.types.is_struct(seen) and pa.types.is_struct(pinned):
        return all(fits(f.type, _child(pinned, f.name)) for f in seen if _child(pinned, f.name) is not None)
    if pa.types.is_list(seen) and pa.types.is_list(pinned):
        return fits(seen.value_type, pinned.value_type)
    if pa.types.is_integer(pinned):
        return pa.types.is_integer(seen)
    if pa.types.is_floating(pinned):
        return pa.types.is_integer(seen) or pa.types.is_floating(seen)
    return False


def _json_text(value: Any) -> str:
    return json.dumps(value, default=str)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns, in its order: missing ones null, others cast (a struct gains
    the fields it lacks as nulls)."""
    columns = []
    for fld in schema:
        if fld.name in table.column_names:
            column = table.column(fld.name)
            columns.append(column if column.type == fld.type else _cast(column, fld.type))
        else:
            columns.append(pa.nulls(table.num_rows, fld.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _cast(column: pa.ChunkedArray, dtype: pa.DataType) -> pa.Array:
    try:
        return column.cast(dtype)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return to_array(column.to_pylist(), dtype)
