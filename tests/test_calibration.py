"""Calibration maths (issue 16): a known miscalibration is recovered, the chosen method beats the
raw model out of sample, the calibration file round-trips; error radii on posteriors of known
geometry."""

from __future__ import annotations

import numpy as np
import pytest

from geosurge_index.calibration import (
    Calibration,
    LevelCalibrator,
    choose,
    fit_calibration,
    fit_level,
    fit_radius_scale,
)
from geosurge_index.errors import FormatError, UserError
from geosurge_index.radius import GRID, cap_area_km2, cap_radius_km, posterior_cdf, quantile_radii
from geosurge_index.reliability import ece, selective_accuracy


def _logit(p):
    return np.log(p) - np.log1p(-p)


def overconfident(n=20000, t=2.5, seed=0):
    """Raw probabilities m whose true rate is sigmoid(logit(m) / t): an overconfident model."""
    rng = np.random.default_rng(seed)
    m = rng.uniform(0.02, 0.98, n)
    truth = 1 / (1 + np.exp(-_logit(m) / t))
    return m, truth, rng.random(n) < truth


def test_temperature_and_platt_recover_a_known_temperature():
    m, truth, hit = overconfident(t=2.5)
    assert ece(m, hit) > 0.1  # the raw scores are badly calibrated
    temp = fit_level(m, hit, "temperature")
    assert temp.params["t"] == pytest.approx(2.5, rel=0.06)
    platt = fit_level(m, hit, "platt")
    assert platt.params["a"] == pytest.approx(1 / 2.5, rel=0.06) and abs(platt.params["b"]) < 0.05
    for cal in (temp, platt, fit_level(m, hit, "isotonic")):
        p = cal(m)
        assert np.abs(p - truth).mean() < 0.03, cal.method  # close to the true rate everywhere
        assert ece(p, hit) < 0.02, cal.method


def test_choose_prefers_a_fitted_method_out_of_sample_and_identity_when_already_calibrated():
    m, _, hit = overconfident(n=4000, t=3.0, seed=1)
    cal, table = choose(m, hit)
    assert cal.method != "identity"
    assert table[cal.method]["brier"] < table["identity"]["brier"] - 0.01
    rng = np.random.default_rng(2)
    m2 = rng.uniform(0, 1, 4000)
    hit2 = rng.random(4000) < m2  # already calibrated
    cal2, table2 = choose(m2, hit2)
    assert table2[cal2.method]["brier"] <= table2["identity"]["brier"] + 1e-3
    assert ece(cal2(m2), hit2) < 0.03


def test_a_constant_raw_score_is_mapped_to_the_observed_rate():
    """A coarse level's mass is ~1 for every photo while only 20% are right: Platt and isotonic
    give ~0.2; temperature scaling (no intercept) can only go as low as 0.5 and is not chosen."""
    rng = np.random.default_rng(7)
    m = 1 - rng.uniform(0, 1e-5, 2000)
    hit = rng.random(2000) < 0.2
    assert fit_level(m, hit, "platt")(m).mean() == pytest.approx(0.2, abs=0.03)
    assert fit_level(m, hit, "isotonic")(m).mean() == pytest.approx(0.2, abs=0.03)
    assert 0.45 <= fit_level(m, hit, "temperature")(m).mean() <= 1.0
    cal, table = choose(m, hit)
    assert cal.method in ("platt", "isotonic") and table[cal.method]["brier"] < 0.17


def test_isotonic_is_monotone_and_never_certain_on_a_small_block():
    rng = np.random.default_rng(3)
    m = rng.uniform(0, 1, 300)
    hit = m > 0.5  # a perfectly separable toy: blocks of all 0 and all 1
    cal = fit_level(m, hit, "isotonic")
    y = np.array(cal.params["y"])
    assert (np.diff(y) >= 0).all() and 0 < y.min() and y.max() < 1


