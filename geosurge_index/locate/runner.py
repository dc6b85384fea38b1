"""The runner: a `LocateJob` on this machine (DataLoader decoding workers -> `Predictor` -> shards),
or handed to the Ray strategy (`locate.ray_runner`), which wraps the same stages."""

from __future__ import annotations

import os

import pyarrow as pa

from geosurge_index.locate.decode import DecodeSpec, InputDataset
from geosurge_index.locate.job import (
    LocateJob,
    Plan,
    RunStats,
    batches_of,
    default_batch_size,
    default_workers,
    plan_job,
    summarize,
)
from geosurge_index.locate.predictor import Predictor
from geosurge_index.pred_store import ChunkAssembler


def _worker_init(_):
    import torch

    torch.set_num_threads(1)  # workers only decode; the model owns the other threads


def run_local(plan: Plan, predictor: Predictor | None = None, progress=None) -> RunStats:
    """The job on this machine: DataLoader decoding workers -> predictor -> shards."""
    import torch

    job = plan.job
    if predictor is None:
        predictor = Predictor.open(job.index_dir, job.device, job.settings(), job.runtime)
    cuda = predictor.device.type == "cuda"
    workers = default_workers(cuda) if job.workers is None else job.workers
    threads = torch.get_num_threads()
    if not cuda:
        # Decoding processes and torch's threads share the cores: oversubscribed, torch's OpenMP
        # threads spin against the decoders and a run gets ~10x slower (measured on 2 cores).
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - workers)))
    try:
        return _run_local(plan, predictor, progress, cuda, workers)
    finally:
        torch.set_num_threads(threads)


def _run_local(plan: Plan, predictor: Predictor, progress, cuda: bool, workers: int) -> RunStats:
    import torch

    job = plan.job
    if predictor.settings.ten_crop != job.ten_crop:
        raise ValueError("the predictor's ten_crop setting differs from the job's")
    batch_size = job.batch_size or default_batch_size(cuda, job.ten_crop)
    size = predictor.image_size
    spec = DecodeSpec(size, size if job.draft_size is None else job.draft_size, job.max_pixels, job.ten_crop)
    batches = batches_of(plan.pending_rows(), batch_size, plan.config.chunk_size)
    dataset = InputDataset(plan.table, batches, spec)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,  # items are batches already
        shuffle=False,
        num_workers=workers,
        pin_memory=cuda,
        prefetch_factor=4 if workers else None,
        worker_init_fn=_worker_init if workers else None,
        persistent_workers=False,
    )
    id_col, path_col = plan.table.column("id"), plan.table.column("path")
    assembler = ChunkAssembler(plan.store, plan.config)
    stats = RunStats()
    for batch in loader:
        rows_arr = pa.array(batch.rows)
        table = predictor.predict(batch, id_col.take(rows_arr).to_pylist(), path_col.take(rows_arr).to_pylist())
        assembler.add(batch.rows, table)
        stats.add(table)
        if progress is not None:
            progress.update(len(batch))
            if stats.errors:
                progress.set_postfix(errors=sum(stats.errors.values()), refresh=False)
    if assembler.pending:
        raise RuntimeError(f"{assembler.pending} chunks were left incomplete")
    return stats


def run_job(job: LocateJob, ray_address: str | None = None, predictor: Predictor | None = None,
            ray_options: dict | None = None) -> dict:
    """Plan, run (locally or on Ray), write `_summary.json`; return the summary."""
    from geosurge_index.progress import bar

    if ray_address is not None:  # before the ledger is written: without Ray, say how to get it
        from geosurge_index.locate.ray_runner import require_ray

        require_ray()
    plan = plan_job(job)
    try:
        n_todo = len(plan.pending_rows())
        with bar(total=n_todo, desc="locate", unit="img") as progress:
            if n_todo == 0:
                stats = RunStats()
            elif ray_address is not None:
                from geosurge_index.locate.ray_runner import run_ray

                stats = run_ray(plan, ray_address, progress=progress, **(ray_options or {}))
            else:
                stats = run_local(plan, predictor, progress=progress)
        summary = summarize(plan, stats, "ray" if ray_address is not None else "local")
        if summary["complete"]:
            plan.store.finish(summary)
    finally:
        plan.store.release()
    return summary

