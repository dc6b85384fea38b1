"""World maps (PNG) and GeoJSON of cells and predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _eval_fixtures import world  # noqa: F401  (the shared fixture)
from PIL import Image

from geosurge_index import maps, s2
from geosurge_index.cli import main


def _ring_ok(ring: np.ndarray) -> bool:
    return (ring.shape[1] == 2 and np.array_equal(ring[0], ring[-1])
            and (np.abs(ring[:, 0]) <= 180 + 1e-9).all() and (np.abs(ring[:, 1]) <= 90 + 1e-9).all())


def _shoelace(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def test_country_outlines_ship_with_the_package():
    rings = maps.country_polygons()
    assert len(rings) > 250  # 177 countries, islands as separate rings
    assert sum(len(r) for r in rings) > 10000
    assert maps.COUNTRIES_FILE.stat().st_size < 1_000_000


def test_small_cell_ring_is_its_s2_vertices():
    ids = s2.latlon_to_ids([48.85], [2.35], 12)
    (ring,), = maps.cell_rings(ids)
    vlat, vlon = s2.cell_vertices(ids)
    assert _ring_ok(ring) and len(ring) == 5  # 4 corners, closed
    np.testing.assert_allclose(ring[:4], np.column_stack([vlon[0], vlat[0]]), atol=1e-12)
    assert _shoelace(ring) > 0  # counter-clockwise, as RFC 7946 wants exteriors


def test_cell_touching_the_antimeridian_stays_one_polygon():
    ids = s2.latlon_to_ids([-17.0], [179.999], 4)  # an S2 cell whose east edge is on 180 degrees (Fiji)
    rings = maps.cell_rings(ids)[0]
    assert len(rings) == 1 and _ring_ok(rings[0])  # no zero-area sliver at -180
    assert rings[0][:, 0].max() == pytest.approx(180.0) and rings[0][:, 0].min() > 170
    assert _shoelace(rings[0]) > 0


def test_cell_across_the_antimeridian_is_cut_in_two():
    face3 = s2.latlon_to_ids([0.0], [180.0], 0)  # S2 face 3 spans 135 E .. 135 W
    rings = maps.cell_rings(face3)[0]
    assert len(rings) == 2 and all(_ring_ok(r) and _shoelace(r) > 0 for r in rings)
    east, west = sorted(rings, key=lambda r: -r[:, 0].max())
    assert east[:, 0].max() == pytest.approx(180.0) and west[:, 0].min() == pytest.approx(-180.0)
    width = sum(r[:, 0].max() - r[:, 0].min() for r in rings)
    assert width == pytest.approx(90.0)  # both pieces together: the cell, not the whole world


def test_big_cells_bend_and_polar_cells_reach_the_pole():
    big = s2.latlon_to_ids([40.0], [-100.0], 2)
    (ring,), = maps.cell_rings(big)
    assert len(ring) > 20  # edges densified along the geodesic
    pole = s2.latlon_to_ids([89.99], [10.0], 3)
    rings = maps.cell_rings(pole)[0]
    assert all(_ring_ok(r) for r in rings)
    assert max(r[:, 1].max() for r in rings) == pytest.approx(90.0)


def test_geodesic_paths_split_at_the_antimeridian():
    paths = maps.geodesic_paths(np.array([0.0, 10.0]), np.array([170.0, 0.0]),
                                np.array([0.0, 20.0]), np.array([-170.0, 5.0]))
    assert len(paths) == 3  # the first crosses 180 degrees, the second does not
    assert all((np.abs(np.diff(p[:, 0])) < 180).all() for p in paths)


def _png_ok(path) -> Image.Image:
    img = Image.open(path)
    img.load()
    assert img.format == "PNG" and img.width > 1000 and img.height > 500
    assert np.asarray(img.convert("L")).std() > 5  # not a blank picture
    return img


def test_map_cells_png_and_geojson_from_index(world, tmp_path):  # noqa: F811
    png = tmp_path / "cells.png"
    assert main(["map", "cells", str(world.index_dir), "--output", str(png)]) == 0
    _png_ok(png)
    gj = tmp_path / "cells.geojson"
    assert main(["map", "cells", str(world.index_dir), "--level", "3", "--output", str(gj)]) == 0
    data = json.loads(gj.read_text())
    cells = maps.read_cells_table(world.index_dir, 3)
    assert data["type"] == "FeatureCollection" and len(data["features"]) == len(cells)
    f = data["features"][0]
    assert f["geometry"]["type"] in ("Polygon", "MultiPolygon")
    assert {"country_name", "town", "n_samples", "density_per_km2", "s2_token"} <= set(f["properties"])
    assert f["properties"]["s2_id"] == str(cells.column("s2_id")[0].as_py())
    assert f["properties"]["density_per_km2"] == pytest.approx(
        f["properties"]["n_samples"] / f["properties"]["area_km2"])


def test_map_cells_from_cells_dir_and_bad_level(world, tmp_path, capsys):  # noqa: F811
    png = tmp_path / "c.png"
    assert main(["map", "cells", str(world.cells_dir), "--output", str(png)]) == 0
    _png_ok(png)
    assert main(["map", "cells", str(world.cells_dir), "--level", "9", "--output", str(png)]) == 2
    assert "--level 9" in capsys.readouterr().err
    assert main(["map", "cells", str(world.cells_dir), "--output", str(tmp_path / "c.jpg")]) == 2
    assert ".png, .geojson" in capsys.readouterr().err
    assert main(["map", "cells", str(tmp_path), "--output", str(png)]) == 2


def test_map_predictions_png_and_geojson(world, tmp_path):  # noqa: F811
    png = tmp_path / "points.png"
    assert main(["map", "predictions", str(world.pred_dir), "--output", str(png)]) == 0
    _png_ok(png)
    lines = tmp_path / "lines.png"
    assert main(["map", "predictions", str(world.pred_dir), "--truth", str(world.truth_csv),
                 "--output", str(lines), "--max-points", "100"]) == 0
    _png_ok(lines)
    gj = tmp_path / "preds.geojson"
    assert main(["map", "predictions", str(world.pred_dir), "--truth", str(world.truth_csv),
                 "--output", str(gj)]) == 0
    data = json.loads(gj.read_text())
    features = data["features"]
    assert len(features) == 300 - world.n_missing  # every prediction row, error rows too
    errors = [f for f in features if f["properties"]["error"] is not None]
    assert len(errors) == world.n_errors and all(f["geometry"] is None for f in errors)
    assert all(f["id"] == f["properties"]["id"] for f in features)
    located = [f for f in features if f["geometry"] is not None]
    props = located[0]["properties"]
    assert {"id", "path", "probability", "error_km", "true_lat", "token_l1", "token_l7", "s2_token",
            "country_code", "country_name", "admin1", "town"} <= set(props)
    assert props["s2_token"] == props["token_l7"] and s2.tokens_to_ids([props["s2_token"]])[0] > 0
    assert all(f["properties"]["country_code"] for f in located)  # the points are in cities
    assert all(f["properties"]["town"] is None for f in errors)
    lon, lat = located[0]["geometry"]["coordinates"]
    from geosurge_index.metrics import haversine_km

    assert props["error_km"] == pytest.approx(float(haversine_km(lat, lon, props["true_lat"], props["true_lon"])),
                                              abs=1e-3)


def _shape(geometry):
    import shapely

    return shapely.geometry.shape(geometry)


def test_map_cells_geojson_is_valid_over_a_whole_partition(tmp_path):
    """Every level of a partition with cells at both poles and across the antimeridian: valid
    (Multi)Polygons, counter-clockwise exteriors, no part outside +-180, no zero-area part, no
    overlap between cells; the coarsest level (the six S2 faces) tiles the whole world."""
    shapely = pytest.importorskip("shapely")
    from geosurge_index.cells import PartitionSettings, partition, write_cells_dir

    rng = np.random.default_rng(3)
    v = rng.normal(size=(6000, 3))
    lat, lon = s2.xyz_to_latlon(v)
    lat = np.r_[lat, np.full(200, 89.99), np.full(200, -89.99), rng.uniform(-70, 70, 400)]
    lon = np.r_[lon, rng.uniform(-180, 180, 400), np.full(400, 180.0)]
    part = partition(lat, lon, PartitionSettings(tau_min=1, tau_max=(3000, 800, 200, 50, 10)))
    cells_dir = write_cells_dir(tmp_path / "cells", part.cells, part.assignments)
    crossing = polar = 0
    for lv in range(1, part.cells.n_levels + 1):
        out = tmp_path / f"level{lv}.geojson"
        assert main(["map", "cells", str(cells_dir), "--level", str(lv), "--output", str(out)]) == 0
        features = json.loads(out.read_text())["features"]
        assert len(features) == len(part.cells.level(lv))
        geoms = [_shape(f["geometry"]) for f in features]
        for f, g in zip(features, geoms, strict=True):
            assert shapely.is_valid(g), (lv, f["properties"]["s2_token"], shapely.is_valid_reason(g))
            parts = list(g.geoms) if g.geom_type == "MultiPolygon" else [g]
            assert all(p.exterior.is_ccw and p.area > 1e-9 for p in parts), f["properties"]["s2_token"]
            minx, miny, maxx, maxy = g.bounds
            assert -180 <= minx and maxx <= 180 and -90 <= miny and maxy <= 90
            if len(parts) == 2:  # across the antimeridian: one part on each side
                crossing += 1
                assert sorted(round(p.bounds[0]) for p in parts)[0] == -180
                assert sorted(round(p.bounds[2]) for p in parts)[1] == 180
            clat, clon = s2.cell_centers(s2.tokens_to_ids([f["properties"]["s2_token"]]))
            assert g.buffer(1e-9).contains(shapely.Point(clon[0], clat[0]))
            if g.geom_type == "Polygon" and abs(maxy if maxy > 0 else miny) == 90 and maxx - minx == 360:
                polar += 1  # a cell round a pole: one polygon from -180 to 180 up to the pole
        total = sum(g.area for g in geoms)
        # no overlaps (but slivers: neighbours of other S2 levels sample a shared geodesic apart)
        assert shapely.union_all(geoms).area == pytest.approx(total, rel=1e-4)
        if lv == 1:
            assert len(features) == 6 and total == pytest.approx(360 * 180)
    assert crossing >= 1 and polar >= 2
