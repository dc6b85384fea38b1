"""`geosurge coverage CELLS_DIR --truth FILE ...`: the ceiling a partition puts on a benchmark."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DESCRIPTION = """\
For a partition and one or more benchmarks: the % of true points inside a cell at each level,
and the accuracy at 1 / 25 / 200 / 750 / 2500 km, median error and GeoGuessr score of two
oracles that know the answer but must predict one of the partition's points:
  oracle   the mean point of the finest cell holding the true point (a model that always
           picks the right finest cell); outside every finest cell, the nearest cell mean
  nearest  the finest-cell mean point nearest to the true point: the partition's ceiling

Example (the 100k GeoCLIP gallery, taus scaled from MP-16's 4.72 M images by 100k / 4.72M):
  geosurge partition geoclip_coordinates_100K.csv --out cells100k/ \
      --tau-min 1 --tau-max 530,265,136,68,34,17,11
  geosurge coverage cells100k/ --truth im2gps3k_places365.csv --truth yfcc4k.csv --json cov.json
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "coverage",
        help="a partition's ceiling on a benchmark: %% of true points in a cell, oracle accuracy",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("cells_dir", metavar="CELLS_DIR",
                   help="partition folder written by `geosurge partition` (or a checkpoint folder)")
    p.add_argument("--truth", required=True, action="append", metavar="FILE",
                   help="benchmark CSV/Parquet with lat/lon columns (repeatable)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="leave out truth rows with invalid coordinates instead of refusing the file")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the figures as JSON to FILE")
    p.set_defaults(func=run_coverage)


def coverage_table(reports) -> str:
    from geosurge_index.metrics import THRESHOLDS_KM

    head = ["truth", "points", "in finest cell %"] + [f"{int(t)} km %" for t in THRESHOLDS_KM] \
        + ["median km", "GeoGuessr"]
    lines = [head]
    for r in reports:
        for name, ev in (("oracle", r.oracle), ("nearest", r.nearest)):
            lines.append([f"{Path(r.truth).name} [{name}]", str(r.n_points),
                          f"{r.inside_pct[max(r.inside_pct)]:.2f}"]
                         + [f"{ev.accuracy_pct[t]:.2f}" for t in THRESHOLDS_KM]
                         + [f"{ev.median_km:.1f}", f"{ev.geoguessr:.1f}"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
                     for row in lines)


def run_coverage(args: argparse.Namespace) -> int:
    from geosurge_index.cells import read_cells
    from geosurge_index.cli.evaluate import check_output_folder
    from geosurge_index.coords import read_coordinates
    from geosurge_index.evaluation import partition_coverage

    check_output_folder(args.json, "--json")
    cells = read_cells(args.cells_dir)
    reports = []
    for path in args.truth:
        truth = read_coordinates(path, skip_invalid=args.skip_invalid)
        reports.append(partition_coverage(cells, truth.lat, truth.lon, truth=str(path)))
    sizes = ", ".join(str(len(lc)) for lc in cells.levels)
    print(f"partition {args.cells_dir}: tau_min {cells.tau_min}, tau_max {list(cells.tau_max)}, "
          f"cells per level {sizes}")
    for r in reports:
        inside = ", ".join(f"L{k} {v:.1f}" for k, v in r.inside_pct.items())
        print(f"{r.truth}: % of true points inside a cell per level: {inside}")
    print(coverage_table(reports))
    if args.json:
        out = {"cells_dir": str(args.cells_dir), "tau_min": cells.tau_min, "tau_max": list(cells.tau_max),
               "cells_per_level": [len(lc) for lc in cells.levels], "benchmarks": [r.to_dict() for r in reports]}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"geosurge coverage: wrote {args.json}", file=sys.stderr)
    return 0