def test_levels_are_nested_and_the_file_round_trips(tmp_path):
    rng = np.random.default_rng(4)
    n = 600
    masses = np.sort(rng.uniform(0.05, 1, (n, 3)), axis=1)[:, ::-1]  # coarse levels hold more mass
    hits = rng.random((n, 3)) < masses ** 2
    hits = np.minimum.accumulate(hits, axis=1)  # in the finer cell => in its parent
    cal = fit_calibration(masses, hits, top_k=10, meta={"source": "test"})
    probs = cal.probabilities(masses)
    assert (np.diff(probs, axis=1) <= 1e-12).all()
    cal.radius_scale = {"50": 1.2, "90": 0.8}
    back = Calibration.from_json(cal.to_json())
    np.testing.assert_allclose(back.probabilities(masses), probs)
    assert back.scale(0.5) == 1.2 and back.meta["n"] == n and len(back.meta["comparison"]) == 3
    with pytest.raises(FormatError):
        Calibration.from_json({**cal.to_json(), "format_version": 99})
    with pytest.raises(FormatError):
        LevelCalibrator.from_json({"method": "platt", "a": 1.0})
    with pytest.raises(UserError):
        fit_calibration(masses[:5], hits[:5], top_k=10)


def test_radius_scale_is_the_conformal_quantile():
    rng = np.random.default_rng(5)
    d = rng.exponential(100, 5000)
    scale = fit_radius_scale(d, {0.5: np.full(5000, 50.0), 0.9: np.full(5000, 100.0)})
    assert np.mean(d <= scale["50"] * 50) == pytest.approx(0.5, abs=0.01)
    assert np.mean(d <= scale["90"] * 100) == pytest.approx(0.9, abs=0.01)


# -- error radii on posteriors of known geometry ----------------------------------------------------

def _radii(level_p, path_radius, alt_dist=None, alt_radius=None, alt_mass=None, alt_ring=None):
    level_p = np.atleast_2d(np.asarray(level_p, float))
    n = level_p.shape[0]
    z = np.zeros((n, 1))
    cdf = posterior_cdf(level_p, np.atleast_2d(path_radius),
                        z if alt_dist is None else alt_dist, z if alt_radius is None else alt_radius,
                        z if alt_mass is None else alt_mass,
                        np.zeros((n, 1), int) if alt_ring is None else alt_ring)
    return quantile_radii(cdf)


def test_all_mass_in_the_finest_cell_gives_the_radii_of_a_uniform_disk():
    rho = 10.0  # a 10 km cap: the share within r is (r / rho)^2 up to the sphere's curvature
    r = _radii([[1.0, 1.0]], [[100.0, rho]])[0]
    np.testing.assert_allclose(r, [rho * np.sqrt(0.5), rho * np.sqrt(0.9)], rtol=0.01)


def test_mass_in_the_ring_between_two_levels():
    # P(finest) = 0.3 in a 10 km cap, the remaining 0.7 uniform between 10 and 100 km
    r50, r90 = _radii([[1.0, 0.3]], [[100.0, 10.0]])[0]
    area = cap_area_km2

    def share(r):
        return 0.3 + 0.7 * (area(r) - area(10.0)) / (area(100.0) - area(10.0))

    assert share(r50) == pytest.approx(0.5, abs=0.01) and share(r90) == pytest.approx(0.9, abs=0.01)


def test_mass_on_a_distant_alternative_moves_r90_out_to_it():
    # 0.6 in the reported 1 km cell; 0.4 outside the level-1 cell, all of it on an alternative
    # 500 km away (its search probability 0.5 >= the 0.4 to place): r50 stays inside, r90 reaches it
    r50, r90 = _radii([[0.6, 0.6]], [[50.0, 1.0]], alt_dist=np.array([[500.0]]), alt_radius=np.array([[1.0]]),
                      alt_mass=np.array([[0.5]]), alt_ring=np.array([[-1]]))[0]
    assert r50 < 1.0 and r90 == pytest.approx(500.0, rel=0.04)  # the grid's resolution: 3.4% steps


