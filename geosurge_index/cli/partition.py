"""`geosurge partition COORDS --out CELLS_DIR`; `geosurge bench partition`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from geosurge_index.errors import UserError

DESCRIPTION = """\
Partition the Earth into the adaptive 7-level hierarchy of S2 geocells from the coordinates of
the training images.

At every level an S2 cell is split into its 4 children while it holds more than that level's
tau_max samples (up to --max-s2-level); cells holding fewer than --tau-min samples are dropped
(their samples have no cell at that level). tau_max decreases from level to level and each level
refines the one above, so the levels form a tree: every cell has exactly one parent.

COORDS is a CSV (also .csv.gz) or Parquet file with a latitude column (lat or latitude, any
case) and a longitude column (lon, lng, long or longitude, any case), in degrees; an id column
(id, img_id, image_id, name, key, path or filename) is carried into assignments.parquet.
Rows with missing, non-numeric or out-of-range coordinates stop the run with their row numbers,
unless --skip-invalid.

CELLS_DIR receives:
  cells.parquet        one row per (level, cell): level, cell_index (dense per level, in S2 id
                       order), s2_id, s2_token, s2_level, parent_index, n_samples, mean_lat/lon
                       (spherical mean of the samples), center_lat/lon, area_km2
  assignments.parquet  one row per valid input row: row (0-based input row), [id], level_1 ..
                       level_7 (cell_index, null where the sample has no cell)
  partition.json       settings and counts (format geosurge-cells, version 1)

Examples:
  geosurge partition mp16_coords.parquet --out cells/
  geosurge partition photos.csv --out cells/ --tau-max 5000,2500,1200,600,300,150,100 --tau-min 10
"""


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one value")
    return values


def _add_settings(p: argparse.ArgumentParser) -> None:
    from geosurge_index.cells import DEFAULT_MAX_S2_LEVEL, DEFAULT_TAU_MAX, DEFAULT_TAU_MIN

    p.add_argument("--tau-min", type=int, default=DEFAULT_TAU_MIN, metavar="N",
                   help="drop cells holding fewer than N samples (default: %(default)s)")
    p.add_argument("--tau-max", type=_int_list, default=DEFAULT_TAU_MAX, metavar="N1,...,N7",
                   help="per level, coarsest first: split cells holding more than this many samples; "
                        "non-increasing; one value per level (default: "
                        f"{','.join(map(str, DEFAULT_TAU_MAX))})")
    p.add_argument("--max-s2-level", type=int, default=DEFAULT_MAX_S2_LEVEL, metavar="L",
                   help="never split below S2 level L (0..30); level-20 cells are about 9 m across, "
                        "finer than GPS accuracy (default: %(default)s)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "partition",
        help="build the adaptive 7-level S2 geocell hierarchy from training coordinates",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("coords", metavar="COORDS", help="CSV or Parquet file with latitude/longitude columns")
    p.add_argument("--out", "-o", required=True, metavar="CELLS_DIR", help="output directory (created)")
    _add_settings(p)
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip rows with missing, non-numeric or out-of-range coordinates (they are "
                        "counted in partition.json) instead of stopping with an error")
    p.add_argument("--lat-column", metavar="NAME", help="latitude column (default: detected)")
    p.add_argument("--lon-column", metavar="NAME", help="longitude column (default: detected)")
    p.add_argument("--id-column", metavar="NAME", help="id column carried into assignments.parquet "
                                                       "(default: detected if present)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing partition in CELLS_DIR (default: refuse)")
    p.set_defaults(func=run_partition)


def run_partition(args: argparse.Namespace) -> int:
    from geosurge_index import cells as cells_mod
    from geosurge_index.coords import read_coordinates

    out = Path(args.out)
    settings = cells_mod.PartitionSettings(
        tau_min=args.tau_min, tau_max=tuple(args.tau_max), max_s2_level=args.max_s2_level)
    existing = [name for name in (cells_mod.META_FILE, cells_mod.CELLS_FILE, cells_mod.ASSIGNMENTS_FILE)
                if (out / name).exists()]
    if existing and not args.overwrite:
        raise UserError(f"--out {out} already holds a partition ({', '.join(existing)}); "
                        "pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    start = time.perf_counter()
    coords = read_coordinates(args.coords, lat_column=args.lat_column, lon_column=args.lon_column,
                              id_column=args.id_column, skip_invalid=args.skip_invalid)
    if not len(coords):
        raise UserError(f"{args.coords}: no valid coordinates")
    read_s = time.perf_counter() - start
    print(f"read {coords.n_input:,} rows from {coords.source} in {read_s:.1f} s "
          f"(columns {coords.lat_column}, {coords.lon_column}"
          f"{', id ' + coords.id_column if coords.id_column else ''}); "
          f"{coords.n_skipped_invalid:,} invalid rows skipped", file=sys.stderr)
    start = time.perf_counter()
    result = cells_mod.partition(
        coords.lat, coords.lon, settings, source=str(Path(args.coords).resolve()),
        n_input=coords.n_input, n_skipped_invalid=coords.n_skipped_invalid, progress=True)
    part_s = time.perf_counter() - start
    if not len(result.cells.levels[-1]):  # a hierarchy without finest cells predicts nothing
        raise UserError(f"{args.coords}: no cell holds --tau-min {settings.tau_min} of the "
                        f"{len(coords):,} valid points; lower --tau-min")
    if out.exists() and args.overwrite:
        (out / cells_mod.META_FILE).unlink(missing_ok=True)  # the directory is incomplete until rewritten
    cells_mod.write_cells_dir(out, result.cells, result.assignments, rows=coords.rows, ids=coords.ids)
    print(cells_mod.format_summary(result.cells, len(coords)))
    print(f"{len(coords):,} points partitioned in {part_s:.1f} s; wrote {out}/ "
          f"({cells_mod.CELLS_FILE}, {cells_mod.ASSIGNMENTS_FILE}, {cells_mod.META_FILE})")
    return 0


# --- bench (geosurge_index.bench.partition) ------------------------------------------------------


def register_bench(bench_subparsers) -> None:
    from geosurge_index.bench.partition import DEFAULT_N, DESCRIPTION

    p = bench_subparsers.add_parser(
        "partition",
        help="time and memory of sampling + partitioning MP-16-sized input; S2 ids vs s2sphere",
        description=DESCRIPTION,
        epilog="Example:\n  geosurge bench partition --n 1000000 --json partition.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n", type=int, default=DEFAULT_N, metavar="N",
                   help="points to sample and partition (default: %(default)s, MP-16's size)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--s2sphere-n", type=int, default=20_000, metavar="M",
                   help="points converted one at a time with s2sphere for the comparison (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of the numpy leaf-id conversion; the median is reported (default: %(default)s)")
    _add_settings(p)
    p.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from geosurge_index.bench.partition import PartitionBench, run_partition_bench

    results = run_partition_bench(PartitionBench(
        n=args.n, seed=args.seed, s2sphere_n=args.s2sphere_n, repeats=args.repeats, tau_min=args.tau_min,
        tau_max=tuple(args.tau_max), max_s2_level=args.max_s2_level))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if results["leaf_ids"]["mismatches"] else 0
