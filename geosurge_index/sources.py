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

import glob
import hashlib
import os
import stat
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from geosurge_index.errors import UserError
from geosurge_index.images import ImageDecodeError, class_map_path

# The one list of each kind of input, for every reader (`input_kind` decides what a path is).
# HEIC/HEIF/AVIF are inputs whether or not this install decodes them (`pillow-heif`, the `heif`
# extra): a folder scan does not change with the plugins, and without one each such file is an
# `unsupported_format` error row that says how to get it, never a silent skip.
HEIF_SUFFIXES = (".heic", ".heif", ".avif")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", *HEIF_SUFFIXES)
MANIFEST_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq", ".csv.gz", ".tsv.gz")
TAR_SUFFIXES = (".tar",)
COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.zst", ".tar.bz2", ".tar.xz")
CLASS_MAP_SUFFIX = ".classmap.png"
# WebDataset sample members that carry the image, in order of preference.
TAR_IMAGE_EXTS = ("jpg", "jpeg", "webp", "png")
TAR_CLASS_MAP_EXT = "classmap.png"
# The most bytes one input may have (a file, or a tar member): a generous cap (a 100-MP JPEG is
# ~50 MB, a 100-MP 16-bit PNG ~600 MB uncompressed but far less on disk) that keeps a huge file,
# or a link to /dev/zero, from being read into memory. `BulkSettings.max_image_bytes`.
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
_READ_BLOCK = 1 << 20

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


@dataclass
class Inputs:
    """The enumerated inputs of a run: the input table, what a scan skipped (reason -> count:
    hidden files, class maps, other extensions, tar links/directories/devices, second images
    under one tar key), and the fingerprint (`fingerprint` of the table with every file path
    made canonical, so that `in`, `./in` and `/abs/in` are the same inputs)."""

    table: pa.Table
    skipped: Counter = field(default_factory=Counter)
    fingerprint: str = ""
    legacy_fingerprint: str = ""  # `fingerprint` of the table as spelled (runs before this version)


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
    if name.endswith(MANIFEST_SUFFIXES + TAR_SUFFIXES) and not _is_regular(p):
        # a FIFO would block the reader forever, /dev/zero would never end
        raise UserError(f"input {source} is not a regular file (a FIFO, device or socket)")
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


def _is_regular(path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


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


def _skip_reason(name: str) -> str:
    """Why a folder scan does not take file `name` (the key it is counted under)."""
    low = name.lower()
    if name.startswith("."):
        return "hidden"
    if low.endswith(CLASS_MAP_SUFFIX):
        return "class_map"
    ext = os.path.splitext(low)[1]
    return f"extension:{ext}" if ext else "no_extension"


def read_folder(folder: str | os.PathLike, skipped: Counter | None = None) -> pa.Table:
    """Every JPEG/PNG/WebP/HEIC/AVIF file under `folder` (recursive, sorted, hidden files and
    folders and class maps skipped). id = path = the file's path as reached from `folder`.
    `skipped`, when given, counts the files not taken by reason (`_skip_reason`; a hidden folder
    counts once as `hidden_folder`)."""
    root = os.fspath(folder)
    paths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=None):
        if skipped is not None:
            skipped.update("hidden_folder" for d in dirnames if d.startswith("."))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if _is_image_name(f):
                paths.append(os.path.join(dirpath, f))
            elif skipped is not None:
                skipped[_skip_reason(f)] += 1
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


