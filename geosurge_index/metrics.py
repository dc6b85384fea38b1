"""Distances and scores: great-circle error, accuracy at the standard thresholds, GeoGuessr score.

The conventions of the geo-localization literature: haversine distance on a sphere of the mean
Earth radius (IUGG, 6371.0088 km), % of images within 1 / 25 / 200 / 750 / 2500 km
(street / city / region / country / continent), and the GeoGuessr score 5000 * exp(-d / 1492.7)
per image. The SQL macros in `sql.py` use the same constants.

An image without a usable prediction (missing from the predictions, or an error row) counts as
wrong at every threshold with a score of 0 and an infinite error, unless the caller drops it:
the benchmark's denominator stays the whole benchmark.

numpy only: scoring a PRED_DIR or a partition, which reads files, is `evaluation.py`'s job.
"""

from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

from geosurge_index.s2 import EARTH_RADIUS_KM  # one radius for cell areas and errors

THRESHOLDS_KM: tuple[float, ...] = (1.0, 25.0, 200.0, 750.0, 2500.0)
THRESHOLD_NAMES = {1.0: "street", 25.0: "city", 200.0: "region", 750.0: "country", 2500.0: "continent"}


def km_key(km: float) -> str:
    """"25" for 25.0 km: how a distance is spelled in keys and column names (JSON, `p_within_25km`)."""
    return f"{float(km):g}"
GEOGUESSR_MAX = 5000.0
GEOGUESSR_SCALE_KM = 1492.7


