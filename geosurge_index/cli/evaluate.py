"""`geosurge eval PRED_DIR --truth FILE [--index INDEX_DIR]`: accuracy of predictions against a benchmark."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from geosurge_index.errors import UserError

DESCRIPTION = """\
Score predictions against a ground truth: % of images within 1 / 25 / 200 / 750 / 2500 km
(street / city / region / country / continent) of the true point by great-circle distance
(haversine, R = 6371.0088 km), the median error, the mean GeoGuessr score
(5000 * exp(-km / 1492.7) per image), and with --index the % of images whose predicted cell is
the cell holding the true point, per level.

Predictions join the truth on id: exactly, else when the prediction's id or path ends with the
truth id as whole path components (photos/123.jpg matches 123.jpg), with or without extension.
Truth images without a prediction row and error rows count as wrong (score 0), unless
--skip-missing leaves the former out.

Confidence (what to read to choose a threshold on `confidence`): the expected calibration error of
the cell probability (10 equal-width bins; needs --index, for the true cells), the share of true
points within r50 / r90 of the predicted point, and the selective-accuracy curve: % within 1 / 25 /
200 / 750 / 2500 km among the 10%, 20%, .., 100% most confident photos (in the JSON; --plot draws
it beside the reliability diagram). Each distance's curve ranks photos by the probability of being
within that distance (`p_within_25km` for the 25 km curve: what to threshold on when you need
answers within 25 km), with the ECE of each p_within_*km; the curve ranked by the cell
probability `confidence` is in the JSON beside it. Predictions of an older run without these
columns are ranked by `confidence`, or without any confidence column by `probability`.

