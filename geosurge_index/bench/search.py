"""`geosurge bench search`: speed and fidelity of the coarse-to-fine search on synthetic
hierarchies (`geosurge_index.synthetic`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

DESCRIPTION = """\
Speed and fidelity of the coarse-to-fine search on synthetic hierarchies (geosurge_index.synthetic).

Method. A random 7-level hierarchy of real S2 cells: going one level finer a cell keeps 0-4
children (1 = the same S2 cell, 2-4 = that many of its S2 children, 0 = a dead end; mean 2.2),
so level 1 has about n_finest / 2.2^6 cells. Embeddings are 768-d unit vectors; a child's is its
parent's plus Gaussian noise (--child-noise, relative norm), so a path is a chain of nearby
vectors. A query is the mean of the vectors on a random finest cell's path plus noise
(--query-noise): coarse levels are easy and fine ones ambiguous, as in a trained model. Scales:
mp16 = 25,000 finest cells (MP-16 at tau_max 500), internet = 1,000,000. On one batch of
--queries queries, the exhaustive search (a GEMM against every cell of every level) and the beam
search for each B are timed (wall clock and process CPU time, the latter less sensitive to a
shared machine; beam: best of --repeats runs after a warm-up), and the beam's top-1 finest
cell is compared with the exhaustive one (agreement). Also printed: how often the exhaustive
top-1 is the query's source cell (how hard the queries are).
"""

SCALES = {"mp16": 25_000, "internet": 1_000_000}


@dataclass(frozen=True)
class SearchBench:
    scale: str = "both"  # mp16, internet or both
    quick: bool = False  # 1/10 of each scale's cells, 256 queries, B in 1,4,16
    queries: int = 1024
    beams: str = "1,2,4,8,16,32"  # B values to time
    schedules: str = "64,32,16,16,16,16;256,128,64,32,32,32;512,256,128,64,32,16"  # per-level beams
    dim: int = 768
    top_k: int = 5
    child_noise: float = 0.6
    query_noise: float = 4.0
    temperature: float = 0.05
    repeats: int = 3
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"


def _sync(device: str) -> None:
    from geosurge_index.devices import synchronize

    synchronize(device)  # the engine's GPU (cuda:N), not the current one


def bench_scale(name: str, n_finest: int, settings: SearchBench, beams: list, n_queries: int) -> dict:
    import numpy as np

    from geosurge_index.index import GeoIndex
    from geosurge_index.synthetic import synthetic_hierarchy, synthetic_queries

    t0 = time.perf_counter()
    h = synthetic_hierarchy(n_finest, dim=settings.dim, seed=settings.seed, child_noise=settings.child_noise,
                            temperature=settings.temperature)
    queries, truth = synthetic_queries(h, n_queries, query_noise=settings.query_noise, seed=settings.seed + 1)
    index = GeoIndex.from_arrays(h.tables, h.temperatures, h.tree(), device=settings.device,
                                 backend=settings.backend)
    del h  # the engine holds the tables (zero-copy on CPU)
    build_s = time.perf_counter() - t0
    sizes = index.tree.sizes
    gib = sum(sizes) * settings.dim * 4 / 2**30
    print(f"\n[{name}] cells per level {sizes} ({sum(sizes):,} vectors, {gib:.2f} GiB float32), "
          f"built in {build_s:.1f} s; {n_queries} queries, device {index.device}, backend {index.backend}")
    dev = index.device
    index.search(queries[:8], top_k=settings.top_k, exhaustive=True)  # warm-up
    _sync(dev)
    t, c = time.perf_counter(), time.process_time()
    ex = index.search(queries, top_k=settings.top_k, exhaustive=True, batch_size=n_queries)
    _sync(dev)
    ex_s, ex_cpu = time.perf_counter() - t, time.process_time() - c
    ex_rate = n_queries / ex_s
    truth_hit = float(np.mean(ex.topk_cells[:, 0] == truth))
    print(f"  exhaustive: {ex_rate:10.1f} queries/s   ({ex_s:.2f} s wall, {ex_cpu:.2f} s CPU; "
          f"top-1 = source cell {truth_hit:.1%})")
    rows = []
    print(f"  {'B':>22} {'queries/s':>10} {'x exhaustive':>13} {'x (CPU time)':>13} {'top-1 agree':>12} "
          f"{'top-k overlap':>14} {'P(best)':>8}")
    for b in beams:
        index.search(queries[:64], top_k=settings.top_k, beam=b)  # warm-up
        best = best_cpu = float("inf")
        for _ in range(max(1, settings.repeats)):
            _sync(dev)
            t, c = time.perf_counter(), time.process_time()
            res = index.search(queries, top_k=settings.top_k, beam=b, batch_size=n_queries)
            _sync(dev)
            best, best_cpu = min(best, time.perf_counter() - t), min(best_cpu, time.process_time() - c)
        agree = float(np.mean(res.topk_cells[:, 0] == ex.topk_cells[:, 0]))
        overlap = float(np.mean([len(set(a) & set(e)) / len(e)
                                 for a, e in zip(res.topk_cells.tolist(), ex.topk_cells.tolist(), strict=True)]))
        rate = n_queries / best
        label = b if isinstance(b, int) else ",".join(map(str, b))
        cpu_speedup = ex_cpu / max(best_cpu, 1e-9)
        rows.append({"beam": label, "queries_per_s": rate, "speedup": rate / ex_rate,
                     "speedup_cpu_time": cpu_speedup, "top1_agreement": agree,
                     "topk_overlap": overlap, "mean_probability": float(res.probability.mean())})
        print(f"  {label:>22} {rate:10.1f} {rate / ex_rate:12.1f}x {cpu_speedup:12.1f}x {agree:12.2%} "
              f"{overlap:14.2%} {float(res.probability.mean()):8.3f}")
    return {"scale": name, "cells_per_level": sizes, "queries": n_queries, "device": dev,
            "backend": index.backend, "exhaustive_queries_per_s": ex_rate,
            "exhaustive_top1_is_source": truth_hit, "beams": rows}


def run_search_bench(settings: SearchBench) -> dict:
    """Run the benchmark, printing the machine, the method and the figures; returns the figures."""
    from geosurge_index.errors import UserError

    try:
        beams = [int(v) for v in settings.beams.split(",") if v.strip()]
    except ValueError as err:
        raise UserError(f"--beams {settings.beams!r}: expected comma-separated integers") from err
    if not beams or min(beams) < 1:
        raise UserError("--beams: values must be >= 1")
    from geosurge_index.search import parse_beam

    schedules = [parse_beam(v, 7) for v in settings.schedules.split(";") if v.strip()]
    n_queries = settings.queries
    names = ["mp16", "internet"] if settings.scale == "both" else [settings.scale]
    if settings.quick:
        n_queries = min(n_queries, 256)
        beams = [b for b in beams if b in (1, 4, 16)] or beams[:3]
    from geosurge_index.machine import describe_machine, machine_info

    info = machine_info()
    print("geosurge bench search")
    print(f"machine: {describe_machine(info)}")
    print("method: " + " ".join(DESCRIPTION.split("\n\n", 1)[1].split()))
    figures = {"machine": info, "scales": []}
    for name in names:
        n = SCALES[name] // (10 if settings.quick else 1)
        figures["scales"].append(bench_scale(name + (" (quick, 1/10)" if settings.quick else ""),
                                             n, settings, beams + schedules, n_queries))
    return figures
