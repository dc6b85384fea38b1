"""PRED_DIR on disk: the run ledger, atomic Parquet shards, resume, and the run summary.

A bulk run numbers its inputs 0..n-1 (`sources.enumerate_inputs`, deterministic) and cuts them
into chunks of `chunk_size` rows. Chunk c is written as exactly one shard `part-{c:05d}.parquet`,
atomically (a hidden temporary file, then `os.replace`), so a shard on disk is always complete.
The run ledger records what the run is (inputs, their fingerprint, the index, every setting that
changes the output); a rerun with the same command finds it, skips the chunks whose shard exists
and computes the others: no duplicates, no gaps, whenever the previous run was killed. A rerun
with different inputs or settings is refused. The summary is written when every chunk is done.

Layout. Only Parquet of the prediction schema sits under PRED_DIR, so that every reader takes
the folder itself: DuckDB `read_parquet('PRED_DIR/*.parquet')`, pyarrow / pandas / geopandas
`read_parquet(PRED_DIR)`, and `polars.scan_parquet(PRED_DIR)`, which reads every non-empty file
under the folder, subfolders included, and refuses one that is not Parquet:

    PRED_DIR/part-00000.parquet ...   the predictions (GeoParquet: see `pred_schema`)
    PRED_DIR/_geosurge/run.parquet    the ledger: zero rows of the shard schema, the JSON in the
                                      Parquet key-value metadata `geosurge.run`
    PRED_DIR/_geosurge/summary.parquet  the summary, likewise (`geosurge.summary`)
    PRED_DIR/_geosurge/lock           empty; flock-ed by the running writer

`read_run` and `read_summary` return the JSON (dicts). Folders written before this layout hold
`_run.json`, `_summary.json` and `_lock` at the top level: they still resume, in their layout
and their shard schema (new columns are not added to a run that began without them).

Joining predictions to cells: the key is `(level, s2_token)`, e.g. `token_l7` against the cells
of level 7, or `(level, cell_index)` with `cell_l7` (what `geosurge sql` joins on). A token alone
is ambiguous: a cell that is not split keeps its S2 cell, hence its token, on the next level.
`topk_tokens` are tokens of the finest level, like `topk_cells`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from geosurge_index.calibration import WITHIN_COLUMNS
from geosurge_index.errors import FormatError, UserError
from geosurge_index.formats import check_format, read_json
from geosurge_index.geoparquet import GEOMETRY_COLUMN, with_geo_metadata

META_DIR = "_geosurge"  # '_': hidden from pyarrow/pandas datasets; holds only Parquet (polars)
META_RUN = "run.parquet"
META_SUMMARY = "summary.parquet"
META_LOCK = "lock"  # flock-ed while a run writes; the kernel releases it when the process dies
RUN_KEY = b"geosurge.run"
SUMMARY_KEY = b"geosurge.summary"
# the top-level layout of older versions: still read, and kept by a resumed old run
RUN_FILE = "_run.json"
LOCK_FILE = "_lock"
SUMMARY_FILE = "_summary.json"
RUN_FORMAT = "geosurge-locate-run"
RUN_FORMAT_VERSION = 1
SHARD_RE = re.compile(r"^part-(\d{5,})\.parquet$")
TEMPORARY_RE = re.compile(r"^\..*\.tmp-\d+$")  # a killed writer's half-written file
NUM_LEVELS = 7


def shard_name(chunk: int) -> str:
    return f"part-{chunk:05d}.parquet"


def pred_schema(save_embeddings: bool = False) -> pa.Schema:
    """The PRED_DIR schema (ARCHITECTURE.md), plus the image's width and height; then the columns
    added later, at the end so that readers by position keep working: `topk_tokens` (the S2
    tokens of `topk_cells`, finest level) and `geometry` (the predicted point as WKB, GeoParquet
    1.1: the schema carries the `geo` metadata), then the archive columns (`ARCHIVE_FIELDS`: EXIF GPS,
    the precision cap), the gallery columns (`REFINEMENT_FIELDS`), then the confidence
    (`confidence.py`, `CONFIDENCE_FIELDS`): `confidence` (the calibrated P(true point in the
    reported finest cell)), `level_confidence` (the same per level, level 1 first), `r50_km` /
    `r90_km` (error radii) and `calibrated` (whether the index's calibration made them; false: the
    model's own probabilities), then `p_within_1km` .. `p_within_2500km` (the probability that the
    true point lies within that distance of lat/lon)."""
    fields = [
        ("id", pa.string()),
        ("path", pa.string()),
        ("lat", pa.float64()),
        ("lon", pa.float64()),
        ("probability", pa.float64()),
        *[(f"cell_l{i}", pa.int32()) for i in range(1, NUM_LEVELS + 1)],
        *[(f"token_l{i}", pa.string()) for i in range(1, NUM_LEVELS + 1)],
        ("topk_cells", pa.list_(pa.int32())),
        ("topk_probs", pa.list_(pa.float32())),
    ]
    if save_embeddings:
        fields.append(("embedding", pa.list_(pa.float32())))
    fields += [("width", pa.int32()), ("height", pa.int32()), ("error", pa.string()),
               ("topk_tokens", pa.list_(pa.string())), (GEOMETRY_COLUMN, pa.binary())]
    fields += ARCHIVE_FIELDS
    fields += REFINEMENT_FIELDS
    fields += CONFIDENCE_FIELDS
    return with_geo_metadata(pa.schema(fields))


# The photo's own EXIF GPS (`exif_gps`) and the precision cap in force (`privacy`), added at the end:
# exif_lat/exif_lon null unless valid; exif_gps_note says why GPS present is not valid; cap_* null
# when no cap; cap_level is the level answered (0: an S2 cell coarser than level 1).
ARCHIVE_FIELDS = [("exif_lat", pa.float64()), ("exif_lon", pa.float64()), ("exif_gps_present", pa.bool_()),
                  ("exif_gps_valid", pa.bool_()), ("exif_gps_note", pa.string()),
                  ("cap_km", pa.float64()), ("cap_level", pa.int8()), ("cap_token", pa.string())]


# Added with galleries (ARCHITECTURE.md, PRED_DIR): how `lat`/`lon` were made. `point_source`:
# "cell_mean" (the best finest cell's mean point, as before galleries), "neighbour" (the nearest
# gallery reference inside the best cells), "neighbours" (the weighted mean of several that agree);
# the nearest reference's gallery, id and cosine similarity (null when none); `cell_lat`/`cell_lon`:
# the best cell's mean point, whatever the rule (equal to lat/lon when point_source = cell_mean).
REFINEMENT_FIELDS = [("point_source", pa.string()), ("neighbour_gallery", pa.string()),
                     ("neighbour_id", pa.string()), ("neighbour_similarity", pa.float32()),
                     ("cell_lat", pa.float64()), ("cell_lon", pa.float64())]

# Added with the confidence (`confidence.py`), after the gallery columns: the calibrated probability
# of the reported finest cell, per level, the error radii around lat/lon, whether calibrated; then
# (added after them) P(true point within 1 / 25 / 200 / 750 / 2500 km of lat/lon).
CONFIDENCE_FIELDS = [("confidence", pa.float64()), ("level_confidence", pa.list_(pa.float32())),
                     ("r50_km", pa.float64()), ("r90_km", pa.float64()), ("calibrated", pa.bool_()),
                     *((name, pa.float64()) for name in WITHIN_COLUMNS)]


@dataclass(frozen=True)
class RunConfig:
    """What a run is. Two runs may share a PRED_DIR only if these are equal."""

    inputs: list[str]  # absolute paths of the INPUT arguments, in order
    n_inputs: int
    fingerprint: str  # sources.fingerprint of the input table
    chunk_size: int
    index_dir: str
    index_id: str  # hash of the index's manifest.json: a re-exported index is another index
    settings: dict = field(default_factory=dict)  # everything else that changes the rows
    # the INPUT arguments as the first run spelled them (ids and paths keep that spelling on
    # resume); None in runs from before it was recorded, whose fingerprint hashes the spelling
    inputs_given: list[str] | None = None

    @property
    def n_chunks(self) -> int:
        return -(-self.n_inputs // self.chunk_size)

    def to_json(self) -> dict:
        return {"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, **asdict(self)}


def index_identity(index_dir: str | os.PathLike) -> str:
    """A hash of INDEX_DIR/manifest.json (its checksums name the weights and the indexes)."""
    p = Path(index_dir) / "manifest.json"
    try:
        return hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    except OSError:
        return "no-manifest"


def chunk_bounds(chunk: int, chunk_size: int, n_inputs: int) -> tuple[int, int]:
    start = chunk * chunk_size
    return start, min(start + chunk_size, n_inputs)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_table(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if _is_disk_full(err):
            raise UserError(f"the disk holding {path.parent} is full (no space left while writing "
                            f"{path.name}): free some space, then rerun the same command to resume") from None
        raise


def _is_disk_full(err: BaseException) -> bool:
    """ENOSPC or EDQUOT, raised by Python or wrapped by Arrow ('No space left on device')."""
    import errno

    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(err, (OSError, pa.ArrowException)) and (
        "No space left on device" in str(err) or "Disk quota exceeded" in str(err))


def _write_meta(path: Path, key: bytes, meta: dict, schema: pa.Schema) -> None:
    """JSON carried by an empty table of the shard schema (polars then reads it as zero rows)."""
    blob = json.dumps(meta, indent=1, default=_json_default).encode()
    kept = {k: v for k, v in (schema.metadata or {}).items() if k not in (RUN_KEY, SUMMARY_KEY)}
    schema = schema.with_metadata({**kept, key: blob})
    _atomic_write_table(path, schema.empty_table())


def _read_meta(path: Path, key: bytes) -> dict:
    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta[key])
    except FileNotFoundError as err:
        raise FormatError(f"{path} is missing") from err
    except (OSError, pa.ArrowException, KeyError, ValueError) as err:
        raise FormatError(f"{path}: not a geosurge run file ({err})") from err


def read_run(pred_dir: str | os.PathLike) -> dict | None:
    """The run ledger of a PRED_DIR (either layout), or None when it has none."""
    d = Path(pred_dir)
    if (d / META_DIR / META_RUN).exists():
        run = _read_meta(d / META_DIR / META_RUN, RUN_KEY)
        check_format(run, d / META_DIR / META_RUN, RUN_FORMAT, RUN_FORMAT_VERSION)
        return run
    if (d / RUN_FILE).exists():
        return read_json(d / RUN_FILE, RUN_FORMAT, RUN_FORMAT_VERSION)
    return None


def read_summary(pred_dir: str | os.PathLike) -> dict | None:
    """The summary of a finished run (either layout), or None when the run is not finished."""
    d = Path(pred_dir)
    if (d / META_DIR / META_SUMMARY).exists():
        return _read_meta(d / META_DIR / META_SUMMARY, SUMMARY_KEY)
    if (d / SUMMARY_FILE).exists():
        try:
            return json.loads((d / SUMMARY_FILE).read_text())
        except (OSError, ValueError) as err:
            raise FormatError(f"{d / SUMMARY_FILE} is not valid JSON ({err})") from err
    return None


def write_run(pred_dir: str | os.PathLike, run: dict) -> None:
    """Replace the ledger, in the folder's layout (for tools and tests; `begin` writes it)."""
    d = Path(pred_dir)
    if (d / RUN_FILE).exists() and not (d / META_DIR / META_RUN).exists():
        _atomic_write_bytes(d / RUN_FILE, json.dumps(run, indent=1).encode())
        return
    path = d / META_DIR / META_RUN
    _write_meta(path, RUN_KEY, run, pq.read_schema(path) if path.exists() else pred_schema())


