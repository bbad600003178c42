"""What an Avro schema carried by a message may ask of the decoder, checked before fastavro sees it.

fastavro decodes in C with no limits of its own: a schema that refers to itself (``record n { c: [null, n] }``)
lets a 5 kB message nest 5,000 levels deep and crash the process (SIGSEGV); an array whose items take no bytes
(``null``, an empty record) lets a few bytes claim billions of items; arrays of small records turn every byte of a
message into a dict. So every writer schema (a container's header, Fink's key, a registry's answer, a topic's
``.avsc``) is judged once, when it is parsed, and every record once more, by its size, before it is decoded:

- the schema's text is at most ``MAX_SCHEMA_BYTES``, its JSON at most ``MAX_JSON_DEPTH`` deep, its types nest at
  most ``MAX_TYPE_DEPTH`` deep (which bounds the data's nesting too: nothing may refer to itself);
- no array or map holds items that encode to zero bytes (their count would not be bounded by the message's size);
- decimals are on ``fixed`` of at most ``MAX_DECIMAL_BYTES`` (fastavro's conversion is quadratic in their size, and
  on ``bytes`` nothing bounds it);
- the memory a record of ``n`` bytes can take once decoded is at most ``Bounds.worst(n)`` (a conservative model of
  CPython's objects: arrays of small records turn few bytes into many dicts); a record that could need more than
  ``MAX_DECODED_MEMORY`` is refused before it is decoded.

String and bytes lengths beyond the data are fastavro's to refuse (it checks them before allocating), and an item
count beyond the data ends at the data's end. Refusals are ``ValueError``s with a one-line reason; the sources turn
them into ``InvalidMessageError``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_SCHEMA_BYTES = 256 * 1024  # Rubin's v11 schema is 40 kB, ZTF's 23 kB
MAX_JSON_DEPTH = 128  # a type level is up to 4 JSON levels (record, fields, field, type)
MAX_TYPE_DEPTH = 32  # ZTF's and Rubin's schemas nest 6 deep
MAX_DECODED_MEMORY = 512 * 1024 * 1024  # bytes of Python objects one record may become, at worst
MAX_DECIMAL_BYTES = 32  # 76 digits; a decimal's conversion is quadratic in its size (100 kB took 2 s)

# A conservative model of what decoded values cost in CPython (bytes; sys.getsizeof rounded up).
_SLOT = 8  # a pointer in a list
_LIST = 64
_DICT = 232
_DICT_ENTRY = 48  # per key of a dict (its share of the table)
_LOGICAL = 160  # a datetime, a Decimal or a UUID in place of the primitive
# name: (least bytes, fixed cost, cost per encoded byte beyond the fixed cost)
_PRIMITIVES = {"null": (0, 0, 0), "boolean": (1, 0, 0), "int": (1, 32, 0), "long": (1, 32, 0),
               "float": (4, 24, 0), "double": (8, 24, 0), "string": (1, 64, 1), "bytes": (1, 40, 1)}
_NO_BYTES = float("inf")


@dataclass(frozen=True)
class Bounds:
    """What a type's values can cost: a value that encodes to ``b`` bytes (at least ``min_bytes``) becomes at most
    ``min(fixed, density * b) + per_byte * b`` bytes of objects. ``fixed`` is what one value's objects cost apart
    from its variable parts, ``density`` the same per encoded byte (what counts when values repeat, in an array or
    a map), ``per_byte`` what grows with the bytes: strings and bytes one for one, arrays and maps their items."""

    min_bytes: int
    fixed: float
    density: float
    per_byte: float
    height: int  # levels of types, itself included: how deep its values nest

    def worst(self, size: int) -> float:
        return self.fixed + size * self.per_byte


def check_schema_text(text: bytes | str) -> Any:
    """The schema's JSON document, once its size and JSON depth are within bounds; ``ValueError`` otherwise."""
    if len(text) > MAX_SCHEMA_BYTES:
        raise ValueError(f"schema of {len(text)} bytes, more than {MAX_SCHEMA_BYTES}")
    try:
        document = json.loads(text)
    except RecursionError:
        raise ValueError("not JSON that ztfd reads: nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON ({exc.__class__.__name__})") from None
    if _json_depth(document) > MAX_JSON_DEPTH:
        raise ValueError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
    return document


def _json_depth(document: Any) -> int:
    """How deep ``document`` nests (without recursion: it may be deeper than Python recurses)."""
    deepest, stack = 0, [(document, 1)]
    while stack:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            return deepest
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
    return deepest


def schema_bounds(parsed: Any) -> Bounds:
    """The bounds of a schema fastavro parsed (full names, references as names); ``ValueError`` with the reason
    for a schema that refers to itself, nests too deeply, or lets a count grow without bytes."""
    return _Judge().bounds(parsed, 1)


def check_record_size(size: int, bounds: Bounds) -> None:
    """Refuse (``ValueError``) a record of ``size`` bytes whose decoded objects could pass ``MAX_DECODED_MEMORY``."""
    worst = bounds.worst(size)
    if worst > MAX_DECODED_MEMORY:
        raise ValueError(f"{size} bytes of this schema could decode to {worst / 2**20:.0f} MiB of objects "
                         f"(more than {MAX_DECODED_MEMORY // 2**20} MiB)")


