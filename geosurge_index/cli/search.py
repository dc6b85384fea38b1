"""`geosurge search` (re-query stored visual embeddings) and `geosurge bench search`."""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

PROBABILITIES = (
    "Probabilities: a finest cell's score is the product of the per-level softmax probabilities "
    "(cosine / temperature of the level) of the cells on its path; reported probabilities are "
    "those products renormalised over the finest cells scored. With --exhaustive that is every "
    "finest cell, so they are exact (the model's posterior over the finest cells); in beam mode "
    "it is the finest cells the beam explored, so they sum to 1 over those candidates and "
    "over-estimate the exhaustive value."
)

SEARCH_DESCRIPTION = (
    "Re-query stored visual embeddings against INDEX_DIR, without images or the encoder. "
    "Input: a .npy file (n, dim) float (ids = row numbers), or a Parquet file or folder of "
    "Parquet files with an `embedding` list<float> column and optional `id`, `path` and `error` "
    "columns (e.g. a PRED_DIR from `geosurge locate --save-embeddings`). Output: one Parquet "
    "file in the PRED_DIR schema (id, path, lat, lon, probability, cell_l1..7, token_l1..7, "
    "topk_cells, topk_probs, width, height, error), one row per input row, in input order; a row "
    "with a missing, wrong-length, non-finite or all-zero embedding becomes an error row.\n\n"
    "Search: level 1 is scored in full; at each finer level only the children of the best B "
    "paths kept at the level above (--beam); --exhaustive scores every cell of every level. "
    + PROBABILITIES
)


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when torch sees a GPU, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "faiss"],
                   help="faiss: on CPU the kept cells' children are scored by FAISS's by-id inner "
                        "product kernel in place (fastest on CPU); on CUDA level 1 goes through "
                        "its FAISS GPU index. torch: all scoring in torch on --device (the GPU "
                        "code path). auto: faiss on CPU; on CUDA faiss when FAISS has GPU "
                        "support, else torch")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "search",
        help="re-query stored visual embeddings (.npy or Parquet) against an index",
        description=SEARCH_DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("index_dir", metavar="INDEX_DIR", help="index folder written by `geosurge export`")
    p.add_argument("--embeddings", required=True, metavar="FILE",
                   help=".npy (n, dim), or Parquet file/folder with an `embedding` list column")
    p.add_argument("--out", required=True, metavar="FILE", help="output Parquet file")
    p.add_argument("--top-k", type=int, default=5, help="finest cells returned per query")
    from geosurge_index.search import DEFAULT_BEAM

    p.add_argument("--beam", default=",".join(map(str, DEFAULT_BEAM)),
                   help="B, paths kept at each of levels 1..6: one value, or one per level; wide "
                        "at the small coarse levels is cheap and catches paths that win on finer "
                        "levels (`geosurge bench search` measures agreement with --exhaustive)")
    p.add_argument("--exhaustive", action="store_true",
                   help="score every cell of every level (exact, slow: the reference)")
    p.add_argument("--batch-size", type=int, default=1024, help="queries per engine call")
    p.add_argument("--id-column", default="id", help="Parquet input: the id column (row number if absent)")
    p.add_argument("--embedding-column", default="embedding", help="Parquet input: the embedding column")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the sha256 check of the index files (presence, sizes and the structure: "
                        "unit-norm vectors, cell counts, the tree are still checked)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_engine_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import pyarrow.parquet as pq

    from geosurge_index.errors import UserError
    from geosurge_index.index import GeoIndex
    from geosurge_index.progress import bar
    from geosurge_index.search import parse_beam

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {out} exists (use --overwrite to replace it)")
    if args.top_k < 1 or args.batch_size < 1:
        raise UserError("--top-k and --batch-size must be >= 1")
    # encoder=False: stored embeddings need no encoder, so its files are neither required nor read
    index = GeoIndex.open(args.index_dir, device=args.device, backend=args.backend, verify=args.verify,
                          encoder=False)
    beam = parse_beam(args.beam, index.levels)
    batches, total = read_embedding_batches(args.embeddings, index.dim, args.batch_size,
                                            id_column=args.id_column,
                                            embedding_column=args.embedding_column)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    n_rows = n_err = 0
    start = time.perf_counter()
    writer = None
    try:
        with bar(total=total, desc="search", unit="emb") as progress:
            for b in batches:
                result = None
                if b.embeddings.shape[0]:
                    result = index.search(b.embeddings, top_k=args.top_k, beam=beam,
                                          exhaustive=args.exhaustive, batch_size=args.batch_size)
                table = index.to_arrow(result, b.ids, b.paths, b.errors)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
                n_rows += table.num_rows
                n_err += sum(e is not None for e in b.errors)
                progress.update(table.num_rows)
        if writer is None:  # no input rows: an empty file with the schema
            table = index.to_arrow(None, [], [], [])
            writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
        writer.close()
        writer = None
        os.replace(tmp, out)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    secs = time.perf_counter() - start
    mode = "exhaustive" if args.exhaustive else f"beam {','.join(map(str, beam))}"
    print(f"wrote {out}: {n_rows} rows ({n_err} errors), {mode}, {index.device}/{index.backend}, "
          f"{n_rows / max(secs, 1e-9):.0f} rows/s")
    return 0


@dataclass
class EmbeddingBatch:
    ids: list[str]
    paths: list[str | None]
    errors: list[str | None]  # one per row
    embeddings: np.ndarray  # (rows without error, dim) float32


def _check_rows(emb: np.ndarray, errors: list[str | None], ok_rows: np.ndarray) -> np.ndarray:
    """Error rows for non-finite embeddings and ones the engine cannot normalise (a float32 norm
    of 0, e.g. all zeros or tiny values, or inf); returns the rows still fine."""
    finite = np.isfinite(emb).all(axis=1)
    with np.errstate(over="ignore", under="ignore"):
        norms = np.linalg.norm(np.where(finite[:, None], emb, 0), axis=1)  # float32, as the engine
    normal = (norms > 0) & np.isfinite(norms)
    for r in ok_rows[~finite].tolist():
        errors[r] = "bad_embedding: non-finite values"
    for r in ok_rows[finite & ~normal].tolist():
        errors[r] = "bad_embedding: all zeros, or a norm too small or too large for float32"
    return finite & normal


def read_embedding_batches(path, dim: int, batch_size: int, *, id_column: str = "id",
                           embedding_column: str = "embedding"):
    """-> (iterator of EmbeddingBatch, total rows) for a .npy file or Parquet file/folder."""
    import pyarrow.dataset as pads

    from geosurge_index.errors import UserError

    path = Path(path)
    if not path.exists():
        raise UserError(f"--embeddings {path} does not exist")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as err:
            raise UserError(f"--embeddings {path}: not a readable .npy file ({err})") from err
        if arr.ndim != 2 or arr.dtype.kind != "f" or arr.shape[1] != dim:
            raise UserError(f"--embeddings {path}: a ({arr.shape}) {arr.dtype} array; the index "
                            f"takes float (n, {dim})")

        def npy_batches():
            for a in range(0, arr.shape[0], batch_size):
                emb = np.asarray(arr[a:a + batch_size], dtype=np.float32)
                errors: list[str | None] = [None] * emb.shape[0]
                keep = _check_rows(emb, errors, np.arange(emb.shape[0]))
                yield EmbeddingBatch([str(i) for i in range(a, a + emb.shape[0])], [None] * emb.shape[0],
                                     errors, emb[keep])

        return npy_batches(), arr.shape[0]
    try:
        ds = pads.dataset(str(path), format="parquet")
        names = ds.schema.names
    except (OSError, ValueError) as err:
        raise UserError(f"--embeddings {path}: not a Parquet file or folder ({err})") from err
    if embedding_column not in names:
        raise UserError(f"--embeddings {path}: no {embedding_column!r} column (columns: {names})")
    cols = [c for c in (id_column, "path", "error") if c in names] + [embedding_column]

    def parquet_batches():
        import pyarrow.compute as pc

        row0 = 0
        for rb in ds.to_batches(columns=cols, batch_size=batch_size):
            n = rb.num_rows
            if n == 0:
                continue
            ids = (rb.column(id_column).cast("string").to_pylist() if id_column in cols else [None] * n)
            ids = [str(row0 + i) if v is None else v for i, v in enumerate(ids)]
            paths = rb.column("path").cast("string").to_pylist() if "path" in cols else [None] * n
            errors = rb.column("error").cast("string").to_pylist() if "error" in cols else [None] * n
            col = rb.column(embedding_column)
            if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
                    or pa.types.is_fixed_size_list(col.type)):
                raise UserError(f"--embeddings {path}: column {embedding_column!r} is {col.type}, "
                                "expected a list of floats")
            lengths = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False)
            flat = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.float32)
            starts = np.cumsum(lengths) - lengths
            present = col.is_valid().to_numpy(zero_copy_only=False)
            no_error = np.array([e is None for e in errors], dtype=bool)
            for r in np.flatnonzero(no_error & ~present).tolist():
                errors[r] = "missing_embedding: the row has no embedding"
            for r in np.flatnonzero(no_error & present & (lengths != dim)).tolist():
                errors[r] = f"bad_embedding: {lengths[r]} values, the index takes {dim}"
            ok_rows = np.flatnonzero([e is None for e in errors])
            emb = flat[starts[ok_rows, None] + np.arange(dim)[None, :]] if ok_rows.size else \
                np.zeros((0, dim), np.float32)
            keep = _check_rows(emb, errors, ok_rows)
            row0 += n
            yield EmbeddingBatch(ids, paths, errors, emb[keep])

    return parquet_batches(), ds.count_rows()


