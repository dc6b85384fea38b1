"""MP-16-like sampling from the shipped TransLocator cell table."""

import numpy as np
import pytest

from geosurge_index import s2, sampler


def test_shipped_cell_table():
    ids, counts = sampler.mp16_cells()
    assert len(ids) == 12_893 and ids.dtype == np.uint64
    assert counts.sum() == 4_658_503 and (counts >= 50).all()
    assert s2.is_valid_id(ids).all()
    order = np.sort(ids)
    assert (s2.range_min(order[1:]) > s2.range_max(order[:-1])).all()  # a partition: disjoint cells


def test_sample_mp16_like_is_deterministic_and_inside_the_cells():
    lat, lon = sampler.sample_mp16_like(50_000, seed=1)
    assert lat.shape == lon.shape == (50_000,) and lat.dtype == np.float64
    again = sampler.sample_mp16_like(50_000, seed=1)
    assert np.array_equal(lat, again[0]) and np.array_equal(lon, again[1])
    assert not np.array_equal(lat, sampler.sample_mp16_like(50_000, seed=2)[0])
    assert (np.abs(lat) <= 90).all() and (np.abs(lon) <= 180).all()
    ids, _ = sampler.mp16_cells()
    order = np.sort(ids)
    leaves = s2.latlon_to_leaf_ids(lat, lon)
    k = np.searchsorted(s2.range_min(order), leaves, side="right") - 1
    assert (k >= 0).all() and (leaves <= s2.range_max(order)[k]).all()  # every point in a shipped cell


def test_sample_follows_the_weights():
    ids = s2.latlon_to_ids([48.85, -33.9, 40.7], [2.35, 151.2, -74.0], 10)
    lat, lon = sampler.sample_in_cells(ids, [1, 3, 6], 100_000, seed=0)
    got = s2.latlon_to_ids(lat, lon, 10)
    shares = np.array([(got == i).mean() for i in ids])
    assert shares == pytest.approx([0.1, 0.3, 0.6], abs=0.01)
    with pytest.raises(ValueError):
        sampler.sample_in_cells(ids, [0, 0, 0], 10)
