"""The bulk job and its plan: what `geosurge locate` was asked (`LocateJob`), the checks made before
any work, the ledger's pending chunks (`Plan`), how pending rows are batched, the defaults that
depend on the device, and the end-of-run summary. Shared by the local and the Ray runner."""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from geosurge_index import sources
from geosurge_index.errors import UserError
from geosurge_index.locate.predictor import SearchSettings
from geosurge_index.pred_store import (
    PredStore,
    RunConfig,
    chunk_bounds,
    index_identity,
    read_run,
)
from geosurge_index.settings import BulkSettings, InferenceSettings

_DEFAULTS = BulkSettings()  # the vocabulary's defaults: declared once, in `settings.py`


@dataclass
class LocateJob:
    """Everything `geosurge locate` needs; one object shared by the local and the Ray runner.

    The inference knobs (top_k .. ten_crop, workers) are `BulkSettings` fields, checked (and `beam`
    '8' read as 8) on construction; a bad value is a `UserError` naming the setting. Build one
    from keywords, as below, or from settings: `LocateJob.from_settings(index_dir, inputs, out_dir,
    BulkSettings.from_env())`.
    """

    index_dir: str
    inputs: list[str]
    out_dir: str
    columns: sources.ManifestColumns = field(default_factory=sources.ManifestColumns)
    top_k: int = _DEFAULTS.top_k
    beam: int | str | None = _DEFAULTS.beam
    save_embeddings: bool = False
    chunk_size: int = 1024
    batch_size: int | None = _DEFAULTS.batch_size  # None: `default_batch_size` for the device
    workers: int | None = _DEFAULTS.workers  # decoding processes; None: `default_workers`; 0: in-process
    device: str = _DEFAULTS.device
    draft_size: int | None = _DEFAULTS.draft_size  # None: the encoder's input size; 0: off
    max_pixels: int = _DEFAULTS.max_pixels
    runtime: str = _DEFAULTS.runtime  # auto | torch | onnx | onnx-fp32 | onnx-int8 (model.onnx_runtime)
    ten_crop: bool = _DEFAULTS.ten_crop  # test-time ten-crop averaging (10x the encoder work)
    max_image_bytes: int = _DEFAULTS.max_image_bytes  # larger inputs are too_large rows, never read
    max_error_rate: float | None = _DEFAULTS.max_error_rate  # None: fail only when every row is an error
    protocol: str | None = _DEFAULTS.protocol  # "paper": ten-crop (sets ten_crop); "fast": one centre crop
    cap_km: float | None = _DEFAULTS.cap_km  # precision cap (`privacy`): None = none
    cap_level: int | None = _DEFAULTS.cap_level
    skip_tagged: bool = _DEFAULTS.skip_tagged  # photos with valid EXIF GPS are not located
    galleries: str | None = _DEFAULTS.galleries  # None: every gallery of the index; "none": no refinement
    refine_cells: int | None = _DEFAULTS.refine_cells  # best cells whose gallery references are searched

    def __post_init__(self) -> None:
        for name, value in self.inference_settings().values().items():  # checked and normalised
            setattr(self, name, value)
        if self.save_embeddings and self.cap is not None:
            raise UserError("--save-embeddings with a precision cap: embeddings are finer than any cap, "
                            "so a capped run never stores them")

    @property
    def cap(self):
        from geosurge_index.privacy import Cap

        return Cap.of(self.cap_km, self.cap_level)

    @classmethod
    def from_settings(cls, index_dir: str, inputs: list[str], out_dir: str, settings: InferenceSettings,
                      **job: Any) -> LocateJob:
        """A job whose inference knobs are `settings`' (a `BulkSettings` also gives `workers`);
        `job`: the other fields (columns, save_embeddings, chunk_size)."""
        knobs = {k: v for k, v in settings.values().items() if k in BulkSettings.model_fields}
        return cls(index_dir=index_dir, inputs=inputs, out_dir=out_dir, **knobs, **job)

    def inference_settings(self) -> BulkSettings:
        """This job's knobs as the shared settings vocabulary."""
        return BulkSettings(**{name: getattr(self, name) for name in BulkSettings.model_fields})

    def settings(self) -> SearchSettings:
        return SearchSettings(self.top_k, self.beam, self.save_embeddings, self.ten_crop, self.cap,
                              galleries=self.galleries, refine_cells=self.refine_cells)

    def output_settings(self) -> dict:
        """The settings that change the rows: a resume must keep them."""
        out = {"top_k": self.top_k, "beam": self.beam, "save_embeddings": self.save_embeddings,
               "draft_size": self.draft_size, "max_pixels": self.max_pixels,
               "path_column": self.columns.path, "id_column": self.columns.id}
        if self.ten_crop:  # recorded only when on, so that runs from before the setting still resume
            out["ten_crop"] = True
        if self.max_image_bytes != _DEFAULTS.max_image_bytes:  # likewise
            out["max_image_bytes"] = self.max_image_bytes
        for name in ("cap_km", "cap_level", "skip_tagged"):  # likewise
            if getattr(self, name):
                out[name] = getattr(self, name)
        if self.galleries is not None:  # likewise: recorded only when not the default
            out["galleries"] = self.galleries
        if self.refine_cells != _DEFAULTS.refine_cells:
            out["refine_cells"] = self.refine_cells
        if self.runtime != _DEFAULTS.runtime:  # likewise: int8 rows differ from torch's in the last digits
            out["runtime"] = self.runtime
        return out


