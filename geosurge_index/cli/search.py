"""`geosurge search` (re-query stored visual embeddings) and `geosurge bench search`."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

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
    "topk_cells, topk_probs, width, height, error, and how the point was made: point_source, "
    "neighbour_*, cell_lat/cell_lon), one row per input row, in input order; a row "
    "with a missing, wrong-length, non-finite or all-zero embedding becomes an error row.\n\n"
    "Search: level 1 is scored in full; at each finer level only the children of the best B "
    "paths kept at the level above (--beam); --exhaustive scores every cell of every level. "
    "When the index has galleries, the point is the nearest reference inside the best --refine-cells "
    "cells (else the best cell's mean point). "
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
        epilog="Example: geosurge search index/ --embeddings preds/ --out requery.parquet --beam 64",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("index_dir", metavar="INDEX_DIR", help="index folder written by `geosurge export`")
    p.add_argument("--embeddings", required=True, metavar="FILE",
                   help=".npy (n, dim), or Parquet file/folder with an `embedding` list column")
    p.add_argument("--out", required=True, metavar="FILE", help="output Parquet file")
    p.add_argument("--top-k", type=int, default=5, help="finest cells returned per query")
    from geosurge_index.search import DEFAULT_BEAM

    p.add_argument("--beam", default=None,
                   help="B, paths kept at each of levels 1..6: one value, or one per level (default: the "
                        "index's own when it records one, else "
                        f"{','.join(map(str, DEFAULT_BEAM))}, cut to the index's depth); wide "
                        "at the small coarse levels is cheap and catches paths that win on finer "
                        "levels (`geosurge bench search` measures agreement with --exhaustive)")
    p.add_argument("--exhaustive", action="store_true",
                   help="score every cell of every level (exact, slow: the reference)")
    p.add_argument("--batch-size", type=int, default=1024, help="queries per engine call")
    p.add_argument("--id-column", default="id", help="Parquet input: the id column (row number if absent)")
    p.add_argument("--embedding-column", default="embedding", help="Parquet input: the embedding column")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the sha256 check of the index files (presence, sizes and the structure: "
                        "unit-norm vectors, cell counts, the tree are still checked) (default: verify every "
                        "checksum)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    from geosurge_index.settings import InferenceSettings

    InferenceSettings.add_arguments(p, ["cap_km", "cap_level"])
    p.add_argument("--galleries", default=None, metavar="NAMES",
                   help="the index's galleries whose references refine the point (`geosurge gallery`): names, "
                        "comma-separated, or all, or none (default: all of the index's)")
    p.add_argument("--refine-cells", type=int, default=None, metavar="N",
                   help="with galleries: the best finest cells whose references are searched; 0 answers with "
                        "the cell's mean point (default: the index's: 3 unless it records its own)")
    _add_engine_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import pyarrow.parquet as pq

    from geosurge_index import confidence
    from geosurge_index.embeddings import read_embedding_batches
    from geosurge_index.errors import UserError
    from geosurge_index.index import GeoIndex
    from geosurge_index.privacy import Cap, apply_cap
    from geosurge_index.progress import bar
    from geosurge_index.search import parse_beam
    from geosurge_index.settings import InferenceSettings

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {out} exists (use --overwrite to replace it)")
    if args.top_k < 1 or args.batch_size < 1:
        raise UserError("--top-k and --batch-size must be >= 1")
    # encoder=False: stored embeddings need no encoder, so its files are neither required nor read
    index = GeoIndex.open(args.index_dir, device=args.device, backend=args.backend, verify=args.verify,
                          encoder=False)
    beam = parse_beam(args.beam if args.beam is not None else index.search_defaults.get("beam"), index.levels)
    cap = Cap.from_settings(InferenceSettings.from_env(cap_km=args.cap_km, cap_level=args.cap_level))
    from geosurge_index.gallery.refine import RefineSettings

    index.use_galleries(args.galleries, None if args.refine_cells is None else RefineSettings(cells=args.refine_cells))
    conf_model = confidence.ConfidenceModel.for_index(index)  # the index's calibration, if any
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
                result = conf = None
                if b.embeddings.shape[0]:
                    result, conf = confidence.search(index, conf_model, b.embeddings, args.top_k, beam=beam,
                                                     exhaustive=args.exhaustive, batch_size=args.batch_size)
                table = apply_cap(index.to_arrow(result, b.ids, b.paths, b.errors, confidence=conf),
                                  index.tree, cap)
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


# --- bench (geosurge_index.bench.search) ---------------------------------------------------------


def register_bench(bench_subparsers) -> None:
    from geosurge_index.bench.search import DESCRIPTION

    p = bench_subparsers.add_parser(
        "search",
        help="queries/s of beam vs. exhaustive search and top-1 agreement, at 25k and 1M finest cells",
        description=DESCRIPTION,
        epilog="Example:\n  geosurge bench search --quick",
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


def run_bench(args) -> int:
    import json

    from geosurge_index.bench.search import SearchBench, run_search_bench
    from geosurge_index.cli import settings_from_args

    figures = run_search_bench(settings_from_args(SearchBench, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0
