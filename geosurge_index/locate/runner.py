"""The runner: a `LocateJob` on this machine (DataLoader decoding workers -> `Predictor` -> shards),
or handed to the Ray strategy (`locate.ray_runner`), which wraps the same stages."""

from __future__ import annotations

import signal
import sys
import threading

import pyarrow as pa

from geosurge_index.locate.decode import DecodeSpec, InputDataset, decode_rows_isolated
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
        predictor = Predictor.open(job.index_dir, job.device, job.settings(), job.runtime)
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
                      job.max_image_bytes, skip_tagged=job.skip_tagged)
    batches = batches_of(plan.pending_rows(), batch_size, plan.config.chunk_size)
    id_col, path_col = plan.table.column("id"), plan.table.column("path")
    assembler = ChunkAssembler(plan.store, plan.config)
    stats = RunStats()

    def handle(batch) -> None:
        rows_arr = pa.array(batch.rows)
        table = predictor.predict(batch, id_col.take(rows_arr).to_pylist(), path_col.take(rows_arr).to_pylist())
        assembler.add(batch.rows, table)
        stats.add(table)
        if progress is not None:
            progress.update(len(batch))
            if stats.errors:
                progress.set_postfix(errors=sum(stats.errors.values()), refresh=False)

    workers = loader_plan.workers
    done = 0  # batches handled, in order
    # The predictor's GPU is the current one while the loader runs: its pinning thread pins on
    # that GPU (cuda:N), not in a new context on GPU 0.
    with on_device(predictor.device):
        while done < len(batches):
            loader = torch.utils.data.DataLoader(
                InputDataset(plan.table, batches[done:], spec),
                batch_size=None,  # items are batches already
                shuffle=False,
                num_workers=workers,
                pin_memory=cuda,
                prefetch_factor=loader_plan.prefetch,
                worker_init_fn=_worker_init if workers else None,
                persistent_workers=False,
            )
            it = iter(loader)
            restore = _worker_deaths_surface_in_next() if workers else None
            try:
                while True:
                    try:
                        batch = next(it)
                    except StopIteration:
                        break
                    except RuntimeError as err:
                        if not _is_worker_death(err):
                            raise
                        # A decoding process died (a codec's segfault, the OOM killer): the batches it
                        # may have held are decoded again one image at a time in a fresh process;
                        # the input that kills that one too becomes a `worker_crashed` row.
                        del it, loader
                        suspects = batches[done:done + workers * (loader_plan.prefetch or 1)]
                        _say(f"locate: a decoding process died ({str(err).strip()}); decoding the next "
                             f"{sum(map(len, suspects))} images one at a time in a separate process", progress)
                        for rows in suspects:
                            handle(decode_rows_isolated(plan.table, rows, spec))
                            done += 1
                        break
                    handle(batch)
                    done += 1
            finally:
                if restore is not None:
                    restore()
    if assembler.pending:
        raise RuntimeError(f"{assembler.pending} chunks were left incomplete")
    return stats


def _is_worker_death(err: RuntimeError) -> bool:
    """torch's error when a DataLoader worker died ('DataLoader worker (pid(s) ...) exited
    unexpectedly', '... is killed by signal: ...')."""
    return str(err).lstrip().startswith("DataLoader worker")


def _worker_deaths_surface_in_next():
    """torch's SIGCHLD handler raises a dead worker's error at whatever line the main thread is
    running (mid-prediction, mid-write); with the default disposition the loader finds the dead
    worker itself, inside `next()`, where the runner handles it. Returns the undo, or None
    (not the main thread: signals cannot be set there)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGCHLD)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    return lambda: signal.signal(signal.SIGCHLD, previous)


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
        for line in plan.store.damaged:
            _say(f"locate: {plan.store.dir / line.split(':', 1)[0]} was damaged ({line.split(': ', 1)[1]}): "
                 "computing that chunk again", None)
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

