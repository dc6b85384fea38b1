"""Input readers for bulk locate, `geosurge segment` and training: folders, single images,
manifests and WebDataset tar shards -> one input table.

Every input is enumerated, deterministically, into an Arrow table with one row per image
(`INPUT_SCHEMA`). A row says where the image's bytes are: a file (`offset` = -1), or a byte
range of an uncompressed tar shard (how img2dataset writes them), plus where its precomputed
class map is, if any. Rows are plain data, so decoding workers (DataLoader processes or Ray
tasks) need nothing but the row to read an image. The table's fingerprint identifies the
inputs of a run so that a resumed run can refuse different inputs.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from geosurge_index.errors import UserError
from geosurge_index.images import ImageDecodeError, class_map_path

# The one list of each kind of input, for every reader (`input_kind` decides what a path is).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MANIFEST_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq", ".csv.gz", ".tsv.gz")
TAR_SUFFIXES = (".tar",)
COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.zst", ".tar.bz2", ".tar.xz")
CLASS_MAP_SUFFIX = ".classmap.png"
# WebDataset sample members that carry the image, in order of preference.
TAR_IMAGE_EXTS = ("jpg", "jpeg", "webp", "png")
TAR_CLASS_MAP_EXT = "classmap.png"

INPUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # the prediction's id: manifest id, else the path, else the tar key
        ("path", pa.string()),  # where the image came from, as written to PRED_DIR
        ("file", pa.string()),  # the file to read: the image itself or its tar shard
        ("offset", pa.int64()),  # byte offset inside `file`; -1: the whole file is the image
        ("size", pa.int64()),  # byte count at `offset`; -1 for whole files
        ("cmap_offset", pa.int64()),  # tar class map's byte range; -1: none in the tar
        ("cmap_size", pa.int64()),  # (for files the map is looked up beside the image)
    ]
)


@dataclass(frozen=True)
class ManifestColumns:
    path: str = "path"
    id: str | None = None  # None: use "id" when the manifest has it, else the path


InputKind = Literal["folder", "image", "manifest", "tar"]


def input_kind(source: str | os.PathLike) -> InputKind:
    """What one input path is: 'folder', 'image' (.jpg/.jpeg/.png/.webp), 'manifest' (.csv, .tsv,
    .parquet, .pq, .csv.gz, .tsv.gz) or 'tar' (an uncompressed WebDataset shard). UserError when
    it does not exist or is none of them. Bulk locate, `geosurge segment` and training all ask
    this one function."""
    p = Path(source)
    if p.is_dir():
        return "folder"
    if not p.exists():
        raise UserError(f"input {source} does not exist")
    name = p.name.lower()
    if name.endswith(MANIFEST_SUFFIXES):
        return "manifest"
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    if name.endswith(CLASS_MAP_SUFFIX):
        raise UserError(f"input {source} is a class map (written by `geosurge segment`), not an image")
    if name.endswith(IMAGE_SUFFIXES):
        return "image"
    if name.endswith(COMPRESSED_TAR_SUFFIXES):
        raise UserError(
            f"input {source} is a compressed tar; shards are read by byte range, so they must be "
            "uncompressed .tar files (img2dataset's default)"
        )
    raise UserError(
        f"input {source} is neither a folder, an image (.jpg, .png, .webp), a manifest (.csv, .tsv, "
        ".parquet, also .csv.gz/.tsv.gz) nor a WebDataset shard (.tar)"
    )


def _table(ids, paths, files, offsets=None, sizes=None, cmo=None, cms=None) -> pa.Table:
    n = len(paths)
    neg = np.full(n, -1, dtype=np.int64)

    def col(v):
        return neg if v is None else np.asarray(v, dtype=np.int64)

    return pa.Table.from_arrays(
        [
            pa.array(ids, pa.string()),
            pa.array(paths, pa.string()),
            pa.array(files, pa.string()),
            pa.array(col(offsets)),
            pa.array(col(sizes)),
            pa.array(col(cmo)),
            pa.array(col(cms)),
        ],
        schema=INPUT_SCHEMA,
    )


def _is_image_name(name: str) -> bool:
    low = name.lower()
    return low.endswith(IMAGE_SUFFIXES) and not low.endswith(CLASS_MAP_SUFFIX) and not name.startswith(".")


def read_folder(folder: str | os.PathLike) -> pa.Table:
    """Every JPEG/PNG/WebP file under `folder` (recursive, sorted, hidden files and class maps
    skipped). id = path = the file's path as reached from `folder`."""
    root = os.fspath(folder)
    paths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=None):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        paths.extend(os.path.join(dirpath, f) for f in filenames if _is_image_name(f))
    paths.sort()
    return _table(paths, paths, paths)


def read_image(path: str | os.PathLike) -> pa.Table:
    """One image file given as an input: one row, id = path = the path as given."""
    p = os.fspath(path)
    return _table([p], [p], [p])