class PredStore:
    """One PRED_DIR: `begin` a run (fresh or resumed), `write_chunk` shards, `finish` it."""

    def __init__(self, out_dir: str | os.PathLike):
        self.dir = Path(out_dir)
        self._lock_fd: int | None = None
        self._schema: pa.Schema | None = None  # what shards are written as (set by `begin`)
        self.damaged: list[str] = []  # "part-NNNNN.parquet: why" of shards `begin` removed to recompute

    @property
    def legacy(self) -> bool:
        """A folder of the older layout (ledger at the top level), kept as it is."""
        return (self.dir / RUN_FILE).exists() and not (self.dir / META_DIR / META_RUN).exists()

    def _meta_path(self, name: str, legacy_name: str) -> Path:
        return self.dir / legacy_name if self.legacy else self.dir / META_DIR / name

    def _lock(self) -> None:
        """One writer per PRED_DIR: a second concurrent run would delete the first's temporaries.
        An advisory flock, so a killed run (even kill -9) never leaves a stale lock behind."""
        import fcntl

        if self._lock_fd is not None:
            return
        path = self._meta_path(META_LOCK, LOCK_FILE)
        path.parent.mkdir(exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"--out {self.dir} is being written by another running `geosurge locate`: "
                            "wait for it to finish, or write to another folder") from None
        self._lock_fd = fd

    def release(self) -> None:
        """Let another run write here (also what the kernel does when this process dies)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- the ledger --------------------------------------------------------------------------
    def begin(self, config: RunConfig) -> set[int]:
        """Create or resume the run; return the chunks already done. UserError on a mismatch."""
        if self.dir.exists() and not self.dir.is_dir():
            raise UserError(f"--out {self.dir} exists and is not a folder")
        self.dir.mkdir(parents=True, exist_ok=True)
        meta_existed = (self.dir / META_DIR).exists()
        self._lock()
        try:
            return self._begin(config)
        except BaseException:
            self.release()
            if not meta_existed and not (self.dir / META_DIR / META_RUN).exists():
                # a refused folder is left as it was found, without our lock file
                (self.dir / META_DIR / META_LOCK).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    (self.dir / META_DIR).rmdir()
            raise

    def _begin(self, config: RunConfig) -> set[int]:
        old = read_run(self.dir)
        schema = pred_schema(bool(config.settings.get("save_embeddings", False)))
        if old is not None:
            self._check_same_run(old, config)
        else:
            stray = self.done_chunks()
            if stray:
                raise UserError(
                    f"--out {self.dir} holds {len(stray)} prediction shards but no {RUN_FILE} nor "
                    f"{META_DIR}/{META_RUN}: it is not a locate run folder; choose an empty or new folder"
                )
            others = sorted(p.name for p in self.dir.iterdir()
                            if p.name != META_DIR and not TEMPORARY_RE.match(p.name))
            if others:
                raise UserError(
                    f"--out {self.dir} is not empty ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}) "
                    "and holds no locate run: choose an empty or new folder")
            _write_meta(self.dir / META_DIR / META_RUN, RUN_KEY, config.to_json(), schema)
        self._remove_temporaries()
        done = self.done_chunks()
        beyond = sorted(c for c in done if c >= config.n_chunks)
        if beyond:
            raise FormatError(f"{self.dir} holds shards beyond the run's {config.n_chunks} chunks: {beyond[:5]}")
        for c in sorted(done):
            why = self._damage(c, config)
            if why is not None:  # not a whole shard (cut, emptied, overwritten): computed again
                (self.dir / shard_name(c)).unlink()
                self.damaged.append(f"{shard_name(c)}: {why}")
                done.discard(c)
        # a resumed run keeps the schema its first shards have: one schema per folder
        self._schema = pq.read_schema(self.dir / shard_name(min(done))) if done else schema
        return done

    def _damage(self, chunk: int, config: RunConfig) -> str | None:
        """Why shard `chunk` is not the whole chunk (None: it is): an unreadable footer (zero bytes,
        cut, not Parquet) or a row count other than the chunk's. Reads the footer only."""
        start, stop = chunk_bounds(chunk, config.chunk_size, config.n_inputs)
        try:
            rows = pq.ParquetFile(self.dir / shard_name(chunk)).metadata.num_rows
        except (OSError, pa.ArrowException) as err:
            return f"unreadable ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        return None if rows == stop - start else f"{rows} rows, the chunk has {stop - start}"

    def _check_same_run(self, old: dict, new: RunConfig) -> None:
        cur = new.to_json()
        diffs = [k for k in cur if k not in ("format", "format_version", "inputs_given") and old.get(k) != cur[k]]
        if "settings" in diffs:
            diffs.remove("settings")
            o, c = old.get("settings", {}), cur["settings"]
            diffs += [f"settings.{k}" for k in sorted(set(o) | set(c)) if o.get(k) != c.get(k)]
        if diffs:
            detail = "; ".join(
                f"{k}: was {_get(old, k)!r}, now {_get(cur, k)!r}" for k in diffs if k != "fingerprint"
            )
            if "fingerprint" in diffs and "n_inputs" not in diffs:
                detail = (detail + "; " if detail else "") + "the inputs' ids, paths or tar contents changed"
            raise UserError(
                f"--out {self.dir} holds a run with other inputs or settings ({detail}). "
                "Resume with the same command, or write to a new --out folder"
            )

    def _remove_temporaries(self) -> None:
        """Half-written files of a killed run (shards, ledger, summary; never seen by readers)."""
        for d in (self.dir, self.dir / META_DIR):
            for p in d.glob(".*.tmp-*"):
                p.unlink(missing_ok=True)

    def done_chunks(self) -> set[int]:
        if not self.dir.is_dir():
            return set()
        return {int(m.group(1)) for p in os.scandir(self.dir) if (m := SHARD_RE.match(p.name))}

    # -- shards ------------------------------------------------------------------------------
    def write_chunk(self, chunk: int, table: pa.Table) -> Path:
        """Write chunk `chunk` atomically: after a kill it is either whole on disk or absent.

        Rows in the prediction schema are written as the run's shard schema: column order and
        types fixed (Ray may hand back other string types), the GeoParquet metadata attached,
        and for a run resumed from an older version, only the columns its shards have."""
        if self._schema is not None and set(self._schema.names) <= set(table.column_names):
            table = table.select(self._schema.names).cast(self._schema)
        final = self.dir / shard_name(chunk)
        _atomic_write_table(final, with_geo_metadata(table))
        return final

    def shard_paths(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("part-*.parquet") if SHARD_RE.match(p.name))

    # -- the end -----------------------------------------------------------------------------
    def error_counts(self) -> tuple[int, Counter]:
        """(rows, Counter of error kinds) over every shard: reads the `error` column only."""
        rows, kinds = 0, Counter()
        for p in self.shard_paths():
            err = pq.read_table(p, columns=["error"]).column("error").combine_chunks()
            rows += len(err)
            bad = err.filter(pc.is_valid(err))
            if len(bad):
                kind = pc.list_element(pc.split_pattern(bad, ":", max_splits=1), 0)
                vc = pc.value_counts(kind)
                kinds.update(dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True)))
        return rows, kinds

    def finish(self, summary: dict) -> Path:
        if self.legacy:
            path = self.dir / SUMMARY_FILE
            _atomic_write_bytes(path, json.dumps(summary, indent=1, default=_json_default).encode())
            return path
        path = self.dir / META_DIR / META_SUMMARY
        schema = self._schema if self._schema is not None else pq.read_schema(self.dir / META_DIR / META_RUN)
        _write_meta(path, SUMMARY_KEY, summary, schema)
        return path


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