def read_tar(path: str | os.PathLike, skipped: Counter | None = None) -> pa.Table:
    """One WebDataset shard: a row per sample (members grouped by key = name up to the first dot
    of the basename) that holds an image. id = the key; path = '<shard>::<member>'.

    A damaged shard is read as far as it goes: when its members stop before the tar's
    end-of-archive marker (cut inside a header, a bad header, or cut exactly at a member
    boundary), one more row, id '<shard>#truncated' with offset = where the readable part ends
    and size -1, stands for what was lost (`read_bytes` makes it a `truncated` error row). A
    shard that is not a tar at all is a UserError. `skipped` counts link, directory and device
    members, and a second image under one key (the first of `TAR_IMAGE_EXTS` is used)."""
    path = os.fspath(path)
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    order: list[str] = []
    counts = Counter() if skipped is None else skipped
    cut_at = -1
    try:
        tar = tarfile.open(path, "r:")
    except tarfile.ReadError:  # not even a first header: the whole shard is lost (e.g. cut to 0 bytes)
        counts["tar_truncated"] += 1
        return _table([f"{path}#truncated"], [path], [path], [0], [-1])
    except (tarfile.TarError, OSError) as err:
        raise UserError(f"WebDataset shard {path} cannot be read as an uncompressed tar: {err}") from err
    try:
        with tar:
            while True:
                try:
                    m = tar.next()
                except tarfile.ReadError:  # a member's data is cut: keep what came before
                    cut_at = min(tar.offset, os.path.getsize(path))
                    break
                if m is None:
                    cut_at = _missing_end_marker(path, tar.offset)
                    break
                if not m.isfile():
                    kind = ("tar_directory" if m.isdir() else "tar_link" if m.issym() or m.islnk()
                            else "tar_special")  # devices, FIFOs
                    counts[kind] += 1
                    continue
                d, _, base = m.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                key = f"{d}/{stem}" if d else stem
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                ext = ext.lower()
                if ext in TAR_IMAGE_EXTS and any(e in samples[key] for e in TAR_IMAGE_EXTS):
                    counts["tar_second_image"] += 1
                    if ext in samples[key]:
                        continue  # the same name twice: the first stays
                samples[key][ext] = m
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
    if cut_at >= 0:  # the readable part ends here: one row stands for what was lost
        counts["tar_truncated"] += 1
        ids.append(f"{path}#truncated")
        paths.append(path)
        offs.append(cut_at)
        sizes.append(-1)
        cmo.append(-1)
        cms.append(-1)
    return _table(ids, paths, [path] * len(ids), offs, sizes, cmo, cms)


def _missing_end_marker(path: str, offset: int) -> int:
    """-1 when the tar's members end at its end-of-archive marker (a zero block at `offset`), else
    `offset`: the shard was cut there, exactly at a member boundary, and what followed is lost."""
    with open(path, "rb") as f:
        f.seek(offset)
        block = f.read(tarfile.BLOCKSIZE)
    return -1 if block and block.count(0) == len(block) else offset


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
    return collect_inputs(sources, columns).table


GLOB_CHARS = frozenset("*?[")


def expand_globs(sources: list[str | os.PathLike]) -> list[str]:
    """INPUT arguments with a glob pattern that names no file (`'photos/*.jpg'` quoted, or a
    shell that does not expand) replaced by its matches, sorted; a pattern matching nothing is a
    UserError. Other arguments are kept as given."""
    out: list[str] = []
    for src in sources:
        s = os.fspath(src)
        if GLOB_CHARS & set(s) and not os.path.lexists(s):
            matches = sorted(glob.glob(s, recursive=True))
            if not matches:
                raise UserError(f"input {s}: no file matches this pattern")
            out.extend(matches)
        else:
            out.append(s)
    return out


def collect_inputs(sources: list[str | os.PathLike], columns: ManifestColumns = ManifestColumns(),
                   spell_as: list[str] | None = None) -> Inputs:
    """All INPUT arguments -> `Inputs`: the table in argument order (duplicate ids: UserError),
    what the scans skipped, and the fingerprint.

    `spell_as` (one string per source): write ids and paths of folder, image and tar inputs as
    if the source had been spelled so (a resumed run keeps its first run's spelling: `in` then
    `/abs/in`); the `file` column stays as given, so that this process can read it. The
    fingerprint does not depend on the spelling: it hashes each folder's, image's and tar's
    files under the source's real path (`os.path.realpath`)."""
    if not sources:
        raise UserError("no inputs given")
    spell_as = [os.fspath(s) for s in sources] if spell_as is None else spell_as
    if len(spell_as) != len(sources):
        raise ValueError("spell_as needs one spelling per source")
    skipped: Counter = Counter()
    parts, canon = [], []
    for src, spelled in zip(sources, spell_as, strict=True):
        src = os.fspath(src)
        kind = input_kind(src)
        t = read_input(src, columns, skipped)
        if kind != "manifest":  # manifests hold resolved paths already
            if spelled != src:
                for name in ("id", "path") if kind != "tar" else ("path",):
                    i = INPUT_SCHEMA.get_field_index(name)
                    t = t.set_column(i, name, _respell(t.column(name), src, spelled))
            real = _respell(t.column("file"), src, os.path.realpath(src))
            canon.append(t.set_column(INPUT_SCHEMA.get_field_index("file"), "file", real))
        else:
            canon.append(t)
        parts.append(t)
    table = pa.concat_tables(parts).combine_chunks()
    check_unique_ids(table)
    return Inputs(table, skipped, fingerprint(pa.concat_tables(canon).combine_chunks()), fingerprint(table))


