"""Ground-truth files of the benchmarks, and matching their ids to prediction ids.

Formats (shared/data/benchmarks/SOURCES.md): Im2GPS, Im2GPS3k and YFCC26k have
`IMG_ID,AUTHOR,LAT,LON,...`; YFCC4k is YFCC100M metadata with the file name in `name` and `lon`
before `lat`. Any CSV or Parquet table with an id column and lat/lon columns works: the columns
are found, and the points validated, by `coords.read_coordinates`. WebDataset shards (.tar) work
too (one, or a folder of them): the truth is the `lat`/`lon` in each sample's JSON member, the
id the sample key
(`sources.read_tar_coordinates`), which is the id `geosurge locate` gives the sample.

Prediction ids are the locate run's ids: a manifest id, else the image's path or tar key. A truth
id such as `45/77/3228511372.jpg` matches a prediction whose id or path is exactly it, or ends
with it as whole path components (`/data/yfcc26k/45/77/3228511372.jpg`), with or without the
file extension.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from geosurge_index.coords import ID_NAMES, Coordinates, read_coordinates
from geosurge_index.errors import UserError


def read_truth(
    path: str | os.PathLike,
    *,
    id_column: str | None = None,
    lat_column: str | None = None,
    lon_column: str | None = None,
    skip_invalid: bool = False,
) -> Coordinates:
    """A benchmark's ground truth (CSV / Parquet, or WebDataset .tar shards): `Coordinates` whose
    `ids` are set.

    Columns are found as `coords.read_coordinates` finds them (IMG_ID, name, id, ... for the id;
    LAT/lat, LON/lon for the point); a file without an id column is refused, since predictions
    join the truth on id. For a .tar or a folder of them, see `read_tar_truth` (the column options
    do not apply).
    """
    if str(path).lower().endswith(".tar") or os.path.isdir(path):
        return read_tar_truth(path, skip_invalid=skip_invalid)
    truth = read_coordinates(path, lat_column=lat_column, lon_column=lon_column, id_column=id_column,
                             skip_invalid=skip_invalid)
    if truth.ids is None:
        raise UserError(
            f"--truth {path}: no id column (looked for {', '.join(ID_NAMES)} in any case); "
            "name it with --id-column"
        )
    if (truth.ids == "").any():
        k = int(np.flatnonzero(truth.ids == "")[0])
        raise UserError(f"--truth {path}: empty id in data row {int(truth.rows[k])} (0-based)")
    return truth


def read_tar_truth(path: str | os.PathLike, *, skip_invalid: bool = False) -> Coordinates:
    """The truth of WebDataset shards (one .tar, or a folder of them, read in name order): each
    sample's JSON `lat`/`lon`, id = the sample key. UserError saying what was expected when the
    shards hold no coordinates."""
    from pathlib import Path

    from geosurge_index.coords import coordinates_from_arrays
    from geosurge_index.sources import read_tar_coordinates

    p = Path(path)
    if p.is_dir():
        shards = sorted(q for q in p.iterdir() if q.name.lower().endswith(".tar") and q.is_file())
        if not shards:
            raise UserError(f"--truth {path}: a folder without WebDataset shards (.tar)")
    elif p.is_file():
        shards = [p]
    else:
        raise UserError(f"--truth {path}: no such file")
    table = pa.concat_tables([read_tar_coordinates(q) for q in shards])
    lat = table.column("lat").to_numpy()
    lon = table.column("lon").to_numpy()
    if not (np.isfinite(lat) & np.isfinite(lon)).any():
        found = (f"{len(table)} JSON members, none with both" if len(table)
                 else "no JSON members")
        raise UserError(
            f"--truth {path}: WebDataset shards with {found} coordinates. Expected each sample's "
            "KEY.json to hold its true point as numbers, e.g. {\"lat\": 48.85, \"lon\": 2.35} "
            "(also latitude/longitude, lng), beside its KEY.jpg; or give a CSV/Parquet truth "
            "(id, lat, lon)"
        )
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    return coordinates_from_arrays(lat, lon, ids=ids, source=f"{path} (sample JSON lat/lon)",
                                   skip_invalid=skip_invalid)


def _norm(s: str) -> str:
    s = s.replace("\\", "/")
    while s.startswith("./"):
        s = s[2:]
    return s


def _strip_ext(s: str) -> str:
    head, _, last = s.rpartition("/")
    stem = last.rsplit(".", 1)[0] if "." in last.lstrip(".") else last
    return f"{head}/{stem}" if head else stem


def match_ids(truth_ids, pred_ids, pred_paths=None) -> np.ndarray:
    """For each truth id, the row of its prediction (int64, -1 if none); see the module doc.

    Exact id matches win; then a truth id matches a prediction id or path that ends with the
    same path components, then the same without extensions. A prediction serves one truth row
    at most only when matching is unambiguous: if two truth ids reduce to one key, neither uses
    that key (no silent mismatches).
    """
    truth_ids = [_norm(str(t)) for t in truth_ids]
    out = np.full(len(truth_ids), -1, dtype=np.int64)
    exact: dict[str, int] = {}
    for i, p in enumerate(pred_ids):
        if p is not None:
            exact.setdefault(_norm(str(p)), i)
    for k, t in enumerate(truth_ids):
        out[k] = exact.get(t, -1)
    todo = np.flatnonzero(out < 0)
    if len(todo) == 0:
        return out
    candidates = [pred_ids] + ([pred_paths] if pred_paths is not None else [])
    for strip in (False, True):
        key_of = {}  # truth key -> truth row; None when ambiguous
        depths = set()
        for k in todo:
            key = _strip_ext(truth_ids[k]) if strip else truth_ids[k]
            key_of[key] = None if key in key_of else k
            depths.add(key.count("/") + 1)
        for column in candidates:
            for i, p in enumerate(column):
                if p is None:
                    continue
                parts = _norm(str(p)).split("/")
                for depth in depths:
                    if depth > len(parts):
                        continue
                    key = "/".join(parts[-depth:])
                    k = key_of.get(_strip_ext(key) if strip else key)
                    if k is not None and out[k] < 0:
                        out[k] = i
        todo = np.flatnonzero(out < 0)
        if len(todo) == 0:
            break
    return out


def truth_table(truth: Coordinates, pred_ids=None, pred_paths=None, true_cells: np.ndarray | None = None) -> pa.Table:
    """The `truth` table of `geosurge sql`: `id` (the matched prediction's id, else the truth id,
    so that `JOIN truth USING (id)` works), `truth_id` (as in the file), `lat`, `lon`, and
    `true_cell_l1..L` (int32, null = no cell) when the true points were placed in an index's cells."""
    ids = np.asarray(truth.ids, dtype=object).copy()
    if pred_ids is not None:
        rows = match_ids(truth.ids, pred_ids, pred_paths)
        pred_ids = np.asarray(pred_ids, dtype=object)
        ids = np.where(rows >= 0, pred_ids[np.maximum(rows, 0)], ids)
    cols = {
        "id": pa.array(ids.tolist(), pa.string()),
        "truth_id": pa.array(truth.ids.tolist(), pa.string()),
        "lat": pa.array(truth.lat, pa.float64()),
        "lon": pa.array(truth.lon, pa.float64()),
    }
    if true_cells is not None:
        tc = np.asarray(true_cells)
        if tc.ndim != 2 or tc.shape[0] != len(truth):
            raise ValueError(f"truth_table: true_cells must be (n, levels), got {tc.shape}")
        for j in range(tc.shape[1]):
            cols[f"true_cell_l{j + 1}"] = pa.array(tc[:, j].astype(np.int32), mask=tc[:, j] < 0)
    return pa.table(cols)