def read_manifest(path: str | os.PathLike, columns: ManifestColumns = ManifestColumns()) -> pa.Table:
    """A CSV/TSV/Parquet manifest (CSV and TSV may be gzipped): a path column (relative paths are relative to the manifest's
    folder) and an optional id column. Missing columns, empty paths or ids: UserError."""
    path = Path(path)
    low = path.name.lower()
    try:
        if low.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            _check_columns(path, names, columns)
            id_col = _id_column(names, columns)
            table = pq.read_table(path, columns=[c for c in (columns.path, id_col) if c])
        else:
            import pyarrow.csv as pacsv

            delim = "\t" if low.endswith((".tsv", ".tsv.gz")) else ","
            parse = pacsv.ParseOptions(delimiter=delim)
            # Read ids and paths as strings: ids like 000123 keep their zeros.
            conv = pacsv.ConvertOptions(
                column_types={columns.path: pa.string(), (columns.id or "id"): pa.string()},
                strings_can_be_null=True,
            )
            table = pacsv.read_csv(path, parse_options=parse, convert_options=conv)
            names = table.column_names
            _check_columns(path, names, columns)
            id_col = _id_column(names, columns)
    except UserError:
        raise
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"manifest {path} cannot be read: {err}") from err

    paths = table.column(columns.path)
    if pa.types.is_large_string(paths.type) or (
        pa.types.is_dictionary(paths.type) and pa.types.is_string(paths.type.value_type)
    ):  # polars' strings, pandas categoricals
        paths = paths.cast(pa.string())
    if paths.type != pa.string():
        raise UserError(f"manifest {path}: column '{columns.path}' holds {paths.type}, not paths")
    _check_no_nulls(path, columns.path, paths)
    paths = paths.combine_chunks()
    base = str(path.parent.resolve())
    absolute = pc.starts_with(paths, "/")
    joined = pc.binary_join_element_wise(pa.scalar(base), paths, "/")
    resolved = pc.if_else(absolute, paths, joined)
    if id_col:
        ids = table.column(id_col).cast(pa.string()).combine_chunks()
        _check_no_nulls(path, id_col, ids)
    else:
        ids = resolved
    n = len(resolved)
    neg = pa.array(np.full(n, -1, dtype=np.int64))
    return pa.Table.from_arrays([ids, resolved, resolved, neg, neg, neg, neg], schema=INPUT_SCHEMA)


def _check_columns(path: Path, names: list[str], columns: ManifestColumns) -> None:
    if columns.path not in names:
        raise UserError(
            f"manifest {path} has no '{columns.path}' column (columns: {', '.join(names)}); "
            "name the image path column with --path-column"
        )
    if columns.id and columns.id not in names:
        raise UserError(f"manifest {path} has no '{columns.id}' id column (columns: {', '.join(names)})")


def _id_column(names: list[str], columns: ManifestColumns) -> str | None:
    if columns.id:
        return columns.id
    return "id" if "id" in names and columns.path != "id" else None


def _check_no_nulls(path: Path, name: str, arr) -> None:
    bad = pc.fill_null(pc.equal(pc.utf8_length(arr), 0), True)
    n_bad = pc.sum(bad).as_py() or 0
    if n_bad:
        first = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
        raise UserError(f"manifest {path}: {n_bad} rows have an empty '{name}' (first: data row {first + 1})")


def read_tar(path: str | os.PathLike) -> pa.Table:
    """One WebDataset shard: a row per sample (members grouped by key = name up to the first dot
    of the basename) that holds an image. id = the key; path = '<shard>::<member>'."""
    path = os.fspath(path)
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                d, _, base = m.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                key = f"{d}/{stem}" if d else stem
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                samples[key][ext.lower()] = m
    except (tarfile.TarError, OSError) as err:
        raise UserError(f"WebDataset shard {path} cannot be read as an uncompressed tar: {err}") from err
    ids, paths, offs, sizes, cmo, cms = [], [], [], [], [], []
    for key in order:
        members = samples[key]
        img = next((members[e] for e in TAR_IMAGE_EXTS if e in members), None)
        if img is None:
            continue
        cmap = members.get(TAR_CLASS_MAP_EXT)
        ids.append(key)
        paths.append(f"{path}::{img.name}")
        offs.append(img.offset_data)
        sizes.append(img.size)
        cmo.append(cmap.offset_data if cmap else -1)
        cms.append(cmap.size if cmap else -1)
    return _table(ids, paths, [path] * len(ids), offs, sizes, cmo, cms)


