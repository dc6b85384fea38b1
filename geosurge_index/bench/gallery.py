"""`geosurge bench gallery`: galleries at MP-16 scale and beyond (build time, bytes per reference,
recall of the exact neighbour inside the chosen cells, queries/s of search + refinement)."""

from __future__ import annotations

import time
from dataclasses import dataclass

DESCRIPTION = """\
Galleries (geotagged references searched inside the best cells) at MP-16 scale and beyond.

Method. A synthetic 7-level hierarchy with about 25,000 finest cells (geosurge_index.synthetic,
as `geosurge bench search`); --refs references (mp16: 4.72 M, the MP-16 training set; 20m: 20 M)
spread over the finest cells with heavy-tailed counts (lognormal weights, as photo density is),
768-d. A reference of cell c (and a query whose source is c) is the mean of the vectors on c's
path plus Gaussian noise of relative norm --ref-noise (--query-noise): references of one cell
cluster around it, as trained embeddings of one place do. Each reference is generated from
(seed, its cell), so the references of any cell can be regenerated exactly. For each storage
(flat float32, fp16, pq with dim/8 bytes) whose size fits --max-gib: the gallery is built cell by
cell (`gallery.store.add_to_ivf`, timed; pq includes training its codebooks on 32,768 references, a
fixed cost), then one batch of
--queries queries is searched (beam search, default schedule) alone and with refinement in
the --refine-cells best cells (`GeoIndex.search`, FAISS search_preassigned on those cells'
lists); the search and the refinement step are timed separately, interleaved, best of --repeats
(overhead = refinement time / search time); recall = how often the refined answer is the exact nearest reference
among the chosen cells' members (numpy brute force on the regenerated float32 references).
A storage whose estimated size exceeds --max-gib (default: half of the memory available now) is
reported as not fitting, not run. --probed-lists fills only the lists that the queries' chosen
cells probe, each with exactly the references it holds at full scale (the others stay empty): the
search, the refinement and the recall are then those of the full-scale gallery (FAISS scans only
the lists it is given), at a fraction of the build; the build time is the codebook training plus
the adds extrapolated from their measured rate, marked so, and the memory figure is the full scale's (bytes/ref x references).
"""

SCALES = {"mp16": 4_720_000, "20m": 20_000_000}


@dataclass(frozen=True)
class GalleryBench:
    scale: str = "mp16"  # mp16, 20m or both
    quick: bool = False  # 1/20 of the references, 256 queries
    storages: str = "flat,fp16,pq"
    queries: int = 1024
    refine_cells: int = 3
    n_finest: int = 25_000
    dim: int = 768
    ref_noise: float = 1.0
    query_noise: float = 1.0
    max_gib: float | None = None  # None: half of MemAvailable
    repeats: int = 3
    seed: int = 0
    probed_lists: bool = False  # fill only the lists the queries probe (search/recall exact; build extrapolated)


def _available_gib() -> float:
    from geosurge_index.devices import free_memory

    return free_memory("cpu") / 2**30 or 8.0  # 8 GiB when /proc/meminfo says nothing


