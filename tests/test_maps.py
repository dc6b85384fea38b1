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


def test_antimeridian_cell_is_cut_in_two():
    ids = s2.latlon_to_ids([-17.0], [179.999], 4)  # an S2 cell across 180 degrees (Fiji)
    rings = maps.cell_rings(ids)[0]
    assert len(rings) == 2 and all(_ring_ok(r) for r in rings)
    edges = sorted(r[:, 0].max() for r in rings)
    assert edges[1] == pytest.approx(180.0) and min(r[:, 0].min() for r in rings) == pytest.approx(-180.0)
    # the two pieces together are about as wide as the cell, not the whole world
    width = sum(r[:, 0].max() - r[:, 0].min() for r in rings)
    assert width < 10


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
    n_points = 300 - world.n_missing - world.n_errors
    assert len(data["features"]) == n_points  # error rows have no point
    props = data["features"][0]["properties"]
    assert {"id", "path", "probability", "error_km", "true_lat"} <= set(props)
    lon, lat = data["features"][0]["geometry"]["coordinates"]
    from geosurge_index.metrics import haversine_km

    assert props["error_km"] == pytest.approx(float(haversine_km(lat, lon, props["true_lat"], props["true_lon"])),
                                              abs=1e-3)
