"""The bulk locate job on Ray Data: the same stages as `locate.run_local`, spread over a cluster.

  input rows (one block per pending chunk)
    -> map_batches(decode_batch)            CPU tasks: the reader stage
    -> map_batches(PredictActor)            GPU (or CPU) actors: encoder + search, model loaded once
    -> iter_batches in the driver           the writer stage: `ChunkAssembler` + `PredStore`

The driver owns the ledger exactly as a local run does: the same chunks, the same atomic shards,
the same `_run.json`, so a Ray run resumes a local one and vice versa, without duplicates.
Every worker must be able to import geosurge_index and read the inputs and INDEX_DIR at the same
paths (a shared file system), as with any Ray Data job reading files.

Ray is an optional extra (`pip install 'geosurge-index[ray]'`): this is the only module that
imports it, and only inside functions (`require_ray`), so everything else works without it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from geosurge_index.errors import UserError
from geosurge_index.exif_gps import GpsTag
from geosurge_index.locate.decode import DecodedBatch, DecodeSpec, decode_rows
from geosurge_index.locate.job import Plan, RunStats, default_batch_size
from geosurge_index.locate.predictor import Predictor, SearchSettings
from geosurge_index.pred_store import ChunkAssembler, chunk_bounds

ROW = "_row"
RAY_EXTRA = "pip install 'geosurge-index[ray]'"


def require_ray():
    """The `ray` module with Ray Data, or a UserError saying how to install the extra."""
    try:
        import ray
        import ray.data  # noqa: F401  (ray without the [data] extra lacks its dependencies)
    except ImportError as err:
        raise UserError(f"--ray needs Ray Data, an optional extra that is not installed ({err}): "
                        f"{RAY_EXTRA}") from err
    return ray


def init_ray(address: str, num_cpus: int | None = None, object_store_mb: int = 256) -> bool:
    """`local`: start a small private Ray instance here; `auto` or HOST:PORT / ray://: connect.
    Returns True when this call connected (the caller then shuts Ray down)."""
    ray = require_ray()

    if ray.is_initialized():
        return False
    common = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        if address == "local":
            ray.init(
                num_cpus=num_cpus or os.cpu_count(),
                object_store_memory=object_store_mb * 1024 * 1024,
                **common,
            )
        else:
            ray.init(address=address, **common)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise UserError(f"--ray {address}: cannot start or reach Ray ({err})") from err
    return True


def decode_batch(batch: pa.Table, spec: DecodeSpec) -> dict:
    """Reader stage on Ray: input rows -> fixed-shape columns (zeros where decoding failed)."""
    rows = np.arange(batch.num_rows)
    db = decode_rows(batch, rows, spec, as_torch=False)
    n, s = batch.num_rows, spec.image_size
    lead = (spec.crops,) if spec.crops > 1 else ()  # ten-crop: (n, 10, S, S, 3)
    pixels = np.zeros((n, *lead, s, s, 3), np.uint8)
    maps = np.full((n, *lead, s, s), 255, np.uint8)
    has_map = np.zeros(n, bool)
    pixels[db.ok] = db.pixels
    maps[db.ok] = db.class_maps
    has_map[db.ok] = db.has_map
    return {
        ROW: batch.column(ROW).to_numpy(),
        "id": np.asarray(batch.column("id").to_pylist(), dtype=object),
        "path": np.asarray(batch.column("path").to_pylist(), dtype=object),
        "ok": db.ok,
        "pixels": pixels,
        "class_map": maps,
        "has_map": has_map,
        "width": db.width,
        "height": db.height,
        "error": np.asarray([e or "" for e in db.errors], dtype=object),  # "" = fine (`ok` decides)
        "gps": np.asarray([json.dumps(None if g is None else dataclasses.asdict(g)) for g in db.gps], dtype=object),
    }


class PredictActor:
    """Encoder + search in a Ray actor: the model is loaded once per actor."""

    def __init__(self, index_dir: str, device: str, settings: SearchSettings, runtime: str = "auto"):
        self.predictor = Predictor.open(index_dir, device, settings, runtime)

    def __call__(self, batch: dict) -> pa.Table:
        ok = np.asarray(batch["ok"], bool)
        db = DecodedBatch(
            rows=np.asarray(batch[ROW], np.int64),
            ok=ok,
            pixels=np.ascontiguousarray(batch["pixels"][ok]),
            class_maps=np.ascontiguousarray(batch["class_map"][ok]),
            has_map=np.asarray(batch["has_map"], bool)[ok],
            width=np.asarray(batch["width"], np.int32),
            height=np.asarray(batch["height"], np.int32),
            errors=[None if o else str(e) for o, e in zip(ok, batch["error"], strict=True)],
            gps=[None if g is None else GpsTag(**g) for g in map(json.loads, batch["gps"])] if "gps" in batch else None,
        )
        table = self.predictor.predict(db, list(batch["id"]), list(batch["path"]))
        return table.append_column(ROW, pa.array(db.rows))


def run_ray(
    plan: Plan,
    address: str,
    *,
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    num_cpus: int | None = None,
    progress=None,
) -> RunStats:
    ray = require_ray()
    started = init_ray(address, num_cpus=num_cpus)
    try:
        return _run(plan, progress, actors, gpus_per_actor)
    finally:
        if started:
            ray.shutdown()


@dataclass(frozen=True)
class ActorPlan:
    """Where the model actors run, decided in the driver from the cluster's resources."""

    device: str  # what each actor passes to `Predictor.open`: "cpu" or "cuda"
    actors: int
    gpus_per_actor: float  # Ray's num_gpus per actor (0 on the CPU)

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_actor > 0