def _bytes_per_ref(storage: str, dim: int) -> int:
    """Code bytes + the 8-byte id FAISS keeps per reference in an inverted list."""
    return {"flat": 4 * dim, "fp16": 2 * dim, "pq": dim // 8}[storage] + 8


class _Refs:
    """References per finest cell, regenerable: counts, and vectors from (seed, cell)."""

    def __init__(self, path_mean, n_refs: int, noise: float, seed: int):
        import numpy as np

        self.path_mean = path_mean
        n_cells, self.dim = path_mean.shape
        w = np.random.default_rng([seed, 1]).lognormal(0.0, 1.0, n_cells)
        self.counts = np.random.default_rng([seed, 2]).multinomial(n_refs, w / w.sum())
        self.noise = np.float32(noise / np.sqrt(self.dim))
        self.seed = seed

    def of_cell(self, c: int):
        import numpy as np

        n = int(self.counts[c])
        x = np.random.default_rng([self.seed, 3, c]).standard_normal((n, self.dim), dtype=np.float32)
        x *= self.noise
        x += self.path_mean[c]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x


def _path_means(h):
    import numpy as np

    levels = len(h.tables)
    n = h.sizes[-1]
    out = np.zeros((n, h.tables[0].shape[1]), np.float32)
    cell = np.arange(n)
    for lv in range(levels - 1, -1, -1):
        out += h.tables[lv][cell] / np.float32(levels)
        cell = h.parents[lv][cell]
    return out


def _build(refs: _Refs, storage: str, n_lists: int, progress):
    import numpy as np

    from geosurge_index.gallery.store import add_to_ivf, new_ivf

    index = new_ivf(n_lists, refs.dim, storage)
    train_s = 0.0
    if not index.is_trained:  # pq: codebooks first (a fixed cost, timed apart from the adds)
        from geosurge_index.gallery.store import PQ_TRAIN_ROWS

        sample, n = [], 0
        for c in np.flatnonzero(refs.counts):
            sample.append(refs.of_cell(int(c)))
            n += sample[-1].shape[0]
            if n >= PQ_TRAIN_ROWS:
                break
        t0 = time.perf_counter()
        index.pq.train(np.concatenate(sample)[:PQ_TRAIN_ROWS])
        index.is_trained = True
        train_s = time.perf_counter() - t0
    first = 0
    batch, cells = [], []
    size = 0
    for c in range(n_lists):
        if refs.counts[c]:
            batch.append(refs.of_cell(c))
            cells.append(np.full(refs.counts[c], c, np.int64))
            size += int(refs.counts[c])
        if size >= 262_144 or (c == n_lists - 1 and size):
            x, cl = np.concatenate(batch), np.concatenate(cells)
            add_to_ivf(index, x, cl, first)
            first += x.shape[0]
            progress.update(x.shape[0])
            batch, cells, size = [], [], 0
    return index, train_s


def bench_storage(name: str, storage: str, refs: _Refs, index, queries, settings: GalleryBench, n_refs: int) -> dict:
    import numpy as np
    import pyarrow as pa

    from geosurge_index.gallery.refine import RefineSettings
    from geosurge_index.gallery.store import Gallery, GalleryEntry
    from geosurge_index.progress import bar

    n_lists = index.tree.sizes[-1]
    n_built = int(refs.counts.sum())
    t0 = time.perf_counter()
    with bar(total=n_built, desc=f"build {storage}", unit="ref") as progress:
        ivf, train_s = _build(refs, storage, n_lists, progress)
    # with --probed-lists only the probed lists are built: the adds extrapolated from their rate
    build_rate = n_built / max(time.perf_counter() - t0 - train_s, 1e-9)
    build_s = train_s + n_refs / build_rate
    cell = np.repeat(np.arange(n_lists), refs.counts).astype(np.int32)
    meta = pa.table({"id": pa.array(np.arange(len(cell)).astype(str)), "lat": np.zeros(len(cell)),
                     "lon": np.zeros(len(cell)), "cell": cell, "source": pa.nulls(len(cell), pa.string())})
    entry = GalleryEntry("bench", "gallery-bench.g1.faiss", "gallery-bench.g1.parquet", 1, len(cell), storage,
                         refs.dim)
    index.use_galleries("none")
    index.gallery_entries.clear()
    index._galleries.clear()
    index.add_gallery(Gallery(entry, ivf, meta))
    index.use_galleries(None, RefineSettings(cells=settings.refine_cells))
    n = queries.shape[0]

    from geosurge_index.gallery.refine import refine

    galleries = index.galleries()
    rs = index.refine_settings
    search = lambda q: index.engine.search(q, top_k=max(5, rs.cells), batch_size=n)  # noqa: E731
    plain = search(queries[:32])
    refine(plain, queries[:32], galleries, rs)  # warm-up
    # the search and the refinement step timed separately, interleaved, best of --repeats: on a
    # shared machine a difference of two end-to-end timings is mostly noise
    s_alone = c_alone = s_ref = c_ref = float("inf")
    for _ in range(max(1, settings.repeats)):
        t, c = time.perf_counter(), time.process_time()
        plain = search(queries)
        s_alone, c_alone = min(s_alone, time.perf_counter() - t), min(c_alone, time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        refined = refine(plain, queries, galleries, rs)
        s_ref, c_ref = min(s_ref, time.perf_counter() - t), min(c_ref, time.process_time() - c)
    assert np.array_equal(index.search(queries[:64], top_k=5).lat, refined.lat[:64])  # the same code path
    # recall: the refined neighbour is the exact nearest among the chosen cells' members
    starts = np.concatenate([[0], np.cumsum(refs.counts)])
    cache: dict[int, np.ndarray] = {}
    hits = total = 0
    for i in range(n):
        chosen = [int(c) for c in plain.topk_cells[i, :settings.refine_cells] if c >= 0 and refs.counts[c]]
        if not chosen:
            continue
        best_sim, best_row = -np.inf, -1
        for c in chosen:
            if c not in cache:
                cache[c] = refs.of_cell(c)
            sims = cache[c] @ queries[i]
            j = int(np.argmax(sims))
            if sims[j] > best_sim:
                best_sim, best_row = float(sims[j]), int(starts[c] + j)
        total += 1
        hits += refined.refinement.neighbour_id[i] == str(best_row)
    bytes_ref = ivf.invlists.code_size + 8
    row = {"storage": storage, "references": n_refs, "references_built": int(ivf.ntotal), "build_s": build_s,
           "build_extrapolated": n_built < n_refs, "train_s": train_s, "build_refs_per_s": build_rate, "bytes_per_ref": bytes_ref,
           "gib": n_refs * bytes_ref / 2**30, "search_qps": n / s_alone, "refined_qps": n / (s_alone + s_ref),
           "refine_overhead_pct": 100 * s_ref / s_alone, "refine_overhead_cpu_pct": 100 * c_ref / max(c_alone, 1e-9),
           "recall_exact_neighbour": hits / max(total, 1), "queries_with_refs": total}
    mark = "*" if n_built < n_refs else " "
    print(f"  {storage:>5} {n_refs:>11,} {build_s:8.0f}{mark} {bytes_ref:9d} {row['gib']:8.2f} "
          f"{row['search_qps']:10.1f} {row['refined_qps']:10.1f} {row['refine_overhead_pct']:9.1f}% "
          f"{row['refine_overhead_cpu_pct']:9.1f}% {row['recall_exact_neighbour']:9.2%}")
    del ivf
    index.use_galleries("none")
    index._galleries.clear()
    return row


def run_gallery_bench(settings: GalleryBench) -> dict:
    import numpy as np

    from geosurge_index.errors import UserError
    from geosurge_index.index import GeoIndex
    from geosurge_index.machine import describe_machine, machine_info
    from geosurge_index.synthetic import synthetic_hierarchy, synthetic_queries

    storages = [s.strip() for s in settings.storages.split(",") if s.strip()]
    bad = [s for s in storages if s not in ("flat", "fp16", "pq")]
    if bad or not storages:
        raise UserError(f"--storages {settings.storages!r}: choose among flat, fp16, pq")
    names = ["mp16", "20m"] if settings.scale == "both" else [settings.scale]
    if any(n not in SCALES for n in names):
        raise UserError(f"--scale {settings.scale!r}: mp16, 20m or both")
    info = machine_info()
    print("geosurge bench gallery")
    print(f"machine: {describe_machine(info)}")
    print("method: " + " ".join(DESCRIPTION.split("\n\n", 1)[1].split()))
    budget = settings.max_gib if settings.max_gib is not None else _available_gib() / 2
    n_q = min(settings.queries, 256) if settings.quick else settings.queries
    h = synthetic_hierarchy(settings.n_finest, dim=settings.dim, seed=settings.seed)
    path_mean = _path_means(h)
    index = GeoIndex.from_arrays(h.tables, h.temperatures, h.tree(), device="cpu")
    q, _ = synthetic_queries(h, n_q, query_noise=settings.query_noise, seed=settings.seed + 1)
    del h
    figures = {"machine": info, "memory_budget_gib": budget, "scales": []}
    for name in names:
        n_refs = SCALES[name] // (20 if settings.quick else 1)
        refs = _Refs(path_mean, n_refs, settings.ref_noise, settings.seed)
        probed = ""
        if settings.probed_lists:
            chosen = index.engine.search(q, top_k=max(5, settings.refine_cells), batch_size=len(q)).topk_cells
            keep = np.zeros(len(refs.counts), bool)
            keep[np.unique(chosen[:, :settings.refine_cells][chosen[:, :settings.refine_cells] >= 0])] = True
            full = refs.counts.copy()
            refs.counts = np.where(keep, refs.counts, 0)
            probed = (f"; --probed-lists: {int(keep.sum()):,} probed lists filled, {int(refs.counts.sum()):,} "
                      f"references built (* = build time extrapolated from their rate)")
            refs_median, refs_max = int(np.median(full)), int(full.max())
        else:
            refs_median, refs_max = int(np.median(refs.counts)), int(refs.counts.max())
        print(f"\n[{name}{' (quick, 1/20)' if settings.quick else ''}] {n_refs:,} references over "
              f"{index.tree.sizes[-1]:,} finest cells (median {refs_median}, max {refs_max} "
              f"per cell), {n_q} queries, refinement in the best {settings.refine_cells} cells; "
              f"memory budget {budget:.1f} GiB{probed}")
        print(f"  {'store':>5} {'refs':>11} {'build s':>9} {'B/ref':>9} {'GiB':>8} {'search q/s':>10} "
              f"{'+refine':>10} {'overhead':>10} {'(CPU)':>10} {'recall':>9}")
        rows = []
        for storage in storages:
            need = n_refs * _bytes_per_ref(storage, settings.dim) / 2**30
            fits = need <= budget
            if not fits:
                print(f"  {storage:>5} {n_refs:>11,}  does not fit: about {need:.1f} GiB of lists > {budget:.1f} GiB budget"
                      + (" (measured on its probed lists all the same)" if settings.probed_lists else ""))
                if not settings.probed_lists:
                    rows.append({"storage": storage, "references": n_refs, "fits": False, "gib_needed": need})
                    continue
            rows.append({"fits": fits, **bench_storage(name, storage, refs, index, q, settings, n_refs)})
        figures["scales"].append({"scale": name, "references": n_refs, "rows": rows})
    return figures
