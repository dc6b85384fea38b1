"""The adaptive geocell hierarchy: partitioning points into S2 cells, the cells table, the tree.

Rule (GeoSURGE, after PlaNet/TransLocator): an S2 cell is split into its 4 children while it
holds more than tau_max samples (up to `max_s2_level`); cells holding fewer than tau_min samples
are dropped (their samples have no cell at that level). One partition per level, tau_max
decreasing with the level, each level computed by refining the one above, so the levels form a
tree: every cell has exactly one parent in the level above (possibly the same S2 cell).

Points are counted in a cell by binary search of the cell's leaf-id range in the sorted leaf ids
of all points, so a whole level is a handful of vectorised passes (no per-point Python work).

On disk this is a CELLS_DIR (see ARCHITECTURE.md): cells.parquet, assignments.parquet,
partition.json. `read_cells` / `assign_points` are what training, evaluation and the demo use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geosurge_index import s2
from geosurge_index.errors import FormatError, UserError
from geosurge_index.formats import read_json

FORMAT = "geosurge-cells"
FORMAT_VERSION = 1
CELLS_FILE = "cells.parquet"
ASSIGNMENTS_FILE = "assignments.parquet"
META_FILE = "partition.json"

DEFAULT_TAU_MIN = 50
DEFAULT_TAU_MAX = (25000, 12500, 6400, 3200, 1600, 800, 500)
# Level-20 cells are about 9 m across (average edge), below consumer GPS accuracy: splitting a
# crowd of photos at one landmark further would only separate identical coordinates.
DEFAULT_MAX_S2_LEVEL = 20


@dataclass(frozen=True)
class PartitionSettings:
    tau_min: int = DEFAULT_TAU_MIN
    tau_max: tuple[int, ...] = DEFAULT_TAU_MAX
    max_s2_level: int = DEFAULT_MAX_S2_LEVEL

    def __post_init__(self) -> None:
        tau_max = tuple(int(t) for t in self.tau_max)
        object.__setattr__(self, "tau_max", tau_max)
        if not tau_max:
            raise UserError("tau_max needs at least one value (one per hierarchy level)")
        if any(t < 1 for t in tau_max) or self.tau_min < 1:
            raise UserError(f"tau_min and tau_max must be positive, got {self.tau_min} and {list(tau_max)}")
        if any(b > a for a, b in zip(tau_max, tau_max[1:], strict=False)):
            raise UserError(f"tau_max must not increase from level to level (finer levels refine "
                            f"coarser ones), got {list(tau_max)}")
        if self.tau_min > tau_max[-1]:
            raise UserError(f"tau_min ({self.tau_min}) must not exceed the smallest tau_max ({tau_max[-1]})")
        if not 0 <= self.max_s2_level <= s2.MAX_LEVEL:
            raise UserError(f"max_s2_level must be in 0..{s2.MAX_LEVEL}, got {self.max_s2_level}")


@dataclass(frozen=True)
class LevelCells:
    """The cells of one hierarchy level, one array entry per cell, indexed by cell_index
    (dense 0..n-1, in increasing s2_id order)."""

    level: int  # 1 (coarsest) .. n_levels (finest)
    s2_id: np.ndarray  # uint64
    s2_token: np.ndarray  # str
    s2_level: np.ndarray  # int8
    parent_index: np.ndarray  # int32, cell_index in level - 1; -1 at level 1
    n_samples: np.ndarray  # int64
    mean_lat: np.ndarray  # float64, spherical mean of the cell's samples (the predicted point)
    mean_lon: np.ndarray
    center_lat: np.ndarray  # float64, S2 cell centre
    center_lon: np.ndarray
    area_km2: np.ndarray  # float64

    def __len__(self) -> int:
        return len(self.s2_id)


@dataclass(frozen=True)
class CellsTable:
    """All levels of a partition plus the settings it was made with (partition.json)."""

    levels: tuple[LevelCells, ...]  # levels[0] is level 1
    tau_min: int
    tau_max: tuple[int, ...]
    max_s2_level: int
    n_input: int  # input rows, valid or not
    n_skipped_invalid: int
    source: str
    format_version: int = FORMAT_VERSION

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    def level(self, level: int) -> LevelCells:
        """Cells of `level`, 1-based as in the files."""
        if not 1 <= level <= self.n_levels:
            raise UserError(f"level must be in 1..{self.n_levels}, got {level}")
        return self.levels[level - 1]

    def children(self, level: int) -> tuple[np.ndarray, np.ndarray]:
        """CSR of the tree below `level` (1..n_levels-1): the children (cell_index in level + 1)
        of cell c are indices[indptr[c]:indptr[c + 1]]."""
        parents = self.level(level + 1).parent_index
        # Cells are in s2_id order and a child's range lies in its parent's, so parent_index is
        # non-decreasing: each parent's children are one contiguous run.
        indptr = np.searchsorted(parents, np.arange(len(self.level(level)) + 1)).astype(np.int64)
        return indptr, np.arange(len(parents), dtype=np.int32)

    def partition_json(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "tau_min": self.tau_min,
            "tau_max": list(self.tau_max),
            "max_s2_level": self.max_s2_level,
            "n_input": self.n_input,
            "n_skipped_invalid": self.n_skipped_invalid,
            "source": self.source,
        }


@dataclass(frozen=True)
class Partition:
    cells: CellsTable
    assignments: np.ndarray  # int32 (n_points, n_levels): cell_index per level, -1 where none


# --- partitioning -------------------------------------------------------------------------------

class _SortedLeaves:
    """The points' leaf ids, sorted once: counting a cell's points is two binary searches."""

    def __init__(self, leaves: np.ndarray) -> None:
        self.order = np.argsort(leaves, kind="stable")
        self.sorted = leaves[self.order]

    def span(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo = np.searchsorted(self.sorted, s2.range_min(ids), side="left")
        hi = np.searchsorted(self.sorted, s2.range_max(ids), side="right")
        return lo, hi


def _refine(ids: np.ndarray, counts: np.ndarray, points: _SortedLeaves, tau_max: int,
            max_s2_level: int) -> tuple[np.ndarray, np.ndarray]:
    """Split cells holding more than tau_max points into their children, recursively, one
    generation at a time; empty children vanish. Returns the cells sorted by id, with counts."""
    done_ids, done_counts = [ids[:0]], [counts[:0]]
    while len(ids):
        split = (counts > tau_max) & (s2.levels(ids) < max_s2_level)
        done_ids.append(ids[~split])
        done_counts.append(counts[~split])
        children = s2.child_ids(ids[split]).ravel()
        lo, hi = points.span(children)
        nonempty = hi > lo
        ids, counts = children[nonempty], (hi - lo)[nonempty]
    ids, counts = np.concatenate(done_ids), np.concatenate(done_counts)
    order = np.argsort(ids)
    return ids[order], counts[order]


def _segment_sums(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Sums of values[lo[k]:hi[k]] for disjoint, sorted, non-empty segments."""
    bounds = np.empty(2 * len(lo), dtype=np.int64)
    bounds[0::2], bounds[1::2] = lo, hi
    if len(bounds) and bounds[-1] == len(values):
        bounds = bounds[:-1]  # reduceat runs the last segment to the end by itself
    return np.add.reduceat(values, bounds, axis=0)[0::2] if len(lo) else np.zeros((0,) + values.shape[1:])