@dataclass
class Plan:
    """The enumerated inputs, the ledger and what is left to do."""

    job: LocateJob
    table: pa.Table
    config: RunConfig
    store: PredStore
    done: set[int]
    skipped: Counter = field(default_factory=Counter)  # files the scans did not take, by reason

    @property
    def pending_chunks(self) -> list[int]:
        return [c for c in range(self.config.n_chunks) if c not in self.done]

    def pending_rows(self) -> np.ndarray:
        cs, n = self.config.chunk_size, self.config.n_inputs
        parts = [np.arange(*chunk_bounds(c, cs, n)) for c in self.pending_chunks]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def plan_job(job: LocateJob) -> Plan:
    """Check everything that can be checked before any work: inputs, ids, index, the ledger.
    Nothing is written into `out_dir` before INDEX_DIR and the inputs have passed."""
    if job.chunk_size < 1 or job.top_k < 1:
        raise UserError("--chunk-size and --top-k must be at least 1")
    index_dir = Path(job.index_dir)
    check_index(index_dir)
    given = sources.expand_globs(job.inputs)
    resolved = [str(Path(p).resolve()) for p in given]
    old = read_run(job.out_dir) if Path(job.out_dir).is_dir() else None
    # A resumed run writes its rows as its first run spelled the inputs (`in` vs `./in` vs /abs/in)
    first = old.get("inputs_given") if old else None
    same_inputs = old is not None and old.get("inputs") == resolved
    spell_as = first if same_inputs and first and len(first) == len(given) else None
    inputs = sources.collect_inputs(given, job.columns, spell_as=spell_as)
    table = inputs.table
    if table.num_rows == 0:
        raise UserError(f"no images found in {', '.join(map(str, job.inputs))}"
                        + (f" (skipped: {format_skipped(inputs.skipped)})" if inputs.skipped else ""))
    legacy = old is not None and "inputs_given" not in old  # a run from before spelling-free resume
    config = RunConfig(
        inputs=resolved,
        n_inputs=table.num_rows,
        fingerprint=inputs.legacy_fingerprint if legacy else inputs.fingerprint,
        chunk_size=job.chunk_size,
        index_dir=str(index_dir.resolve()),
        index_id=index_identity(index_dir),
        settings=job.output_settings(),
        inputs_given=None if legacy else (spell_as or given),
    )
    store = PredStore(job.out_dir)
    done = store.begin(config)
    return Plan(job, table, config, store, done, inputs.skipped)


def check_index(index_dir: Path) -> None:
    """INDEX_DIR holds a readable manifest of a known version, every file a reader opens at the
    manifest's size, and an encoder (locate encodes images): checked before `--out` is touched,
    so that a wrong INDEX_DIR leaves no run behind. The sha256 pass is the predictor's."""
    from geosurge_index.index import read_manifest, verify_index

    if not index_dir.is_dir():
        raise UserError(f"INDEX_DIR {index_dir} is not a folder")
    manifest = read_manifest(index_dir)
    if not manifest.get("encoder"):
        raise UserError(f"INDEX_DIR {index_dir} has no encoder (exported for `geosurge search` over stored "
                        "embeddings): `geosurge locate` needs one to embed images; export from a checkpoint")
    verify_index(index_dir, checksums=False)


def format_skipped(skipped: Counter) -> str:
    """'class_map 4, extension:.tif 2, hidden 1': what the scans did not take, by reason."""
    return ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))


@dataclass
class RunStats:
    processed: int = 0  # rows predicted by this invocation
    errors: Counter = field(default_factory=Counter)  # this invocation's error kinds
    started: float = field(default_factory=time.perf_counter)

    def add(self, table: pa.Table) -> None:
        self.processed += table.num_rows
        for e in table.column("error").to_pylist():
            if e is not None:
                self.errors[e.split(":", 1)[0]] += 1