def haversine_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in km between points given in degrees (broadcasts; NaN in -> NaN out)."""
    lat1, lon1, lat2, lon2 = (np.radians(np.asarray(a, dtype=np.float64)) for a in (lat1, lon1, lat2, lon2))
    h = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    # clip: rounding can push h a hair above 1 for antipodal points
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))


def geoguessr_score(distance_km) -> np.ndarray:
    """Per-image GeoGuessr score; an infinite or NaN distance (no prediction) scores 0."""
    d = np.asarray(distance_km, dtype=np.float64)
    score = GEOGUESSR_MAX * np.exp(-d / GEOGUESSR_SCALE_KM)
    return np.where(np.isfinite(d), score, 0.0)


def accuracy_at(distance_km, thresholds=THRESHOLDS_KM) -> dict[float, float]:
    """% of distances <= each threshold (NaN / inf count as misses); empty input gives NaN."""
    d = np.asarray(distance_km, dtype=np.float64)
    if d.size == 0:
        return {float(t): math.nan for t in thresholds}
    with np.errstate(invalid="ignore"):
        return {float(t): float(100.0 * np.mean(d <= t)) for t in thresholds}


@dataclass
class EvalReport:
    """Scores of one prediction set against one ground truth (JSON-ready through `to_dict`)."""

    n_truth: int  # rows of the ground truth
    n_evaluated: int  # images in the denominator
    n_matched: int  # evaluated truth rows with a prediction row
    n_missing: int  # evaluated truth rows without a prediction row (counted as wrong)
    n_errors: int  # matched prediction rows without a point (decode errors etc.)
    accuracy_pct: dict[float, float]  # threshold km -> % within
    median_km: float
    mean_km: float  # over images with a point
    geoguessr: float  # mean score over the evaluated images
    cell_accuracy_pct: dict[int, float] = field(default_factory=dict)  # level -> % predicted cell == true cell
    truth_in_cell_pct: dict[int, float] = field(default_factory=dict)  # level -> % of true points inside a cell
    n_predictions: int | None = None  # prediction rows in the run, matched or not
    confidence: dict | None = None  # `reliability.confidence_report`: ECE, radius coverage, selective accuracy

    def to_dict(self) -> dict:
        out = asdict(self)
        out["accuracy_pct"] = {_km_key(t): v for t, v in self.accuracy_pct.items()}
        out["cell_accuracy_pct"] = {str(k): v for k, v in self.cell_accuracy_pct.items()}
        out["truth_in_cell_pct"] = {str(k): v for k, v in self.truth_in_cell_pct.items()}
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}

    def rows(self) -> list[tuple[str, str]]:
        """(metric, value) rows for a human-readable table."""
        rows = [("images in truth", f"{self.n_truth}")]
        if self.n_predictions is not None:
            rows.append(("prediction rows", f"{self.n_predictions}"))
        rows += [
            ("with a prediction", f"{self.n_matched}"),
            ("missing predictions", f"{self.n_missing}"),
            ("error rows", f"{self.n_errors}"),
            ("evaluated", f"{self.n_evaluated}"),
        ]
        for t, v in self.accuracy_pct.items():
            name = THRESHOLD_NAMES.get(t, "")
            rows.append((f"% within {_km_key(t)} km" + (f" ({name})" if name else ""), f"{v:.2f}"))
        rows.append(("median error km", f"{self.median_km:.1f}"))
        rows.append(("mean error km (with a point)", f"{self.mean_km:.1f}"))
        rows.append(("GeoGuessr score (mean)", f"{self.geoguessr:.1f}"))
        for level, v in self.cell_accuracy_pct.items():
            inside = self.truth_in_cell_pct.get(level, math.nan)
            rows.append((f"% correct cell, level {level}", f"{v:.2f}  (truth inside a cell: {inside:.2f})"))
        return rows


def _km_key(t: float) -> str:
    return str(int(t)) if float(t).is_integer() else str(t)


def evaluate_points(
    pred_lat,
    pred_lon,
    true_lat,
    true_lon,
    *,
    n_truth: int | None = None,
    n_missing: int = 0,
    thresholds=THRESHOLDS_KM,
    pred_cells: np.ndarray | None = None,
    true_cells: np.ndarray | None = None,
) -> EvalReport:
    """Score aligned prediction / truth arrays, one entry per evaluated truth image.

    A NaN predicted point is an image without a point: `n_missing` of them had no prediction row
    at all, the rest are error rows. Both are wrong everywhere. `pred_cells` / `true_cells` are
    (n, L) int arrays of cell_index per level (-1 = none); a true point without a cell at a level
    can never be predicted right there.
    """
    pred_lat, pred_lon, true_lat, true_lon = (
        np.asarray(a, dtype=np.float64) for a in (pred_lat, pred_lon, true_lat, true_lon)
    )
    if not (pred_lat.shape == pred_lon.shape == true_lat.shape == true_lon.shape) or pred_lat.ndim != 1:
        raise ValueError("evaluate_points: all coordinate arrays must be 1-d of one length")
    n = pred_lat.shape[0]
    d = haversine_km(pred_lat, pred_lon, true_lat, true_lon)
    has_point = np.isfinite(d)
    d_all = np.where(has_point, d, np.inf)
    n_without = int((~has_point).sum())
    if not 0 <= n_missing <= n_without:
        raise ValueError(f"evaluate_points: n_missing={n_missing} but only {n_without} images lack a point")
    cell_acc: dict[int, float] = {}
    inside: dict[int, float] = {}
    if pred_cells is not None and true_cells is not None:
        pc, tc = np.asarray(pred_cells), np.asarray(true_cells)
        if pc.shape != tc.shape or pc.ndim != 2 or pc.shape[0] != n:
            raise ValueError(f"evaluate_points: cell arrays must be (n, levels); got {pc.shape} and {tc.shape}")
        for j in range(pc.shape[1]):
            right = (tc[:, j] >= 0) & (pc[:, j] == tc[:, j]) & has_point
            cell_acc[j + 1] = 100.0 * float(right.mean()) if n else math.nan
            inside[j + 1] = 100.0 * float((tc[:, j] >= 0).mean()) if n else math.nan
    return EvalReport(
        n_truth=int(n_truth if n_truth is not None else n),
        n_evaluated=int(n),
        n_matched=int(n - n_missing),
        n_missing=int(n_missing),
        n_errors=n_without - int(n_missing),
        accuracy_pct=accuracy_at(d_all, thresholds),
        median_km=float(np.median(d_all)) if n else math.nan,
        mean_km=float(d[has_point].mean()) if has_point.any() else math.nan,
        geoguessr=float(geoguessr_score(d_all).mean()) if n else math.nan,
        cell_accuracy_pct=cell_acc,
        truth_in_cell_pct=inside,
    )


# Moved to `evaluation` (they read a PRED_DIR or a partition, which a maths module must not),
# importable from here for one more release. This shim is the only way back up to the reading
# layer: loaded on first use only, through importlib so that the static import graph stays
# acyclic (tests/test_imports.py), and removed with the old names.
_MOVED = {"evaluate_predictions", "partition_coverage", "CoverageReport"}


def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(f"geosurge_index.metrics.{name} moved to geosurge_index.evaluation.{name}; "
                      "the old name goes in the next release", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module("geosurge_index.evaluation"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