def _segment_labels(lo: np.ndarray, hi: np.ndarray, n: int) -> np.ndarray:
    """Label of each sorted position: k inside [lo[k], hi[k]), -1 elsewhere."""
    labels = np.full(n, -1, dtype=np.int32)
    counts = hi - lo
    starts = np.cumsum(counts) - counts
    positions = np.arange(counts.sum()) + np.repeat(lo - starts, counts)
    labels[positions] = np.repeat(np.arange(len(lo), dtype=np.int32), counts)
    return labels


def _cells_geometry(ids: np.ndarray) -> dict[str, np.ndarray]:
    center_lat, center_lon = s2.cell_centers(ids)
    return {
        "s2_token": s2.ids_to_tokens(ids),
        "s2_level": s2.levels(ids).astype(np.int8),
        "center_lat": center_lat,
        "center_lon": center_lon,
        "area_km2": s2.cell_areas_km2(ids),
    }


def _parent_indices(child_ids: np.ndarray, parent_ids: np.ndarray) -> np.ndarray:
    """cell_index in the level above of each cell (the one whose range holds it)."""
    k = np.searchsorted(s2.range_min(parent_ids), s2.range_min(child_ids), side="right") - 1
    ok = (k >= 0) & (s2.range_max(child_ids) <= s2.range_max(parent_ids)[np.maximum(k, 0)])
    if not ok.all():  # cannot happen when tau_max does not increase; guards the tree property
        raise AssertionError("a cell has no parent in the level above")
    return k.astype(np.int32)


