"""`geosurge sql INDEX_DIR [--predictions PRED_DIR] [--truth FILE] (QUERY | -f FILE.sql)`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from geosurge_index.errors import UserError

DESCRIPTION = """\
Query an index, its predictions and a ground truth with DuckDB SQL, read-only. The command
never writes anywhere but --output, and --output may not lie inside INDEX_DIR or PRED_DIR
(symlinks and hard links included). Only queries run: SELECT/WITH/FROM/VALUES, EXPLAIN,
DESCRIBE, SHOW, SUMMARIZE, PIVOT/UNPIVOT and SET/RESET VARIABLE; any other statement (COPY,
IMPORT/EXPORT DATABASE, ATTACH, INSTALL/LOAD, PRAGMA, CALL, CREATE, INSERT, ...) refuses the
script before it runs, and settings are locked. Reading your own files stays allowed
(read_csv, read_parquet, read_json: join predictions to your tables). The index is opened as
every command opens it: manifest format and version, cells.duckdb's checksum (--no-verify
skips it) and the structure of its tables.

Views and tables:
  cells        one row per (level, cell): level, cell_index, s2_id, s2_token, s2_level,
               parent_index, n_samples, mean_lat, mean_lon, center_lat, center_lon, area_km2,
               country_code, country_name, admin1, town, town_distance_km (place names of the
               cell's mean point)
  levels       level, tau_max, n_cells, temperature
  predictions  the PRED_DIR shards (--predictions): id, path, lat, lon, probability,
               cell_l1..cell_l7, token_l1..token_l7, topk_cells, topk_probs, error, ...
  truth        the ground truth (--truth): id (the matching prediction's id, so that
               `JOIN truth USING (id)` works), truth_id (as in the file), lat, lon, and
               true_cell_l1..true_cell_l7 (the index's cells holding the true point; null = none)

Macros:
  haversine_km(lat1, lon1, lat2, lon2)          great-circle distance, R = 6371.0088 km
  within_km(lat, lon, lat0, lon0, radius_km)    true within radius_km of (lat0, lon0)
  geoguessr_score(distance_km)                  5000 * exp(-distance_km / 1492.7)

Parameters: --param name=value runs `SET VARIABLE name = value` first (numbers stay numbers);
queries read them with getvariable('name'). A script may give defaults that --param overrides:
  SET VARIABLE radius_km = coalesce(getvariable('radius_km'), 25);

Examples:
  geosurge sql index/ "SELECT level, count(*) FROM cells GROUP BY level ORDER BY level"
  geosurge sql index/ --predictions preds/ --truth im2gps3k.csv -f queries/accuracy.sql
  geosurge sql index/ --predictions preds/ -f queries/within_radius.sql \\
      --param lat=48.8584 --param lon=2.2945 --param radius_km=5 --format csv --output eiffel.csv
  geosurge sql index/ --predictions preds/ --format csv --output joined.csv \\
      "SELECT p.id, p.lat, p.lon, m.* FROM predictions p JOIN read_csv('my_photos.csv') m USING (id)"
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sql",
        help="query cells, predictions and ground truth with DuckDB SQL (read-only)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("index_dir", metavar="INDEX_DIR", help="index directory written by `geosurge export`")
    p.add_argument("query", metavar="QUERY", nargs="?", default=None,
                   help="SQL to run (one or more statements; the last one's rows are printed)")
    p.add_argument("-f", "--file", metavar="FILE.sql", default=None,
                   help="read the SQL from this file instead of QUERY (e.g. a recipe under queries/)")
    p.add_argument("--predictions", metavar="PRED_DIR", default=None,
                   help="folder of prediction shards (`geosurge locate --out`) for the `predictions` view")
    p.add_argument("--truth", metavar="FILE", default=None,
                   help="ground-truth CSV/Parquet with an id and lat/lon columns (e.g. a benchmark file) "
                        "for the `truth` table")
    p.add_argument("--id-column", default=None,
                   help="the truth file's id column (default: found by name: id, IMG_ID, name, ...)")
    p.add_argument("--param", metavar="NAME=VALUE", action="append", default=[],
                   help="set a DuckDB variable before the query (repeatable); read with getvariable('NAME')")
    p.add_argument("--format", choices=("table", "csv", "json", "parquet"), default="table",
                   help="output format: a table on the terminal, CSV, JSON (one object per line) "
                        "or Parquet (needs --output) (default: %(default)s)")
    p.add_argument("--output", "-o", metavar="FILE", default=None,
                   help="write the result to FILE instead of standard output (csv, json, parquet); never a "
                        "path inside INDEX_DIR or PRED_DIR, through symlinks or hard links")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the sha256 check of cells.duckdb (its size and the structure of its "
                        "tables are still checked) (default: verify the checksum)")
    p.add_argument("--max-rows", type=int, default=50,
                   help="rows shown by --format table; other formats write every row (default: %(default)s)")
    p.set_defaults(func=run_sql)
    # QUERY may come after the options (`sql INDEX_DIR --predictions P "SELECT ..."`): plain
    # argparse binds every positional at the first one, so this parser parses intermixed.
    p.__class__ = _IntermixedParser


class _IntermixedParser(argparse.ArgumentParser):
    _inside = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inside:  # parse_known_intermixed_args calls back in here
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def run_sql(args: argparse.Namespace) -> int:
    from geosurge_index import sql
    from geosurge_index.benchmarks import read_truth

    if (args.query is None) == (args.file is None):
        raise UserError("give the SQL either as QUERY or with -f FILE.sql (exactly one)")
    if args.file is not None:
        path = Path(args.file)
        if not path.is_file():
            raise UserError(f"-f {path}: no such file")
        script = path.read_text()
    else:
        script = args.query
    params = dict(sql.parse_param(p) for p in args.param)
    truth = read_truth(args.truth, id_column=args.id_column) if args.truth else None
    con = sql.connect(args.index_dir, predictions=args.predictions, truth=truth, params=params,
                      verify=args.verify)
    try:
        rel = sql.run(con, script)
        n = sql.write_result(con, rel, args.format, args.output, max_rows=args.max_rows,
                             protect=[args.index_dir, args.predictions])
    finally:
        con.close()
    if args.output is not None:
        print(f"geosurge sql: wrote {n} rows to {args.output}", file=sys.stderr)
    return 0
