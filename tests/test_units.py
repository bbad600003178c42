"""Sizes for people: decimal units, one helper for every command."""

from __future__ import annotations

import pytest

from ztfd.units import human_bytes


@pytest.mark.parametrize(("size", "shown"), [
    (None, "-"), (0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (1024, "1.0 kB"), (212_000, "212.0 kB"),
    (5_100_000, "5.1 MB"), (812_400_000_000, "812.4 GB"), (1.8e12, "1.8 TB"), (3e18, "3000.0 PB"),
])
def test_sizes_are_decimal(size: float | None, shown: str) -> None:
    assert human_bytes(size) == shown
