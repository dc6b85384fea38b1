"""Training data: geotagged images -> rows with cell targets, and the deterministic batch order.

A split is read from manifests (CSV/TSV/Parquet, CSV and TSV also gzipped, with an image path
column and lat/lon columns) or WebDataset tar shards as img2dataset writes them (`key.jpg` + `key.json` holding
latitude/longitude, optionally `key.classmap.png`). Images are located with `sources` (the same
reader bulk locate uses), coordinates with `coords`, targets with `cells.assign_points`.

The batch order of an epoch is a pure function of (seed, epoch, rank, world size), so a resumed
run continues with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from geosurge_index.errors import UserError
from geosurge_index.sources import TAR_SUFFIXES


@dataclass
class Split:
    """Images with known locations and their cell targets; row i of every field is one sample."""

    name: str
    table: pa.Table  # sources.INPUT_SCHEMA: where each image's bytes are
    lat: np.ndarray  # float64 (n,)
    lon: np.ndarray
    targets: np.ndarray  # int32 (n, levels), -1 where the sample has no cell at that level
    n_read: int = 0  # samples read before dropping
    n_dropped_invalid: int = 0  # missing / invalid coordinates
    n_dropped_no_cell: int = 0  # no cell at any level (training only)

    def __len__(self) -> int:
        return len(self.lat)

    def take(self, idx: np.ndarray, name: str | None = None) -> Split:
        idx = np.asarray(idx, dtype=np.int64)
        return Split(name or self.name, self.table.take(pa.array(idx)), self.lat[idx], self.lon[idx],
                     self.targets[idx], len(idx))


def expand_sources(spec: str | list[str]) -> list[str]:
    """A source spec -> files: manifests, tar shards, folders of shards, or glob patterns."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for s in specs:
        s = os.path.expanduser(str(s))
        if any(c in s for c in "*?["):
            hits = sorted(glob.glob(s))
            if not hits:
                raise UserError(f"data source {s!r} matches no files")
            out.extend(hits)
        elif os.path.isdir(s):
            hits = sorted(str(p) for p in Path(s).iterdir()
                          if p.name.lower().endswith(TAR_SUFFIXES) and p.is_file())
            if not hits:
                raise UserError(f"data source {s} is a folder without .tar shards (give a manifest or shards)")
            out.extend(hits)
        elif os.path.isfile(s):
            out.append(s)
        else:
            raise UserError(f"data source {s} does not exist")
    return out


def _read_manifest_split(path: str, path_column: str) -> tuple[pa.Table, np.ndarray, np.ndarray, int]:
    from geosurge_index import sources
    from geosurge_index.coords import read_coordinates

    table = sources.read_manifest(path, sources.ManifestColumns(path=path_column))
    coords = read_coordinates(path, skip_invalid=True, id_column=path_column)
    if coords.n_input != table.num_rows:
        raise UserError(f"manifest {path}: {table.num_rows} paths but {coords.n_input} coordinate rows")
    return table.take(pa.array(coords.rows)), coords.lat, coords.lon, coords.n_skipped_invalid


def tar_coordinates(path: str) -> dict[str, tuple[float, float]]:
    """key -> (lat, lon) from a shard's `key.json` members (img2dataset writes `latitude`,
    `longitude` when asked to keep those columns; `lat`/`lon`/`lng` are accepted too)."""
    out: dict[str, tuple[float, float]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not (m.isfile() and m.name.endswith(".json")):
                    continue
                d, _, base = m.name.rpartition("/")
                stem = base.partition(".")[0]
                key = f"{d}/{stem}" if d else stem
                try:
                    meta = json.loads(tar.extractfile(m).read())
                    lat = meta.get("latitude", meta.get("lat"))
                    lon = meta.get("longitude", meta.get("lon", meta.get("lng")))
                    out[key] = (float(lat), float(lon))
                except (ValueError, TypeError, AttributeError):
                    continue  # no usable coordinates: the sample is dropped and counted
    except (tarfile.TarError, OSError) as err:
        raise UserError(f"WebDataset shard {path} cannot be read: {err}") from err
    return out


def _read_tar_split(path: str) -> tuple[pa.Table, np.ndarray, np.ndarray, int]:
    from geosurge_index import sources

    table = sources.read_tar(path)
    coords = tar_coordinates(path)
    latlon = np.array([coords.get(k, (np.nan, np.nan)) for k in table.column("id").to_pylist()],
                      dtype=np.float64).reshape(-1, 2)
    lat, lon = latlon[:, 0], latlon[:, 1]
    ok = np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90) & (np.abs(lon) <= 180)
    keep = np.flatnonzero(ok)
    return table.take(pa.array(keep)), lat[keep], lon[keep], int((~ok).sum())