Truth files: any CSV/Parquet with an id column (id, IMG_ID, name, ...) and lat/lon columns
(LAT/lat/latitude, LON/lon/lng/longitude), e.g. the benchmark files: Im2GPS3k and YFCC26k
(IMG_ID, ..., LAT, LON), YFCC4k (name, ..., lon, lat). A WebDataset shard (.tar) works too:
the truth is the `lat`/`lon` in each sample's KEY.json, the id the sample key, as `geosurge
locate SHARD.tar` names its predictions; a folder of shards is read as one truth.

Benchmark protocol: the paper tests with ten-crop averaging (the 4 corner crops and the centre
crop of a 1.143x resize, and their mirror images; the embedding is their normalised mean). To
compare with its tables, locate the benchmark images with `--protocol paper` (= --ten-crop) and
evaluate those predictions. The default of `geosurge locate` is one centre crop, ~10x cheaper in
encoder work; measured on a demo index (the tiny 64 px model, 400 test photos, a shared 2-core
CPU): 8.3x the time (31 vs 261 images/s) and no accuracy gain there (-0.25 / -0.25 / -2.25 /
-1.0 points at 25 / 200 / 750 / 2500 km); the paper reports it for its full-size model.


--truth exif: the photos' own EXIF GPS (the exif_* columns `geosurge locate` writes): scores the
predictions of the tagged photos of an archive against where they were taken, so that you learn
how well the index does on your archive before trusting it on the untagged ones (run locate
without --skip-tagged for this; malformed GPS counts as untagged).


Example:
  geosurge locate index/ im2gps3k/ --out preds-paper/ --protocol paper
  geosurge eval preds-paper/ --truth im2gps3k_places365.csv --index index/ --json im2gps3k.json
  geosurge eval preds/ --truth exif
  geosurge eval preds/ --truth shard-00000.tar
  geosurge eval preds/ --truth test.csv --index index/ --plot confidence.png
  geosurge eval preds/ --truth shards/
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="accuracy at 1/25/200/750/2500 km, median error, GeoGuessr score, per-level cell accuracy",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pred_dir", metavar="PRED_DIR", help="folder of prediction shards (`geosurge locate --out`)")
    p.add_argument("--truth", required=True, metavar="FILE", help="ground truth: CSV/Parquet (id, lat, lon), or WebDataset shards (a .tar or "
                        "a folder of them) whose samples' JSON holds lat/lon, or `exif`: the photos' own "
                        "EXIF GPS")
    p.add_argument("--index", metavar="INDEX_DIR", default=None,
                   help="the index the predictions came from: adds per-level cell accuracy (default: none)")
    p.add_argument("--id-column", default=None, help="the truth file's id column (default: found by name)")
    p.add_argument("--lat-column", default=None, help="the truth file's latitude column (default: found by name)")
    p.add_argument("--lon-column", default=None, help="the truth file's longitude column (default: found by name)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="leave out truth rows with invalid coordinates instead of refusing the file")
    p.add_argument("--skip-missing", action="store_true",
                   help="leave truth images without a prediction row out of the denominator "
                        "(default: they count as wrong)")
    p.add_argument("--point", default="refined", choices=["refined", "cell"],
                   help="which point to score: refined = lat/lon, the answer (refined by the index's galleries "
                        "when it has any); cell = the best cell's mean point (cell_lat/cell_lon). With "
                        "galleries both are printed; this one goes to --json (default: %(default)s)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the figures as JSON to FILE")
    p.add_argument("--plot", metavar="FILE", default=None,
                   help="also draw the reliability diagram and the selective-accuracy curve to this PNG")
    p.set_defaults(func=run_eval)


def check_output_folder(path: str | None, flag: str) -> None:
    """Before the work: an output file in a missing folder is a clear error, not a late traceback."""
    if path is not None and not Path(path).resolve().parent.is_dir():
        raise UserError(f"{flag} {path}: folder {Path(path).parent} does not exist")


def format_rows(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run_eval(args: argparse.Namespace) -> int:
    from geosurge_index.benchmarks import read_truth
    from geosurge_index.evaluation import EXIF_TRUTH, evaluate_predictions, exif_truth

    check_output_folder(args.json, "--json")
    check_output_folder(getattr(args, "plot", None), "--plot")
    if args.truth == EXIF_TRUTH:
        truth = exif_truth(args.pred_dir)
    else:
        truth = read_truth(args.truth, id_column=args.id_column, lat_column=args.lat_column,
                           lon_column=args.lon_column, skip_invalid=args.skip_invalid)
    from geosurge_index.evaluation import point_sources

    point = getattr(args, "point", "refined")
    report = evaluate_predictions(args.pred_dir, truth, args.index, skip_missing=args.skip_missing, point=point)
    print(f"predictions {args.pred_dir} against {args.truth}"
          + (f" ({truth.n_skipped_invalid} invalid truth rows skipped)" if truth.n_skipped_invalid else ""))
    rows = report.rows()
    if report.confidence is not None:
        from geosurge_index.reliability import plot_confidence, summary_rows

        rows += summary_rows(report.confidence)
        if getattr(args, "plot", None):
            plot_confidence(report.confidence, args.plot, title=f"{args.pred_dir} against {args.truth}")
            print(f"geosurge eval: wrote {args.plot}", file=sys.stderr)
    print(format_rows(rows))
    sources = point_sources(args.pred_dir)
    other = None
    if set(sources) - {"cell_mean"}:  # galleries refined some points: the other answer, for comparison
        other = evaluate_predictions(args.pred_dir, truth, None, skip_missing=args.skip_missing,
                                     point="cell" if point == "refined" else "refined")
        print(f"\npoints made by: {', '.join(f'{k} {v}' for k, v in sources.items())}")
        print(f"the {'cell mean' if point == 'refined' else 'refined'} points instead:")
        print(format_rows([r for r in other.rows() if "km" in r[0] or "median" in r[0] or "score" in r[0]]))
    if args.json:
        out = {"predictions": str(args.pred_dir), "truth": str(args.truth),
               "index": str(args.index) if args.index else None, "point": point, **report.to_dict()}
        if other is not None:
            out["point_sources"] = sources
            out["cell" if point == "refined" else "refined"] = other.to_dict()
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"geosurge eval: wrote {args.json}", file=sys.stderr)
    return 0
