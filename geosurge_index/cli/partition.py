"""`geosurge partition COORDS --out CELLS_DIR`; `geosurge bench partition`."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from geosurge_index.errors import UserError
from geosurge_index.machine import describe_machine

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

DEFAULT_BENCH_N = 4_720_000


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


# --- bench ---------------------------------------------------------------------------------------

BENCH_DESCRIPTION = """\
Measure the partition stage on N points with MP-16's real density (sampled inside the shipped
TransLocator cells of MP-16 in proportion to their image counts; N defaults to MP-16's 4.72 M):

  1. sampling the points                (wall time; peak memory)
  2. partitioning them (7 levels)       (wall time; peak memory), then writing CELLS_DIR
  3. lat/lon -> S2 leaf ids: this library's numpy code on all N points vs s2sphere (one point
     at a time) on a subsample, checking that the ids are equal

Method: phases 1 and 2 each run in a fresh Python process; wall time is time.perf_counter()
around the phase alone (not imports, not loading the input), peak memory is that process's
maximum resident set size (getrusage ru_maxrss via os.wait4), printed beside the RSS of a process
that only imports the library (the baseline). The code is single-threaded numpy.
"""


def register_bench(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "partition",
        help="time and memory of sampling + partitioning MP-16-sized input; S2 ids vs s2sphere",
        description=BENCH_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n", type=int, default=DEFAULT_BENCH_N, metavar="N",
                   help="points to sample and partition (default: %(default)s, MP-16's size)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--s2sphere-n", type=int, default=20_000, metavar="M",
                   help="points converted one at a time with s2sphere for the comparison (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of the numpy leaf-id conversion; the median is reported (default: %(default)s)")
    _add_settings(p)
    p.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    p.set_defaults(func=run_bench)


_CHILD = r"""
import json, sys, time
import numpy as np
phase, work, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
from geosurge_index import cells, sampler
out = {}
if phase == "sample":
    t = time.perf_counter()
    lat, lon = sampler.sample_mp16_like(args["n"], args["seed"])
    out["seconds"] = time.perf_counter() - t
    np.save(work + "/lat.npy", lat); np.save(work + "/lon.npy", lon)
elif phase == "partition":
    lat, lon = np.load(work + "/lat.npy"), np.load(work + "/lon.npy")
    settings = cells.PartitionSettings(args["tau_min"], tuple(args["tau_max"]), args["max_s2_level"])
    t = time.perf_counter()
    part = cells.partition(lat, lon, settings, source="bench")
    out["seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    cells.write_cells_dir(work + "/cells", part.cells, part.assignments)
    out["write_seconds"] = time.perf_counter() - t
    out["summary"] = cells.format_summary(part.cells, len(lat))
with open(work + "/" + phase + ".json", "w") as f:
    json.dump(out, f)
"""


def _run_child(phase: str, work: str, params: dict) -> dict:
    """Run one phase in a fresh interpreter; returns its figures plus its peak RSS in MiB."""
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, phase, work, json.dumps(params)])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"bench phase {phase!r} failed with exit code {proc.returncode}")
    figures = json.loads(Path(work, f"{phase}.json").read_text()) if phase != "baseline" else {}
    figures["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return figures


def run_bench(args: argparse.Namespace) -> int:
    import numpy as np

    from geosurge_index import s2
    from geosurge_index.cells import PartitionSettings

    if args.n < 1 or args.s2sphere_n < 0 or args.repeats < 1:
        raise UserError("--n and --repeats must be positive and --s2sphere-n non-negative")
    settings = PartitionSettings(args.tau_min, tuple(args.tau_max), args.max_s2_level)
    params = {"n": args.n, "seed": args.seed, "tau_min": settings.tau_min,
              "tau_max": list(settings.tau_max), "max_s2_level": settings.max_s2_level}
    machine = describe_machine(libraries=("numpy", "s2sphere"))  # no torch here
    print(f"machine: {machine}")
    print(f"method: each phase in a fresh process; wall = perf_counter around the phase; "
          f"peak memory = ru_maxrss of that process (os.wait4); input: {args.n:,} points sampled with "
          f"MP-16's density (seed {args.seed}); tau_min {settings.tau_min}, tau_max "
          f"{','.join(map(str, settings.tau_max))}, max S2 level {settings.max_s2_level}")
    results: dict = {"machine": machine, "params": params}
    with tempfile.TemporaryDirectory(prefix="geosurge-bench-") as work:
        _CHILD_BASELINE = "import numpy, geosurge_index.cells, geosurge_index.sampler"
        proc = subprocess.Popen([sys.executable, "-c", _CHILD_BASELINE])
        _, _, usage = os.wait4(proc.pid, 0)
        proc.returncode = 0
        results["baseline_rss_mib"] = usage.ru_maxrss / 1024
        results["sample"] = _run_child("sample", work, params)
        results["partition"] = _run_child("partition", work, params)
        print(results["partition"].pop("summary"))
        lat, lon = np.load(Path(work, "lat.npy")), np.load(Path(work, "lon.npy"))

    s2.latlon_to_leaf_ids(lat[:1000], lon[:1000])  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        leaves = s2.latlon_to_leaf_ids(lat, lon)
        times.append(time.perf_counter() - start)
    numpy_s = float(np.median(times))
    m = min(args.s2sphere_n, args.n)
    ref_s = None
    mismatches = 0
    if m:
        import s2sphere

        pick = np.random.default_rng(args.seed).choice(args.n, size=m, replace=False)
        start = time.perf_counter()
        ref = [s2sphere.CellId.from_lat_lng(s2sphere.LatLng.from_degrees(a, b)).id()
               for a, b in zip(lat[pick].tolist(), lon[pick].tolist(), strict=True)]
        ref_s = time.perf_counter() - start
        mismatches = int((np.array(ref, dtype=np.uint64) != leaves[pick]).sum())
    results["leaf_ids"] = {"numpy_seconds": numpy_s, "numpy_s_per_million": numpy_s / args.n * 1e6,
                           "s2sphere_points": m, "s2sphere_seconds": ref_s,
                           "s2sphere_s_per_million": None if ref_s is None else ref_s / m * 1e6,
                           "mismatches": mismatches}

    base = results["baseline_rss_mib"]
    sam, par, leaf = results["sample"], results["partition"], results["leaf_ids"]
    print(f"baseline (python + imports): {base:,.0f} MiB RSS")
    print(f"sampling {args.n:,} points:      {sam['seconds']:7.2f} s   peak RSS {sam['peak_rss_mib']:,.0f} MiB")
    print(f"partitioning ({len(settings.tau_max)} levels):     {par['seconds']:7.2f} s   peak RSS {par['peak_rss_mib']:,.0f} MiB "
          f"(incl. the {args.n * 16 / 2**20:,.0f} MiB input)")
    print(f"writing CELLS_DIR:           {par['write_seconds']:7.2f} s")
    line = f"leaf ids, numpy:             {numpy_s:7.2f} s  ({leaf['numpy_s_per_million']:.2f} s per million, median of {args.repeats})"
    print(line)
    if ref_s is not None:
        print(f"leaf ids, s2sphere:          {ref_s:7.2f} s for {m:,} points ({leaf['s2sphere_s_per_million']:.1f} s "
              f"per million; {leaf['s2sphere_s_per_million'] / leaf['numpy_s_per_million']:.0f}x slower); "
              f"ids differing from numpy's: {mismatches}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if mismatches else 0