def read_tar_coordinates(path: str | os.PathLike) -> pa.Table:
    """The `lat`/`lon` in each WebDataset sample's JSON member (`KEY.json`, as img2dataset and
    webdataset's TarWriter write them): a table id (the sample key, as `read_tar` gives it), lat,
    lon (float64, NaN where a sample's JSON lacks them). Keys are found in any case: lat or
    latitude, lon, lng, long or longitude, at the top level of the JSON object. Samples without
    a JSON member are left out. Unreadable shard: UserError."""
    import json

    from geosurge_index.coords import LAT_NAMES, LON_NAMES

    path = os.fspath(path)
    ids, lats, lons = [], [], []

    def number(obj: dict, names) -> float:
        low = {str(k).lower(): v for k, v in obj.items()}
        for name in names:
            v = low.get(name)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
            if isinstance(v, str):
                try:
                    return float(v)
                except ValueError:
                    return float("nan")
        return float("nan")

    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                d, _, base = m.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not (m.isfile() and dot and ext.lower() == "json"):
                    continue
                f = tar.extractfile(m)
                try:
                    obj = json.loads(f.read()) if f is not None else None
                except ValueError:
                    obj = None
                obj = obj if isinstance(obj, dict) else {}
                ids.append(f"{d}/{stem}" if d else stem)
                lats.append(number(obj, LAT_NAMES))
                lons.append(number(obj, LON_NAMES))
    except (tarfile.TarError, OSError) as err:
        raise UserError(f"WebDataset shard {path} cannot be read as an uncompressed tar: {err}") from err
    return pa.table({"id": pa.array(ids, pa.string()), "lat": pa.array(lats, pa.float64()),
                     "lon": pa.array(lons, pa.float64())})


def enumerate_inputs(
    sources: list[str | os.PathLike], columns: ManifestColumns = ManifestColumns()
) -> pa.Table:
    """All INPUT arguments -> one input table, in argument order. Duplicate ids: UserError."""
    if not sources:
        raise UserError("no inputs given")
    table = pa.concat_tables([read_input(src, columns) for src in sources]).combine_chunks()
    check_unique_ids(table)
    return table


def read_input(source: str | os.PathLike, columns: ManifestColumns = ManifestColumns()) -> pa.Table:
    """One INPUT argument (any `input_kind`) -> its rows of the input table."""
    kind = input_kind(source)
    if kind == "folder":
        return read_folder(source)
    if kind == "image":
        return read_image(source)
    if kind == "manifest":
        return read_manifest(source, columns)
    return read_tar(source)


def image_files(sources: list[str | os.PathLike], columns: ManifestColumns = ManifestColumns()) -> list[str]:
    """Image files named by INPUT arguments (folders, images, manifests), in input order, each once
    (for work done per file, such as writing class maps beside images). Tar shards: UserError."""
    if not sources:
        raise UserError("no inputs given")
    tables = []
    for src in sources:
        if input_kind(src) == "tar":
            raise UserError(f"input {src} is a WebDataset shard: class maps are written beside image files; "
                            "give the shard's samples a classmap.png member instead")
        tables.append(read_input(src, columns))
    return list(dict.fromkeys(pa.concat_tables(tables).column("file").to_pylist()))


def check_unique_ids(table: pa.Table) -> None:
    counts = pc.value_counts(table.column("id"))
    dup = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(dup):
        examples = ", ".join(repr(v) for v in dup.field("values")[:5].to_pylist())
        raise UserError(
            f"the inputs hold {len(dup)} duplicate ids (e.g. {examples}); every input needs its "
            "own id, since predictions are keyed by id"
        )


def fingerprint(table: pa.Table) -> str:
    """A hash of the ids, paths and byte ranges: equal iff a rerun would see the same inputs."""
    h = hashlib.sha256()
    h.update(str(table.num_rows).encode())
    for name in INPUT_SCHEMA.names:
        arr = table.column(name).combine_chunks()
        if pa.types.is_string(arr.type):  # hash logical content, never buffer padding
            offs = np.frombuffer(arr.buffers()[1], np.int32, len(arr) + 1, arr.offset * 4)
            h.update((offs - offs[0]).tobytes())
            h.update(memoryview(arr.buffers()[2])[offs[0] : offs[-1]])
        else:
            h.update(arr.to_numpy().tobytes())
    return h.hexdigest()


def read_bytes(file: str, offset: int, size: int) -> bytes:
    """The bytes of one input (a whole file or a tar byte range); ImageDecodeError if unreadable."""
    try:
        with open(file, "rb") as f:
            if offset < 0:
                return f.read()
            f.seek(offset)
            data = f.read(size)
    except OSError as err:
        raise ImageDecodeError("unreadable", f"{file}: {err.strerror or err}") from err
    if len(data) != size:
        raise ImageDecodeError("truncated", f"{file}: shard ends inside the member at byte {offset}")
    return data


def class_map_source(file: str, offset: int, cmap_offset: int, cmap_size: int):
    """Where this input's class map is: a path, tar bytes, or None when it has none."""
    if offset < 0:
        p = class_map_path(file)
        # os.path.isfile, not Path.is_file: a name too long for a ".classmap.png" sibling has none
        # (Path.is_file raises ENAMETOOLONG).
        return p if os.path.isfile(p) else None
    if cmap_offset < 0:
        return None
    return read_bytes(file, cmap_offset, cmap_size)
