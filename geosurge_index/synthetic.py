"""Synthetic inputs for tests and benchmarks: geocell hierarchies with trained-like structure
(`geosurge bench search`), photo-like JPEGs, and a whole random-weight INDEX_DIR (`random_index`).

Shape: real S2 cells. Level-1 cells are distinct random S2 cells; going one level finer, a cell
keeps 0..4 children following S2's split: 1 child = the same S2 cell (not split further), 2..4 =
that many of its four S2 children, 0 = a dead end (all its samples fell under tau_min).
Embeddings: a child's vector is its parent's plus Gaussian noise (relative norm `child_noise`),
normalised, so a path is a chain of nearby vectors, as training aligns the levels to the same
visual embeddings. Queries: the mean of the vectors on one finest cell's path plus noise
(relative norm `query_noise`); that finest cell is the query's source.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from geosurge_index import s2
from geosurge_index.search import CellTree

# P(0..4 children): mean 2.2 children, as adaptive partitions halving tau_max per level give.
BRANCHING = (0.03, 0.33, 0.30, 0.14, 0.20)
_CHUNK = 65536


@dataclass
class SyntheticHierarchy:
    tables: list[np.ndarray]  # (n_l, d) float32, unit rows
    parents: list[np.ndarray]  # (n_l,) int32, -1 at level 1
    s2_ids: list[np.ndarray]  # (n_l,) uint64
    mean_lat: list[np.ndarray]
    mean_lon: list[np.ndarray]
    n_samples: list[np.ndarray]
    temperatures: np.ndarray  # (L,)

    @property
    def sizes(self) -> list[int]:
        return [len(p) for p in self.parents]

    def tree(self) -> CellTree:
        return CellTree.from_parents(self.parents, self.mean_lat, self.mean_lon,
                                     [pa.array(s2.ids_to_tokens(i), pa.string()) for i in self.s2_ids])

    def cells_table(self) -> pa.Table:
        """The hierarchy as a cells.parquet table (ARCHITECTURE.md, CELLS_DIR)."""
        cols: dict[str, list] = {k: [] for k in ("level", "cell_index", "s2_id", "s2_token", "s2_level",
                                                 "parent_index", "n_samples", "mean_lat", "mean_lon",
                                                 "center_lat", "center_lon", "area_km2")}
        for lv, ids in enumerate(self.s2_ids):
            n = len(ids)
            clat, clon = s2.cell_centers(ids)
            cols["level"].append(pa.array(np.full(n, lv + 1), pa.int8()))
            cols["cell_index"].append(pa.array(np.arange(n), pa.int32()))
            cols["s2_id"].append(pa.array(ids, pa.uint64()))
            cols["s2_token"].append(pa.array(s2.ids_to_tokens(ids), pa.string()))
            cols["s2_level"].append(pa.array(s2.levels(ids), pa.int8()))
            par = self.parents[lv]
            cols["parent_index"].append(pa.array(par, pa.int32(), mask=par < 0))
            cols["n_samples"].append(pa.array(self.n_samples[lv], pa.int64()))
            cols["mean_lat"].append(pa.array(self.mean_lat[lv], pa.float64()))
            cols["mean_lon"].append(pa.array(self.mean_lon[lv], pa.float64()))
            cols["center_lat"].append(pa.array(clat, pa.float64()))
            cols["center_lon"].append(pa.array(clon, pa.float64()))
            cols["area_km2"].append(pa.array(s2.cell_areas_km2(ids), pa.float64()))
        return pa.table({k: pa.concat_arrays(v) for k, v in cols.items()})


def _normalise_rows(a: np.ndarray) -> np.ndarray:
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    return a


def synthetic_hierarchy(n_finest: int = 25_000, *, dim: int = 768, levels: int = 7, seed: int = 0,
                        child_noise: float = 0.6, temperature: float = 0.05,
                        branching=BRANCHING) -> SyntheticHierarchy:
    """A random hierarchy with about `n_finest` finest cells (the level-1 count is chosen from
    the mean branching). Memory: the tables themselves plus one 64k-row chunk."""
    rng = np.random.default_rng(seed)
    probs = np.asarray(branching, dtype=np.float64)
    probs = probs / probs.sum()
    mean_b = float(np.dot(np.arange(5), probs))
    n1 = max(1, int(round(n_finest / mean_b ** (levels - 1))))
    # level-1 S2 cells: distinct cells at an S2 level with room for them and 2*(levels-1) splits
    s2_level = 1
    while 6 * 4 ** s2_level < 4 * n1:
        s2_level += 1
    picks = rng.choice(6 * 4 ** s2_level, size=n1, replace=False)
    picks.sort()
    face, pos = np.divmod(picks.astype(np.uint64), np.uint64(4 ** s2_level))
    shift = np.uint64(61 - 2 * s2_level)
    ids = (face << np.uint64(61)) | (pos << shift) | (np.uint64(1) << (shift - np.uint64(1)))
    s2_ids = [ids]
    parents = [np.full(n1, -1, dtype=np.int32)]
    for _ in range(1, levels):
        prev = s2_ids[-1]
        counts = rng.choice(5, size=len(prev), p=probs)
        if counts.sum() == 0:
            counts[rng.integers(len(prev))] = 1
        parent = np.repeat(np.arange(len(prev), dtype=np.int32), counts)
        # which of the 4 S2 children each kept child is: a random subset, in id order
        slot = np.argsort(rng.random((len(prev), 4)), axis=1)
        rank = np.arange(len(parent)) - np.repeat(np.cumsum(counts) - counts, counts)
        chosen = np.sort(np.where(np.arange(4)[None, :] < counts[:, None], slot, 9), axis=1)
        kids = s2.child_ids(prev)
        child = kids[parent, chosen[parent, rank]]
        child = np.where(counts[parent] == 1, prev[parent], child)  # not split: same S2 cell
        s2_ids.append(child.astype(np.uint64))
        parents.append(parent)
    mean_lat, mean_lon, n_samples = [], [], []
    for lv, ids in enumerate(s2_ids):
        clat, clon = s2.cell_centers(ids)
        # the samples' mean is near, not at, the cell centre
        spread = 0.2 * np.sqrt(s2.cell_areas_km2(ids)) / 111.0
        mean_lat.append(np.clip(clat + rng.normal(0, 1, len(ids)) * spread, -90, 90))
        mean_lon.append(((clon + rng.normal(0, 1, len(ids)) * spread + 180) % 360) - 180)
        n_samples.append(rng.integers(50, 500 * 2 ** (levels - lv), len(ids)))
    tables = [_normalise_rows(rng.standard_normal((n1, dim), dtype=np.float32))]
    scale = np.float32(child_noise / np.sqrt(dim))
    for lv in range(1, levels):
        parent = parents[lv]
        out = np.empty((len(parent), dim), dtype=np.float32)
        for a in range(0, len(parent), _CHUNK):
            block = rng.standard_normal((min(_CHUNK, len(parent) - a), dim), dtype=np.float32)
            block *= scale
            block += tables[lv - 1][parent[a:a + _CHUNK]]
            out[a:a + _CHUNK] = _normalise_rows(block)
        tables.append(out)
    return SyntheticHierarchy(tables, parents, s2_ids, mean_lat, mean_lon, n_samples,
                              np.full(levels, temperature, dtype=np.float64))


def synthetic_queries(h: SyntheticHierarchy, n: int, *, query_noise: float = 1.0,
                      seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """n unit queries -> (queries (n, d) float32, their source finest cell (n,) int32).

    A query is the mean of the vectors on a random finest cell's path plus Gaussian noise of
    relative norm `query_noise`: training aligns an image's embedding with its cell at every
    level, so coarse levels (well-separated cells) are easy and fine ones (siblings with
    similar vectors) are ambiguous, as in a trained model."""
    rng = np.random.default_rng(seed)
    levels = len(h.tables)
    dim = h.tables[0].shape[1]
    truth = rng.integers(0, h.sizes[-1], n)
    q = rng.standard_normal((n, dim), dtype=np.float32)
    q *= np.float32(query_noise / np.sqrt(dim))
    cell = truth
    for lv in range(levels - 1, -1, -1):
        q += h.tables[lv][cell] / np.float32(levels)
        cell = h.parents[lv][cell]
    return _normalise_rows(q), truth.astype(np.int32)


def synthetic_jpegs(n: int, size: tuple[int, int] = (640, 480), seed: int = 0, quality: int = 90) -> list[bytes]:
    """n distinct photo-like JPEGs (smooth colour fields plus fine noise) for speed and load
    benchmarks; geolocating them means nothing."""
    import io

    from PIL import Image

    width, height = size
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
        arr = np.asarray(base, dtype=np.int16) + rng.integers(-12, 13, (height, width, 1), dtype=np.int16)
        buf = io.BytesIO()
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def write_synthetic_jpegs(folder, n: int, width: int, height: int, seed: int = 0) -> list:
    """`synthetic_jpegs` written to `folder` as img000000.jpg, ...; returns their paths."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(synthetic_jpegs(n, (width, height), seed)):
        paths.append(folder / f"img{i:06d}.jpg")
        paths[-1].write_bytes(data)
    return paths