def partition(
    lat,
    lon,
    settings: PartitionSettings = PartitionSettings(),
    *,
    source: str = "",
    n_input: int | None = None,
    n_skipped_invalid: int = 0,
    progress: bool = False,
) -> Partition:
    """Partition points (degrees; invalid ones raise UserError: filter with coords.read_coordinates)
    into the adaptive hierarchy. Deterministic: cells are ordered by S2 id within each level."""
    from geosurge_index.progress import bar

    lat = np.asarray(lat, dtype=np.float64).ravel()
    lon = np.asarray(lon, dtype=np.float64).ravel()
    n = len(lat)
    leaves = s2.latlon_to_leaf_ids(lat, lon)
    points = _SortedLeaves(leaves)
    del leaves
    # unit vectors in sorted order: per-cell sums give the spherical mean (right across the
    # antimeridian, where averaging longitudes is not)
    xyz_sorted = s2.latlon_to_xyz(lat[points.order], lon[points.order])

    faces = np.array([(f << 61) | (1 << 60) for f in range(6)], dtype=np.uint64)
    lo, hi = points.span(faces)
    ids, counts = faces[hi > lo], (hi - lo)[hi > lo]
    assignments = np.full((n, len(settings.tau_max)), -1, dtype=np.int32)
    levels: list[LevelCells] = []
    steps = range(len(settings.tau_max))
    for li in bar(steps, desc="partition", unit="level") if progress else steps:
        ids, counts = _refine(ids, counts, points, settings.tau_max[li], settings.max_s2_level)
        keep = counts >= settings.tau_min
        ids, counts = ids[keep], counts[keep]  # the next level refines only the kept cells
        lo, hi = points.span(ids)
        mean_lat, mean_lon = s2.xyz_to_latlon(_segment_sums(xyz_sorted, lo, hi))
        parent = (np.full(len(ids), -1, dtype=np.int32) if li == 0
                  else _parent_indices(ids, levels[-1].s2_id))
        levels.append(LevelCells(
            level=li + 1, s2_id=ids, parent_index=parent, n_samples=counts.astype(np.int64),
            mean_lat=mean_lat, mean_lon=mean_lon, **_cells_geometry(ids),
        ))
        assignments[points.order, li] = _segment_labels(lo, hi, n)
    cells = CellsTable(
        levels=tuple(levels), tau_min=settings.tau_min, tau_max=settings.tau_max,
        max_s2_level=settings.max_s2_level, n_input=n if n_input is None else n_input,
        n_skipped_invalid=n_skipped_invalid, source=source,
    )
    return Partition(cells=cells, assignments=assignments)


# --- assigning points to existing cells ----------------------------------------------------------

def assign_leaf_ids(cells: CellsTable, leaves: np.ndarray) -> np.ndarray:
    """cell_index per level (int32, (n, n_levels), -1 where none) of leaf ids, by S2 containment."""
    leaves = np.asarray(leaves, dtype=np.uint64).ravel()
    # binary searches of sorted queries are ~10x faster (cache-friendly): sort once, search 7 times
    point_order = np.argsort(leaves)
    sorted_leaves = leaves[point_order]
    found = np.full((len(leaves), cells.n_levels), -1, dtype=np.int32)
    for li, lc in enumerate(cells.levels):
        if not len(lc):
            continue
        order = np.argsort(lc.s2_id)  # already sorted when written by partition(); cheap to ensure
        lo, hi = s2.range_min(lc.s2_id[order]), s2.range_max(lc.s2_id[order])
        k = np.searchsorted(lo, sorted_leaves, side="right") - 1
        inside = (k >= 0) & (sorted_leaves <= hi[np.maximum(k, 0)])
        found[inside, li] = order[k[inside]]
    out = np.empty_like(found)
    out[point_order] = found
    return out


def assign_points(cells: CellsTable, lat, lon) -> np.ndarray:
    """cell_index per level (int32, (n, n_levels), -1 where none) of points in degrees."""
    return assign_leaf_ids(cells, s2.latlon_to_leaf_ids(lat, lon))


# --- CELLS_DIR ------------------------------------------------------------------------------------

# cells.parquet's columns and their Arrow type names (ARCHITECTURE.md, CELLS_DIR); names, not
# pyarrow types, so that importing this module does not import pyarrow
CELL_COLUMN_TYPES = {
    "level": "int8", "cell_index": "int32", "s2_id": "uint64", "s2_token": "string", "s2_level": "int8",
    "parent_index": "int32", "n_samples": "int64", "mean_lat": "float64", "mean_lon": "float64",
    "center_lat": "float64", "center_lon": "float64", "area_km2": "float64",
}
_CELL_COLUMNS = tuple(CELL_COLUMN_TYPES)


