"""The runner: a `LocateJob` on this machine (DataLoader decoding workers -> `Predictor` -> shards),
or handed to the Ray strategy (`locate.ray_runner`), which wraps the same stages."""

from __future__ import annotations

import sys

import pyarrow as pa

from geosurge_index.locate.decode import DecodeSpec, InputDataset
from geosurge_index.locate.job import (
    LocateJob,
    Plan,
    RunStats,
    available_cores,
    batch_bytes,
    batches_of,
    default_batch_size,
    plan_job,
    plan_loader,
    summarize,
)
from geosurge_index.locate.predictor import Predictor
from geosurge_index.pred_store import ChunkAssembler


def _worker_init(_):
    import torch

    torch.set_num_threads(1)  # workers only decode; the model owns the other threads


def _say(line: str, progress) -> None:
    """One line on stderr, above the progress bar when there is one."""
    if progress is not None and hasattr(progress, "write"):
        progress.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


def run_local(plan: Plan, predictor: Predictor | None = None, progress=None) -> RunStats:
    """The job on this machine: DataLoader decoding workers -> predictor -> shards."""
    import torch

    job = plan.job
    if predictor is None:
        predictor = Predictor.open(job.index_dir, job.device, job.settings())
    cuda = predictor.device.type == "cuda"
    batch_size = job.batch_size or default_batch_size(cuda, job.ten_crop)
    crops = 10 if job.ten_crop else 1
    loader = plan_loader(cuda, batch_bytes(batch_size, predictor.image_size, crops), job.workers)
    _say(f"locate: {loader.line}", progress)
    threads = torch.get_num_threads()
    if not cuda:
        # Decoding processes and torch's threads share the cores: oversubscribed, torch's OpenMP
        # threads spin against the decoders and a run gets ~10x slower (measured on 2 cores).
        torch.set_num_threads(max(1, min(threads, available_cores() - loader.workers)))
    try:
        return _run_local(plan, predictor, progress, cuda, loader, batch_size)
    finally:
        torch.set_num_threads(threads)


def _run_local(plan: Plan, predictor: Predictor, progress, cuda: bool, loader_plan, batch_size: int) -> RunStats:
    import torch

    from geosurge_index.devices import on_device

    job = plan.job
    if predictor.settings.ten_crop != job.ten_crop:
        raise ValueError("the predictor's ten_crop setting differs from the job's")
    size = predictor.image_size
    spec = DecodeSpec(size, size if job.draft_size is None else job.draft_size, job.max_pixels, job.ten_crop,
                      skip_tagged=job.skip_tagged)
    batches = batches_of(plan.pending_rows(), batch_size, plan.config.chunk_size)
    dataset = InputDataset(plan.table, batches, spec)
    workers = loader_plan.workers
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,  # items are batches already
        shuffle=False,
        num_workers=workers,
        pin_memory=cuda,
        prefetch_factor=loader_plan.prefetch,
        worker_init_fn=_worker_init if workers else None,
        persistent_workers=False,
    )
    id_col, path_col = plan.table.column("id"), plan.table.column("path")
    assembler = ChunkAssembler(plan.store, plan.config)
    stats = RunStats()
    # The predictor's GPU is the current one while the loader runs: its pinning thread pins on
    # that GPU (cuda:N), not in a new context on GPU 0.
    with on_device(predictor.device):
        for batch in loader:
            rows_arr = pa.array(batch.rows)
            table = predictor.predict(batch, id_col.take(rows_arr).to_pylist(),
                                      path_col.take(rows_arr).to_pylist())
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
        from geosurge_index.locate.ray_runner import plan_actors, require_ray

        require_ray()
        opts = ray_options or {}  # the flags' own checks (a GPU share of 0, no actors), before any work
        plan_actors("cpu", 0, opts.get("actors"), opts.get("gpus_per_actor"))
        if job.device != "auto":
            from geosurge_index.devices import parse_device

            parse_device(job.device)  # its spelling; the cluster's GPUs are checked once Ray is up
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

