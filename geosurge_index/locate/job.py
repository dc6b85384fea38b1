"""The bulk job and its plan: what `geosurge locate` was asked (`LocateJob`), the checks made before
any work, the ledger's pending chunks (`Plan`), how pending rows are batched, the defaults that
depend on the device, and the end-of-run summary. Shared by the local and the Ray runner."""

from __future__ import annotations

import os
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

    def __post_init__(self) -> None:
        for name, value in self.inference_settings().values().items():  # checked and normalised
            setattr(self, name, value)

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
        return SearchSettings(self.top_k, self.beam, self.save_embeddings, self.ten_crop)

    def output_settings(self) -> dict:
        """The settings that change the rows: a resume must keep them."""
        out = {"top_k": self.top_k, "beam": self.beam, "save_embeddings": self.save_embeddings,
               "draft_size": self.draft_size, "max_pixels": self.max_pixels,
               "path_column": self.columns.path, "id_column": self.columns.id}
        if self.ten_crop:  # recorded only when on, so that runs from before the setting still resume
            out["ten_crop"] = True
        return out


@dataclass
class Plan:
    """The enumerated inputs, the ledger and what is left to do."""

    job: LocateJob
    table: pa.Table
    config: RunConfig
    store: PredStore
    done: set[int]

    @property
    def pending_chunks(self) -> list[int]:
        return [c for c in range(self.config.n_chunks) if c not in self.done]

    def pending_rows(self) -> np.ndarray:
        cs, n = self.config.chunk_size, self.config.n_inputs
        parts = [np.arange(*chunk_bounds(c, cs, n)) for c in self.pending_chunks]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def plan_job(job: LocateJob) -> Plan:
    """Check everything that can be checked before any work: inputs, ids, index, the ledger."""
    if job.chunk_size < 1 or job.top_k < 1:
        raise UserError("--chunk-size and --top-k must be at least 1")
    index_dir = Path(job.index_dir)
    if not index_dir.is_dir():
        raise UserError(f"INDEX_DIR {index_dir} is not a folder")
    table = sources.enumerate_inputs(job.inputs, job.columns)
    if table.num_rows == 0:
        raise UserError(f"no images found in {', '.join(map(str, job.inputs))}")
    config = RunConfig(
        inputs=[str(Path(p).resolve()) for p in job.inputs],
        n_inputs=table.num_rows,
        fingerprint=sources.fingerprint(table),
        chunk_size=job.chunk_size,
        index_dir=str(index_dir.resolve()),
        index_id=index_identity(index_dir),
        settings=job.output_settings(),
    )
    store = PredStore(job.out_dir)
    done = store.begin(config)
    return Plan(job, table, config, store, done)


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


def default_workers(cuda: bool) -> int:
    """Decoding processes: on CUDA enough to feed the GPU (all cores but one, at most 16); on the
    CPU a quarter of the cores (at least 1), the model's threads taking the rest."""
    cores = os.cpu_count() or 1
    return max(1, min(16, cores - 1)) if cuda else max(1, cores // 4)



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
        "this_run": {
            "images": stats.processed,
            "resumed_chunks": len(plan.done),
            "wall_s": round(wall, 3),
            "images_per_s": round(stats.processed / wall, 3) if wall > 0 else None,
            "strategy": strategy,
        },
        "complete": rows == plan.config.n_inputs,
    }

