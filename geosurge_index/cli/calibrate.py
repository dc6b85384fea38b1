"""`geosurge calibrate INDEX_DIR --truth FILE [INPUT ...]`: fit the index's confidence calibration."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from geosurge_index.errors import UserError

DESCRIPTION = """\
Fit the calibration an index carries, so that the probability every answer reports means what it
says: `confidence` = the probability that the true point lies in the reported finest cell (and per
level, in the reported cell of that level), and the error radii r50 / r90 (km around the predicted
point holding 50% / 90% of the true points). Fit it on geotagged photos the model did not train on:
the split `geosurge train` keeps aside (RUN_DIR/calibration.csv), or your own tagged photos.

Per level, temperature scaling, Platt scaling and isotonic regression of the model's raw probability
are compared by 5-fold cross-validation (Brier score) against the uncalibrated model, and the
simplest within one standard error of the best is kept; the radii get one factor each so that they
cover 50% / 90% of these photos; and the probability that the true point lies within 1 / 25 / 200
/ 750 / 2500 km of the predicted point (`p_within_25km` ..., the posterior's mass within that
distance) gets its own calibrator per distance, chosen the same way. The result is
INDEX_DIR/calibration.json, listed with its checksum in manifest.json; `geosurge locate`, the
Python API and `geosurge serve` then report calibrated values (`calibrated: true`). Without one they
report the model's own probabilities with `calibrated: false`. A few hundred photos are enough; more
give a finer curve.

The photos: INPUT (images, folders, manifests, WebDataset shards, as `geosurge locate` reads them;
default: the truth file itself when it is a manifest with a path column or a .tar shard), located
with the index's encoder; or --predictions PRED_DIR, a locate run written with --save-embeddings
(nothing is re-encoded). Photos join the truth on id, as in `geosurge eval`.

Example:
  geosurge calibrate index/ --truth runs/demo/calibration.csv
  geosurge calibrate index/ photos/ --truth tagged.csv
  geosurge calibrate index/ --truth tagged.csv --predictions preds/
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="fit the index's confidence calibration (calibrated probabilities, error radii) on tagged photos",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("index_dir", metavar="INDEX_DIR", help="the index to calibrate (`geosurge export --out`)")
    p.add_argument("inputs", metavar="INPUT", nargs="*",
                   help="the photos (default: the truth file, when it lists image paths or is a shard)")
    p.add_argument("--truth", required=True, metavar="FILE",
                   help="their true points: CSV/Parquet (id, lat, lon; a path column to locate it directly) "
                        "or WebDataset shards")
    p.add_argument("--predictions", metavar="PRED_DIR", default=None,
                   help="a `geosurge locate --save-embeddings` run over the photos: use its embeddings")
    p.add_argument("--method", default="auto", choices=["auto", "temperature", "platt", "isotonic"],
                   help="auto: the best by cross-validation per level (default: %(default)s)")
    p.add_argument("--beam", default=None,
                   help="the beam the answers will use (default: the index's default, as locate)")
    p.add_argument("--device", default="auto", help="encoder device for INPUT photos (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None, help="images per encoder batch (default: by device)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: by cores)")
    p.add_argument("--id-column", default=None, help="the truth file's id column (default: found by name)")
    p.add_argument("--lat-column", default=None, help="the truth file's latitude column")
    p.add_argument("--lon-column", default=None, help="the truth file's longitude column")
    p.add_argument("--dry-run", action="store_true", help="fit and report, but leave the index unchanged")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the fit report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from geosurge_index import sources
    from geosurge_index.benchmarks import read_truth
    from geosurge_index.calibration import FIT_METHODS
    from geosurge_index.calibration_fit import calibrate
    from geosurge_index.cli.evaluate import check_output_folder, format_rows

    check_output_folder(args.json, "--json")
    truth = read_truth(args.truth, id_column=args.id_column, lat_column=args.lat_column,
                       lon_column=args.lon_column)
    inputs = list(args.inputs)
    if args.predictions is None and not inputs:
        if sources.input_kind(args.truth) in ("manifest", "tar"):
            inputs = [args.truth]
        else:
            raise UserError(f"--truth {args.truth}: give the photos as INPUT or --predictions PRED_DIR")
    methods = FIT_METHODS if args.method == "auto" else (args.method,)
    cal, report = calibrate(args.index_dir, truth, predictions=args.predictions, inputs=inputs, beam=args.beam,
                            methods=methods, device=args.device, batch_size=args.batch_size,
                            workers=args.workers, truth_source=str(args.truth), write=not args.dry_run)
    before, after = report["finest_before"], report["finest_after"]
    rows = [
        ("photos fitted on", f"{report['n']} of {report['n_truth']} in the truth"
                             + (f" ({report['n_unmatched']} without a prediction)" if report["n_unmatched"] else "")),
        ("true point in the reported finest cell", f"{100 * report['finest_hit_rate']:.1f}%"),
        ("method per level (1..L)", ", ".join(report["methods"])),
        ("finest cell: ECE before -> after", f"{before['ece']:.4f} -> {after['ece']:.4f} (in-sample)"),
        ("finest cell: Brier before -> after", f"{before['brier']:.4f} -> {after['brier']:.4f}"),
        ("r50 / r90 coverage before scaling", " / ".join(f"{100 * v:.1f}%"
                                                         for v in report["radius_coverage_unscaled"].values())),
        ("r50 / r90 factors", " / ".join(f"{v:.3g}" for v in report["radius_scale"].values())),
        *((f"P(within {km} km): method, ECE before -> after",
           f"{w['method']}, {w['before']['ece']:.4f} -> {w['after']['ece']:.4f} (true rate {100 * w['rate']:.1f}%)")
          for km, w in report.get("within_km", {}).items()),
    ]
    print(format_rows(rows))
    where = "not written (--dry-run)" if args.dry_run else f"wrote {Path(args.index_dir) / 'calibration.json'}"
    print(f"geosurge calibrate: {where}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"index": str(args.index_dir), "truth": str(args.truth),
                                               **report, "calibration": cal.to_json()}, indent=2) + "\n")
    return 0