class ChunkAssembler:
    """Collects prediction rows (any order, any batching) and writes each chunk once it is whole."""

    def __init__(self, store: PredStore, config: RunConfig):
        self.store, self.config = store, config
        self.parts: dict[int, list[tuple[np.ndarray, pa.Table]]] = {}
        self.counts: Counter = Counter()
        self.written = 0

    def add(self, rows: np.ndarray, table: pa.Table) -> int:
        """Add rows (global row numbers + their predictions); return the chunks written."""
        cs = self.config.chunk_size
        chunks = rows // cs
        done = 0
        for c in np.unique(chunks):
            sel = np.flatnonzero(chunks == c)
            self.parts.setdefault(int(c), []).append((rows[sel], table.take(pa.array(sel))))
            self.counts[int(c)] += len(sel)
            start, stop = chunk_bounds(int(c), cs, self.config.n_inputs)
            if self.counts[int(c)] == stop - start:
                self._write(int(c), start, stop)
                done += 1
        return done

    def _write(self, c: int, start: int, stop: int) -> None:
        parts = self.parts.pop(c)
        del self.counts[c]
        rows = np.concatenate([r for r, _ in parts])
        table = pa.concat_tables([t for _, t in parts])
        order = np.argsort(rows, kind="stable")
        if not np.array_equal(rows[order], np.arange(start, stop)):
            raise RuntimeError(f"chunk {c}: rows are not exactly {start}..{stop - 1} (duplicates or gaps)")
        self.store.write_chunk(c, table.take(pa.array(order)))
        self.written += 1

    @property
    def pending(self) -> int:
        return len(self.parts)

