"""P(true point within 1 / 25 / 200 / 750 / 2500 km of the answer) (issue 16, `p_within_*km`): the
posterior's mass within each distance, calibrated per distance, reported beside the cell
probability, ranking the selective-accuracy curves, and acted on by sidecars' --within-km."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from geosurge_index.calibration import (
    WITHIN_COLUMNS,
    WITHIN_KM,
    Calibration,
    LevelCalibrator,
    fit_within,
    km_key,
    within_column,
)
from geosurge_index.errors import UserError
from geosurge_index.metrics import THRESHOLDS_KM


def test_the_distances_are_the_evaluation_thresholds_and_name_the_columns():
    assert WITHIN_KM == THRESHOLDS_KM
    assert WITHIN_COLUMNS == ("p_within_1km", "p_within_25km", "p_within_200km", "p_within_750km",
                              "p_within_2500km")
    assert within_column(25) == "p_within_25km" and km_key(2500.0) == "2500"


def test_fit_within_recovers_a_known_miscalibration():
    """Raw masses w whose true probability is w**3 (overconfident): the fitted calibrator's
    out-of-sample ECE falls far below the identity's."""
    from geosurge_index.reliability import ece

    rng = np.random.default_rng(3)
    n = 6000
    w = rng.random((n, len(WITHIN_KM)))
    truth_p = w ** 3
    u = rng.random(n)
    # distances: within t exactly with probability w_t**3 for the 25 km column (others: same draw)
    d = np.where(u < truth_p[:, 1], 10.0, 5000.0)
    cals, table = fit_within(w[: n // 2], d[: n // 2], WITHIN_KM)
    assert set(cals) == {km_key(t) for t in WITHIN_KM} and len(table) == len(WITHIN_KM)
    assert cals["25"].method != "identity"
    test_w, test_y = w[n // 2:, 1], d[n // 2:] <= 25
    assert ece(test_w, test_y) > 0.15
    assert ece(cals["25"](test_w), test_y) < 0.03


def test_calibration_file_round_trips_within_and_reads_files_without_it(tmp_path):
    cal = Calibration([LevelCalibrator("identity")] * 2, 10,
                      within={"25": LevelCalibrator("platt", {"a": 2.0, "b": -1.0})})
    back = Calibration.from_json(json.loads(json.dumps(cal.to_json())))
    raw = np.array([[0.1, 0.5, 0.6, 0.7, 0.9], [0.0, 0.2, 0.3, 0.9, 1.0]])
    np.testing.assert_allclose(back.within_probabilities(raw, WITHIN_KM), cal.within_probabilities(raw, WITHIN_KM))
    old = cal.to_json()
    del old["within_km"]  # a calibration.json fitted before the within calibrators
    legacy = Calibration.from_json(old)
    assert legacy.within == {} and "within_km" not in legacy.meta
    np.testing.assert_allclose(legacy.within_probabilities(raw, WITHIN_KM), np.maximum.accumulate(raw, axis=1))
    p = cal.within_probabilities(raw, WITHIN_KM)
    assert (np.diff(p, axis=1) >= 0).all()  # nested distances: never less probable at a larger one
    with pytest.raises(ValueError):
        cal.within_probabilities(raw[:, :3], WITHIN_KM)


def _world(tmp_path):
    from geosurge_index.index import GeoIndex
    from geosurge_index.synthetic import random_index

    index_dir = random_index(tmp_path / "index", n_points=1500)
    return GeoIndex.open(index_dir, device="cpu", encoder=False)


def test_within_masses_match_the_radii_and_grow_with_distance(tmp_path):
    from geosurge_index.confidence import ConfidenceModel

    index = _world(tmp_path)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((64, index.dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    model = ConfidenceModel(index.tree)
    result = index.search(emb, top_k=model.top_k)
    conf = model.apply(result)
    assert conf.within.shape == (64, len(WITHIN_KM)) and (np.diff(conf.within, axis=1) >= -1e-12).all()
    assert ((conf.within >= 0) & (conf.within <= 1)).all()
    # one posterior for the radii and for p_within: the mass within t lies between the radii
    # grid's values one step below and one step above t
    from geosurge_index.radius import GRID

    cdf = np.maximum.accumulate(model.posterior(result, conf.level_probability, GRID), axis=1)
    for j, t in enumerate(WITHIN_KM):
        k = int(np.searchsorted(GRID, t))
        assert (cdf[:, k - 1] <= conf.within[:, j] + 1e-9).all() and (conf.within[:, j] <= cdf[:, k] + 1e-9).all()
    r50 = model.radii(result, conf.level_probability, scaled=False)[:, 0]
    j = WITHIN_KM.index(25.0)
    assert (conf.within[r50 < 25 / 1.04, j] >= 0.5 - 1e-9).all() and (conf.within[r50 > 25 * 1.04, j] <= 0.5).all()


def test_selective_curves_rank_each_distance_by_its_own_probability():
    from geosurge_index.reliability import confidence_report, summary_rows

    n = 100
    rng = np.random.default_rng(1)
    d = np.where(np.arange(n) < 30, 5.0, 3000.0)  # the first 30 photos are within 25 km
    within = np.tile(np.linspace(0.1, 0.9, len(WITHIN_KM)), (n, 1))
    within[:30, 1] = 0.8  # P(within 25 km) knows which
    within[30:, 1] = 0.1
    cell = rng.random(n)  # the cell probability does not
    cell[:30] = 0.01
    rep = confidence_report(cell, d, within=within, within_km=WITHIN_KM)
    assert rep["selective_ranking"] == "p_within"
    assert rep["selective_accuracy_pct"]["25"][2] == 100.0  # the 30% most probable within 25 km are
    assert rep["selective_accuracy_by_confidence_pct"]["25"][2] < 10.0
    assert rep["within_25km_top_half_vs_all"] == pytest.approx(60.0 / 30.0)
    assert rep["within_ece"]["25"] == pytest.approx(0.2 * 0.3 + 0.1 * 0.7)
    text = dict(summary_rows(rep))
    assert "% within 25 km, most confident 10/50/100% by p_within_25km" in text
    # without p_within (older predictions) the curve ranks by the cell probability
    old = confidence_report(cell, d)
    assert old["selective_ranking"] == "confidence"
    assert old["selective_accuracy_pct"] == rep["selective_accuracy_by_confidence_pct"]


def test_row_probability_within_and_the_sidecar_decision():
    from geosurge_index.confidence import row_probability
    from geosurge_index.sidecars import _decide

    row = {"id": "a", "path": None, "lat": 1.0, "lon": 2.0, "probability": 0.9, "confidence": 0.05,
           "error": None, "exif_gps_valid": False, "p_within_25km": 0.7}
    assert row_probability(row, 25) == 0.7 and row_probability(row) == 0.05
    assert row_probability({**row, "p_within_25km": None}, 25) == 0.0  # withheld (capped): never passes
    assert _decide(row, None, 0.5)[0] == "low_probability"  # by the cell probability
    assert _decide(row, None, 0.5, 25.0)[0] == "no_file"  # passed the bar within 25 km


def test_sidecars_refuse_an_unknown_distance_and_rows_without_the_column(tmp_path):
    from geosurge_index.sidecars import write_sidecars

    with pytest.raises(UserError, match="--within-km 30"):
        write_sidecars(tmp_path, within_km=30.0)
    preds = tmp_path / "preds"
    preds.mkdir()
    pq.write_table(pa.table({"id": ["a"], "path": ["a.jpg"], "lat": [1.0], "lon": [2.0],
                             "probability": [0.5], "error": pa.array([None], pa.string())}),
                   preds / "part-00000.parquet")
    with pytest.raises(UserError, match="no p_within_25km column"):
        write_sidecars(preds, within_km=25.0, dry_run=True)