def _respell(arr, old: str, new: str) -> pa.Array:
    """Strings that begin with the source spelling `old` (the source itself, `old/...` or
    `old::member`) rewritten to begin with `new` instead."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    old_s = old.rstrip("/") or old  # "in/" and "in" give the same rows ("in/a.jpg")
    new_s = new.rstrip("/") or new
    if old_s == new_s:
        return arr
    tail = pc.utf8_slice_codeunits(arr, len(old_s))
    joined = pc.binary_join_element_wise(pa.scalar(new_s), tail, "")
    return pc.if_else(pc.starts_with(arr, old_s), joined, arr)


def read_input(source: str | os.PathLike, columns: ManifestColumns = ManifestColumns(),
               skipped: Counter | None = None) -> pa.Table:
    """One INPUT argument (any `input_kind`) -> its rows of the input table (`skipped`: what a
    folder or tar scan did not take, by reason)."""
    kind = input_kind(source)
    if kind == "folder":
        return read_folder(source, skipped)
    if kind == "image":
        return read_image(source)
    if kind == "manifest":
        return read_manifest(source, columns)
    return read_tar(source, skipped)


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


def read_bytes(file: str, offset: int, size: int, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of one input (a whole file or a tar byte range); ImageDecodeError if unreadable.

    Only regular files are read (`not_a_regular_file` otherwise: a FIFO would block forever, a
    link to /dev/zero would never end), checked on the path before opening it and on the open
    descriptor (opened non-blocking, so that a FIFO swapped in between cannot block either).
    Nothing beyond `max_bytes` is read: a larger input is `too_large`, refused on its size before
    a byte is read (one read of the checked size: no growing buffer); a file that grows or
    shrinks while it is read is `unreadable`.
    A tar row of size -1 (offset >= 0) stands for the lost end of a cut shard: `truncated`."""
    if offset >= 0 and size < 0:
        raise ImageDecodeError("truncated", f"{file}: the shard's readable members end at byte {offset} "
                               "(cut or damaged there): what followed is lost")
    try:
        if not stat.S_ISREG(os.stat(file).st_mode):
            raise ImageDecodeError("not_a_regular_file", f"{file} is not a regular file (a FIFO, device, "
                                   "socket or a link to one)")
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise ImageDecodeError("unreadable", f"{file}: {err.strerror or err}") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageDecodeError("not_a_regular_file", f"{file} is not a regular file")
        want = st.st_size if offset < 0 else size
        if want > max_bytes:
            raise ImageDecodeError("too_large", f"{file}{'' if offset < 0 else f' (member at byte {offset})'}: "
                                   f"{want} bytes exceeds the cap of {max_bytes} (--max-image-bytes)")
        if offset >= 0:
            os.lseek(fd, offset, os.SEEK_SET)
        data = _read_exactly(fd, want)
        grew = offset < 0 and os.read(fd, 1)
    except OSError as err:
        raise ImageDecodeError("unreadable", f"{file}: {err.strerror or err}") from err
    finally:
        os.close(fd)
    if grew:
        raise ImageDecodeError("unreadable", f"{file}: the file grew while it was read")
    if len(data) != want:
        if offset < 0:
            raise ImageDecodeError("unreadable", f"{file}: the file shrank while it was read")
        raise ImageDecodeError("truncated", f"{file}: shard ends inside the member at byte {offset}")
    return data


def _read_exactly(fd: int, n: int) -> bytes:
    """`n` bytes from `fd` (fewer at its end): one read of the checked size, which for a regular
    file is normally all of it (no second copy); short reads are completed in blocks."""
    data = os.read(fd, n) if n else b""
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        block = os.read(fd, min(_READ_BLOCK * 16, n - got))
        if not block:
            break
        parts.append(block)
        got += len(block)
    return b"".join(parts)


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