def batches_of(rows: np.ndarray, batch_size: int, chunk_size: int) -> list[np.ndarray]:
    """Cut pending rows into batches that never span two chunks, so chunks finish in order."""
    if len(rows) == 0:
        return []
    cuts = np.flatnonzero(np.diff(rows // chunk_size)) + 1
    out = []
    for part in np.split(rows, cuts):
        out.extend(np.array_split(part, -(-len(part) // batch_size)))
    return out


def default_batch_size(cuda: bool, ten_crop: bool = False) -> int:
    """Images per model call: 256 on CUDA, 32 on the CPU; with ten-crop 8x fewer (each image is
    10 crops through the encoder)."""
    return (256 if cuda else 32) // (8 if ten_crop else 1)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or taskset's share, not
    the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def default_workers(cuda: bool, cores: int | None = None) -> int:
    """Decoding processes: on CUDA enough to feed the GPU (all available cores but one, at most 16);
    on the CPU a quarter of them (at least 1), the model's threads taking the rest."""
    cores = available_cores() if cores is None else cores
    return max(1, min(16, cores - 1)) if cuda else max(1, cores // 4)


SHM = "/dev/shm"
SHM_FRACTION = 0.5  # of the free shared memory the prefetched batches may take


def shm_free_bytes(path: str = SHM) -> int | None:
    """Free bytes of the shared memory DataLoader workers hand batches through (None: no such
    file system, e.g. macOS, where torch uses other means)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def batch_bytes(batch_size: int, image_size: int, crops: int = 1) -> int:
    """Bytes of one decoded batch: uint8 pixels (3 per pixel) and class maps (1 per pixel)."""
    return batch_size * crops * image_size * image_size * 4


@dataclass(frozen=True)
class LoaderPlan:
    """What a DataLoader of decoding workers was sized to, and the one line that says so."""

    workers: int
    prefetch: int | None  # batches each worker keeps ready (None with no workers)
    line: str


def plan_loader(cuda: bool, batch_nbytes: int, workers: int | None = None, prefetch: int = 4, *,
                cores: int | None = None, shm_free: int | None = -1, what: str = "decoding") -> LoaderPlan:
    """Decoding workers and prefetch depth that fit this process's cores and its free shared memory.

    Every batch a worker has ready sits in /dev/shm (and again in pinned memory on CUDA):
    workers x prefetch x batch bytes must fit in half of what is free there, or the workers die
    with a bus error (Docker's default /dev/shm is 64 MB). Prefetch is lowered first, then workers;
    when not even one batch fits, batches are decoded in the main process. `workers` None: the
    default for the device (`default_workers`); `shm_free` -1: measured."""
    cores = available_cores() if cores is None else cores
    asked = default_workers(cuda, cores) if workers is None else workers
    free = shm_free_bytes() if shm_free == -1 else shm_free
    w, pf = asked, prefetch
    if w > 0 and free is not None and batch_nbytes > 0:
        room = int(free * SHM_FRACTION) // batch_nbytes  # batches that fit
        pf = max(1, min(prefetch, room // w))
        if w * pf > room:
            w = room  # not even one batch per worker: fewer workers (0: decode in this process)
    shm = "unknown" if free is None else f"{free / 2**20:.0f} MiB free"
    line = (f"{what}: {w} worker process(es)" + (f" x prefetch {pf}" if w else " (in this process)")
            + f"; {cores} core(s) available, /dev/shm {shm}, {batch_nbytes / 2**20:.1f} MiB per batch")
    if (w, pf) != (asked, prefetch) and asked > 0:
        line += (f" (reduced from {asked} x {prefetch}: /dev/shm too small; raise it, e.g. docker run "
                 "--shm-size=8g)")
    return LoaderPlan(w, pf if w else None, line)


def summarize(plan: Plan, stats: RunStats, strategy: str) -> dict:
    """The end-of-run summary (whole PRED_DIR, plus this invocation's throughput)."""
    wall = time.perf_counter() - stats.started
    rows, kinds = plan.store.error_counts()
    return {
        "images": rows,
        "ok": rows - sum(kinds.values()),
        "errors": sum(kinds.values()),
        "errors_by_kind": dict(sorted(kinds.items())),
        "shards": len(plan.store.shard_paths()),
        "skipped_inputs": dict(sorted(plan.skipped.items())),
        "recomputed_damaged_shards": list(plan.store.damaged),
        "this_run": {
            "images": stats.processed,
            "resumed_chunks": len(plan.done),
            "wall_s": round(wall, 3),
            "images_per_s": round(stats.processed / wall, 3) if wall > 0 else None,
            "strategy": strategy,
        },
        "complete": rows == plan.config.n_inputs,
        "max_error_rate": plan.job.max_error_rate,
    }


def too_many_errors(summary: dict) -> str | None:
    """Why a finished run should exit non-zero, or None: more than `max_error_rate` of its rows
    are errors, or, with no rate given, every row is one."""
    n, bad, rate = summary["images"], summary["errors"], summary.get("max_error_rate")
    if not n:
        return None
    if rate is None:
        return None if bad < n else f"every one of the {n} rows is an error"
    if bad / n > rate:
        return f"{bad} of {n} rows ({bad / n:.1%}) are errors, above --max-error-rate {rate:g}"
    return None

