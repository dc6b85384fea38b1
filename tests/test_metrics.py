"""Distances, accuracy at thresholds, GeoGuessr score, and the partition ceiling (coverage)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _eval_fixtures import world  # noqa: F401  (the shared fixture)
from geopy.distance import great_circle

from geosurge_index import metrics
from geosurge_index.evaluation import partition_coverage
from geosurge_index.metrics import (
    EARTH_RADIUS_KM,
    accuracy_at,
    evaluate_points,
    geoguessr_score,
    haversine_km,
)


def _geopy_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    return np.array([great_circle((a, b), (c, d), radius=EARTH_RADIUS_KM).km
                     for a, b, c, d in zip(lat1, lon1, lat2, lon2, strict=True)])


def test_haversine_matches_geopy_great_circle():
    rng = np.random.default_rng(0)
    n = 2000
    lat1, lat2 = rng.uniform(-90, 90, n), rng.uniform(-90, 90, n)
    lon1, lon2 = rng.uniform(-180, 180, n), rng.uniform(-180, 180, n)
    # edge cases: same point, antipodes, poles, across the antimeridian, tiny distances
    lat1 = np.r_[lat1, 10, 0, 90, -90, 0, 45.0]
    lon1 = np.r_[lon1, 20, 0, 0, 0, 179.9, 7.0]
    lat2 = np.r_[lat2, 10, 0, -90, 90, 0, 45.000001]
    lon2 = np.r_[lon2, 20, 180, 0, 123, -179.9, 7.0]
    ours = haversine_km(lat1, lon1, lat2, lon2)
    ref = _geopy_km(lat1, lon1, lat2, lon2)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-6)
    assert ours[-4] == pytest.approx(math.pi * EARTH_RADIUS_KM)  # pole to pole
    assert ours[-2] == pytest.approx(2 * math.pi * EARTH_RADIUS_KM * 0.2 / 360)  # 0.2 deg across 180


def test_haversine_nan_in_nan_out_and_broadcasts():
    d = haversine_km([np.nan, 0.0], [0.0, 0.0], 0.0, [1.0, 1.0])
    assert np.isnan(d[0]) and d[1] == pytest.approx(111.195, abs=1e-3)


def test_accuracy_at_counts_boundaries_and_misses():
    d = np.array([0.5, 1.0, 1.0001, 25.0, 199.0, 750.0, 3000.0, np.inf, np.nan, 2500.0])
    acc = accuracy_at(d)
    assert acc == {1.0: 20.0, 25.0: 40.0, 200.0: 50.0, 750.0: 60.0, 2500.0: 70.0}
    assert all(math.isnan(v) for v in accuracy_at([]).values())


def test_geoguessr_score():
    s = geoguessr_score([0.0, 1492.7, 20000.0, np.inf, np.nan])
    assert s[0] == 5000.0
    assert s[1] == pytest.approx(5000 / math.e)
    assert s[2] == pytest.approx(5000 * math.exp(-20000 / 1492.7))
    assert s[3] == 0.0 and s[4] == 0.0


def test_evaluate_points_counts_missing_and_errors_as_wrong():
    true_lat = np.array([0.0, 0.0, 0.0, 0.0, 0.0])
    true_lon = np.array([0.0, 0.0, 0.0, 0.0, 0.0])
    pred_lat = np.array([0.0, 0.1, np.nan, np.nan, 10.0])  # 2 without a point: 1 missing, 1 error
    pred_lon = np.array([0.0, 0.0, np.nan, np.nan, 0.0])
    pred_cells = np.array([[1, 2], [1, 3], [-1, -1], [-1, -1], [4, 5]])
    true_cells = np.array([[1, 2], [1, 2], [1, 2], [-1, -1], [1, -1]])
    r = evaluate_points(pred_lat, pred_lon, true_lat, true_lon, n_missing=1,
                        pred_cells=pred_cells, true_cells=true_cells)
    assert (r.n_truth, r.n_evaluated, r.n_matched, r.n_missing, r.n_errors) == (5, 5, 4, 1, 1)
    assert r.accuracy_pct[1.0] == 20.0 and r.accuracy_pct[25.0] == 40.0 and r.accuracy_pct[2500.0] == 60.0
    d = haversine_km(pred_lat, pred_lon, true_lat, true_lon)
    assert r.median_km == pytest.approx(d[4])  # sorted: 0, 11.1, 1112, inf, inf
    assert r.mean_km == pytest.approx(np.nanmean(d))
    assert r.geoguessr == pytest.approx(geoguessr_score(d[[0, 1, 4]]).sum() / 5)
    assert r.cell_accuracy_pct == {1: 40.0, 2: 20.0}
    assert r.truth_in_cell_pct == {1: 80.0, 2: 60.0}
    out = r.to_dict()
    assert out["accuracy_pct"]["25"] == 40.0 and out["cell_accuracy_pct"]["2"] == 20.0
    with pytest.raises(ValueError):
        evaluate_points(pred_lat, pred_lon, true_lat, true_lon, n_missing=3)
    with pytest.raises(ValueError):
        evaluate_points(pred_lat[:2], pred_lon, true_lat, true_lon)


def test_report_rows_render_every_metric():
    r = evaluate_points([0.0], [0.0], [0.0], [0.0])
    names = [k for k, _ in r.rows()]
    assert any("2500 km" in k for k in names) and "median error km" in names
    assert "GeoGuessr score (mean)" in names


def test_partition_coverage_against_brute_force(world):  # noqa: F811
    from geosurge_index.cells import assign_points, read_cells

    cells = read_cells(world.cells_dir)
    rep = partition_coverage(cells, world.lat, world.lon, truth="t")
    finest = cells.levels[-1]
    inside = assign_points(cells, world.lat, world.lon)
    assert rep.inside_pct[7] == pytest.approx(100 * (inside[:, -1] >= 0).mean())
    assert rep.inside_pct[1] >= rep.inside_pct[4] >= rep.inside_pct[7]
    # nearest: brute force over every finest cell mean
    all_d = haversine_km(world.lat[:, None], world.lon[:, None], finest.mean_lat[None, :], finest.mean_lon[None, :])
    best = all_d.min(axis=1)
    assert rep.nearest.median_km == pytest.approx(np.median(best))
    assert rep.nearest.accuracy_pct == pytest.approx(accuracy_at(best))
    # oracle: the true finest cell's mean when inside one, the nearest otherwise
    k = inside[:, -1]
    oracle_d = np.where(k >= 0, haversine_km(world.lat, world.lon, finest.mean_lat[k], finest.mean_lon[k]), best)
    assert rep.oracle.accuracy_pct == pytest.approx(accuracy_at(oracle_d))
    assert rep.oracle.geoguessr == pytest.approx(geoguessr_score(oracle_d).mean())
    assert all(rep.nearest.accuracy_pct[t] >= rep.oracle.accuracy_pct[t] for t in metrics.THRESHOLDS_KM)


@pytest.mark.parametrize("name", ["evaluate_predictions", "partition_coverage", "CoverageReport"])
def test_moved_names_still_importable_with_a_deprecation_warning(name):
    from geosurge_index import evaluation

    with pytest.warns(DeprecationWarning, match=f"metrics.{name} moved to geosurge_index.evaluation"):
        assert getattr(metrics, name) is getattr(evaluation, name)
    with pytest.raises(AttributeError):
        metrics.no_such_name  # noqa: B018


def test_metrics_is_pure_maths():
    """Importing metrics loads no reader: no DuckDB, no sql / evaluation / index module."""
    import subprocess
    import sys

    code = ("import sys, geosurge_index.metrics; "
            "print(sorted(m for m in ('duckdb', 'geosurge_index.sql', 'geosurge_index.evaluation', "
            "'geosurge_index.index') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