def cells_to_arrow(cells: CellsTable):
    """cells.parquet's table: one row per (level, cell), sorted by (level, cell_index)."""
    import pyarrow as pa

    def col(name, dtype):
        return np.concatenate([getattr(lc, name) for lc in cells.levels]).astype(dtype)

    sizes = [len(lc) for lc in cells.levels]
    parent = col("parent_index", np.int32)
    return pa.table({
        "level": pa.array(np.repeat(np.arange(1, cells.n_levels + 1), sizes).astype(np.int8)),
        "cell_index": pa.array(np.concatenate([np.arange(s) for s in sizes]).astype(np.int32)),
        "s2_id": pa.array(col("s2_id", np.uint64)),
        "s2_token": pa.array(col("s2_token", str).tolist(), type=pa.string()),
        "s2_level": pa.array(col("s2_level", np.int8)),
        "parent_index": pa.array(parent, mask=parent < 0),
        "n_samples": pa.array(col("n_samples", np.int64)),
        **{name: pa.array(col(name, np.float64))
           for name in ("mean_lat", "mean_lon", "center_lat", "center_lon", "area_km2")},
    })


def write_cells_dir(
    out_dir: str | Path,
    cells: CellsTable,
    assignments: np.ndarray,
    rows: np.ndarray | None = None,
    ids: np.ndarray | None = None,
) -> Path:
    """Write a CELLS_DIR. `rows` are the 0-based input rows of the assigned points (default
    0..n-1); `ids` (optional) the input's id column, written as `id` beside them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    assignments = np.asarray(assignments)
    if assignments.ndim != 2 or assignments.shape[1] != cells.n_levels:
        raise ValueError(f"assignments must be (n, {cells.n_levels}), got {assignments.shape}")
    rows = np.arange(len(assignments), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    if len(rows) != len(assignments) or (ids is not None and len(ids) != len(assignments)):
        raise ValueError("rows / ids must have one entry per assignment row")
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(cells_to_arrow(cells), out / CELLS_FILE)
    columns = {"row": pa.array(rows)}
    if ids is not None:
        columns["id"] = pa.array(np.asarray(ids, dtype=object), type=pa.string())
    for li in range(cells.n_levels):
        a = np.ascontiguousarray(assignments[:, li], dtype=np.int32)
        columns[f"level_{li + 1}"] = pa.array(a, mask=a < 0)
    pq.write_table(pa.table(columns), out / ASSIGNMENTS_FILE)
    # partition.json last: its presence marks a complete directory
    (out / META_FILE).write_text(json.dumps(cells.partition_json(), indent=2) + "\n")
    return out


def _read_meta(directory: Path) -> dict:
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise FormatError(f"{directory}: not a cells directory ({META_FILE} missing); "
                          f"make one with `geosurge partition`")
    meta = read_json(meta_path, FORMAT, FORMAT_VERSION)
    _check_meta_keys(meta, meta_path)
    return meta


def _check_meta_keys(meta: dict, where: str | Path) -> None:
    for key in ("tau_min", "tau_max", "max_s2_level"):
        if key not in meta:
            raise FormatError(f"{where}: missing key {key!r}")


def read_cells(directory: str | Path) -> CellsTable:
    """Read and check a CELLS_DIR's cells.parquet + partition.json (FormatError when missing,
    corrupted or of a newer format version)."""
    directory = Path(directory)
    meta = _read_meta(directory)
    return cells_from_arrow(_read_parquet(directory, CELLS_FILE), meta, where=directory / CELLS_FILE)


def _read_parquet(directory: Path, name: str):
    """One Parquet file of a CELLS_DIR; FormatError when missing or unreadable."""
    import pyarrow.parquet as pq

    path = directory / name
    if not path.is_file():
        raise FormatError(f"{directory}: {name} missing")
    try:
        return pq.read_table(path)
    except (OSError, ValueError) as err:
        raise FormatError(f"{path}: unreadable: {err}") from None


def cells_from_arrow(table, meta: dict, *, where: str | Path = "cells table") -> CellsTable:
    """A `CellsTable` from a cells.parquet-shaped Arrow table (extra columns are ignored) and
    partition.json's settings (`tau_min`, `tau_max`, `max_s2_level`; the rest optional).
    FormatError naming `where` when a column is missing, a level's cell_index is not dense
    0..n-1, or the table has levels beyond `len(tau_max)`."""
    _check_meta_keys(meta, where)
    missing = [c for c in _CELL_COLUMNS if c not in table.column_names]
    if missing:
        raise FormatError(f"{where}: missing columns {missing}")
    data = {c: table.column(c).to_numpy(zero_copy_only=False) for c in _CELL_COLUMNS if c != "parent_index"}
    data["parent_index"] = table.column("parent_index").fill_null(-1).to_numpy(zero_copy_only=False)
    n_levels = len(meta["tau_max"])
    levels = []
    for level in range(1, n_levels + 1):
        sel = np.flatnonzero(data["level"] == level)
        sel = sel[np.argsort(data["cell_index"][sel], kind="stable")]
        if not np.array_equal(data["cell_index"][sel], np.arange(len(sel))):
            raise FormatError(f"{where}: cell_index of level {level} is not dense 0..n-1")
        levels.append(LevelCells(
            level=level,
            s2_id=data["s2_id"][sel].astype(np.uint64),
            s2_token=data["s2_token"][sel].astype(str),
            s2_level=data["s2_level"][sel].astype(np.int8),
            parent_index=data["parent_index"][sel].astype(np.int32),
            n_samples=data["n_samples"][sel].astype(np.int64),
            **{c: data[c][sel].astype(np.float64)
               for c in ("mean_lat", "mean_lon", "center_lat", "center_lon", "area_km2")},
        ))
    extra = set(np.unique(data["level"]).tolist()) - set(range(1, n_levels + 1))
    if extra:
        raise FormatError(f"{where}: levels {sorted(extra)} beyond the {n_levels} in {META_FILE}")
    return CellsTable(
        levels=tuple(levels), tau_min=int(meta["tau_min"]), tau_max=tuple(int(t) for t in meta["tau_max"]),
        max_s2_level=int(meta["max_s2_level"]), n_input=int(meta.get("n_input", 0)),
        n_skipped_invalid=int(meta.get("n_skipped_invalid", 0)), source=str(meta.get("source", "")),
        format_version=int(meta.get("format_version", FORMAT_VERSION)),
    )


def read_assignments(directory: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(rows int64 (n,), assignments int32 (n, n_levels) with -1 where none) of a CELLS_DIR."""
    directory = Path(directory)
    meta = _read_meta(directory)
    path = directory / ASSIGNMENTS_FILE
    table = _read_parquet(directory, ASSIGNMENTS_FILE)
    names = ["row"] + [f"level_{k}" for k in range(1, len(meta["tau_max"]) + 1)]
    missing = [c for c in names if c not in table.column_names]
    if missing:
        raise FormatError(f"{path}: missing columns {missing}")
    assignments = np.stack([table.column(c).fill_null(-1).to_numpy().astype(np.int32) for c in names[1:]], 1)
    return table.column("row").to_numpy().astype(np.int64), assignments