def plan_actors(device: str, cluster_gpus: float, actors: int | None = None,
                gpus_per_actor: float | None = None) -> ActorPlan:
    """The actors' device and count, checked before any actor starts.

    Ray gives each actor the GPUs it reserved as cuda:0.., so an actor's device is 'cuda', never
    'cuda:N' (N would name a GPU the actor cannot see). `device` 'cuda' / 'cuda:N' on a cluster
    without GPUs, or a GPU share that is not positive, is a UserError here, not a failure inside
    every actor later. 'auto': the GPUs when the cluster has any, else the CPU."""
    from geosurge_index.devices import parse_device

    if gpus_per_actor is not None and not gpus_per_actor > 0:
        raise UserError(f"--ray-gpus-per-actor {gpus_per_actor:g}: must be more than 0 (a fraction "
                        "such as 0.5 shares a GPU between actors); --device cpu runs the actors without GPUs")
    if actors is not None and actors < 1:
        raise UserError(f"--ray-actors {actors}: must be at least 1")
    kind = "cuda" if device == "auto" and cluster_gpus > 0 else parse_device(
        "cpu" if device == "auto" else device).type
    if kind == "cpu":
        return ActorPlan("cpu", actors or 1, 0.0)
    if cluster_gpus <= 0:
        raise UserError(f"--device {device}: the Ray cluster has no GPUs (its resources list none); "
                        "use --device cpu or auto")
    share = 1.0 if gpus_per_actor is None else float(gpus_per_actor)
    if share > cluster_gpus:
        raise UserError(f"--ray-gpus-per-actor {share:g}: the Ray cluster has {cluster_gpus:g} GPU(s)")
    return ActorPlan("cuda", actors or max(1, int(cluster_gpus / share)), share)


def _run(plan: Plan, progress, actors, gpus_per_actor) -> RunStats:
    ray = require_ray()

    job = plan.job
    resources = ray.cluster_resources()
    actor_plan = plan_actors(job.device, float(resources.get("GPU", 0)), actors, gpus_per_actor)
    device = actor_plan.device
    batch_size = job.batch_size or default_batch_size(actor_plan.use_gpu, job.ten_crop)

    # The encoder's input size, without loading the model here: read it from the index's encoder.
    image_size = _image_size(job.index_dir)
    spec = DecodeSpec(image_size, image_size if job.draft_size is None else job.draft_size, job.max_pixels,
                      job.ten_crop, job.max_image_bytes, skip_tagged=job.skip_tagged)

    cs, n = plan.config.chunk_size, plan.config.n_inputs
    blocks = []
    for c in plan.pending_chunks:
        start, stop = chunk_bounds(c, cs, n)
        part = plan.table.slice(start, stop - start)
        blocks.append(part.append_column(ROW, pa.array(np.arange(start, stop, dtype=np.int64))))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts images; Ray's would interleave with it
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(decode_batch, fn_kwargs={"spec": spec}, batch_size=batch_size,
                        batch_format="pyarrow", num_cpus=1)
    ds = ds.map_batches(
        PredictActor,
        fn_constructor_kwargs={"index_dir": job.index_dir, "device": device, "settings": job.settings(),
                               "runtime": job.runtime},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actor_plan.actors),
        num_gpus=actor_plan.gpus_per_actor,
        num_cpus=1,  # Ray sets OMP_NUM_THREADS to it: torch uses that many threads on CPU
    )
    assembler = ChunkAssembler(plan.store, plan.config)
    stats = RunStats()
    for out in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows = out.column(ROW).to_numpy()
        table = out.drop_columns([ROW])
        assembler.add(rows, table)
        stats.add(table)
        if progress is not None:
            progress.update(table.num_rows)
    if assembler.pending:
        raise RuntimeError(f"{assembler.pending} chunks were left incomplete by the Ray job")
    return stats


def _image_size(index_dir: str) -> int:
    from geosurge_index.model import encoder_image_size

    return encoder_image_size(index_dir)  # any encoder kind
