"""geosurge_index.s2 against s2sphere (the reference port of S2), on random points and edge cases."""

import math

import numpy as np
import pytest
import s2sphere

from geosurge_index import s2
from geosurge_index.errors import UserError

# 35.26...° is where three cube faces meet (a corner: |x| = |y| = |z|)
CORNER_LAT = math.degrees(math.atan(1 / math.sqrt(2)))


def ref_leaf(lat: float, lon: float) -> int:
    return s2sphere.CellId.from_lat_lng(s2sphere.LatLng.from_degrees(lat, lon)).id()


def random_points(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))  # uniform on the sphere
    lon = rng.uniform(-180, 180, n)
    return lat, lon


def edge_points() -> tuple[np.ndarray, np.ndarray]:
    lats = [0.0, -0.0, 90.0, -90.0, 45.0, -45.0, CORNER_LAT, -CORNER_LAT, 89.99999999, -89.99999999, 1e-300]
    lons = [0.0, -0.0, 180.0, -180.0, 45.0, -45.0, 135.0, -135.0, 90.0, -90.0, 179.9999999999, -179.9999999999]
    base = [(a, b) for a in lats for b in lons]
    # one ulp either side of every face edge / corner coordinate
    nudged = [(np.nextafter(a, d), np.nextafter(b, e)) for a, b in base for d in (-100, 100) for e in (-200, 200)]
    pts = np.array(base + nudged, dtype=np.float64)
    lat, lon = np.clip(pts[:, 0], -90, 90), np.clip(pts[:, 1], -180, 180)
    return lat, lon


@pytest.fixture(scope="module")
def sample():
    lat, lon = random_points(100_000, seed=7)
    leaves = s2.latlon_to_leaf_ids(lat, lon)
    return lat, lon, leaves


def test_leaf_ids_equal_s2sphere_on_100k_random_points(sample):
    lat, lon, leaves = sample
    assert leaves.dtype == np.uint64
    ref = np.array([ref_leaf(a, b) for a, b in zip(lat.tolist(), lon.tolist(), strict=True)], dtype=np.uint64)
    assert np.array_equal(leaves, ref)


def test_leaf_ids_equal_s2sphere_on_edge_cases():
    lat, lon = edge_points()
    ref = np.array([ref_leaf(a, b) for a, b in zip(lat.tolist(), lon.tolist(), strict=True)], dtype=np.uint64)
    got = s2.latlon_to_leaf_ids(lat, lon)
    assert np.array_equal(got, ref)
    assert set((got >> np.uint64(61)).tolist()) == set(range(6))  # all six faces are reached
    # lon 180 and -180 land in leaf cells touching each other (sin(pi) is 1.2e-16, not 0)
    east, west = s2.latlon_to_leaf_ids([10.0, 10.0], [180.0, -180.0])
    (lat_e, lat_w), (lon_e, lon_w) = s2.cell_centers(np.array([east, west]))
    assert abs(lat_e - lat_w) < 1e-7 and abs(abs(lon_e) - 180) < 1e-7 and abs(abs(lon_w) - 180) < 1e-7


def test_hand_checked_ids():
    # faces: id = (2 * face + 1) << 60; tokens 1, 3, 5, 7, 9, b
    faces = np.array([(2 * f + 1) << 60 for f in range(6)], dtype=np.uint64)
    assert s2.ids_to_tokens(faces).tolist() == ["1", "3", "5", "7", "9", "b"]
    # (0, 0) is face 0's centre; the poles are on faces 2 and 5; lon 90 / -90 on faces 1 / 4; lon 180: face 3
    pts = s2.latlon_to_ids([0, 90, -90, 0, 0, 0], [0, 0, 0, 90, -90, 180], 0)
    assert pts.tolist() == faces[[0, 2, 5, 1, 4, 3]].tolist()
    assert s2.levels(faces).tolist() == [0] * 6
    assert s2.levels(s2.latlon_to_leaf_ids([1.0], [2.0])).tolist() == [30]


def test_parents_levels_and_containment(sample):
    _, _, leaves = sample
    rng = np.random.default_rng(1)
    levels = rng.integers(0, 31, len(leaves))
    parents = s2.parent_ids(leaves, levels)
    assert np.array_equal(s2.levels(parents), levels)
    k = np.arange(0, len(leaves), 50)
    ref = [s2sphere.CellId(int(a)).parent(int(b)).id() for a, b in zip(leaves[k], levels[k], strict=True)]
    assert parents[k].tolist() == ref
    assert s2.contains(parents, leaves).all()
    assert (s2.range_min(parents) <= leaves).all() and (leaves <= s2.range_max(parents)).all()


