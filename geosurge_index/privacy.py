"""The precision cap: how fine an answer may leave the process.

Geolocating people's photos is dual-use, so every output path (bulk `locate` and `search` rows,
the `Locator` API, the HTTP service, sidecars, the review page) passes its answers through one
function, `apply_cap(rows_or_predictions, tree, cap)`, before they leave.

The rule. A `Cap` is a distance (`km`) and/or a hierarchy level (`level`). A cell's extent is the
side of the square of its area, sqrt(area_km2). Along a predicted path (the best finest cell and its
ancestors, levels 1..L) the extents never grow, so the answer is the deepest cell on the path whose
extent is at least `km` and whose level is at most `level`. When even the level-1 cell is finer
than `km`, the answer is the S2 ancestor of the level-1 cell whose extent is at least `km`
(`cap_level` 0; its point is the S2 cell's centre, the hierarchy holding no sample mean for it).
What is reported under a cap:

- `lat`/`lon`: the answered cell's mean point (its S2 centre at `cap_level` 0);
- `probability`: the probability of the answered cell, summed over the top-k finest cells inside
  it (a lower bound of the cell's mass; never below the finest cell's own);
- the path's cells and tokens down to the answered level only; `cap_km`, `cap_level` and
  `cap_token` (the S2 token of the answered cell);
- alternatives (the Locator/HTTP answer): the top-k finest cells grouped into their own capped
  cells, probabilities summed; in Parquet rows the `topk_*` lists are withheld (null);
- place names: the answered cell's, less the names finer than it (`PLACE_DETAIL_KM`);
- radii (`r50_km`, `r90_km`, any `r<NN>_km` column): never below the answered cell's extent (so
  never below the cap's km): max(r, extent), measured from the answered point. The radius of the
  uncapped answer is kept when it is larger: it says how far the truth may be from the path, which
  a coarser cell does not narrow;
- the calibrated confidence (`confidence`, `level_confidence`; `confidence.py`): `confidence` becomes
  the calibrated probability of the answered cell, `level_confidence[answered level]` (level 1's at
  `cap_level` 0, a lower bound of the larger S2 cell's); `level_confidence` keeps the answered levels
  only; `calibrated` is kept; `p_within_*km` (the probability of being within a distance of the
  uncapped point, which the capped point is not) are withheld;
- nothing else: embeddings, and any column this module does not know (e.g. gallery neighbours,
  their ids and similarities, a refined point), are withheld (null). A new column that carries
  no location goes into `KEEP_COLUMNS`.

A request may make a cap coarser, never finer: `Cap.coarser(other)` is the coarser of the two
in each part (the larger km, the smaller level).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from geosurge_index import s2
from geosurge_index.calibration import WITHIN_COLUMNS
from geosurge_index.errors import UserError

# The caps a user usually means (README "For photo archives"); km, as the evaluation thresholds.
TYPICAL_CAPS_KM = {"street": 1.0, "city": 25.0, "region": 200.0, "country": 750.0, "continent": 2500.0}
MAX_CAP_KM = 5000.0  # every S2 face (about 9,000 km across) is coarser: a cap always has an answer
# A place name is kept when the answered cell is smaller than this (km of extent): a town names
# an area of a few tens of km, a region (admin1) a few hundred, a country up to a continent's.
PLACE_DETAIL_KM = {"town": 100.0, "admin1": 500.0, "country_code": 2500.0, "country_name": 2500.0}
# Prediction columns that carry no finer location than the capped answer (kept as they are)
KEEP_COLUMNS = frozenset({
    "id", "path", "width", "height", "error",
    "exif_lat", "exif_lon", "exif_gps_present", "exif_gps_valid", "exif_gps_note",  # the photo's own
    "source", "row", "bytes", "sha256",  # input bookkeeping
    "calibrated",  # whether the index's calibration made the confidence (`confidence.py`)
})
_RADIUS = re.compile(r"^r\d+(_km)?$")  # r50_km, r90_km: uncertainty radii, floored at the extent
_CAP_COLUMNS = ("cap_km", "cap_level", "cap_token")
PLACE_FIELDS = ("country_code", "country_name", "admin1", "town")


@dataclass(frozen=True)
class Cap:
    """A precision cap: `km` (the answered cell's extent is at least this) and/or `level`
    (the answered cell is at this hierarchy level or coarser). Both None: no cap."""

    km: float | None = None
    level: int | None = None

    def __post_init__(self) -> None:
        if self.km is not None and not (0 <= float(self.km) <= MAX_CAP_KM and math.isfinite(float(self.km))):
            raise UserError(f"cap_km must lie in 0..{MAX_CAP_KM:g}, got {self.km}")
        if self.level is not None and int(self.level) < 1:
            raise UserError(f"cap_level must be at least 1, got {self.level}")

    @classmethod
    def of(cls, km: float | None = None, level: int | None = None) -> Cap | None:
        """A Cap, or None when neither part is given."""
        return None if km is None and level is None else cls(None if km is None else float(km),
                                                              None if level is None else int(level))

    @classmethod
    def from_settings(cls, settings) -> Cap | None:
        """The cap of an `InferenceSettings` (`cap_km`, `cap_level`)."""
        return cls.of(getattr(settings, "cap_km", None), getattr(settings, "cap_level", None))

    def __bool__(self) -> bool:
        return self.km is not None or self.level is not None

    def coarser(self, other: Cap | None) -> Cap:
        """The coarser of two caps in each part: what a request may ask on top of a service's cap."""
        if not other:
            return self
        km = [v for v in (self.km, other.km) if v is not None]
        lv = [v for v in (self.level, other.level) if v is not None]
        return Cap(max(km) if km else None, min(lv) if lv else None)

    def to_dict(self) -> dict:
        return {"km": self.km, "level": self.level}


def coarsest(*caps: Cap | None) -> Cap | None:
    """The coarsest combination of caps (None when none is set)."""
    out: Cap | None = None
    for c in caps:
        if c:
            out = c if out is None else out.coarser(c)
    return out


def describe(cap: Cap | None) -> str:
    if not cap:
        return "no cap"
    parts = ([f"{cap.km:g} km"] if cap.km is not None else []) + (
        [f"level {cap.level}"] if cap.level is not None else [])
    return " and ".join(parts)


# -- cell geometry ----------------------------------------------------------------------------------

class CapCells:
    """Per level of a `CellTree`: each cell's extent in km (sqrt of its S2 area), computed once per
    tree (`cap_cells(tree)`), plus the level-1 cells' S2 ids for answers above level 1."""

    def __init__(self, tree):
        self.tree = tree
        self.ids = [s2.tokens_to_ids(t.to_numpy(zero_copy_only=False)) if len(t) else np.zeros(0, np.uint64)
                    for t in tree.tokens]
        self.extent = [np.sqrt(s2.cell_areas_km2(i)) if len(i) else np.zeros(0) for i in self.ids]


def cap_cells(tree) -> CapCells:
    """The `CapCells` of a tree, cached on it."""
    cached = getattr(tree, "_cap_cells", None)
    if cached is None:
        cached = CapCells(tree)
        tree._cap_cells = cached
    return cached


@dataclass
class CappedCells:
    """The capped answer of n paths (numpy arrays)."""

    level: np.ndarray  # int8 (n,): hierarchy level answered, 0 = an S2 ancestor of the level-1 cell
    cell: np.ndarray  # int64 (n,): cell_index at `level` (-1 at level 0)
    s2_id: np.ndarray  # uint64 (n,)
    lat: np.ndarray
    lon: np.ndarray
    extent_km: np.ndarray

    @property
    def token(self) -> np.ndarray:
        return s2.ids_to_tokens(self.s2_id) if len(self.s2_id) else np.zeros(0, dtype=str)


def capped_cells(paths: np.ndarray, tree, cap: Cap) -> CappedCells:
    """(n, L) paths (cell_index per level; -1 below a path's known depth, as in rows capped before)
    -> the deepest cell of each path allowed by `cap`."""
    cc = cap_cells(tree)
    paths = np.asarray(paths, dtype=np.int64).reshape(-1, tree.levels)
    n, levels = paths.shape
    known = paths >= 0
    ext = np.full((n, levels), -np.inf)
    for lv in range(levels):
        ext[known[:, lv], lv] = cc.extent[lv][paths[known[:, lv], lv]]
    # extents never grow along a path: the allowed levels are a prefix
    k = (ext >= (cap.km or 0.0) - 1e-9).sum(axis=1) if cap.km is not None else known.sum(axis=1)
    if cap.level is not None:
        k = np.minimum(k, int(cap.level))
    k = k.astype(np.int64)
    rows = np.arange(n)
    cell = np.where(k > 0, paths[rows, np.maximum(k - 1, 0)], -1)
    lat, lon = np.empty(n), np.empty(n)
    ids = np.zeros(n, dtype=np.uint64)
    extent = np.zeros(n)
    for lv in np.unique(k[k > 0]):
        sel = k == lv
        c = cell[sel]
        lat[sel], lon[sel] = tree.mean_lat[lv - 1][c], tree.mean_lon[lv - 1][c]
        ids[sel], extent[sel] = cc.ids[lv - 1][c], cc.extent[lv - 1][c]
    above = np.flatnonzero(k == 0)
    if len(above):
        ids[above], extent[above], lat[above], lon[above] = s2_ancestor_at_least(
            cc.ids[0][paths[above, 0]], cap.km or 0.0)
    return CappedCells(k.astype(np.int8), cell, ids, lat, lon, extent)


def s2_ancestor_at_least(base: np.ndarray, km: float):
    """The deepest S2 ancestor (or the cell itself) of each id whose extent is at least `km`
    -> (ids, extents, centre lat, centre lon). Faces (about 9,000 km) satisfy any cap."""
    base = np.asarray(base, dtype=np.uint64)
    ids, extent = base.copy(), np.sqrt(s2.cell_areas_km2(base)) if len(base) else np.zeros(0)
    todo = extent < km - 1e-9
    if todo.any():
        for s2_level in range(int(s2.levels(base[todo]).max()) - 1, -1, -1):
            sel = np.flatnonzero(todo & (s2.levels(base) > s2_level))
            if not len(sel):
                continue
            anc = s2.parent_ids(base[sel], s2_level)
            e = np.sqrt(s2.cell_areas_km2(anc))
            ok = e >= km - 1e-9
            ids[sel[ok]], extent[sel[ok]] = anc[ok], e[ok]
            todo[sel[ok]] = False
            if not todo.any():
                break
    lat, lon = s2.cell_centers(ids) if len(ids) else (np.zeros(0), np.zeros(0))
    return ids, extent, lat, lon


def _capped_probability(answer: CappedCells, topk: np.ndarray, probs: np.ndarray, tree) -> np.ndarray:
    """Sum of the top-k probabilities whose finest cell lies inside each row's answered cell."""
    n, k = topk.shape
    if not n:
        return np.zeros(0)
    valid = topk >= 0
    anc = tree.ancestors(np.where(valid, topk, 0).reshape(-1)).reshape(n, k, tree.levels)
    level = answer.level.astype(np.int64)
    inside = np.zeros((n, k), dtype=bool)
    deep = level > 0
    if deep.any():
        col = anc[deep][:, :, :][np.arange(deep.sum())[:, None], np.arange(k)[None, :], level[deep, None] - 1]
        inside[deep] = col == answer.cell[deep, None]
    if (~deep).any():
        cc = cap_cells(tree)
        sub = np.flatnonzero(~deep)
        lvl1 = cc.ids[0][anc[sub, :, 0]]
        inside[sub] = s2.contains(np.repeat(answer.s2_id[sub], k).reshape(-1, k).ravel(),
                                  lvl1.ravel()).reshape(-1, k)
    return np.where(inside & valid, probs, 0.0).sum(axis=1)


# -- the boundary ---------------------------------------------------------------------------------

def apply_cap(rows, tree, cap: Cap | None, *, places: Callable[[int, int], dict] | None = None):
    """The one boundary every output passes: prediction rows (a pyarrow Table in the PRED_DIR
    schema) or `locate.Prediction`s -> the same, capped (see the module docstring). No cap: the
    input unchanged. `tree`: the index's `CellTree` (`GeoIndex.tree`, `index.read_tree`).
    `places(level, cell_index) -> {country_code, ...}`: the place names of a cell (Predictions
    then name the answered cell; without it they keep the coarse names of their own)."""
    if not cap:
        return rows
    if isinstance(rows, pa.Table):
        return _cap_table(rows, tree, cap)
    return _cap_predictions(list(rows), tree, cap, places)


def _cap_table(table: pa.Table, tree, cap: Cap) -> pa.Table:
    levels = tree.levels
    n = table.num_rows
    cell_cols = [f"cell_l{lv}" for lv in range(1, levels + 1)]
    missing = [c for c in cell_cols if c not in table.column_names]
    if missing:
        raise UserError(f"prediction rows lack {missing[0]}: cannot apply a precision cap to them")
    lat_valid = np.asarray(table.column("lat").is_valid().to_numpy(zero_copy_only=False), dtype=bool) \
        if n else np.zeros(0, bool)
    # -1 below a row's known depth (a row capped before keeps its path down to its cap)
    cells = np.stack([table.column(c).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
                      for c in cell_cols], axis=1) if n else np.zeros((0, levels), np.int64)
    earlier = _earlier_s2_answers(table, n)  # rows capped above level 1 before: their S2 cell
    ok = lat_valid & ((cells[:, 0] >= 0) | (earlier != 0))
    rows = np.flatnonzero(ok)
    ans = capped_cells(cells[rows], tree, cap)
    again = np.flatnonzero((earlier[rows] != 0) & (cells[rows, 0] < 0))
    if len(again):
        got = s2_ancestor_at_least(earlier[rows][again], cap.km or 0.0)
        ans.s2_id[again], ans.extent_km[again], ans.lat[again], ans.lon[again] = got
        ans.level[again], ans.cell[again] = 0, -1
    prob = None
    if {"topk_cells", "topk_probs"} <= set(table.column_names) and len(rows):
        topk, probs = _lists(table.column("topk_cells"), rows), _lists(table.column("topk_probs"), rows)
        if topk is not None and probs is not None:
            prob = np.maximum(_capped_probability(ans, topk, probs, tree),
                              _col(table, "probability", rows))
    if prob is None:
        prob = _col(table, "probability", rows) if "probability" in table.column_names else np.full(len(rows), np.nan)
    mask = ~ok

    def spread(values, dtype) -> pa.Array:
        full = np.zeros(n, dtype=np.asarray(values).dtype if len(rows) else np.float64)
        if len(rows):
            full[rows] = values
        return pa.array(full, type=dtype, mask=mask)

    out: dict[str, pa.Array] = {}
    for name in table.column_names:
        col = table.column(name)
        if name in KEEP_COLUMNS:
            out[name] = col
        elif name == "lat":
            out[name] = spread(ans.lat, pa.float64())
        elif name == "lon":
            out[name] = spread(ans.lon, pa.float64())
        elif name == "probability":
            out[name] = spread(prob.astype(np.float64), col.type)
        elif name == "level_confidence":
            out[name] = _capped_level_lists(col, rows, ans.level, n)
        elif name == "confidence" and "level_confidence" in table.column_names:
            out[name] = _capped_confidence(table.column("level_confidence"), rows, ans.level, n, col.type)
        elif name.startswith(("cell_l", "token_l")) and name.rsplit("l", 1)[1].isdigit():
            lv = int(name.rsplit("l", 1)[1])
            keep = np.zeros(n, dtype=bool)
            if len(rows):
                keep[rows] = ans.level >= lv
            out[name] = pc.if_else(pa.array(keep), col.combine_chunks(), pa.nulls(n, col.type))
        elif _RADIUS.match(name):
            vals = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
            floor = np.full(n, np.nan)
            if len(rows):
                floor[rows] = ans.extent_km
            out[name] = pa.array(np.fmax(vals, floor), type=col.type, mask=mask | np.isnan(np.fmax(vals, floor)))
        elif name == "geometry":
            from geosurge_index.geoparquet import points_wkb

            out[name] = points_wkb(spread(ans.lon, pa.float64()).to_numpy(zero_copy_only=False),
                                   spread(ans.lat, pa.float64()).to_numpy(zero_copy_only=False))
        elif name in _CAP_COLUMNS:
            continue
        else:  # topk_*, embedding, gallery neighbours, anything unknown: withheld
            out[name] = pa.nulls(n, col.type)
    before = (np.asarray(table.column("cap_km").to_numpy(zero_copy_only=False), dtype=np.float64)
              if "cap_km" in table.column_names else np.full(n, np.nan))
    km = np.fmax(before, np.nan if cap.km is None else cap.km)
    out["cap_km"] = pa.array(km, pa.float64(), mask=~ok | np.isnan(km))
    out["cap_level"] = spread(ans.level.astype(np.int8), pa.int8())
    toks = np.full(n, None, dtype=object)
    if len(rows):
        toks[rows] = ans.token
    out["cap_token"] = pa.array(toks, pa.string())
    names = [c for c in table.column_names if c not in _CAP_COLUMNS] + list(_CAP_COLUMNS)
    if set(_CAP_COLUMNS) <= set(table.column_names):
        names = table.column_names  # keep the schema's order
    fields = []
    for name in names:
        typ = table.schema.field(name).type if name in table.column_names else out[name].type
        fields.append(pa.field(name, typ))
    arrays = [out[name] if isinstance(out[name], pa.ChunkedArray) else out[name].cast(typ)
              for name, typ in zip(names, [f.type for f in fields], strict=True)]
    return pa.table(arrays, schema=pa.schema(fields, metadata=table.schema.metadata))


def _level_lists(col, rows: np.ndarray) -> list:
    return col.take(pa.array(rows)).to_pylist() if len(rows) else []


def _capped_level_lists(col, rows: np.ndarray, level: np.ndarray, n: int) -> pa.Array:
    """A per-level list column (level 1 first) cut to each row's answered levels (null elsewhere)."""
    full: list = [None] * n
    for r, v, lv in zip(rows, _level_lists(col, rows), level, strict=True):
        full[r] = None if v is None else v[:max(int(lv), 1)]
    return pa.array(full, col.type)


def _capped_confidence(level_col, rows: np.ndarray, level: np.ndarray, n: int, typ) -> pa.Array:
    """The calibrated probability of each row's answered cell: `level_confidence` at the answered
    level (level 1's above it, a lower bound); null where unknown. A row capped before keeps only
    its answered levels, so the last entry is taken there."""
    full: list = [None] * n
    for r, v, lv in zip(rows, _level_lists(level_col, rows), level, strict=True):
        if v:
            full[r] = v[min(max(int(lv), 1), len(v)) - 1]
    return pa.array(full, typ)


def _earlier_s2_answers(table: pa.Table, n: int) -> np.ndarray:
    """uint64 (n,): the S2 id of rows answered above level 1 by an earlier cap (cap_level 0), else 0."""
    out = np.zeros(n, dtype=np.uint64)
    if "cap_level" not in table.column_names or "cap_token" not in table.column_names or not n:
        return out
    lv = table.column("cap_level").fill_null(-1).to_numpy(zero_copy_only=False)
    sel = np.flatnonzero(lv == 0)
    if len(sel):
        out[sel] = s2.tokens_to_ids(np.asarray(table.column("cap_token").take(pa.array(sel)).to_pylist(), dtype=str))
    return out


def _col(table: pa.Table, name: str, rows: np.ndarray) -> np.ndarray:
    return np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)[rows]


