"""Sampling points with the real density of MP-16 (the 4.72 M-image training set).

The package ships `data/mp16_cells.csv`: TransLocator's S2 partition of MP-16 (tau_min 50,
tau_max 1000; 12,893 cells, 4.66 M images) as (S2 token, images per cell); see data/SOURCES.md.
Drawing a cell in proportion to its image count, then a point uniformly inside it, gives a point
set with MP-16's density at the ~1000-images-per-cell scale, for benchmarks and the demo.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np

from geosurge_index import s2

MP16_SIZE = 4_720_000  # images in MP-16 (the usual rounded figure)
_CELLS_FILE = "mp16_cells.csv"


@lru_cache(maxsize=1)
def mp16_cells() -> tuple[np.ndarray, np.ndarray]:
    """(S2 ids uint64, images per cell int64) of the shipped MP-16 cell table."""
    text = resources.files("geosurge_index").joinpath("data", _CELLS_FILE).read_text()
    table = np.loadtxt(text.splitlines(), delimiter=",", skiprows=1, dtype=str)
    ids = s2.tokens_to_ids(table[:, 0])
    counts = table[:, 1].astype(np.int64)
    return ids, counts


def sample_in_cells(ids, weights, n: int, seed: int | np.random.Generator = 0) -> tuple[np.ndarray, np.ndarray]:
    """n points (lat, lon degrees): cells drawn in proportion to `weights`, points uniform in the
    cell's (s, t) square (near-uniform in area), returned in random order."""
    rng = np.random.default_rng(seed)
    ids = np.asarray(ids, dtype=np.uint64)
    weights = np.asarray(weights, dtype=np.float64)
    if n < 0 or len(ids) != len(weights) or not len(ids) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError("need n >= 0 and one non-negative weight per cell, not all zero")
    per_cell = rng.multinomial(n, weights / weights.sum())
    chosen = np.repeat(ids, per_cell)
    rng.shuffle(chosen)
    return s2.sample_in_cells(chosen, rng)


def sample_mp16_like(n: int = MP16_SIZE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n points (lat, lon float64 degrees) with MP-16's density; deterministic for a seed."""
    ids, counts = mp16_cells()
    return sample_in_cells(ids, counts, n, seed)