def test_children(sample):
    _, _, leaves = sample
    cells = s2.parent_ids(leaves[:2000], np.random.default_rng(2).integers(0, 30, 2000))
    kids = s2.child_ids(cells)
    ref = [[c.id() for c in s2sphere.CellId(int(a)).children()] for a in cells]
    assert kids.tolist() == ref
    assert np.array_equal(s2.parent_ids(kids.ravel(), np.repeat(s2.levels(cells), 4)), np.repeat(cells, 4))
    with pytest.raises(UserError, match="leaf"):
        s2.child_ids(leaves[:1])


def test_tokens_round_trip_and_match_s2sphere(sample):
    _, _, leaves = sample
    cells = s2.parent_ids(leaves[:5000], np.random.default_rng(3).integers(0, 31, 5000))
    tokens = s2.ids_to_tokens(cells)
    assert tokens.tolist() == [s2sphere.CellId(int(a)).to_token() for a in cells]
    assert np.array_equal(s2.tokens_to_ids(tokens), cells)
    assert np.array_equal(s2.tokens_to_ids(np.char.upper(tokens)), cells)


@pytest.mark.parametrize("bad", ["", "xyz", "0123456789abcdef0", "2", "1g"])
def test_malformed_tokens_raise(bad):
    with pytest.raises(UserError):
        s2.tokens_to_ids(["89c", bad])


def test_invalid_ids_raise():
    with pytest.raises(UserError, match="invalid S2 cell ids"):
        s2.levels(np.array([0, 7 << 61], dtype=np.uint64))
    with pytest.raises(UserError):
        s2.parent_ids(np.array([1 << 60], dtype=np.uint64), 3)  # a face has no level-3 ancestor


def test_centres_vertices_and_areas_close_to_s2sphere(sample):
    _, _, leaves = sample
    cells = s2.parent_ids(leaves[:2000], np.random.default_rng(4).integers(0, 31, 2000))
    lat, lon = s2.cell_centers(cells)
    vlat, vlon = s2.cell_vertices(cells)
    area = s2.cell_areas(cells)
    for k, cid in enumerate(cells[:600]):
        c = s2sphere.Cell(s2sphere.CellId(int(cid)))
        ll = s2sphere.CellId(int(cid)).to_lat_lng()
        assert lat[k] == pytest.approx(ll.lat().degrees, abs=1e-12)
        assert lon[k] == pytest.approx(ll.lng().degrees, abs=1e-12)
        for q in range(4):
            v = s2sphere.LatLng.from_point(c.get_vertex(q))
            assert vlat[k, q] == pytest.approx(v.lat().degrees, abs=1e-12)
            dlon = (vlon[k, q] - v.lng().degrees + 180) % 360 - 180
            assert abs(dlon) < 1e-12 or abs(abs(v.lat().degrees) - 90) < 1e-9
        assert area[k] == pytest.approx(c.exact_area(), rel=1e-6)
        if c.level() >= 5:  # approx_area is within 0.1% from level 5 on
            assert area[k] == pytest.approx(c.approx_area(), rel=2e-3)


def test_areas_add_up():
    faces = np.array([(2 * f + 1) << 60 for f in range(6)], dtype=np.uint64)
    assert s2.cell_areas(faces).sum() == pytest.approx(4 * math.pi, rel=1e-12)
    cells = s2.latlon_to_ids([48.85, -33.9, 0.0], [2.35, 151.2, 0.0], 12)
    kids = s2.child_ids(cells)
    assert s2.cell_areas(kids.ravel()).reshape(-1, 4).sum(1) == pytest.approx(s2.cell_areas(cells), rel=1e-9)
    km2 = s2.cell_areas_km2(faces).sum()
    assert km2 == pytest.approx(4 * math.pi * s2.EARTH_RADIUS_KM**2)


def test_sample_in_cells_stays_inside():
    cells = s2.latlon_to_ids([48.85, -33.9, 0.0, 89.9, -10.0], [2.35, 151.2, 0.0, 10.0, 179.99], 9)
    rng = np.random.default_rng(0)
    many = np.repeat(cells, 200)
    lat, lon = s2.sample_in_cells(many, rng)
    assert np.array_equal(s2.latlon_to_ids(lat, lon, 9), many)


def test_invalid_coordinates_raise_naming_rows():
    with pytest.raises(UserError, match=r"row 1: latitude is missing/NaN; row 2: longitude 181.0 outside"):
        s2.latlon_to_leaf_ids([1.0, np.nan, 0.0], [2.0, 3.0, 181.0])
