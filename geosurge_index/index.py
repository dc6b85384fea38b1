"""The index directory (INDEX_DIR): export, open, verify.

INDEX_DIR holds
- `level_{1..L}.faiss`: one FAISS IndexFlatIP per level over the L2-normalised geocell
  embeddings, row = cell_index (inner product = cosine);
- `cells.duckdb`: table `cells` (the partition's cells.parquet columns + place names of each
  cell's mean point: country_code, country_name, admin1, town, town_distance_km) and table
  `levels` (level, tau_max, n_cells, temperature);
- `encoder.safetensors` + `encoder.json`: the visual encoder (written by the model package), so
  an index directory plus the backbone weights is all a query host needs;
- `manifest.json`, written last: format and version, embedding dim, levels, sha256 and size of
  every other file, library versions. A folder without it is an incomplete export.

Opening checks the manifest: a missing file, a size or checksum mismatch, or a newer format
version raise FormatError before FAISS or DuckDB touch the files. A command checks only the files
it reads (`search` never needs the encoder's). Then a cheap structural check, which also runs
when checksums are skipped: unit-norm vectors, the cell counts of the manifest, the `levels` and
`cells` tables and the FAISS files agreeing, cell_index dense, parents in range.
`geosurge verify` (`index_check.check_index`) runs every check and reports each. `IndexCells` is
the one reader of cells.duckdb (the tree, place names, one cell); `sql.connect` attaches it for
its SQL surface.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from geosurge_index import machine
from geosurge_index.calibration import CALIBRATION_FILE  # optional: `geosurge calibrate` writes it
from geosurge_index.cells import CELL_COLUMN_TYPES, cells_to_arrow
from geosurge_index.devices import resolve_device
from geosurge_index.errors import FormatError, UserError
from geosurge_index.formats import read_json
from geosurge_index.search import CellTree, SearchEngine, SearchResult, result_to_arrow

INDEX_FORMAT = "geosurge-index"
INDEX_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CELLS_DB = "cells.duckdb"
ENCODER_FILES = ("encoder.safetensors", "encoder.json")

# the cells.parquet contract (ARCHITECTURE.md, CELLS_DIR)
CELL_COLUMNS = {name: pa.type_for_alias(t) for name, t in CELL_COLUMN_TYPES.items()}
_ADD_CHUNK = 65536  # rows normalised and added to FAISS at a time (bounds the temporary copy)


def level_file(level: int) -> str:
    return f"level_{level}.faiss"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    return {**machine.library_versions(("geosurge_index", "faiss", "numpy", "duckdb", "pyarrow")),
            "python": platform.python_version()}


# --- export --------------------------------------------------------------------------------------

def _check_cells_table(cells: pa.Table, sizes: Sequence[int]) -> pa.Table:
    missing = [c for c in CELL_COLUMNS if c not in cells.column_names]
    if missing:
        raise FormatError(f"cells table lacks columns {missing} (see ARCHITECTURE.md, cells.parquet)")
    cells = cells.select(list(CELL_COLUMNS)).cast(pa.schema(CELL_COLUMNS))
    cells = cells.sort_by([("level", "ascending"), ("cell_index", "ascending")])
    level = cells["level"].to_numpy()
    counts = np.bincount(level.astype(np.int64), minlength=len(sizes) + 1)
    if level.min(initial=1) < 1 or counts.shape[0] > len(sizes) + 1:
        raise FormatError(f"cells table has levels outside 1..{len(sizes)}")
    if list(counts[1:]) != list(sizes):
        raise FormatError(f"cells per level {list(counts[1:])} do not match the embedding tables {list(sizes)}")
    idx = cells["cell_index"].to_numpy()
    expected = np.concatenate([np.arange(s) for s in sizes]) if sizes else idx
    if not np.array_equal(idx, expected):
        raise FormatError("cell_index must be dense 0..n-1 within each level")
    return cells


def _write_faiss(table: np.ndarray, path: Path) -> None:
    import faiss

    n, d = table.shape
    index = faiss.IndexFlatIP(d)
    for a in range(0, n, _ADD_CHUNK):
        chunk = np.asarray(table[a:a + _ADD_CHUNK], dtype=np.float32)
        norms = np.linalg.norm(chunk, axis=1, keepdims=True)
        if not np.all(np.isfinite(chunk)) or np.any(norms == 0):
            raise UserError(f"{path.name}: embedding rows {a}..{a + len(chunk) - 1} contain a "
                            "non-finite value or an all-zero row")
        index.add(np.ascontiguousarray(chunk / norms))
    faiss.write_index(index, str(path))


# cells.duckdb is written in this storage format; the oldest DuckDB that opens it is OLDEST_DUCKDB
CELLS_DB_STORAGE_VERSION = "v1.0.0"
OLDEST_DUCKDB = "0.10.3"


def _write_cells_db(cells: pa.Table, levels: pa.Table, path: Path, place_names: bool) -> None:
    """cells.duckdb in DuckDB's v1.0.0 storage format (storage version 64), whatever DuckDB
    writes it: every DuckDB from 0.10.3 on opens it (DuckDB 0.10.2 and older do not), the DuckDB
    CLI 1.x included, where a file in the writer's newest format (e.g. 69 from DuckDB 2.0) would
    be refused by any older reader."""
    import duckdb

    if place_names:
        from geosurge_index.placenames import reverse_geocode

        names = reverse_geocode(cells["mean_lat"].to_numpy(zero_copy_only=False),
                                cells["mean_lon"].to_numpy(zero_copy_only=False))
        cells = (cells.append_column("country_code", pa.array(names.country_code, pa.string()))
                 .append_column("country_name", pa.array(names.country_name, pa.string()))
                 .append_column("admin1", pa.array(names.admin1, pa.string()))
                 .append_column("town", pa.array(names.town, pa.string()))
                 .append_column("town_distance_km",
                                pa.array(names.town_distance_km, pa.float64(),
                                         mask=np.isnan(names.town_distance_km))))
    con = duckdb.connect(":memory:")
    try:
        con.execute(f"ATTACH '{_sql_path(path)}' AS cells_db (STORAGE_VERSION '{CELLS_DB_STORAGE_VERSION}')")
        con.register("_cells", cells)
        con.register("_levels", levels)
        con.execute("CREATE TABLE cells_db.cells AS SELECT * FROM _cells ORDER BY level, cell_index")
        con.execute("CREATE TABLE cells_db.levels AS SELECT * FROM _levels ORDER BY level")
        con.unregister("_cells")
        con.unregister("_levels")
        con.execute("CHECKPOINT cells_db")
        con.execute("DETACH cells_db")
    finally:
        con.close()


def _sql_path(path: Path) -> str:
    return str(path).replace("'", "''")


def export_index(
    geo_tables: Sequence[np.ndarray],
    temperatures,
    cells_table,
    out_dir: str | os.PathLike,
    *,
    encoder_writer: Callable[[Path], None] | None = None,
    tau_max: Sequence[int] | None = None,
    source: str | None = None,
    place_names: bool = True,
    overwrite: bool = False,
    model: dict | None = None,
) -> Path:
    """Write INDEX_DIR from the per-level geocell embeddings.

    geo_tables: L arrays (n_l, d) (row = cell_index; normalised here); temperatures: (L,);
    cells_table: the partition's cells (a pyarrow Table in the cells.parquet schema, a
    cells.parquet path, or a cells.CellsTable);
    encoder_writer(out_dir): writes encoder.safetensors + encoder.json (None: an index without
    an encoder, enough for `search` over stored embeddings); tau_max: per-level tau_max for the
    `levels` table; model: what the manifest's `model` says beyond the defaults (`kind`,
    `provenance`, `licence` of imported weights; `embed_dim` is the tables' width). Refuses a
    non-empty out_dir unless overwrite.
    """
    from geosurge_index.progress import bar

    out = Path(out_dir)
    levels = len(geo_tables)
    if levels < 1:
        raise UserError("no embedding tables to export")
    dims = {int(np.shape(t)[1]) if np.ndim(t) == 2 else -1 for t in geo_tables}
    if len(dims) != 1 or -1 in dims:
        raise UserError(f"embedding tables must be 2-D with one width, got shapes "
                        f"{[np.shape(t) for t in geo_tables]}")
    dim = dims.pop()
    temps = np.asarray(temperatures, dtype=np.float64).reshape(-1)
    if temps.shape[0] != levels or not np.all(temps > 0):
        raise UserError(f"need {levels} positive temperatures, got {temps.tolist()}")
    if tau_max is not None and len(tau_max) != levels:
        raise UserError(f"tau_max has {len(tau_max)} values for {levels} levels")
    if isinstance(cells_table, (str, os.PathLike)):
        import pyarrow.parquet as pq

        cells_table = pq.read_table(cells_table)
    elif not isinstance(cells_table, pa.Table):  # a cells.CellsTable
        cells_table = cells_to_arrow(cells_table)
    sizes = [int(np.shape(t)[0]) for t in geo_tables]
    cells = _check_cells_table(cells_table, sizes)
    # the tree must be valid (parents in range) before anything is written
    lv_col = cells["level"].to_numpy()
    parent_col = cells["parent_index"].fill_null(-1).to_numpy()
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    CellTree.from_parents([parent_col[bounds[i]:bounds[i + 1]] for i in range(levels)],
                          [np.zeros(s) for s in sizes], [np.zeros(s) for s in sizes],
                          [pa.nulls(s, pa.string()) for s in sizes])
    del lv_col

    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} exists and is not empty (use --overwrite to replace its index)")
        for name in [MANIFEST, CELLS_DB, CELLS_DB + ".wal", *ENCODER_FILES, CALIBRATION_FILE,
                     *(p.name for p in out.glob("level_*.faiss")), *(p.name for p in out.glob("gallery-*"))]:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    files = []
    for lv in bar(range(levels), desc="faiss indexes", unit="level"):
        _write_faiss(geo_tables[lv], out / level_file(lv + 1))
        files.append(level_file(lv + 1))
    level_rows = pa.table({
        "level": pa.array(np.arange(1, levels + 1), pa.int8()),
        "tau_max": pa.array(list(tau_max) if tau_max is not None else [None] * levels, pa.int64()),
        "n_cells": pa.array(sizes, pa.int64()),
        "temperature": pa.array(temps, pa.float64()),
    })
    _write_cells_db(cells, level_rows, out / CELLS_DB, place_names)
    files.append(CELLS_DB)
    if encoder_writer is not None:
        encoder_writer(out)
        for name in ENCODER_FILES:
            if not (out / name).is_file():
                raise FormatError(f"the encoder writer did not write {name}")
        files.extend(ENCODER_FILES)

    manifest = {
        "format": INDEX_FORMAT,
        "format_version": INDEX_FORMAT_VERSION,
        "dim": dim,
        "metric": "inner_product",
        "normalised": True,
        "levels": [
            {"level": lv + 1, "n_cells": sizes[lv], "file": level_file(lv + 1),
             "temperature": float(temps[lv]),
             "tau_max": int(tau_max[lv]) if tau_max is not None else None}
            for lv in range(levels)
        ],
        "encoder": encoder_writer is not None,
        # what made the embeddings: "geosurge" (trained here) or an imported model's kind,
        # provenance and licence (`geosurge model-info INDEX`)
        "model": {"kind": "geosurge" if encoder_writer is not None else None, "embed_dim": dim, **(model or {})},
        "place_names": place_names,
        "files": {name: {"sha256": _sha256(out / name), "bytes": (out / name).stat().st_size}
                  for name in bar(files, desc="checksums", unit="file")},
        "library_versions": library_versions(),
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": source,
    }
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
    return out


def export_checkpoint(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                      overwrite: bool = False, place_names: bool = True,
                      segmenter: str | os.PathLike | None = None) -> Path:
    """Export a training checkpoint directory (ARCHITECTURE.md, Checkpoints) to INDEX_DIR.
    `segmenter`: a folder written by the segmenter training (`segmenter_train`) whose segmenter
    replaces the checkpoint's in the index's encoder files."""
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise UserError(f"CHECKPOINT {ckpt} is not a folder")
    for name in ("cells.parquet", "partition.json"):
        if not (ckpt / name).is_file():
            raise FormatError(f"checkpoint {ckpt} has no {name} (a checkpoint carries a copy of "
                              "its partition)")
    try:
        from geosurge_index.model import load_checkpoint, read_geo_tables, save_encoder
    except ImportError as err:  # the model package predates these functions
        raise UserError(f"this install cannot read checkpoints: {err}") from err

    tables, temps = read_geo_tables(ckpt)
    partition = json.loads((ckpt / "partition.json").read_text())
    # weights=False: frozen pretrained parts are named in encoder.json, not stored, so there is
    # no need to load them (or to have them on the exporting host)
    encoder = load_checkpoint(ckpt, weights=False).model.encoder
    if segmenter is not None:
        from geosurge_index.model.encoder_io import with_segmenter

        encoder = with_segmenter(encoder, segmenter)
    return export_index(
        tables, temps, ckpt / "cells.parquet", out_dir,
        encoder_writer=lambda d: save_encoder(encoder, d),
        tau_max=partition.get("tau_max"), source=str(ckpt.resolve()),
        place_names=place_names, overwrite=overwrite,
    )


# --- open / verify -------------------------------------------------------------------------------

def index_file(index_dir: str | os.PathLike, name: str, why_missing: str = "") -> Path:
    """INDEX_DIR/name after checking that INDEX_DIR is a folder (UserError) holding it (FormatError)."""
    d = Path(index_dir)
    if not d.is_dir():
        raise UserError(f"INDEX_DIR {d} is not a folder")
    path = d / name
    if not path.is_file():
        raise FormatError(f"{d} has no {name}: not an index folder written by `geosurge export`{why_missing}")
    return path


def read_manifest(index_dir: str | os.PathLike) -> dict:
    """manifest.json, after checking the format name and version and the shape of its entries."""
    path = index_file(index_dir, MANIFEST, ", or an export that did not finish")
    manifest = read_json(path, INDEX_FORMAT, INDEX_FORMAT_VERSION)
    for key in ("dim", "levels", "files"):
        if key not in manifest:
            raise FormatError(f"{path}: no {key!r}")
    files, levels = manifest["files"], manifest["levels"]
    if not (isinstance(files, dict) and isinstance(levels, list) and levels
            and all(isinstance(m, dict) and {"sha256", "bytes"} <= m.keys() for m in files.values())
            and all(isinstance(e, dict) and {"level", "file", "n_cells", "temperature"} <= e.keys()
                    for e in levels)):
        raise FormatError(f"{path}: malformed 'files' or 'levels' entries")
    names = [*files, *(e["file"] for e in levels)]
    if not all(isinstance(n, str) and n and n == Path(n).name and n not in (".", "..") for n in names):
        raise FormatError(f"{path}: file names must be plain names inside the index folder")
    if sorted(e["level"] for e in levels) != list(range(1, len(levels) + 1)):
        raise FormatError(f"{path}: levels {[e['level'] for e in levels]} are not 1..{len(levels)}")
    from geosurge_index.gallery.store import manifest_galleries

    manifest_galleries(manifest, str(path))  # FormatError when an entry is malformed or newer
    return manifest


def reader_files(manifest: dict, *, encoder: bool = True, galleries: Sequence[str] | None = None) -> list[str]:
    """The files a reader of the index opens: every level file and cells.duckdb, the encoder's
    when the manifest lists an encoder and `encoder` (a command that encodes images), and the
    files of the galleries named (None: every gallery of the manifest)."""
    from geosurge_index.gallery.store import manifest_galleries

    names = [e["file"] for e in sorted(manifest["levels"], key=lambda e: e["level"])] + [CELLS_DB]
    names += [CALIBRATION_FILE] if CALIBRATION_FILE in manifest["files"] else []  # read when listed
    names += list(ENCODER_FILES) if encoder and manifest.get("encoder") else []
    for g in manifest_galleries(manifest):
        if galleries is None or g.name in galleries:
            names += list(g.files)
    return names


def update_manifest(index_dir: str | os.PathLike, change: Callable[[dict], dict]) -> dict:
    """Rewrite manifest.json as change(manifest) in one atomic replace (fsynced): readers see the
    old manifest or the new one, never a mix. Used by `geosurge gallery` (galleries are added to
    and removed from an exported index); the caller holds the gallery lock."""
    d = Path(index_dir)
    manifest = change(read_manifest(d))
    manifest["modified_utc"] = datetime.now(UTC).isoformat(timespec="seconds")
    tmp = d / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / MANIFEST)
    read_manifest(d)  # the new manifest reads back
    return manifest


def file_entry(index_dir: Path, name: str) -> dict:
    """{sha256, bytes} of INDEX_DIR/name, as manifest.json lists files."""
    path = Path(index_dir) / name
    return {"sha256": _sha256(path), "bytes": path.stat().st_size}


def add_listed_file(index_dir: str | os.PathLike, name: str, entry: dict | None = None) -> dict:
    """List INDEX_DIR/name (already written) in the manifest with its sha256 and size, and set the
    manifest's `entry` keys (e.g. {"calibration": summary}), in one atomic manifest rewrite
    (`update_manifest`). Returns the new manifest."""
    d = Path(index_dir)
    if name != Path(name).name or not (d / name).is_file():
        raise UserError(f"{d}: {name} is not a file inside the index folder")

    def change(manifest: dict) -> dict:
        manifest["files"][name] = file_entry(d, name)
        manifest.update(entry or {})
        return manifest

    return update_manifest(d, change)


SEARCH_DEFAULTS_KEY = "search_defaults"  # manifest: the index's own default search settings


def set_search_defaults(index_dir: str | os.PathLike, *, beam: int | str | None = None,
                        refine_cells: int | None = None) -> dict:
    """Record the index's default search settings in its manifest (`search_defaults`: what a
    search, `geosurge locate`, the `Locator` and the service use when the caller gives none):
    `beam` (one value or one per level, as --beam) and `refine_cells` (the best finest cells whose
    gallery references are searched). An index built for another search (e.g. an imported GeoCLIP
    index, whose answers equal GeoCLIP's only when far more cells are searched) says so here.
    None leaves a setting as it is. Returns the new manifest."""
    from geosurge_index.search import parse_beam

    d = Path(index_dir)
    values: dict = {}
    if beam is not None:
        parse_beam(beam, len(read_manifest(d)["levels"]))  # refused here, not at the first query
        values["beam"] = beam
    if refine_cells is not None:
        if int(refine_cells) < 0:
            raise UserError(f"refine_cells {refine_cells}: must be >= 0")
        values["refine_cells"] = int(refine_cells)

    def change(manifest: dict) -> dict:
        manifest[SEARCH_DEFAULTS_KEY] = {**manifest.get(SEARCH_DEFAULTS_KEY, {}), **values}
        return manifest

    from geosurge_index.gallery.store import gallery_lock

    with gallery_lock(d):
        return update_manifest(d, change)


def verify_index(index_dir: str | os.PathLike, *, checksums: bool = True,
                 files: Sequence[str] | None = None) -> dict:
    """Check the manifest and the files it lists (presence, size, and sha256 unless
    checksums=False). files: only these (what the calling command reads; each must be covered
    by the manifest), default every listed file. Returns the manifest."""
    d = Path(index_dir)
    manifest = read_manifest(d)
    listed = manifest["files"]
    # every file the reader opens must be covered by a checksum
    needed = reader_files(manifest) if files is None else list(files)
    uncovered = [name for name in needed if name not in listed]
    if uncovered:
        raise FormatError(f"{d}: {', '.join(uncovered)} not covered by the manifest's checksums")
    for name in (listed if files is None else needed):
        check_file(d, name, listed[name], checksums=checksums)
    return manifest


def check_file(index_dir: Path, name: str, meta: dict, *, checksums: bool = True) -> None:
    """One listed file: present, of the manifest's size, and (checksums) of its sha256."""
    path = index_dir / name
    if not path.is_file():
        raise FormatError(f"{index_dir}: {name} is missing (listed in {MANIFEST})")
    if path.stat().st_size != meta["bytes"]:
        raise FormatError(f"{index_dir}: {name} has {path.stat().st_size} bytes, the manifest says "
                          f"{meta['bytes']}: truncated or replaced")
    if checksums and _sha256(path) != meta["sha256"]:
        raise FormatError(f"{index_dir}: {name} does not match its sha256 in {MANIFEST}: corrupted or replaced")


# --- structural checks (what a skipped checksum would miss) ---------------------------------------

UNIT_NORM_TOLERANCE = 1e-3  # |norm - 1| of a stored row; export writes float32 unit rows (error ~1e-6)
_NORM_CHUNK = 65536  # rows whose norms are computed at a time (bounds the temporary)


def check_unit_rows(vectors: np.ndarray, where: str | os.PathLike) -> None:
    """FormatError naming `where` unless every row of `vectors` (n, d) has a norm within
    UNIT_NORM_TOLERANCE of 1 (finite). A flipped exponent or sign byte in a level file breaks
    this; a flip in the low mantissa bits moves a cosine by less than the tolerance."""
    for a in range(0, vectors.shape[0], _NORM_CHUNK):
        chunk = vectors[a:a + _NORM_CHUNK]
        with np.errstate(over="ignore", invalid="ignore"):
            # float32 sums: rounding error ~1e-6 at d = 768, far below the tolerance, 3x faster
            norms = np.sqrt(np.einsum("ij,ij->i", chunk, chunk))
        bad = ~(np.abs(norms - 1.0) <= UNIT_NORM_TOLERANCE)  # NaN counts as bad
        if bad.any():
            rows = np.flatnonzero(bad)
            raise FormatError(f"{where}: {rows.size} vector(s) are not unit-norm (row {a + int(rows[0])}: "
                              f"norm {norms[rows[0]]:.6g}): corrupted")


def read_level(path: Path, entry: dict, dim: int, n_tree: int):
    """One level file as a FAISS IndexFlat, checked: readable, flat, entry['n_cells'] x dim
    vectors matching the cells table's n_tree cells, and unit-norm rows."""
    import faiss

    try:
        index = faiss.read_index(str(path))
    except RuntimeError as err:
        raise FormatError(f"{path}: FAISS cannot read it: {str(err).splitlines()[0]}") from err
    if index.d != dim or index.ntotal != entry["n_cells"] or index.ntotal != n_tree:
        raise FormatError(f"{path}: {index.ntotal} x {index.d} vectors, the manifest says "
                          f"{entry['n_cells']} x {dim} and the cells table {n_tree} cells")
    if not isinstance(index, faiss.IndexFlat):
        raise FormatError(f"{path}: expected a flat inner-product index, got {type(index).__name__}")
    check_unit_rows(_flat_view(index), path)
    return index


def read_checked_tree(index_dir: str | os.PathLike, manifest: dict) -> CellTree:
    """The cell tree of cells.duckdb, checked against the manifest: the `levels` table's cell
    counts are the manifest's, and the `cells` table is a tree of those counts (IndexCells.tree:
    cell_index dense per level, parents in range)."""
    entries = sorted(manifest["levels"], key=lambda e: e["level"])
    with IndexCells.open(index_dir) as cells:
        table_sizes = cells.level_sizes()
        want = [int(e["n_cells"]) for e in entries]
        if table_sizes != want:
            raise FormatError(f"{cells.path}: the levels table counts {table_sizes} cells per level, "
                              f"the manifest {want}")
        return cells.tree(len(entries))  # FormatError naming cells.duckdb when it is damaged


# --- the cells database ---------------------------------------------------------------------------

PLACE_COLUMNS = ("country_code", "country_name", "admin1", "town")  # place names of a cell's mean point
_TREE_COLUMNS = ("level", "parent_index", "mean_lat", "mean_lon", "s2_token")


class IndexCells:
    """The one reader of INDEX_DIR/cells.duckdb (read-only): the tree, a level's place names, one
    cell, the whole table. `IndexCells.open(index_dir)`; close it, or use it as a context manager.

    Thread-safe: every call queries through its own DuckDB cursor (cursors are not shared
    between threads), taken under a lock. A damaged file (not a DuckDB database, tables or
    columns missing) raises FormatError naming it. `sql.connect` attaches the file itself:
    its SQL surface needs the tables inside its own session.
    """

    def __init__(self, path: Path, con):
        self.path = path
        self._con = con
        self._lock = threading.Lock()
        self.columns: tuple[str, ...] = ()  # the `cells` table's columns, set by `open`

    @classmethod
    def open(cls, index_dir: str | os.PathLike) -> IndexCells:
        import duckdb

        path = index_file(index_dir, CELLS_DB)
        try:
            con = duckdb.connect(str(path), read_only=True)
        except duckdb.Error as err:
            raise FormatError(f"{path}: cannot open as a DuckDB database: {_first_line(err)}") from None
        cells = cls(path, con)
        try:
            tables = {r[0] for r in cells._fetch("SELECT table_name FROM duckdb_tables()")}
            for name in ("cells", "levels"):
                if name not in tables:
                    raise FormatError(f"{path} has no table `{name}`: not an index written by `geosurge export`")
            cells.columns = tuple(r[0] for r in cells._fetch("DESCRIBE cells"))
        except BaseException:
            cells.close()
            raise
        return cells

    def __enter__(self) -> IndexCells:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            con, self._con = self._con, None
        if con is not None:
            con.close()

    @contextlib.contextmanager
    def _cursor(self):
        import duckdb

        with self._lock:
            if self._con is None:
                raise ValueError(f"{self.path}: IndexCells is closed")
            cur = self._con.cursor()
        try:
            yield cur
        except duckdb.Error as err:
            raise FormatError(f"{self.path}: cannot read the cells database: {_first_line(err)}") from None
        finally:
            cur.close()

    def _fetch(self, query: str, params=None) -> list[tuple]:
        with self._cursor() as cur:
            return cur.execute(query, params).fetchall()

    def _arrow(self, query: str, params=None) -> pa.Table:
        with self._cursor() as cur:  # sql(), not execute(): Arrow straight from the relation, no copy
            return cur.sql(query, params=params).to_arrow_table()

    def table(self, level: int | None = None) -> pa.Table:
        """Every column of the `cells` table (one level, or all), in (level, cell_index) order."""
        where = "" if level is None else "WHERE level = ? "
        return self._arrow(f"SELECT * FROM cells {where}ORDER BY level, cell_index",
                           None if level is None else [level])

    def level_table(self) -> pa.Table:
        """The `levels` table: level, tau_max, n_cells, temperature, in level order."""
        return self._arrow("SELECT * FROM levels ORDER BY level")

    def level_sizes(self) -> list[int]:
        """n_cells of each level, from the `levels` table, in level order."""
        return [int(r[1]) for r in self._fetch("SELECT level, n_cells FROM levels ORDER BY level")]

    def tree(self, levels: int | None = None) -> CellTree:
        """The engine's numpy tree of levels 1..`levels` (default: every level of `levels`),
        checked: the levels table's cell counts, cell_index dense 0..n-1 within each level,
        parents in range (FormatError naming cells.duckdb)."""
        t = self._arrow(f"SELECT cell_index, {', '.join(_TREE_COLUMNS)} FROM cells ORDER BY level, cell_index")
        sizes_table = self.level_sizes()
        if levels is None:
            levels = len(sizes_table)
        level = t["level"].to_numpy()
        bounds = np.searchsorted(level, np.arange(1, levels + 2))
        sizes = np.diff(bounds).tolist()
        if level.size and level.min() < 1:
            raise FormatError(f"{self.path}: the cells table has rows at level {int(level.min())}")
        if sizes != sizes_table[:levels]:
            raise FormatError(f"{self.path}: the cells table has {sizes} cells in levels 1..{levels}, "
                              f"the levels table says {sizes_table[:levels]}")
        idx = t["cell_index"].to_numpy()[:bounds[-1]]
        # sorted by (level, cell_index): dense iff each level's run is 0..n-1
        dense = np.arange(bounds[-1]) - np.repeat(bounds[:-1], sizes)
        if not np.array_equal(idx, dense):
            raise FormatError(f"{self.path}: cell_index is not dense 0..n-1 within each level")
        parent = t["parent_index"].fill_null(-1).to_numpy()
        lat = t["mean_lat"].to_numpy(zero_copy_only=False)
        lon = t["mean_lon"].to_numpy(zero_copy_only=False)
        tok = t["s2_token"].combine_chunks()
        sl = [slice(bounds[i], bounds[i + 1]) for i in range(levels)]
        try:
            return CellTree.from_parents([parent[s] for s in sl], [lat[s] for s in sl],
                                         [lon[s] for s in sl], [tok[s.start:s.stop] for s in sl])
        except (ValueError, UserError) as err:
            raise FormatError(f"{self.path}: the cells table is not a tree of {levels} levels: {err}") from None

    def places(self, level: int) -> dict[str, list]:
        """The PLACE_COLUMNS of one level's cells in cell_index order (None everywhere for a
        column the index lacks: an export with place_names=False)."""
        cols = [c if c in self.columns else f"NULL::VARCHAR AS {c}" for c in PLACE_COLUMNS]
        t = self._arrow(f"SELECT {', '.join(cols)} FROM cells WHERE level = ? ORDER BY cell_index", [level])
        return {c: t.column(c).to_pylist() for c in PLACE_COLUMNS}

    def cell(self, level: int, cell_index: int) -> dict | None:
        """One cell's row as JSON-ready values (NaN -> None, other types -> str); None if absent."""
        with self._cursor() as cur:
            rel = cur.execute("SELECT * FROM cells WHERE level = ? AND cell_index = ?", [level, cell_index])
            row = rel.fetchone()
            if row is None:
                return None
            names = [d[0] for d in rel.description]
        return {k: _jsonable(v) for k, v in zip(names, row, strict=True)}

    def partition(self):
        """The cells as a `cells.CellsTable` (for `cells.assign_points`), checked by
        `cells.cells_from_arrow` as `cells.read_cells` checks a CELLS_DIR."""
        from geosurge_index.cells import cells_from_arrow

        tau_max = self.level_table()["tau_max"].to_pylist()
        # the index keeps tau_max per level; the other partition settings do not matter to a reader
        meta = {"tau_min": 0, "tau_max": [t or 0 for t in tau_max], "max_s2_level": 30, "source": str(self.path)}
        return cells_from_arrow(self.table(), meta, where=f"{self.path} (table cells)")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


def read_tree(index_dir: str | os.PathLike, levels: int) -> CellTree:
    """The `cells` table as the engine's numpy tree (`IndexCells.tree`)."""
    with IndexCells.open(index_dir) as cells:
        return cells.tree(levels)


def resolve_backend(backend: str, device: str) -> str:
    if backend == "auto":
        return "faiss" if device == "cpu" or _faiss_gpus() > 0 else "torch"
    if backend not in ("torch", "faiss"):
        raise UserError(f"backend {backend!r}: expected auto, torch or faiss")
    return backend


def _faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _flat_view(index) -> np.ndarray:
    """(ntotal, d) float32 numpy view of an IndexFlat's storage (no copy; keep `index` alive)."""
    import faiss

    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


class _FaissLevel1:
    """Full level-1 cosines through a FAISS index moved to the GPU (index_cpu_to_gpu). Only for
    a level within FAISS GPU's k limit (`fits`): a larger one is scored by torch on the GPU,
    not by a CPU FAISS search returning every cell (a full sort per query)."""

    GPU_MAX_K = 2048  # FAISS GPU k-selection limit

    @classmethod
    def fits(cls, n_cells: int, device: str) -> bool:
        return device.startswith("cuda") and _faiss_gpus() > 0 and n_cells <= cls.GPU_MAX_K

    def __init__(self, index, device: str):
        import faiss

        self.n = index.ntotal
        self.index = index
        self.gpu_resources = None
        if self.fits(self.n, device):
            self.gpu_resources = faiss.StandardGpuResources()
            dev = int(device.split(":")[1]) if ":" in device else 0
            self.index = faiss.index_cpu_to_gpu(self.gpu_resources, dev, index)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        dist, ids = self.index.search(np.ascontiguousarray(x, dtype=np.float32), self.n)
        out = np.empty((x.shape[0], self.n), dtype=np.float32)
        np.put_along_axis(out, ids, dist, axis=1)
        return out


class GeoIndex:
    """An opened INDEX_DIR: the cell tree and the search engine over the level embeddings.

    Where the work runs (`device`, `backend`):
    - device "auto": CUDA when torch sees a GPU, else CPU. On CPU the engine's tensors are
      zero-copy views of the FAISS storage (one copy of the embeddings in memory); on CUDA the
      tables are copied to the GPU once and the host copies are released.
    - backend "faiss": on CPU, the children of the kept cells are scored by FAISS's
      fvec_inner_products_by_idx reading the index storage in place (about 10x faster than a
      gather + bmm; a FAISS search restricted by an IDSelector is slower than a full search);
      on CUDA, level 1 (scored in full) goes through its FAISS index moved to the GPU with
      index_cpu_to_gpu when FAISS has GPU support and level 1 has at most 2048 cells (FAISS
      GPU's k limit; else a torch GEMM on the GPU), and the children are gathered and scored in
      torch on the GPU. backend "torch": everything in torch on `device` (the GPU code path,
      also runnable on CPU). "auto": faiss on CPU; on CUDA faiss when FAISS has a GPU, else torch.
      The exhaustive mode needs every score, which FAISS's top-k API does not give: it is a
      torch GEMM per level on every backend.
    """

    def __init__(self, tree: CellTree, engine: SearchEngine, manifest: dict | None = None,
                 directory: Path | None = None, backend: str = "torch", keep_alive=()):
        self.tree = tree
        self.engine = engine
        self.manifest = manifest or {}
        self.dir = directory
        self.backend = backend
        self._keep_alive = list(keep_alive)  # FAISS indexes whose storage the tensors view
        self._init_galleries()

    @property
    def levels(self) -> int:
        return self.tree.levels

    @property
    def dim(self) -> int:
        return self.engine.dim

    @property
    def device(self) -> str:
        return str(self.engine.device)

    @property
    def temperatures(self) -> np.ndarray:
        return self.engine.temperatures

    @property
    def has_encoder(self) -> bool:
        return bool(self.manifest.get("encoder"))

    @property
    def search_defaults(self) -> dict:
        """The manifest's `search_defaults` (`set_search_defaults`): {} for most indexes."""
        return dict(self.manifest.get(SEARCH_DEFAULTS_KEY) or {})

    # -- galleries (geosurge_index.gallery) -------------------------------------------------------

    def _init_galleries(self) -> None:
        from geosurge_index.gallery.refine import RefineSettings
        from geosurge_index.gallery.store import manifest_galleries

        self.gallery_entries = {g.name: g for g in manifest_galleries(self.manifest)} if self.manifest else {}
        self._galleries: dict[str, object] = {}  # name -> gallery.store.Gallery, read on first use
        self._gallery_lock = threading.Lock()
        self.selected_galleries: tuple[str, ...] = tuple(self.gallery_entries)
        cells = self.search_defaults.get("refine_cells", RefineSettings.cells)  # the index's own default
        self.refine_settings = RefineSettings(cells=int(cells))

    def use_galleries(self, names: Sequence[str] | str | None = None, settings=None) -> None:
        """Which galleries refine the answers (None or "all": every gallery of the index; "none"
        or []: none; else names, comma-separated or a list; an unknown name is a UserError) and
        how (`gallery.RefineSettings`; None keeps the current)."""
        if isinstance(names, str):
            names = None if names.strip().lower() == "all" else \
                [] if names.strip().lower() == "none" else [n for n in names.replace(" ", "").split(",") if n]
        if names is None:
            names = list(self.gallery_entries)
        unknown = [n for n in names if n not in self.gallery_entries]
        if unknown:
            have = ", ".join(self.gallery_entries) or "none"
            raise UserError(f"gallery {', '.join(unknown)} is not in {self.dir or 'the index'} (galleries: {have})")
        self.selected_galleries = tuple(dict.fromkeys(names))
        if settings is not None:
            self.refine_settings = settings
        if self.refine_settings.cells > 0:
            self.galleries()  # read now, not in the first query's time

    def add_gallery(self, gallery) -> None:
        """An in-memory gallery (tests, benchmarks): a `gallery.store.Gallery`, selected."""
        self.gallery_entries[gallery.name] = gallery.entry
        self._galleries[gallery.name] = gallery
        self.selected_galleries = (*self.selected_galleries, gallery.name)

    def galleries(self, names: Sequence[str] | None = None) -> list:
        """The opened galleries (default: the selected ones), read from INDEX_DIR on first use."""
        from geosurge_index.gallery.store import Gallery

        out = []
        with self._gallery_lock:
            for name in (self.selected_galleries if names is None else names):
                if name not in self._galleries:
                    self._galleries[name] = Gallery.read(self.dir, self.gallery_entries[name],
                                                         self.tree.sizes[-1], self.dim)
                out.append(self._galleries[name])
        return out

    @classmethod
    def open(cls, index_dir: str | os.PathLike, device: str = "auto", *, backend: str = "auto",
             verify: bool = True, encoder: bool = True) -> GeoIndex:
        """Open INDEX_DIR. verify=False skips the sha256 pass, worth it for multi-GB indexes
        opened often: presence and sizes are always checked, and so is the structure (unit-norm
        vectors, counts of the manifest, cells table and FAISS files agreeing, cell_index dense,
        parents in range), which catches most damage a skipped checksum would miss.
        encoder=False: the caller never reads the encoder files (`search` over stored
        embeddings), so they are neither required nor checked."""
        import torch

        d = Path(index_dir)
        manifest = verify_index(d, checksums=verify, files=reader_files(read_manifest(d), encoder=encoder))
        device = str(resolve_device(device))
        backend = resolve_backend(backend, device)
        entries = sorted(manifest["levels"], key=lambda e: e["level"])
        dim = int(manifest["dim"])
        temps = np.array([e["temperature"] for e in entries], dtype=np.float64)
        tree = read_checked_tree(d, manifest)
        vectors, keep, level1 = [], [], None
        for e in entries:
            index = read_level(d / e["file"], e, dim, tree.sizes[e["level"] - 1])
            view = torch.from_numpy(_flat_view(index))
            if device == "cpu":
                vectors.append(view)
                keep.append(index)
            else:
                vectors.append(view.to(device))
            if e["level"] == 1 and backend == "faiss" and _FaissLevel1.fits(index.ntotal, device):
                level1 = _FaissLevel1(index, device)
            del view, index
        engine = SearchEngine(tree, vectors, temps, device=device, level1_scorer=level1,
                              faiss_kernels=backend == "faiss" and device == "cpu")
        return cls(tree, engine, manifest, d, backend, keep)

    @classmethod
    def from_arrays(cls, tables: Sequence[np.ndarray], temperatures, tree: CellTree, *,
                    device: str = "cpu", backend: str = "auto") -> GeoIndex:
        """An in-memory index (tests, benchmarks): tables are normalised (float32 copies unless
        already float32 with unit rows, in which case they are used as they are)."""
        import faiss
        import torch

        device = str(resolve_device(device))
        backend = resolve_backend(backend, device)
        vectors = []
        for t in tables:
            a = np.asarray(t, dtype=np.float32)
            norms = np.linalg.norm(a, axis=1)
            if not np.allclose(norms, 1.0, atol=1e-4):
                a = a / norms[:, None]
            vectors.append(torch.from_numpy(np.ascontiguousarray(a)).to(device))
        level1 = None
        if backend == "faiss" and _FaissLevel1.fits(vectors[0].shape[0], device):
            index = faiss.IndexFlatIP(vectors[0].shape[1])
            index.add(vectors[0].cpu().numpy())
            level1 = _FaissLevel1(index, device)
        engine = SearchEngine(tree, vectors, temperatures, device=device, level1_scorer=level1,
                              faiss_kernels=backend == "faiss" and device == "cpu")
        return cls(tree, engine, None, None, backend)

    def search(self, emb, top_k: int = 5, beam: int | Sequence[int] | str | None = None,
               exhaustive: bool = False, batch_size: int = 1024) -> SearchResult:
        """Search visual embeddings (n, d). beam: cells kept per level 1..L-1 (one value or one
        per level; default None: DEFAULT_BEAM = 512,256,128,64,32,16 cut to the tree's depth). exhaustive=True scores every cell
        of every level: exact probabilities; beam probabilities are normalised over the explored
        finest candidates. See geosurge_index.search. When galleries are selected (every gallery
        of the index by default; `use_galleries`), the point is refined by the references inside
        the best cells (`gallery.refine`) and `result.refinement` says how."""
        if beam is None:  # the index's own default (`set_search_defaults`), else the engine's
            beam = self.search_defaults.get("beam")
        settings = self.refine_settings
        if not self.selected_galleries or settings.cells == 0:
            return self.engine.search(emb, top_k=top_k, beam=beam, exhaustive=exhaustive,
                                      batch_size=batch_size)
        from geosurge_index.gallery.refine import refine

        # the references of the best `settings.cells` cells are searched: the engine returns at
        # least that many (probabilities do not depend on k)
        result = self.engine.search(emb, top_k=max(top_k, settings.cells), beam=beam,
                                    exhaustive=exhaustive, batch_size=batch_size)
        return refine(result, emb, self.galleries(), settings).head(top_k)

    def to_arrow(self, result: SearchResult | None, ids, paths=None, errors=None,
                 embeddings=None, confidence=None) -> pa.Table:
        """Prediction rows in the PRED_DIR schema: see search.result_to_arrow."""
        return result_to_arrow(result, self.tree, ids, paths, errors, embeddings, confidence=confidence)
