"""Fitting an index's calibration on geotagged photos (`geosurge calibrate`): their embeddings (a
PRED_DIR written with --save-embeddings, or images run through the bulk locate pipeline first) are
searched as every answer is (`confidence.search`), the true points placed in the index's cells, and
`calibration.fit_calibration` + `fit_radius_scale` fitted on them. The result is written to
INDEX_DIR/calibration.json and listed in the manifest with its checksum (`index.add_listed_file`).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from geosurge_index.calibration import (
    CALIBRATION_FILE,
    FIT_METHODS,
    QUANTILES,
    Calibration,
    fit_calibration,
    fit_radius_scale,
    fit_within,
    km_key,
    scores,
)
from geosurge_index.errors import UserError


@dataclass
class CalibrationSet:
    """Held-out photos as the calibration sees them (one row per matched photo)."""

    masses: np.ndarray  # (n, L) raw level masses (`confidence.level_masses`)
    hits: np.ndarray  # (n, L) bool: the true point lies in the reported cell of the level
    distance_km: np.ndarray  # (n,) from the predicted to the true point
    result: object  # the search.SearchResult of these photos (with CONFIDENCE_TOP_K cells)
    n_truth: int  # truth rows
    n_unmatched: int  # truth rows without a usable embedding


def embeddings_for_truth(pred_dir, truth, dim: int, batch_size: int = 4096):
    """(matched truth rows, their embeddings) from a PRED_DIR holding an `embedding` column."""
    from geosurge_index.benchmarks import match_ids
    from geosurge_index.embeddings import read_embedding_batches

    batches, _ = read_embedding_batches(pred_dir, dim, batch_size)
    ids, paths, embs = [], [], []
    for b in batches:
        ok = [i for i, e in enumerate(b.errors) if e is None]
        ids += [b.ids[i] for i in ok]
        paths += [b.paths[i] for i in ok]
        embs.append(b.embeddings)
    if not ids:
        raise UserError(f"--predictions {pred_dir}: no row with a usable embedding (locate with --save-embeddings)")
    emb = np.concatenate(embs)
    rows = match_ids(truth.ids, ids, paths)
    keep = np.flatnonzero(rows >= 0)
    return keep, emb[rows[keep]]


def calibration_set(index, truth, embeddings: np.ndarray, truth_rows: np.ndarray, *, beam=None) -> CalibrationSet:
    """Search the embeddings of the matched truth rows and compare with their true cells."""
    from geosurge_index.cells import assign_points
    from geosurge_index.confidence import ConfidenceModel, level_masses
    from geosurge_index.index import IndexCells
    from geosurge_index.metrics import haversine_km

    model = ConfidenceModel(index.tree)
    result = index.search(embeddings, top_k=model.top_k, **({} if beam is None else {"beam": beam}))
    lat, lon = truth.lat[truth_rows], truth.lon[truth_rows]
    with IndexCells.open(index.dir) as cells:
        true_cells = assign_points(cells.partition(), lat, lon)
    hits = (true_cells >= 0) & (true_cells == result.best_cells)
    return CalibrationSet(level_masses(result, index.tree, model.top_k), hits,
                          haversine_km(result.lat, result.lon, lat, lon), result,
                          len(truth), len(truth) - len(truth_rows))


def fit_index_calibration(index, cal_set: CalibrationSet, *, methods=FIT_METHODS, meta: dict | None = None
                          ) -> tuple[Calibration, dict]:
    """-> (the calibration, a report: in-sample scores before and after, radius coverage)."""
    from geosurge_index.confidence import WITHIN_KM, ConfidenceModel

    s = cal_set
    top_k = ConfidenceModel(index.tree).top_k
    cal = fit_calibration(s.masses, s.hits, top_k=top_k, methods=methods, meta=meta)
    probs = cal.probabilities(s.masses)
    raw, raw_within = ConfidenceModel(index.tree, cal).raw_radii_and_within(s.result, probs)
    cal.radius_scale = fit_radius_scale(s.distance_km, {q: raw[:, i] for i, q in enumerate(QUANTILES)})
    cal.within, within_comparison = fit_within(raw_within, s.distance_km, WITHIN_KM, methods)
    cal.meta["within_comparison"] = within_comparison
    within = cal.within_probabilities(raw_within, WITHIN_KM)
    report = {
        "n": int(len(s.distance_km)), "n_truth": s.n_truth, "n_unmatched": s.n_unmatched,
        "finest_hit_rate": float(s.hits[:, -1].mean()),
        "finest_before": scores(np.minimum.accumulate(np.clip(s.masses, 0, 1), axis=1)[:, -1], s.hits[:, -1]),
        "finest_after": scores(probs[:, -1], s.hits[:, -1]),
        "radius_coverage_unscaled": {f"{round(q * 100)}": float(np.mean(s.distance_km <= raw[:, i]))
                                     for i, q in enumerate(QUANTILES)},
        "radius_scale": cal.radius_scale,
        "methods": [c.method for c in cal.levels],
        "within_km": {km_key(t): {"method": cal.within[km_key(t)].method,
                                  "rate": float(np.mean(s.distance_km <= t)),
                                  "before": scores(raw_within[:, j], s.distance_km <= t),
                                  "after": scores(within[:, j], s.distance_km <= t)}
                      for j, t in enumerate(WITHIN_KM)},
    }
    cal.meta["fit_report"] = report
    return cal, report


def write_calibration(index_dir, cal: Calibration) -> Path:
    """INDEX_DIR/calibration.json (atomically), then listed in the manifest with its checksum;
    under the index's manifest lock (`gallery.store.gallery_lock`), as `geosurge gallery` changes
    the manifest too."""
    from geosurge_index.gallery.store import gallery_lock, write_atomic
    from geosurge_index.index import add_listed_file

    d = Path(index_dir)
    path = d / CALIBRATION_FILE
    with gallery_lock(d):
        write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(cal.to_json(), indent=1) + "\n"))
        add_listed_file(d, CALIBRATION_FILE, {"calibration": cal.summary()})
    return path


def calibrate(index_dir, truth, *, predictions=None, inputs=None, beam=None, methods=FIT_METHODS,
              device: str = "auto", batch_size: int | None = None, workers: int | None = None,
              truth_source: str = "", write: bool = True) -> tuple[Calibration, dict]:
    """The whole of `geosurge calibrate`: embeddings (from `predictions`, else by locating `inputs`
    into a temporary PRED_DIR), the calibration set, the fit, and (write) the index's files."""
    from geosurge_index.index import GeoIndex

    index = GeoIndex.open(index_dir, device="cpu", encoder=False)
    index.use_galleries("none")  # the cell probabilities and the cell-mean points (see `calibration_set`)
    with tempfile.TemporaryDirectory(prefix="geosurge-calibrate-") as tmp:
        if predictions is None:
            if not inputs:
                raise UserError("give the photos: INPUT paths (images, folders, manifests, shards) or --predictions")
            from geosurge_index.locate.job import LocateJob
            from geosurge_index.locate.runner import run_job

            predictions = Path(tmp) / "predictions"
            run_job(LocateJob(index_dir=str(index_dir), inputs=[str(i) for i in inputs], out_dir=str(predictions),
                              save_embeddings=True, device=device, batch_size=batch_size, workers=workers))
        rows, emb = embeddings_for_truth(predictions, truth, index.dim)
    if len(rows) == 0:
        raise UserError("no photo of the truth file has a prediction with an embedding (ids did not match)")
    cal_set = calibration_set(index, truth, emb, rows, beam=beam)
    meta = {"source": truth_source, "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "search": {"beam": beam, "top_k": int(cal_set.result.topk_cells.shape[1])}}
    cal, report = fit_index_calibration(index, cal_set, methods=methods, meta=meta)
    if write:
        write_calibration(index_dir, cal)
    return cal, report