class _Judge:
    """One walk over a parsed schema; named types are judged once and remembered by their full name."""

    def __init__(self) -> None:
        self.named: dict[str, Bounds] = {}
        self.open: set[str] = set()  # named types being judged: a reference to one is a recursion

    def bounds(self, schema: Any, depth: int) -> Bounds:
        if depth > MAX_TYPE_DEPTH:
            raise ValueError(f"types nested more than {MAX_TYPE_DEPTH} levels deep")
        if isinstance(schema, list):
            return self._union(schema, depth)
        if isinstance(schema, str):
            return self._named_or_primitive(schema, depth)
        if not isinstance(schema, dict):
            raise ValueError(f"a type that is a {type(schema).__name__}")
        kind = schema.get("type")
        name = schema.get("name")
        if kind in ("record", "error", "enum", "fixed") and isinstance(name, str):
            self.open.add(name)
            try:
                found = self._complex(kind, schema, depth)
            finally:
                self.open.discard(name)
            self.named[name] = found
            return found
        if kind in ("array", "map"):
            return self._complex(kind, schema, depth)
        if isinstance(kind, str | list | dict):
            found = self.bounds(kind, depth)
            if schema.get("logicalType") == "decimal" and kind == "bytes":
                raise ValueError("a decimal on bytes (its size is unbounded and its conversion quadratic): ztfd "
                                 f"reads decimals on fixed of at most {MAX_DECIMAL_BYTES} bytes")
            if schema.get("logicalType"):
                fixed = max(found.fixed, _LOGICAL)
                return Bounds(found.min_bytes, fixed, fixed / found.min_bytes if found.min_bytes else _NO_BYTES,
                              found.per_byte, found.height)
            return found
        raise ValueError("a type without a type")

    def _named_or_primitive(self, name: str, depth: int) -> Bounds:
        if name in _PRIMITIVES:
            least, fixed, per_byte = _PRIMITIVES[name]
            return Bounds(least, fixed, fixed / least if least else _NO_BYTES * bool(fixed), per_byte, 1)
        if name in self.open:
            raise ValueError(f"type {name[:60]} refers to itself (recursive schemas are not read)")
        known = self.named.get(name)
        if known is None:
            raise ValueError(f"unknown type {name[:60]}")
        if depth - 1 + known.height > MAX_TYPE_DEPTH:
            raise ValueError(f"types nested more than {MAX_TYPE_DEPTH} levels deep")
        return known

    def _union(self, branches: list[Any], depth: int) -> Bounds:
        judged = [self.bounds(branch, depth + 1) for branch in branches]
        if not judged:
            raise ValueError("an empty union")
        # The branch's index takes a byte: even a branch of no bytes (null) is paid for by one.
        return Bounds(1 + min(b.min_bytes for b in judged), max(b.fixed for b in judged),
                      max(min(b.fixed / (1 + b.min_bytes), b.density) for b in judged),
                      max(b.per_byte for b in judged), 1 + max(b.height for b in judged))

    def _complex(self, kind: str, schema: dict[str, Any], depth: int) -> Bounds:
        if kind == "enum":
            return Bounds(1, 0, 0, 0, 1)  # the symbols are the schema's own strings
        if kind == "fixed":
            size = schema.get("size")
            if not isinstance(size, int) or size < 0:
                raise ValueError("a fixed type without a size")
            if schema.get("logicalType") == "decimal" and size > MAX_DECIMAL_BYTES:
                raise ValueError(f"a decimal of {size} bytes (ztfd reads decimals of at most {MAX_DECIMAL_BYTES})")
            return Bounds(size, 40 + size, (40 + size) / size if size else _NO_BYTES, 0, 1)
        if kind == "array":
            items = self.bounds(schema.get("items"), depth + 1)
            if items.min_bytes == 0:
                raise ValueError("an array of items that take no bytes (their count is not bounded by the "
                                 "message's size)")
            return Bounds(1, _LIST, _LIST, _SLOT / items.min_bytes + items.density + items.per_byte,
                          1 + items.height)
        if kind == "map":
            values = self.bounds(schema.get("values"), depth + 1)
            key_bytes, key_fixed, key_per_byte = _PRIMITIVES["string"]
            entry_bytes = key_bytes + values.min_bytes
            value = values.fixed / entry_bytes if values.min_bytes == 0 else values.density
            per_entry = (_DICT_ENTRY + key_fixed) / entry_bytes + value + max(key_per_byte, values.per_byte)
            return Bounds(1, _DICT, _DICT, per_entry, 1 + values.height)
        fields = schema.get("fields")
        if not isinstance(fields, list):
            raise ValueError("a record without fields")
        judged = [self.bounds(field.get("type") if isinstance(field, dict) else None, depth + 1) for field in fields]
        own = _DICT + _DICT_ENTRY * len(judged)
        least = sum(b.min_bytes for b in judged)
        fixed = own + sum(b.fixed for b in judged)
        density = own / least + max(b.density for b in judged) if least else _NO_BYTES  # least > 0: judged
        return Bounds(least, fixed, density, max((b.per_byte for b in judged), default=0),
                      1 + max((b.height for b in judged), default=0))
