"""A small real world for the sql / eval / map tests: a partition of clustered points, an index
exported from it (random hierarchical cell embeddings), predictions made by searching noisy
embeddings of the true cells through that index, and a ground-truth CSV.

Built once per test session (`world` fixture) under pytest's temporary folder.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

# Cities the clustered points gather around (lat, lon); one near the antimeridian.
CENTRES = [(48.86, 2.35), (40.71, -74.0), (35.68, 139.69), (-33.87, 151.21), (-22.91, -43.17),
           (51.51, -0.13), (41.9, 12.5), (19.43, -99.13), (1.35, 103.82), (-18.14, 178.44),
           (64.15, -21.94), (30.04, 31.24)]
N_POINTS = 4000
DIM = 16
TAU_MIN = 5
TAU_MAX = (800, 400, 200, 100, 50, 25, 12)


@dataclass(frozen=True)
class World:
    root: Path
    cells_dir: Path
    index_dir: Path
    pred_dir: Path
    truth_csv: Path  # ids as the images' file names; lat/lon of the true points
    ids: list  # truth ids, in truth order
    lat: np.ndarray  # true points
    lon: np.ndarray
    n_errors: int  # prediction rows that are error rows
    n_missing: int  # truth rows without a prediction row


def clustered_points(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    c = rng.integers(0, len(CENTRES), n)
    centres = np.asarray(CENTRES)[c]
    spread = rng.choice([0.02, 0.3, 3.0], n, p=[0.5, 0.35, 0.15])
    lat = np.clip(centres[:, 0] + rng.normal(0, 1, n) * spread, -89.9, 89.9)
    lon = (centres[:, 1] + rng.normal(0, 1, n) * spread + 180.0) % 360.0 - 180.0
    return lat, lon


def build_world(root: Path) -> World:
    from geosurge_index.cells import PartitionSettings, assign_points, partition, write_cells_dir
    from geosurge_index.index import GeoIndex, export_index
    from geosurge_index.pred_store import PredStore

    rng = np.random.default_rng(7)
    lat, lon = clustered_points(N_POINTS, rng)
    part = partition(lat, lon, PartitionSettings(tau_min=TAU_MIN, tau_max=TAU_MAX), source="test")
    cells = part.cells
    cells_dir = write_cells_dir(root / "cells", cells, part.assignments)

    # hierarchical embeddings: a child points near its parent, so that a query near a finest
    # cell's vector also scores that cell's ancestors well and the beam finds the true path
    tables = []
    for lc in cells.levels:
        noise = rng.normal(size=(len(lc), DIM)) / np.sqrt(DIM)  # norm ~1
        v = noise if lc.level == 1 else tables[-1][lc.parent_index] + 0.5 * noise
        tables.append(v / np.linalg.norm(v, axis=1, keepdims=True))
    from geosurge_index.cells import cells_to_arrow

    index_dir = export_index([t.astype(np.float32) for t in tables], np.full(len(tables), 0.05),
                             cells_to_arrow(cells), root / "index", tau_max=TAU_MAX, source="test")

    # the benchmark: 300 held-out points from the same distribution
    n_truth = 300
    tlat, tlon = clustered_points(n_truth, rng)
    ids = [f"{k:04d}_{int(rng.integers(1e9))}.jpg" for k in range(n_truth)]
    truth_csv = root / "truth.csv"
    with open(truth_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["IMG_ID", "AUTHOR", "LAT", "LON"])
        for i, a, b in zip(ids, tlat, tlon, strict=True):
            w.writerow([i, "someone", f"{a:.6f}", f"{b:.6f}"])

    # predictions: the embedding of each truth point's finest cell (or, outside every finest
    # cell, a random one), plus noise; 10 inputs fail to decode, 12 truth images are never run
    index = GeoIndex.open(index_dir, device="cpu")
    true_cells = assign_points(cells, tlat, tlon)
    finest = true_cells[:, -1].copy()
    outside = finest < 0
    finest[outside] = rng.integers(0, len(tables[-1]), outside.sum())
    emb = tables[-1][finest] + 0.2 * rng.normal(size=(n_truth, DIM)) / np.sqrt(DIM)
    run = np.arange(n_truth - 12)  # the last 12 truth images have no prediction row
    errors = [None] * len(run)
    for k in rng.choice(len(run), 10, replace=False):
        errors[k] = "not_an_image: test"
    ok = np.array([e is None for e in errors])
    result = index.search(emb[run][ok].astype(np.float32), top_k=5, beam=4)
    # ids as a folder run writes them: relative paths under the input folder
    pred_ids = [f"photos/{ids[k]}" for k in run]
    paths = [f"/data/bench/photos/{ids[k]}" for k in run]
    table = index.to_arrow(result, pred_ids, paths, errors)
    store = PredStore(root / "pred")
    store.dir.mkdir(parents=True)
    half = len(run) // 2
    store.write_chunk(0, table.slice(0, half))
    store.write_chunk(1, table.slice(half))
    return World(root=root, cells_dir=cells_dir, index_dir=Path(index_dir), pred_dir=store.dir,
                 truth_csv=truth_csv, ids=ids, lat=tlat, lon=tlon, n_errors=10, n_missing=12)


_CACHE: dict[str, World] = {}


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    key = str(tmp_path_factory.getbasetemp())
    if key not in _CACHE:
        _CACHE[key] = build_world(tmp_path_factory.mktemp("eval-world"))
    return _CACHE[key]
