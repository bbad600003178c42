"""HEALPix at order 29 (nested), the spatial index HATS and LSDB name ``_healpix_29``, and cone pruning."""

from __future__ import annotations

import numpy as np
from astropy import units as u
from astropy_healpix import HEALPix

ORDER = 29
PRUNE_ORDER_MAX = 16  # cones are covered with cells of at most this order, then widened to order-29 ranges


def healpix_29(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    grid = HEALPix(nside=2**ORDER, order="nested")
    return np.asarray(grid.lonlat_to_healpix(ra * u.deg, dec * u.deg), dtype=np.int64)


def cone_ranges(ra: float, dec: float, radius_arcsec: float) -> list[tuple[int, int]]:
    """Ranges [low, high] of order-29 indices that together cover the cone (and a little more): a coarse order
    whose cells are a few times the radius, the cells its ``cone_search_lonlat`` finds, each cell's order-29 span."""
    radius_deg = radius_arcsec / 3600.0
    order = PRUNE_ORDER_MAX
    while order > 0 and HEALPix(nside=2**order).pixel_resolution.to_value(u.deg) < radius_deg:
        order -= 1
    grid = HEALPix(nside=2**order, order="nested")
    margin = 1.5 * grid.pixel_resolution.to_value(u.deg)  # a cell the cone only grazes is taken too
    cells = np.unique(grid.cone_search_lonlat(ra * u.deg, dec * u.deg, (radius_deg + margin) * u.deg))
    shift = 2 * (ORDER - order)
    ranges: list[tuple[int, int]] = []
    for cell in cells.tolist():
        low, high = cell << shift, ((cell + 1) << shift) - 1
        if ranges and ranges[-1][1] + 1 == low:
            ranges[-1] = (ranges[-1][0], high)
        else:
            ranges.append((low, high))
    return ranges