def random_index(out_dir, config=None, *, n_points: int = 4000, seed: int = 0, place_names: bool = False):
    """A real INDEX_DIR from a config-built model with random weights (default `tiny_config()`):
    random points clustered around a few centres -> partition -> checkpoint -> export, the same
    code as `geosurge partition` and `geosurge export`. For benchmarks and tests."""
    from pathlib import Path

    import torch

    from geosurge_index import cells as cells_mod
    from geosurge_index.index import export_checkpoint
    from geosurge_index.model import GeoSurgeModel, save_checkpoint, tiny_config

    out_dir = Path(out_dir)
    work = out_dir.with_name(out_dir.name + ".build")
    rng = np.random.default_rng(seed)
    centres = rng.uniform([-50, -170], [60, 170], size=(12, 2))
    pick = rng.integers(0, len(centres), n_points)
    lat = np.clip(centres[pick, 0] + rng.normal(0, 2, n_points), -89, 89)
    lon = (centres[pick, 1] + rng.normal(0, 2, n_points) + 180) % 360 - 180
    settings = cells_mod.PartitionSettings(tau_min=5, tau_max=(800, 400, 200, 100, 50, 25, 12))
    part = cells_mod.partition(lat, lon, settings, source="random")
    cells_mod.write_cells_dir(work / "cells", part.cells, part.assignments)
    torch.manual_seed(seed)
    config = config or tiny_config()
    model = GeoSurgeModel(config, [len(lc) for lc in part.cells.levels])
    save_checkpoint(work / "ckpt", model, epoch=0, cells_dir=work / "cells")
    export_checkpoint(work / "ckpt", out_dir, place_names=place_names)
    return out_dir
