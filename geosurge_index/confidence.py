"""The one place where an answer's confidence is computed: the calibrated probability that the true
point lies in the reported cell (finest and per level), the error radii r50 / r90, and the
probability that the true point lies within each evaluation distance of the predicted point
(`p_within_1km` .. `p_within_2500km`), from a search result, the cell tree's geometry and the
index's calibration (`calibration.py`, `radius.py`).

`ConfidenceModel.for_index(index)` reads INDEX_DIR/calibration.json when the manifest lists it
(checked with the other files when the index is opened); without one the probabilities are the
model's own (`calibrated` false) and the radii come from that uncalibrated posterior.
`search(index, emb, top_k, ...)` is the search every answer goes through (bulk locate, `Locator`,
the service, `geosurge search`): it asks the engine for at least `CONFIDENCE_TOP_K` cells, computes
the confidence from them, and cuts the result to the `top_k` asked, so that every caller gets the
same numbers for the same embedding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geosurge_index.calibration import CALIBRATION_FILE, QUANTILES, WITHIN_KM, Calibration, within_column
from geosurge_index.radius import GRID, cap_radius_km, posterior_cdf, quantile_radii
from geosurge_index.search import CellTree, SearchResult

log = logging.getLogger("geosurge.confidence")

CONFIDENCE_TOP_K = 10  # finest cells the confidence reads (the answer's own top_k may be smaller)


@dataclass(frozen=True)
class Confidence:
    """Per answer (n rows, those of the SearchResult it came from)."""

    probability: np.ndarray  # (n,) P(true point in the reported finest cell)
    level_probability: np.ndarray  # (n, L) the same per level (level 1 first), non-increasing
    r50_km: np.ndarray  # (n,) radius around the predicted point holding 50% of the posterior
    r90_km: np.ndarray  # (n,) 90%
    calibrated: bool  # False: the model's own probabilities (the index has no calibration)
    # (n, len(WITHIN_KM)) P(true point within WITHIN_KM[j] km of the predicted point), non-decreasing
    within: np.ndarray

    def __len__(self) -> int:
        return int(self.probability.shape[0])


def level_masses(result: SearchResult, tree: CellTree, k: int | None = None) -> np.ndarray:
    """(n, L): per level, the summed probability of the top-k finest cells whose ancestor at that
    level is the reported one (the raw probability the calibration maps). Finest level: the best
    cell's own probability."""
    cells = result.topk_cells[:, :k].astype(np.int64)
    probs = np.where(cells >= 0, result.topk_probs[:, :k].astype(np.float64), 0.0)
    anc = tree.ancestors(np.maximum(cells, 0).reshape(-1)).reshape(*cells.shape, tree.levels)
    same = anc == result.best_cells[:, None, :].astype(np.int64)
    return np.einsum("nk,nkl->nl", probs, same.astype(np.float64))


class CellGeometry:
    """Per level, each cell's cap radius (km: the spherical cap of the cell's area, from its S2
    token; 0 when the tree has no tokens) and mean point."""

    def __init__(self, tree: CellTree):
        from geosurge_index import s2

        self.radius: list[np.ndarray] = []
        for tok in tree.tokens:
            if len(tok) == 0 or tok.null_count == len(tok):
                self.radius.append(np.zeros(len(tok)))
                continue
            t = np.asarray(tok.to_numpy(zero_copy_only=False), dtype=object)
            ok = np.array([v is not None for v in t], dtype=bool)
            area = np.full(len(t), np.nan)
            if ok.any():
                area[ok] = s2.cell_areas_km2(s2.tokens_to_ids(t[ok].astype(str)))
            self.radius.append(cap_radius_km(area))
        self.tree = tree