def _lists(col, rows: np.ndarray) -> np.ndarray | None:
    """A list column's rows as an (m, k) array (-1 / 0 padded), or None when it is all null."""
    vals = col.take(pa.array(rows)).to_pylist()
    if all(v is None for v in vals):
        return None
    k = max((len(v) for v in vals if v is not None), default=0)
    out = np.full((len(vals), max(k, 1)), -1, dtype=np.float64)
    for i, v in enumerate(vals):
        if v:
            out[i, :len(v)] = [np.nan if x is None else x for x in v]
    return out


def capped_places(place: dict, extent_km: float) -> dict:
    """Place names of an answer of this extent: each only while the cell is smaller than
    `PLACE_DETAIL_KM` says for it."""
    return {k: (None if k in PLACE_DETAIL_KM and extent_km >= PLACE_DETAIL_KM[k] else v) for k, v in place.items()}


@dataclass(frozen=True)
class CapInfo:
    """What a capped `Prediction` says about its cap: the cap in force, the level answered
    (0 = coarser than level 1), the answered cell's S2 token and extent."""

    km: float | None
    level: int | None
    answered_level: int
    s2_token: str
    extent_km: float


def _cap_predictions(preds: list, tree, cap: Cap, places) -> list:
    ok = [i for i, p in enumerate(preds) if p.error is None and p.cells]
    if not ok:
        return [replace(p, embedding=None) for p in preds]
    paths = np.array([[c.cell_index for c in preds[i].cells] for i in ok], dtype=np.int64)
    if paths.shape[1] != tree.levels:
        raise ValueError("a prediction's path is not a full path of this tree (capped twice?)")
    ans = capped_cells(paths, tree, cap)
    k = max(len(preds[i].alternatives) for i in ok)
    topk = np.full((len(ok), max(k, 1)), -1, dtype=np.int64)
    probs = np.zeros(topk.shape)
    for r, i in enumerate(ok):
        for j, a in enumerate(preds[i].alternatives):
            topk[r, j], probs[r, j] = a.cell_index, a.probability
    prob = np.maximum(_capped_probability(ans, topk, probs, tree),
                      np.array([preds[i].probability or 0.0 for i in ok]))
    # every alternative capped by the same rule, then grouped
    flat = topk[topk >= 0]
    alt_ans = capped_cells(tree.ancestors(flat), tree, cap) if len(flat) else None
    tokens, alt_tokens = ans.token, (alt_ans.token if alt_ans is not None else [])
    out = list(preds)
    pos = 0
    for r, i in enumerate(ok):
        p = preds[i]
        groups: dict[str, list] = {}
        for j in range(topk.shape[1]):
            if topk[r, j] < 0:
                continue
            t = str(alt_tokens[pos])
            g = groups.setdefault(t, [int(alt_ans.level[pos]), int(alt_ans.cell[pos]), 0.0,
                                      float(alt_ans.lat[pos]), float(alt_ans.lon[pos]), p.alternatives[j]])
            g[2] += float(probs[r, j])
            pos += 1
        alts = sorted(groups.items(), key=lambda kv: -kv[1][2])
        lv = int(ans.level[r])
        own = {k: getattr(p, k) for k in PLACE_FIELDS}
        if places is not None:
            own = places(lv, int(ans.cell[r])) if lv > 0 else dict.fromkeys(PLACE_FIELDS)
        place = capped_places(own, float(ans.extent_km[r]))
        ext = float(ans.extent_km[r])
        conf = {}
        if getattr(p, "confidence", None) is not None:  # `confidence.py`: see the module docstring
            level_conf = [getattr(c, "confidence", None) for c in p.cells[:max(lv, 1)]]
            conf = {"confidence": level_conf[-1] if level_conf and level_conf[-1] is not None else None,
                    **{k: max(float(getattr(p, k)), ext) for k in ("r50_km", "r90_km") if getattr(p, k) is not None},
                    **{k: None for k in WITHIN_COLUMNS if hasattr(p, k)}}  # of the uncapped point: withheld
        out[i] = replace(
            p, lat=float(ans.lat[r]), lon=float(ans.lon[r]), probability=float(prob[r]),
            cells=list(p.cells[:lv]), embedding=None, **conf,
            alternatives=[replace(g[5], cell_index=g[1], s2_token=t, probability=g[2], lat=g[3], lon=g[4],
                                  level=g[0]) for t, g in alts],
            cap=CapInfo(cap.km, cap.level, lv, str(tokens[r]), float(ans.extent_km[r])),
            **place,
        )
    return [replace(p, embedding=None) if p.error is not None else p for p in out]
