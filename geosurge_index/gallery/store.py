"""Galleries on disk: geotagged references inside INDEX_DIR, organised by finest cell.

A gallery is two files beside the levels, both listed in manifest.json with their checksums:

    gallery-NAME.gN.faiss    a FAISS IndexIVF whose inverted lists ARE the finest cells (list c
                             holds the references inside finest cell c; FAISS id = row of the
                             sidecar). The coarse quantizer is never used: references are added
                             with their list given (`add_core`), queries search the lists of the
                             cells the coarse-to-fine engine picked (`search_preassigned`).
                             Storage: flat (IndexIVFFlat, float32), fp16 (IndexIVFScalarQuantizer
                             QT_fp16) or pq (IndexIVFPQ, by_residual off, codebooks trained on the
                             first references added).
    gallery-NAME.gN.parquet  one row per reference, row = FAISS id: id (string), lat, lon
                             (float64), cell (int32, finest cell_index), source (string).

N is a generation number: an append writes generation N+1 next to N, then the manifest switches
to it in one atomic replace, then N is deleted. Readers only open what the manifest lists, so a
`gallery add` killed at any moment leaves the index as it was (plus stray files, removed by the
next add). The manifest's `galleries` list carries one entry per gallery (`GalleryEntry`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geosurge_index.errors import FormatError, UserError

GALLERY_FORMAT = "geosurge-gallery"
GALLERY_FORMAT_VERSION = 1
STORAGES = ("flat", "fp16", "pq")
EMBEDDINGS = ("geo",)  # what references and queries are compared with: the model's visual embedding
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FILE_RE = re.compile(r"^gallery-(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]{0,63})\.g(?P<gen>\d+)\.(faiss|parquet)$")
LOCK_FILE = ".gallery.lock"
STAGING_DIR = ".staging"
META_SCHEMA = pa.schema([("id", pa.string()), ("lat", pa.float64()), ("lon", pa.float64()),
                         ("cell", pa.int32()), ("source", pa.string())])
_ADD_CHUNK = 65536


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or name.lower() in ("all", "none"):
        raise UserError(f"gallery name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a "
                        "letter or digit ('all' and 'none' are reserved)")
    return name


def file_names(name: str, generation: int) -> tuple[str, str]:
    return f"gallery-{name}.g{generation}.faiss", f"gallery-{name}.g{generation}.parquet"


@dataclass
class GalleryEntry:
    """One gallery as listed in manifest.json (`galleries`)."""

    name: str
    index_file: str
    meta_file: str
    generation: int
    n_refs: int
    storage: str
    dim: int
    embedding: str = "geo"
    pq_m: int | None = None
    n_cells: int = 0  # finest cells holding at least one reference
    rejected: dict[str, int] = field(default_factory=dict)  # error kind -> rows refused, over all additions
    additions: list[dict] = field(default_factory=list)  # {fingerprint, sources, n_added, created_utc}
    format: str = GALLERY_FORMAT
    format_version: int = GALLERY_FORMAT_VERSION

    @classmethod
    def from_json(cls, d: dict, where: str) -> GalleryEntry:
        from geosurge_index.formats import check_format

        check_format(d, f"{where} (gallery {d.get('name') if isinstance(d, dict) else d!r})",
                     GALLERY_FORMAT, GALLERY_FORMAT_VERSION)
        try:
            entry = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except TypeError as err:
            raise FormatError(f"{where}: malformed gallery entry {d.get('name')!r}: {err}") from None
        for f in (entry.index_file, entry.meta_file):
            if not (isinstance(f, str) and FILE_RE.match(f)):
                raise FormatError(f"{where}: gallery {entry.name!r} names a file {f!r} that is not a gallery file")
        if entry.storage not in STORAGES or entry.embedding not in EMBEDDINGS:
            raise FormatError(f"{where}: gallery {entry.name!r}: storage {entry.storage!r} / embedding "
                              f"{entry.embedding!r} unknown to this geosurge-index")
        return entry

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def files(self) -> tuple[str, str]:
        return self.index_file, self.meta_file


def manifest_galleries(manifest: dict, where: str = "manifest.json") -> list[GalleryEntry]:
    raw = manifest.get("galleries", [])
    if not isinstance(raw, list):
        raise FormatError(f"{where}: 'galleries' is not a list")
    entries = [GalleryEntry.from_json(d, where) for d in raw]
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise FormatError(f"{where}: a gallery name is listed twice: {names}")
    return entries


# --- building -----------------------------------------------------------------------------------


def new_ivf(n_lists: int, dim: int, storage: str, pq_m: int | None = None):
    """An empty IndexIVF (inner product) with one list per finest cell; its quantizer stays empty."""
    import faiss

    if storage not in STORAGES:
        raise UserError(f"storage {storage!r}: expected one of {', '.join(STORAGES)}")
    quantizer = faiss.IndexFlatIP(dim)
    if storage == "flat":
        index = faiss.IndexIVFFlat(quantizer, dim, n_lists, faiss.METRIC_INNER_PRODUCT)
    elif storage == "fp16":
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, n_lists, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT, False)
    else:
        m = pq_m or default_pq_m(dim)
        if dim % m:
            raise UserError(f"--pq-m {m} must divide the embedding width {dim}")
        index = faiss.IndexIVFPQ(quantizer, dim, n_lists, m, 8, faiss.METRIC_INNER_PRODUCT)
        index.by_residual = False  # residuals would need the (unused) quantizer's centroids
    index.own_fields = True
    quantizer.this.disown()
    if storage != "pq":
        index.is_trained = True
    return index


def default_pq_m(dim: int) -> int:
    """Sub-quantizers for PQ: dim/8 (8 bits each: 1 byte per 8 dimensions, 96 bytes at 768-d)."""
    for m in (dim // 8, dim // 4, dim // 2, dim):
        if m >= 1 and dim % m == 0:
            return m
    return dim


PQ_TRAIN_ROWS = 32768  # references the PQ codebooks are trained on (128 per centroid; the first ones added)


def add_to_ivf(index, emb: np.ndarray, cells: np.ndarray, first_id: int, progress: bool = False) -> None:
    """Add unit rows `emb` (n, d) to the lists `cells` (n,), FAISS ids first_id.. (the sidecar rows)."""
    import faiss

    from geosurge_index.progress import bar

    n = emb.shape[0]
    if not index.is_trained:  # PQ: codebooks from a sample of the first references
        if n < 256:
            raise UserError(f"pq storage needs at least 256 references to train its codebooks, got {n}; "
                            "use --storage flat or fp16 for a small gallery")
        sample = np.random.default_rng(0).permutation(n)[:PQ_TRAIN_ROWS]
        index.pq.train(np.ascontiguousarray(emb[np.sort(sample)], dtype=np.float32))
        index.is_trained = True
    steps = range(0, n, _ADD_CHUNK)
    for a in (bar(steps, desc="gallery add", unit="chunk") if progress and n > _ADD_CHUNK else steps):
        x = np.ascontiguousarray(emb[a:a + _ADD_CHUNK], dtype=np.float32)
        lists = np.ascontiguousarray(cells[a:a + _ADD_CHUNK], dtype=np.int64)
        ids = np.arange(first_id + a, first_id + a + x.shape[0], dtype=np.int64)
        index.add_core(x.shape[0], faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(lists))


def normalise_rows(emb: np.ndarray) -> np.ndarray:
    emb = np.asarray(emb, dtype=np.float32)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.where(norms > 0, norms, 1)


# --- loading ------------------------------------------------------------------------------------


class Gallery:
    """One opened gallery: its IVF index and the references' coordinates and ids."""

    def __init__(self, entry: GalleryEntry, index, meta: pa.Table):
        self.entry = entry
        self.name = entry.name
        self.index = index
        self.lat = meta["lat"].to_numpy(zero_copy_only=False)
        self.lon = meta["lon"].to_numpy(zero_copy_only=False)
        self.cell = meta["cell"].to_numpy(zero_copy_only=False)
        self.ids = meta["id"].combine_chunks() if meta.num_rows else pa.array([], pa.string())
        self._lock = threading.Lock()  # nprobe is set per call on the shared index

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def read(cls, index_dir: Path, entry: GalleryEntry, n_lists: int, dim: int) -> Gallery:
        import faiss

        path = index_dir / entry.index_file
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as err:
            raise FormatError(f"{path}: FAISS cannot read it: {str(err).splitlines()[0]}") from err
        if not isinstance(index, faiss.IndexIVF):
            raise FormatError(f"{path}: expected an IndexIVF, got {type(index).__name__}")
        if index.nlist != n_lists or index.d != entry.dim or index.ntotal != entry.n_refs:
            raise FormatError(f"{path}: {index.ntotal} references of width {index.d} in {index.nlist} lists; "
                              f"the manifest says {entry.n_refs} of width {entry.dim} and the index has "
                              f"{n_lists} finest cells")
        if entry.dim != dim:
            raise FormatError(f"{path}: {entry.dim}-d references, the index's embeddings are {dim}-d")
        meta_path = index_dir / entry.meta_file
        try:
            meta = pq.read_table(meta_path, schema=META_SCHEMA)
        except (OSError, pa.ArrowInvalid, ValueError) as err:
            raise FormatError(f"{meta_path}: not a gallery table: {err}") from err
        if meta.num_rows != entry.n_refs:
            raise FormatError(f"{meta_path}: {meta.num_rows} rows, the manifest says {entry.n_refs}")
        cell = meta["cell"].to_numpy(zero_copy_only=False)
        if cell.size and (cell.min() < 0 or cell.max() >= n_lists):
            raise FormatError(f"{meta_path}: cell out of range 0..{n_lists - 1}")
        return cls(entry, index, meta)

    def search(self, queries: np.ndarray, lists: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest references of each query among the lists (finest cells) given: queries (n, d)
        unit float32, lists (n, m) int64 (-1: none) -> (similarities (n, k) float32, -inf where
        none; rows (n, k) int64, -1 where none)."""
        n, m = lists.shape
        if n == 0 or m == 0 or self.index.ntotal == 0:
            return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
        x = np.ascontiguousarray(queries, dtype=np.float32)
        keys = np.ascontiguousarray(lists, dtype=np.int64)
        with self._lock:
            self.index.nprobe = m
            sims, rows = self.index.search_preassigned(x, k, keys, np.zeros((n, m), np.float32))
        sims = np.where(rows >= 0, sims, -np.inf).astype(np.float32)
        return sims, rows


# --- the manifest (via index.update_manifest) ---------------------------------------------------


@contextlib.contextmanager
def gallery_lock(index_dir: Path):
    """An exclusive flock on INDEX_DIR/.gallery.lock: one `gallery add/remove` at a time."""
    path = Path(index_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another `geosurge gallery` command is changing {index_dir}; wait for it") from None
        yield
    finally:
        os.close(fd)


def write_atomic(path: Path, write) -> None:
    """write(tmp_path), fsync, rename to path: the file is complete or absent."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stray_files(index_dir: Path, manifest: dict) -> list[str]:
    """Gallery files the manifest does not list (an interrupted add, or an old generation)."""
    listed = set(manifest.get("files", {}))
    gone = []
    for p in Path(index_dir).iterdir():
        if FILE_RE.match(p.name) and p.name not in listed:
            p.unlink(missing_ok=True)
            gone.append(p.name)
    return gone


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