# --- bench -----------------------------------------------------------------------------------

BENCH_DESCRIPTION = """\
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


def register_bench(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "search",
        help="queries/s of beam vs. exhaustive search and top-1 agreement, at 25k and 1M finest cells",
        description=BENCH_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--scale", default="both", choices=["mp16", "internet", "both"],
                   help="mp16: 25k finest cells; internet: 1M (about 6 GB of embeddings) (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 1/10 of each scale's cells, 256 queries, B in 1,4,16")
    p.add_argument("--queries", type=int, default=1024, help="queries in the batch (default: %(default)s)")
    p.add_argument("--beams", default="1,2,4,8,16,32", help="B values to time (default: %(default)s)")
    p.add_argument("--schedules", default="64,32,16,16,16,16;256,128,64,32,32,32;512,256,128,64,32,16",
                   help="per-level beams (levels 1..6) to time as well, ';'-separated; wide where "
                        "levels are small and ambiguity starts (default: %(default)s)")
    p.add_argument("--dim", type=int, default=768, help="embedding width (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=5, help="finest cells returned (default: %(default)s)")
    p.add_argument("--child-noise", type=float, default=0.6,
                   help="child = parent + noise of this relative norm (default: %(default)s)")
    p.add_argument("--query-noise", type=float, default=4.0,
                   help="query = mean of its path's vectors + noise of this relative norm (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.05, help="every level's temperature (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed beam runs, best kept (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON here")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "faiss"],
                   help="see `geosurge search --help` (default: %(default)s)")
    p.set_defaults(func=run_bench)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_scale(name: str, n_finest: int, args, beams: list, n_queries: int) -> dict:
    import numpy as np

    from geosurge_index.index import GeoIndex
    from geosurge_index.synthetic import synthetic_hierarchy, synthetic_queries

    t0 = time.perf_counter()
    h = synthetic_hierarchy(n_finest, dim=args.dim, seed=args.seed, child_noise=args.child_noise,
                            temperature=args.temperature)
    queries, truth = synthetic_queries(h, n_queries, query_noise=args.query_noise, seed=args.seed + 1)
    index = GeoIndex.from_arrays(h.tables, h.temperatures, h.tree(), device=args.device,
                                 backend=args.backend)
    del h  # the engine holds the tables (zero-copy on CPU)
    build_s = time.perf_counter() - t0
    sizes = index.tree.sizes
    gib = sum(sizes) * args.dim * 4 / 2**30
    print(f"\n[{name}] cells per level {sizes} ({sum(sizes):,} vectors, {gib:.2f} GiB float32), "
          f"built in {build_s:.1f} s; {n_queries} queries, device {index.device}, backend {index.backend}")
    dev = index.device
    index.search(queries[:8], top_k=args.top_k, exhaustive=True)  # warm-up
    _sync(dev)
    t, c = time.perf_counter(), time.process_time()
    ex = index.search(queries, top_k=args.top_k, exhaustive=True, batch_size=n_queries)
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
        index.search(queries[:64], top_k=args.top_k, beam=b)  # warm-up
        best = best_cpu = float("inf")
        for _ in range(max(1, args.repeats)):
            _sync(dev)
            t, c = time.perf_counter(), time.process_time()
            res = index.search(queries, top_k=args.top_k, beam=b, batch_size=n_queries)
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


def run_bench(args) -> int:
    import json

    from geosurge_index.errors import UserError

    try:
        beams = [int(v) for v in args.beams.split(",") if v.strip()]
    except ValueError as err:
        raise UserError(f"--beams {args.beams!r}: expected comma-separated integers") from err
    if not beams or min(beams) < 1:
        raise UserError("--beams: values must be >= 1")
    from geosurge_index.search import parse_beam

    schedules = [parse_beam(v, 7) for v in args.schedules.split(";") if v.strip()]
    n_queries = args.queries
    names = ["mp16", "internet"] if args.scale == "both" else [args.scale]
    if args.quick:
        n_queries = min(n_queries, 256)
        beams = [b for b in beams if b in (1, 4, 16)] or beams[:3]
    from geosurge_index.machine import describe_machine, machine_info

    info = machine_info()
    print("geosurge bench search")
    print(f"machine: {describe_machine(info)}")
    print("method: " + " ".join(BENCH_DESCRIPTION.split("\n\n", 1)[1].split()))
    figures = {"machine": info, "scales": []}
    for name in names:
        n = SCALES[name] // (10 if args.quick else 1)
        figures["scales"].append(bench_scale(name + (" (quick, 1/10)" if args.quick else ""),
                                             n, args, beams + schedules, n_queries))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0