class ConfidenceModel:
    """Computes `Confidence` for search results of one index (with or without a calibration)."""

    def __init__(self, tree: CellTree, calibration: Calibration | None = None):
        if calibration is not None and len(calibration.levels) != tree.levels:
            from geosurge_index.errors import FormatError

            raise FormatError(f"{CALIBRATION_FILE}: {len(calibration.levels)} levels, the index has {tree.levels}")
        self.tree = tree
        self.calibration = calibration
        self._geometry: CellGeometry | None = None

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    @property
    def top_k(self) -> int:
        return max(CONFIDENCE_TOP_K, self.calibration.top_k if self.calibration else 0)

    @property
    def geometry(self) -> CellGeometry:
        if self._geometry is None:
            self._geometry = CellGeometry(self.tree)
        return self._geometry

    @classmethod
    def for_index(cls, index) -> ConfidenceModel:
        """The index's calibration when its manifest lists one (already checksummed by
        `GeoIndex.open`), else an uncalibrated model."""
        manifest = getattr(index, "manifest", None) or {}
        directory = getattr(index, "dir", None)
        cal = None
        if directory is not None and CALIBRATION_FILE in manifest.get("files", {}):
            cal = Calibration.read(Path(directory) / CALIBRATION_FILE)
        return cls(index.tree, cal)

    def summary(self) -> dict:
        """{"calibrated": bool, ...}: what outputs and `/v1/index` say about the probabilities."""
        if self.calibration is None:
            return {"calibrated": False, "note": "no calibration.json: probabilities are the model's own "
                                                 "(uncalibrated); fit one with `geosurge calibrate`"}
        return self.calibration.summary()

    def apply(self, result: SearchResult) -> Confidence:
        """Confidence of every row of `result` (searched with at least `top_k` cells for the
        calibrated masses to mean what they meant when fitted)."""
        tree = self.tree
        n, levels = len(result), tree.levels
        if n == 0:
            z = np.zeros(0)
            return Confidence(z, np.zeros((0, levels)), z, z, self.calibrated, np.zeros((0, len(WITHIN_KM))))
        k = self.calibration.top_k if self.calibration else None
        masses = level_masses(result, tree, k)
        if self.calibration is None:
            probs = np.minimum.accumulate(np.clip(masses, 0.0, 1.0), axis=1)
        else:
            probs = self.calibration.probabilities(masses)
        radii, within = self.raw_radii_and_within(result, probs)
        if self.calibration is not None:
            radii = radii * self._radius_factors()
            within = self.calibration.within_probabilities(within, WITHIN_KM)
        return Confidence(probs[:, -1].copy(), probs, radii[:, 0], radii[:, 1], self.calibrated, within)

    def raw_radii_and_within(self, result: SearchResult, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """From one evaluation of the posterior: (n, 2) r50, r90 in km before the calibration's
        factors, and (n, len(WITHIN_KM)) its mass within each distance of the predicted point (the
        raw score `Calibration.within_probabilities` maps), non-decreasing."""
        cdf = self.posterior(result, probs, np.concatenate([GRID, np.asarray(WITHIN_KM, dtype=np.float64)]))
        g = len(GRID)
        return quantile_radii(cdf[:, :g], QUANTILES), np.maximum.accumulate(cdf[:, g:], axis=1)

    def _radius_factors(self) -> np.ndarray:
        return np.array([self.calibration.scale(q) for q in QUANTILES])[None, :]

    def radii(self, result: SearchResult, probs: np.ndarray, *, scaled: bool = True) -> np.ndarray:
        """(n, 2) r50, r90 in km (`radius.py`), times the calibration's factors when `scaled`."""
        r = self.raw_radii_and_within(result, probs)[0]
        return r * self._radius_factors() if scaled and self.calibration is not None else r

    def within_masses(self, result: SearchResult, probs: np.ndarray) -> np.ndarray:
        """(n, len(WITHIN_KM)) the raw masses of `raw_radii_and_within`."""
        return self.raw_radii_and_within(result, probs)[1]

    def posterior(self, result: SearchResult, probs: np.ndarray, grid: np.ndarray) -> np.ndarray:
        """(n, G) `radius.posterior_cdf` of each answer: its mass within each radius of `grid`."""
        from geosurge_index.metrics import haversine_km

        tree, geo = self.tree, self.geometry
        levels = tree.levels
        path = result.best_cells.astype(np.int64)
        path_radius = np.stack([geo.radius[lv][path[:, lv]] for lv in range(levels)], axis=1)
        cells = result.topk_cells.astype(np.int64)
        safe = np.maximum(cells, 0)
        finest = levels - 1
        anc = tree.ancestors(safe.reshape(-1)).reshape(*cells.shape, levels)
        shared = (anc == path[:, None, :]).sum(2)  # levels shared with the reported path (a prefix)
        ring = shared - 1  # l-1: inside the reported level-l cell, not its child; -1: outside level 1
        mass = np.where((cells >= 0) & (shared < levels), result.topk_probs.astype(np.float64), 0.0)
        dist = haversine_km(result.lat[:, None], result.lon[:, None],
                            tree.mean_lat[finest][safe], tree.mean_lon[finest][safe])
        return posterior_cdf(probs, path_radius, dist, geo.radius[finest][safe], mass, ring, grid=grid)


def truncate(result: SearchResult, top_k: int) -> SearchResult:
    """The result with only its first `top_k` finest cells (its refinement kept)."""
    return result if result.topk_cells.shape[1] <= top_k else result.head(top_k)


def search(index, model: ConfidenceModel, emb, top_k: int, **kwargs) -> tuple[SearchResult, Confidence]:
    """`index.search` with enough cells for the confidence, the confidence, and the result cut to
    `top_k` (kwargs: beam, exhaustive, batch_size)."""
    result = index.search(emb, top_k=max(top_k, model.top_k), **kwargs)
    return truncate(result, top_k), model.apply(result)


def row_probability(row: dict, within_km: float | None = None) -> float:
    """The probability a user acts on: the calibrated `confidence` when the row has one, else the
    model's own `probability` (a PRED_DIR from before the confidence columns); with `within_km`,
    the probability that the true point lies within that distance (`p_within_<km>km`; 0 when the
    row has none: a capped or older row)."""
    if within_km is not None:
        value = row.get(within_column(within_km))
        return 0.0 if value is None else float(value)
    value = row.get("confidence")
    if value is None:
        value = row.get("probability")
    return 0.0 if value is None else float(value)