def test_radii_match_sampled_points_of_the_mixture():
    """Monte Carlo: points drawn from the same mixture fall within r50 / r90 half / 90% of the time."""
    rng = np.random.default_rng(6)
    p = np.array([[0.9, 0.55, 0.2]])
    rad = np.array([[800.0, 120.0, 8.0]])
    r50, r90 = _radii(p, rad)[0]
    n = 200_000
    u = rng.random(n)
    comp = np.searchsorted(np.cumsum([0.2, 0.35, 0.35, 0.1]), u, side="right")
    lo = np.array([0.0, 8.0, 120.0, 800.0])[comp]
    hi = np.array([8.0, 120.0, 800.0, np.pi * 6371.0088])[comp]
    a = cap_area_km2(lo) + rng.random(n) * (cap_area_km2(hi) - cap_area_km2(lo))  # uniform in area
    dist = cap_radius_km(a)
    assert np.mean(dist <= r50) == pytest.approx(0.5, abs=0.01)
    assert np.mean(dist <= r90) == pytest.approx(0.9, abs=0.01)


def test_grid_spans_metres_to_half_the_earth():
    assert GRID[0] < 0.01 and GRID[-1] == pytest.approx(np.pi * 6371.0088)


def test_selective_accuracy_keeps_the_most_confident_first():
    conf = np.array([0.9, 0.1, 0.8, np.nan])
    dist = np.array([1.0, 5000.0, 10.0, 1.0])
    curve = selective_accuracy(conf, dist, keep_pct=(25, 50, 100), thresholds=(25.0,))
    assert curve["25"] == [100.0, 100.0, 50.0]  # the NaN row counts as least confident and wrong


def test_archive_tools_act_on_the_calibrated_value():
    """sidecars' --min-probability and the review page read `confidence` when the rows have it."""
    import pyarrow as pa

    from geosurge_index.confidence import row_probability
    from geosurge_index.review import review_records
    from geosurge_index.sidecars import _decide

    assert row_probability({"confidence": 0.2, "probability": 0.9}) == 0.2
    assert row_probability({"confidence": None, "probability": 0.9}) == 0.9  # rows from before
    row = {"id": "a", "path": None, "lat": 1.0, "lon": 2.0, "probability": 0.9, "confidence": 0.2,
           "error": None, "exif_gps_valid": False}
    assert _decide(row, None, 0.5)[0] == "low_probability"
    assert _decide({**row, "confidence": 0.7, "probability": 0.1}, None, 0.5)[0] == "no_file"  # passed the bar
    table = pa.table({"id": ["a"], "path": ["a.jpg"], "lat": [1.0], "lon": [2.0], "probability": [0.9],
                      "confidence": [0.2], "error": pa.array([None], pa.string()), "cell_l1": [0]})
    records = review_records(table, lambda level, cell: {}, None)
    assert records[0][3] == 0.2


def test_radius_coverage_per_point_source():
    from geosurge_index.reliability import confidence_report, summary_rows

    d = np.array([1.0, 5.0, 1.0, 50.0])
    rep = confidence_report(np.full(4, 0.5), d, r50=np.full(4, 2.0), r90=np.full(4, 10.0),
                            groups=np.array(["cell_mean", "cell_mean", "neighbour", "neighbour"], dtype=object))
    assert rep["coverage_by_group"] == {"cell_mean": {"n": 2, "r50": 0.5, "r90": 1.0},
                                        "neighbour": {"n": 2, "r50": 0.5, "r90": 0.5}}
    assert any("per point source" in k for k, _ in summary_rows(rep))


def test_ranking_signals_are_compared():
    from geosurge_index.reliability import confidence_report, top_half_ratio

    d = np.array([1.0, 1.0, 100.0, 100.0])
    assert top_half_ratio(np.array([0.9, 0.8, 0.1, 0.2]), d) == 2.0
    assert top_half_ratio(np.array([0.1, 0.2, 0.9, 0.8]), d) == 0.0
    rep = confidence_report(np.array([0.1, 0.2, 0.9, 0.8]), d, signals={"-r90": -np.array([1.0, 2.0, 9.0, 8.0])})
    assert rep["within_25km_top_half_vs_all"] == 0.0 and rep["within_25km_top_half_vs_all_by_signal"]["-r90"] == 2.0