def read_split(name: str, spec: str | list[str], cells, *, path_column: str = "path",
               drop_no_cell: bool = False) -> Split:
    """Read every source of a split and assign its samples to cells."""
    from geosurge_index import sources
    from geosurge_index.cells import assign_points

    tables, lats, lons, dropped = [], [], [], 0
    for src in expand_sources(spec):
        kind = sources.input_kind(src)  # the same dispatch as `geosurge locate`
        if kind == "tar":
            t, la, lo, d = _read_tar_split(src)
        elif kind == "manifest":
            t, la, lo, d = _read_manifest_split(src, path_column)
        else:
            raise UserError(f"data source {src} is a single image: training needs coordinates, so give a "
                            "manifest (.csv, .tsv, .parquet, also .csv.gz/.tsv.gz) or .tar shards")
        tables.append(t)
        lats.append(la)
        lons.append(lo)
        dropped += d
    table = pa.concat_tables(tables).combine_chunks()
    lat, lon = np.concatenate(lats), np.concatenate(lons)
    targets = assign_points(cells, lat, lon).astype(np.int32)
    split = Split(name, table, lat, lon, targets, len(lat) + dropped, dropped)
    if drop_no_cell:
        keep = np.flatnonzero((targets >= 0).any(axis=1))
        n_no = len(lat) - len(keep)
        split = split.take(keep)
        split.n_read, split.n_dropped_invalid, split.n_dropped_no_cell = len(lat) + dropped, dropped, n_no
    if len(split) == 0:
        raise UserError(f"{name} split ({spec}) holds no usable samples")
    return split


def holdout(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """A seeded random (train, validation) split of one Split."""
    if not 0 < fraction < 1:
        raise UserError(f"data.val_fraction must be in (0, 1), got {fraction}")
    perm = np.random.default_rng([seed, 7919]).permutation(len(split))
    n_val = max(1, int(round(fraction * len(split))))
    val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    if len(train) == 0:
        raise UserError("data.val_fraction leaves no training samples")
    return split.take(train, "train"), split.take(val, "val")


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[np.ndarray]:
    """This rank's micro-batches for `epoch`: a seeded permutation cut into global steps of
    world * batch_size samples (the remainder is dropped so every rank takes the same number of
    steps), rank r taking the r-th slice of each."""
    per_step = batch_size * world
    steps = n // per_step
    if steps == 0:
        raise UserError(f"the training split has {n} samples, fewer than one step of {per_step} "
                        f"(batch_size {batch_size} x {world} processes)")
    perm = np.random.default_rng([seed, epoch]).permutation(n)[: steps * per_step]
    return [perm[s * per_step + rank * batch_size: s * per_step + (rank + 1) * batch_size] for s in range(steps)]


def eval_batches(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[np.ndarray]:
    """Every sample once, in order, spread over ranks (uneven counts allowed)."""
    mine = np.arange(rank, n, world)
    return [mine[i: i + batch_size] for i in range(0, len(mine), batch_size)]


class BatchDataset:
    """A torch map-style dataset whose item i is batch i, decoded (the locate reader stage):
    `(rows, DecodedBatch)`. Unreadable images come back as error rows, never exceptions."""

    def __init__(self, split: Split, batches: list[np.ndarray], image_size: int, draft: bool = True):
        from geosurge_index.locate.decode import DecodeSpec

        self.split, self.batches = split, batches
        self.spec = DecodeSpec(image_size=image_size, draft_size=image_size if draft else 0)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        from geosurge_index.locate.decode import decode_rows

        rows = self.batches[i]
        return rows, decode_rows(self.split.table, rows, self.spec)
