"""The archive's pure parts: pinned types of message fields, stamp kinds from file names, the HEALPix ranges a cone
covers (never missing a point inside), and the output formats of ``ztfd query``."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from ztfd.archive import arrowtypes, messages, query, sky
from ztfd.archive.stamps import kind_of


def test_json_values_pin_int64_float64_structs_and_mixed_kinds_as_text() -> None:
    assert arrowtypes.infer([1, 2, None]) == pa.int64()
    assert arrowtypes.infer([1, 2.5]) == pa.float64()
    assert arrowtypes.infer([None, None]) is None  # nothing to pin yet: not written
    assert arrowtypes.infer([1, "a"]) == pa.string()
    assert arrowtypes.infer([{"a": 1, "b": None}]) == pa.struct([("a", pa.int64())])


def test_a_value_that_does_not_fit_its_pinned_type_is_null_and_nan_stays_nan() -> None:
    assert arrowtypes.to_array([1, 2.5, 2**70, 3], pa.int64()).to_pylist() == [1, None, None, 3]
    assert arrowtypes.to_array([1, 2.5, 3], pa.int64()).to_pylist() == [1, None, 3]  # never truncated
    nested = pa.struct([("id", pa.int64()), ("x", pa.float64())])
    assert arrowtypes.to_array([{"id": 7, "x": 1}, {"id": 7.5, "x": 2.0}], nested).to_pylist() == [
        {"id": 7, "x": 1.0}, None]
    floats = arrowtypes.to_array([math.nan, 1], pa.float64()).to_pylist()
    assert math.isnan(floats[0]) and floats[1] == 1.0
    assert arrowtypes.to_array([{"x": 1}, "s"], pa.string()).to_pylist() == ['{"x": 1}', "s"]


def test_widening_adds_struct_fields_and_never_changes_a_leaf() -> None:
    pinned = pa.struct([("a", pa.int64())])
    seen = pa.struct([("a", pa.float64()), ("b", pa.string())])
    assert arrowtypes.widen(pinned, seen) == pa.struct([("a", pa.int64()), ("b", pa.string())])
    assert arrowtypes.widen(pa.int64(), pa.float64()) == pa.int64()


def test_avro_types() -> None:
    record = {"type": "record", "name": "r", "fields": [
        {"name": "id", "type": "long"}, {"name": "f", "type": ["null", "float"]},
        {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["a"]}},
        {"name": "l", "type": {"type": "array", "items": "r2"}}]}
    named = {"r2": pa.int64()}
    assert arrowtypes.avro_type(record, named) == pa.struct(
        [("id", pa.int64()), ("f", pa.float64()), ("e", pa.string()), ("l", pa.list_(pa.int64()))])


def test_positions_from_every_message_shape() -> None:
    assert messages.position({"candidate": {"ra": 1.0, "dec": 2.0}, "ra": 5.0, "dec": 6.0}) == (1.0, 2.0)
    assert messages.position({"diaSource": {"ra": 3.0, "dec": -4.0}}) == (3.0, -4.0)
    assert messages.position({"ramean": 10.0, "decmean": 20.0}) == (10.0, 20.0)
    assert messages.position({"ra": 10.0, "decl": 20.0}) == (10.0, 20.0)
    assert messages.position({"alert": {"diaObject": {"ra": 7.0, "decl": 8.0}}}) == (7.0, 8.0)
    assert messages.position({"ra": math.nan, "dec": 1.0}) == (None, None)
    assert messages.position({"objectId": "x"}) == (None, None)


@pytest.mark.parametrize(("name", "expected"), [
    ("1704227453315015003_science.fits.gz", ("1704227453315015003", "science")),
    ("170094456272322680_difference.fits", ("170094456272322680", "difference")),
    ("1704227453315015003.png", ("1704227453315015003", "preview")),
    ("1704227453315015003_packet.avro", ("1704227453315015003", "packet")),
])
def test_stamp_kinds_from_file_names(name: str, expected: tuple[str, str]) -> None:
    assert kind_of(name) == expected


@pytest.mark.parametrize("radius", [0.5, 10.0, 300.0, 5400.0])
@pytest.mark.parametrize(("ra", "dec"), [(150.1, 2.2), (0.0001, -30.0), (359.9999, 89.99), (45.0, -89.9)])
def test_cone_ranges_cover_every_point_inside_the_cone(ra: float, dec: float, radius: float) -> None:
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    rng = np.random.default_rng(abs(int(ra * 1000 + dec * 7 + radius)))
    centre = SkyCoord(ra * u.deg, dec * u.deg)
    angles = rng.uniform(0, 360, 2000) * u.deg
    distances = np.sqrt(rng.uniform(0, 1, 2000)) * radius * u.arcsec * 0.999
    points = centre.directional_offset_by(angles, distances)
    cells = sky.healpix_29(points.ra.deg, points.dec.deg)
    ranges = sky.cone_ranges(ra, dec, radius)
    lows = np.array([low for low, _ in ranges])
    highs = np.array([high for _, high in ranges])
    covered = [bool(np.any((lows <= cell) & (cell <= highs))) for cell in cells]
    assert all(covered)


def test_query_output_formats() -> None:
    table = pa.table({"n": [1, None], "x": [1.5, math.nan], "s": ["a,b", "c"]})
    assert json.loads(query.render(table, "json")) == [{"n": 1, "x": 1.5, "s": "a,b"}, {"n": None, "x": None, "s": "c"}]
    assert query.render(table, "csv").splitlines() == ["n,x,s", '1,1.5,"a,b"', ",,c"]
    text = query.render(table, "table").splitlines()
    assert text[0].split() == ["n", "x", "s"] and text[-1] == "(2 rows)"
