"""`geosurge map cells|predictions ...`: PNG world maps and GeoJSON of cells and predictions."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from geosurge_index.errors import UserError

DESCRIPTION = """\
Draw cells or predictions on a world map (PNG; Natural Earth country outlines shipped with the
package, no download), or write them as GeoJSON for GIS tools (QGIS, geojson.io, kepler.gl).
The output's extension picks the format: .png, or .geojson / .json.

  geosurge map cells SRC --output cells.png
      cells of one level (default: the finest) coloured by training density, samples per km2;
      SRC is an INDEX_DIR (GeoJSON then carries the place names) or a CELLS_DIR
  geosurge map cells SRC --level 3 --output level3.geojson
      one valid Polygon per cell, counter-clockwise (RFC 7946), a MultiPolygon for a cell
      across the antimeridian, polar cells up to the pole; every column as a property
  geosurge map predictions PRED_DIR --output preds.png
      predicted points
  geosurge map predictions PRED_DIR --truth im2gps3k_places365.csv --output errors.png
      a great-circle line from each true point to its prediction, coloured by error
      (<= 25, 200, 750, 2500 km, beyond); GeoJSON: one feature per prediction row (id, S2
      tokens, place names of the predicted point, error_km), error rows with a null geometry
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "map",
        help="world maps (PNG) and GeoJSON of cells and predictions",
        description=DESCRIPTION,
        epilog="Examples:\n  geosurge map cells index/ --level 3 --output cells.png\n"
               "  geosurge map predictions preds/ --truth test.csv --output errors.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="what", metavar="WHAT")
    c = sub.add_parser("cells", help="cells of one level, coloured by training density",
                       description="Cells of one level coloured by training density (n_samples / area_km2).",
                       epilog="Example: geosurge map cells index/ --level 3 --output cells.geojson")
    c.add_argument("src", metavar="SRC", help="INDEX_DIR (`geosurge export`) or CELLS_DIR (`geosurge partition`)")
    c.add_argument("--level", type=int, default=None, help="hierarchy level to draw (default: the finest)")
    c.add_argument("--output", "-o", required=True, metavar="FILE", help="FILE.png or FILE.geojson")
    c.add_argument("--title", default="", help="title of the PNG (default: describes the content)")
    c.set_defaults(func=run_map_cells)
    q = sub.add_parser("predictions", help="predicted points, or lines from the truth coloured by error",
                       description="Predicted points, or with --truth a line from each true point to "
                                   "its prediction coloured by error.",
                       epilog="Example: geosurge map predictions preds/ --truth test.csv --output errors.png")
    q.add_argument("pred_dir", metavar="PRED_DIR", help="folder of prediction shards (`geosurge locate --out`)")
    q.add_argument("--truth", metavar="FILE", default=None,
                   help="ground truth, CSV/Parquet (id, lat, lon) or a WebDataset .tar with lat/lon "
                        "in each sample's JSON: draw lines from the truth (default: points only)")
    q.add_argument("--id-column", default=None, help="the truth file's id column (default: found by name)")
    q.add_argument("--output", "-o", required=True, metavar="FILE", help="FILE.png or FILE.geojson")
    q.add_argument("--max-points", type=int, default=100_000,
                   help="PNG: draw a random sample of at most this many predictions (default: %(default)s)")
    q.add_argument("--title", default="", help="title of the PNG (default: describes the content)")
    q.add_argument("--no-place-names", action="store_true",
                   help="GeoJSON: leave out the country/region/town of each point (default: included, "
                        "from the offline reverse geocoder)")
    q.set_defaults(func=run_map_predictions)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _kind(output: str) -> str:
    from geosurge_index.cli.evaluate import check_output_folder

    check_output_folder(output, "--output")
    suffix = Path(output).suffix.lower()
    if suffix == ".png":
        return "png"
    if suffix in (".geojson", ".json"):
        return "geojson"
    raise UserError(f"--output {output}: the extension must be .png, .geojson or .json")


def run_map_cells(args: argparse.Namespace) -> int:
    from geosurge_index import maps

    kind = _kind(args.output)
    cells = maps.read_cells_table(args.src, args.level)
    level = cells.column("level")[0].as_py() if len(cells) else args.level
    if kind == "png":
        title = args.title or f"{Path(args.src).name}: {len(cells):,} cells of level {level}, by training density"
        maps.plot_cells(cells, args.output, title=title)
    else:
        maps.cells_geojson(cells, args.output)
    print(f"geosurge map: wrote {len(cells)} cells of level {level} to {args.output}", file=sys.stderr)
    return 0


def run_map_predictions(args: argparse.Namespace) -> int:
    from geosurge_index import maps
    from geosurge_index.benchmarks import read_truth

    kind = _kind(args.output)
    if args.max_points < 1:
        raise UserError("--max-points must be at least 1")
    truth = read_truth(args.truth, id_column=args.id_column) if args.truth else None
    table = maps.read_prediction_points(args.pred_dir, truth)
    if kind == "geojson":
        maps.predictions_geojson(table, args.output, place_names=not args.no_place_names)
    else:
        col = lambda name: table.column(name).to_numpy(zero_copy_only=False).astype(float)  # noqa: E731
        maps.plot_predictions(col("lat"), col("lon"), args.output,
                              true_lat=col("true_lat") if truth is not None else None,
                              true_lon=col("true_lon") if truth is not None else None,
                              max_points=args.max_points, title=args.title)
    print(f"geosurge map: wrote {args.output} ({len(table)} prediction rows)", file=sys.stderr)
    return 0
