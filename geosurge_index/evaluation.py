"""Evaluation that reads artefacts: a PRED_DIR against a ground truth (through DuckDB, `sql.connect`),
and a partition's ceiling on a benchmark (`cells.assign_points` on a `cells.CellsTable`).

The scores themselves are `metrics.py`'s (pure numpy); this module gathers the aligned arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from geosurge_index import s2, sql
from geosurge_index.calibration import WITHIN_COLUMNS, WITHIN_KM
from geosurge_index.cells import assign_points
from geosurge_index.coords import Coordinates
from geosurge_index.metrics import EvalReport, evaluate_points

POINTS = ("refined", "cell")


def evaluate_predictions(pred_dir, truth, index_dir=None, *, skip_missing: bool = False,
                         point: str = "refined") -> EvalReport:
    """Score a PRED_DIR against a ground truth (`benchmarks.read_truth`).

    Predictions join the truth on id (`benchmarks.match_ids`); with `index_dir` the true points
    are placed in the index's cells and compared with the predicted cell at every level.
    `skip_missing` leaves truth images without a prediction row out of the denominator (error
    rows still count as wrong). `point`: "refined" scores `lat`/`lon`, the answer (refined by
    the index's galleries when it has any); "cell" scores the best cell's mean point
    (`cell_lat`/`cell_lon`; PRED_DIRs from before galleries have only `lat`/`lon`, which are that).
    """
    if point not in POINTS:
        raise ValueError(f"point {point!r}: expected one of {POINTS}")
    con = sql.connect(index_dir, predictions=pred_dir, truth=truth)
    try:
        truth_cols = con.sql("SELECT * FROM truth LIMIT 0").columns
        pred_cols = set(con.sql("SELECT * FROM predictions LIMIT 0").columns)
        lat_col, lon_col = ("cell_lat", "cell_lon") if point == "cell" and "cell_lat" in pred_cols else ("lat", "lon")
        levels = [int(c.rsplit("_l", 1)[1]) for c in truth_cols if c.startswith("true_cell_l")]
        levels = [lv for lv in levels if f"cell_l{lv}" in pred_cols]
        cell_sel = "".join(f", p.cell_l{lv} AS p{lv}, t.true_cell_l{lv} AS t{lv}" for lv in levels)
        cell_sel += confidence_columns(pred_cols)
        # one row per truth image; a prediction id seen twice counts once
        rows = con.sql(f"""
            SELECT t.lat AS true_lat, t.lon AS true_lon, p.{lat_col} AS pred_lat, p.{lon_col} AS pred_lon,
                   p.id IS NULL AS missing {cell_sel}
            FROM truth t
            LEFT JOIN (SELECT * FROM predictions QUALIFY row_number() OVER (PARTITION BY id) = 1) p
                USING (id)
        """).fetchnumpy()
        n_predictions = int(con.sql("SELECT count(*) FROM predictions").fetchall()[0][0])
    finally:
        con.close()
    missing = np.asarray(rows["missing"], dtype=bool)
    keep = ~missing if skip_missing else np.ones(len(missing), dtype=bool)

    def col(name, fill):
        a = rows[name]
        a = a.filled(fill) if np.ma.isMaskedArray(a) else np.asarray(a)
        return a[keep]

    pred_cells = true_cells = None
    if levels:
        pred_cells = np.stack([col(f"p{lv}", -1).astype(np.int64) for lv in levels], axis=1)
        true_cells = np.stack([col(f"t{lv}", -1).astype(np.int64) for lv in levels], axis=1)
    report = evaluate_points(
        col("pred_lat", np.nan).astype(np.float64), col("pred_lon", np.nan).astype(np.float64),
        col("true_lat", np.nan).astype(np.float64), col("true_lon", np.nan).astype(np.float64),
        n_truth=len(missing), n_missing=int(missing[keep].sum()),
        pred_cells=pred_cells, true_cells=true_cells,
    )
    report.n_predictions = n_predictions
    report.confidence = confidence_of(rows, keep, levels)
    return report


def confidence_columns(pred_cols: set) -> str:
    """The SELECT list (after the cell columns) of what `confidence_of` reads: the confidence
    columns when the predictions have them, else `probability` (an older PRED_DIR: uncalibrated)."""
    if "confidence" in pred_cols:
        return (", p.confidence AS conf, p.r50_km AS r50, p.r90_km AS r90, p.calibrated AS calibrated"
                ", p.level_confidence AS level_conf"
                + (", p.point_source AS point_source" if "point_source" in pred_cols else "")
                + "".join(f", p.{c} AS {c}" for c in WITHIN_COLUMNS if c in pred_cols))
    return ", p.probability AS conf" if "probability" in pred_cols else ""


def _ranking_signals(rows: dict, num, level_conf) -> dict:
    """Candidate rankings for the selective-accuracy comparison: the smallest radii first, and each
    level's calibrated probability (`reliability.confidence_report(signals=...)`)."""
    out = {f"-{r}": -num(r) for r in ("r50", "r90") if r in rows}
    if level_conf is not None:
        out.update({f"level {j + 1} confidence": level_conf[:, j] for j in range(level_conf.shape[1])})
    return out


def confidence_of(rows: dict, keep: np.ndarray, levels: list[int]) -> dict | None:
    """`reliability.confidence_report` of the joined rows (missing predictions: no confidence)."""
    from geosurge_index.metrics import haversine_km
    from geosurge_index.reliability import confidence_report

    if "conf" not in rows:
        return None

    def num(name):
        a = rows[name]
        if np.ma.isMaskedArray(a):
            return np.ma.asarray(a).astype(np.float64).filled(np.nan)[keep]
        return np.asarray(a, dtype=np.float64)[keep]

    d = haversine_km(num("pred_lat"), num("pred_lon"), num("true_lat"), num("true_lon"))
    hit = level_conf = level_hits = None
    if levels:
        fin = max(levels)
        hit = (num(f"t{fin}") == num(f"p{fin}")) & np.isfinite(num(f"t{fin}"))
    cal_col = rows.get("calibrated")
    calibrated = False
    if cal_col is not None:
        flags = {bool(v) for v in np.ma.asarray(cal_col)[keep].compressed().tolist() if v is not None}
        calibrated = flags == {True} if flags else None
    if "level_conf" in rows and levels:
        raw = rows["level_conf"]
        raw = np.asarray(raw.astype(object).filled(None) if np.ma.isMaskedArray(raw) else raw, dtype=object)[keep]
        width = max(levels)
        level_conf = np.array([list(v) if v is not None and len(v) == width else [np.nan] * width for v in raw],
                              dtype=np.float64).reshape(-1, width)
        level_hits = np.stack([(num(f"t{lv}") == num(f"p{lv}")) if lv in levels else np.zeros(len(d), bool)
                               for lv in range(1, width + 1)], axis=1)
    groups = None
    if "point_source" in rows:  # coverage per how the point was made (galleries)
        src = rows["point_source"]
        src = np.asarray(src.astype(object).filled(None) if np.ma.isMaskedArray(src) else src, dtype=object)[keep]
        groups = np.array(["none" if v is None else str(v) for v in src], dtype=object)
    within = None
    if all(c in rows for c in WITHIN_COLUMNS):
        within = np.stack([num(c) for c in WITHIN_COLUMNS], axis=1)
    signals = _ranking_signals(rows, num, level_conf)
    if within is not None:
        signals = {"p_within_25km": within[:, WITHIN_KM.index(25.0)], "confidence (cell)": num("conf"), **signals}
    return confidence_report(num("conf"), d, hit, num("r50") if "r50" in rows else None,
                             num("r90") if "r90" in rows else None, level_confidence=level_conf,
                             level_hits=level_hits, calibrated=calibrated, groups=groups,
                             signals=signals, within=within, within_km=WITHIN_KM if within is not None else None)
EXIF_TRUTH = "exif"  # `geosurge eval PRED_DIR --truth exif`


def exif_truth(pred_dir) -> Coordinates:
    """The ground truth an archive carries itself: each photo's own valid EXIF GPS (the `exif_*`
    columns `geosurge locate` writes), keyed by the prediction's id, for the photos that were
    located (a `--skip-tagged` row has no prediction to score). Photos with malformed GPS are
    untagged and left out."""
    import pyarrow.parquet as pq

    from geosurge_index.coords import coordinates_from_arrays
    from geosurge_index.errors import UserError
    from geosurge_index.exif_gps import TAGGED_ERROR
    from geosurge_index.pred_store import PredStore

    shards = PredStore(pred_dir).shard_paths()
    if not shards:
        raise UserError(f"PRED_DIR {pred_dir} holds no prediction shards")
    cols = ["id", "error", "exif_lat", "exif_lon", "exif_gps_valid"]
    try:
        t = pq.read_table(shards, columns=cols)
    except (KeyError, ValueError, OSError) as err:  # an older PRED_DIR: no exif columns
        raise UserError(f"--truth exif: {pred_dir} has no EXIF GPS columns ({err}); locate the photos again "
                        "with this version to read their GPS") from None
    rows = t.to_pydict()
    keep = [i for i, v in enumerate(rows["exif_gps_valid"])
            if v and not (rows["error"][i] or "").startswith(TAGGED_ERROR + ":")]
    if not keep:
        raise UserError(f"--truth exif: no photo in {pred_dir} was both located and tagged with valid EXIF GPS "
                        "(a run with --skip-tagged locates none of its tagged photos)")
    return coordinates_from_arrays([rows["exif_lat"][i] for i in keep], [rows["exif_lon"][i] for i in keep],
                                   ids=[rows["id"][i] for i in keep], source=f"{pred_dir} (EXIF GPS)")


@dataclass
class CoverageReport:
    """How well a partition can answer a benchmark at best (`geosurge coverage`)."""

    truth: str
    n_points: int
    n_finest_cells: int
    inside_pct: dict[int, float]  # level -> % of true points inside a cell of that level
    oracle: EvalReport  # predicts the mean point of the true finest cell (nearest one when outside all)
    nearest: EvalReport  # predicts the finest cell mean nearest to the truth: the ceiling

    def to_dict(self) -> dict:
        return {"truth": self.truth, "n_points": self.n_points, "n_finest_cells": self.n_finest_cells,
                "inside_pct": {str(k): v for k, v in self.inside_pct.items()},
                "oracle": self.oracle.to_dict(), "nearest": self.nearest.to_dict()}


def partition_coverage(cells, lat, lon, *, truth: str = "") -> CoverageReport:
    """The partition's ceiling on a benchmark's true points (`cells`: a `cells.CellsTable`).

    oracle: for a true point inside a finest cell, that cell's mean point (what a model that
    always picks the right cell predicts); for a point outside every finest cell, the finest
    cell whose mean point is nearest. nearest: always the nearest finest-cell mean point, the
    best any prediction restricted to the partition's points can do.
    """
    from scipy.spatial import cKDTree

    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    assigned = assign_points(cells, lat, lon)
    finest = cells.levels[-1]
    if len(finest) == 0:
        raise ValueError("the partition's finest level has no cells")
    # chord distance between unit vectors is monotone in great-circle distance
    tree = cKDTree(s2.latlon_to_xyz(finest.mean_lat, finest.mean_lon))
    _, nearest = tree.query(s2.latlon_to_xyz(lat, lon))
    true_cell = assigned[:, -1]
    oracle = np.where(true_cell >= 0, true_cell, nearest)
    inside = {lv + 1: 100.0 * float((assigned[:, lv] >= 0).mean()) if len(lat) else math.nan
              for lv in range(cells.n_levels)}
    return CoverageReport(
        truth=truth, n_points=len(lat), n_finest_cells=len(finest), inside_pct=inside,
        oracle=evaluate_points(finest.mean_lat[oracle], finest.mean_lon[oracle], lat, lon),
        nearest=evaluate_points(finest.mean_lat[nearest], finest.mean_lon[nearest], lat, lon),
    )


def point_sources(pred_dir) -> dict[str, int]:
    """Rows per `point_source` (how the points were made: cell_mean, neighbour, neighbours); {}
    for a PRED_DIR from before galleries."""
    con = sql.connect(predictions=pred_dir)
    try:
        if "point_source" not in con.sql("SELECT * FROM predictions LIMIT 0").columns:
            return {}
        rows = con.sql("SELECT point_source, count(*) FROM predictions WHERE error IS NULL GROUP BY 1 ORDER BY 1")
        return {str(k): int(v) for k, v in rows.fetchall()}
    finally:
        con.close()