# --- summaries -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LevelSummary:
    level: int
    tau_max: int
    cells: int
    samples_covered: int
    median_samples: float
    max_samples: int
    median_area_km2: float
    s2_levels: tuple[int, int]  # min, max S2 level


def summarize(cells: CellsTable) -> list[LevelSummary]:
    out = []
    for lc, tau in zip(cells.levels, cells.tau_max, strict=True):
        empty = len(lc) == 0
        out.append(LevelSummary(
            level=lc.level, tau_max=tau, cells=len(lc), samples_covered=int(lc.n_samples.sum()),
            median_samples=0.0 if empty else float(np.median(lc.n_samples)),
            max_samples=0 if empty else int(lc.n_samples.max()),
            median_area_km2=0.0 if empty else float(np.median(lc.area_km2)),
            s2_levels=(0, 0) if empty else (int(lc.s2_level.min()), int(lc.s2_level.max())),
        ))
    return out


def format_summary(cells: CellsTable, n_points: int) -> str:
    """The per-level table `geosurge partition` prints."""
    head = f"{'level':>5} {'tau_max':>7} {'cells':>8} {'samples covered':>22} {'median/cell':>11} " \
           f"{'max/cell':>9} {'median km2':>11} {'S2 levels':>9}"
    lines = [head]
    for s in summarize(cells):
        share = 100.0 * s.samples_covered / n_points if n_points else 0.0
        lines.append(
            f"{s.level:>5} {s.tau_max:>7} {s.cells:>8} {s.samples_covered:>13,} ({share:5.1f}%) "
            f"{s.median_samples:>11.0f} {s.max_samples:>9,} {s.median_area_km2:>11.4g} "
            f"{s.s2_levels[0]:>4}-{s.s2_levels[1]:<4}"
        )
    return "\n".join(lines)
