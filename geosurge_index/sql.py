"""DuckDB over the index, the predictions and a ground truth, read-only.

`connect` opens an in-memory DuckDB with:
- `cells`, `levels`: views over INDEX_DIR/cells.duckdb, ATTACHed READ_ONLY as `idx`, so that no
  statement can change the index (DuckDB refuses writes to a read-only attachment);
- `predictions`: a view over the PRED_DIR Parquet shards (read lazily: nothing is loaded until a
  query needs it, and DuckDB reads only the columns it uses);
- `truth`: the ground-truth table (`benchmarks.truth_table`: id to join predictions on,
  truth_id as in the file, lat, lon, and true_cell_l1..7 when an index places the points);
- macros `haversine_km(lat1, lon1, lat2, lon2)`, `within_km(lat, lon, lat0, lon0, radius_km)`,
  `geoguessr_score(distance_km)`, with the constants of `metrics.py`.

Parameters reach queries as DuckDB variables: `params={"radius_km": 25}` runs
`SET VARIABLE radius_km = 25` before the query, which reads it with `getvariable('radius_km')`.
`run` executes a script of statements and returns the last one's result; statements that would
attach, detach or load other databases or extensions, or write files (COPY, EXPORT, a PREPAREd
COPY), are refused, and the configuration is locked (settings like profiling_output write files).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import pyarrow as pa

from geosurge_index.coords import Coordinates
from geosurge_index.errors import FormatError, UserError
from geosurge_index.index import CELLS_DB, IndexCells, index_file
from geosurge_index.metrics import EARTH_RADIUS_KM, GEOGUESSR_MAX, GEOGUESSR_SCALE_KM

FORMATS = ("table", "csv", "json", "parquet")
_PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

MACROS = f"""
CREATE MACRO _haversine_h(lat1, lon1, lat2, lon2) AS
    pow(sin(radians(lat2 - lat1) / 2), 2)
    + cos(radians(lat1)) * cos(radians(lat2)) * pow(sin(radians(lon2 - lon1) / 2), 2);
-- CASE, not least(): least() skips NULLs, and a missing point must give a NULL distance
CREATE MACRO haversine_km(lat1, lon1, lat2, lon2) AS
    2 * {EARTH_RADIUS_KM} * asin(sqrt(CASE WHEN _haversine_h(lat1, lon1, lat2, lon2) > 1 THEN 1.0
                                           ELSE _haversine_h(lat1, lon1, lat2, lon2) END));
CREATE MACRO within_km(lat, lon, lat0, lon0, radius_km) AS
    haversine_km(lat, lon, lat0, lon0) <= radius_km;
CREATE MACRO geoguessr_score(distance_km) AS
    {GEOGUESSR_MAX} * exp(-(distance_km) / {GEOGUESSR_SCALE_KM});
"""

# Statement types that would reach beyond the index, predictions and truth given on the command
# line, or write files (COPY ... TO could overwrite cells.duckdb itself): results leave through
# write_result (--format / --output) instead. PREPARE/EXECUTE are refused because a prepared
# statement hides its type (`PREPARE p AS COPY ...; EXECUTE p`). Settings that write files
# (profiling_output, log_query_path) are closed by locking the configuration in `connect`.
_REFUSED = {"ATTACH", "DETACH", "LOAD", "EXTENSION", "EXPORT", "COPY", "COPY_DATABASE", "PREPARE", "EXECUTE"}
_YIELDS_ROWS = {"SELECT", "EXPLAIN", "PRAGMA", "CALL", "RELATION"}


def connect(
    index_dir: str | os.PathLike | None = None,
    *,
    predictions: str | os.PathLike | None = None,
    truth: Coordinates | None = None,
    params: dict | None = None,
):
    """An in-memory DuckDB connection with the views and macros above (see the module doc).

    `truth` (from `benchmarks.read_truth`) becomes the `truth` table: its ids are matched to the
    prediction ids (`benchmarks.match_ids`) and, with an index, its points placed in the cells.
    """
    import duckdb

    con = duckdb.connect(":memory:")
    con.execute(MACROS)
    if index_dir is not None:
        db = index_file(index_dir, CELLS_DB)
        try:
            con.execute(f"ATTACH {_sql_str(str(db))} AS idx (READ_ONLY)")
        except duckdb.Error as err:
            raise FormatError(f"{db}: cannot open as a DuckDB database: {_first_line(err)}") from None
        tables = {r[0] for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = 'idx'").fetchall()}
        for name in ("cells", "levels"):
            if name not in tables:
                raise FormatError(f"{db} has no table `{name}`: not an index written by `geosurge export`")
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM idx.main.{name}")
    if predictions is not None:
        shards = prediction_shards(predictions)
        files = "[" + ", ".join(_sql_str(str(p)) for p in shards) + "]"
        try:
            con.execute(f"CREATE VIEW predictions AS SELECT * FROM read_parquet({files}, union_by_name = true)")
        except duckdb.Error as err:
            raise FormatError(f"PRED_DIR {predictions}: unreadable shards: {_first_line(err)}") from None
    if truth is not None:
        from geosurge_index.benchmarks import truth_table

        pred_ids = pred_paths = None
        if predictions is not None:
            keys = con.sql("SELECT id, path FROM predictions").to_arrow_table()
            pred_ids = keys.column("id").to_pylist()
            pred_paths = keys.column("path").to_pylist()
        true_cells = None
        if index_dir is not None:
            from geosurge_index.cells import assign_points

            true_cells = assign_points(index_cells(index_dir), truth.lat, truth.lon)
        con.register("_truth_arrow", truth_table(truth, pred_ids, pred_paths, true_cells))
        con.execute("CREATE TABLE truth AS SELECT * FROM _truth_arrow")
        con.unregister("_truth_arrow")
    set_params(con, params or {})
    # no downloads into ~/.duckdb, no secrets stored on disk; then no SET/PRAGMA of a setting from
    # here on (SET VARIABLE still works): some settings write files (profiling_output, log_query_path)
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET allow_persistent_secrets = false")
    con.execute("SET lock_configuration = true")
    return con


def index_cells(index_dir: str | os.PathLike):
    """The index's cells as a `cells.CellsTable` (for `cells.assign_points`): `IndexCells.partition`."""
    with IndexCells.open(index_dir) as cells:
        return cells.partition()


def prediction_shards(pred_dir: str | os.PathLike) -> list[Path]:
    """The Parquet shards of a PRED_DIR (`pred_store`'s naming), or one Parquet file given directly."""
    from geosurge_index.pred_store import PredStore

    p = Path(pred_dir)
    if p.is_file() and p.suffix == ".parquet":
        return [p]
    if not p.is_dir():
        raise UserError(f"PRED_DIR {p} is neither a folder nor a .parquet file")
    shards = PredStore(p).shard_paths()
    if not shards:
        raise UserError(f"PRED_DIR {p} holds no part-*.parquet shards: is it the --out of `geosurge locate`?")
    return shards


def parse_param(text: str) -> tuple[str, object]:
    """`name=value` from the command line; the value becomes an int, a float, or else a string."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or not _PARAM_NAME.match(name):
        raise UserError(f"--param {text!r}: expected name=value with name a plain identifier")
    raw = raw.strip()
    for conv in (int, float):
        try:
            return name, conv(raw)
        except ValueError:
            pass
    return name, raw


def set_params(con, params: dict) -> None:
    for name, value in params.items():
        if not _PARAM_NAME.match(name):
            raise UserError(f"parameter name {name!r} is not a plain identifier")
        con.execute(f"SET VARIABLE {name} = ?", [value])


def run(con, script: str):
    """Execute every statement of `script`; return the last one's relation (None if it yields no rows).

    DuckDB's errors become UserError with the statement's first line, so the CLI prints them
    cleanly; a write to the index is reported as such.
    """
    import duckdb

    try:
        statements = con.extract_statements(script)
    except duckdb.Error as err:
        raise UserError(f"SQL: {_first_line(err)}") from err
    if not statements:
        raise UserError("SQL: no statement given")
    for st in statements:
        kind = st.type.name
        if kind in _REFUSED:
            hint = ("write results with --format and --output" if kind == "COPY" else
                    "geosurge sql sees only the index, predictions and truth given on its command line")
            raise UserError(f"SQL: {kind} statements are not allowed (read-only session): {hint}")
    result = None
    for i, st in enumerate(statements):
        try:
            if i == len(statements) - 1 and st.type.name in _YIELDS_ROWS:
                result = con.sql(st.query)
            else:
                con.execute(st.query).fetchall()  # DuckDB 2 wants each result consumed
        except duckdb.Error as err:
            raise UserError(_explain(err, st.query)) from err
    return result


def _explain(err: Exception, query: str) -> str:
    msg = _first_line(err)
    head = " ".join(query.strip().split())[:80]
    if "read-only mode" in msg or "Can only update base table" in msg or "Cannot drop" in msg:
        return f"the index is read-only; `{head}` was refused ({msg})"
    if "configuration has been locked" in msg:
        return f"SQL: settings cannot change in a read-only session (some write files); `{head}` was refused"
    for view, flag in (("predictions", "--predictions PRED_DIR"), ("truth", "--truth FILE"),
                       ("cells", "an INDEX_DIR"), ("levels", "an INDEX_DIR")):
        if re.search(rf"Table with name {view} does not exist", msg):
            return f"SQL: there is no `{view}` view; pass {flag} ({msg})"
    return f"SQL error in `{head}`: {msg}"


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def write_result(
    con, rel, fmt: str = "table", output: str | os.PathLike | None = None, *, max_rows: int = 50
) -> int:
    """Write a relation as a table (stdout), CSV, JSON (one object per line) or Parquet.

    Files are written by DuckDB's COPY (streaming, any size); stdout gets Arrow batches. Returns
    the number of rows written (-1 for `table`, which does not count them).
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if rel is None:
        return 0
    if fmt == "table":
        if output is not None:
            raise UserError("--format table prints to the terminal; use csv, json or parquet with --output")
        rel.show(max_rows=max_rows, max_width=shutil.get_terminal_size((160, 40)).columns)
        return -1
    if output is not None:
        out = Path(output)
        if out.parent and not out.parent.is_dir():
            raise UserError(f"--output {out}: folder {out.parent} does not exist")
        if out.resolve() in _attached_files(con):
            raise UserError(f"--output {out} is the index's database, which geosurge sql never changes; "
                            "write the result elsewhere")
        options = {"csv": "FORMAT csv, HEADER true", "json": "FORMAT json", "parquet": "FORMAT parquet"}[fmt]
        rel.to_view("_result", replace=True)
        counted = con.execute(f"COPY (SELECT * FROM _result) TO {_sql_str(str(out))} ({options})").fetchall()
        return int(counted[0][0]) if counted else -1
    if fmt == "parquet":
        raise UserError("--format parquet needs --output FILE")
    return _write_stream(rel, fmt, sys.stdout)


def _attached_files(con) -> set[Path]:
    """The database files attached to this session (the index's cells.duckdb)."""
    paths = {r[0] for r in con.execute("SELECT path FROM duckdb_databases() WHERE path IS NOT NULL").fetchall()}
    return {Path(p).resolve() for p in paths}


def _write_stream(rel, fmt: str, stream) -> int:
    import csv

    import pyarrow.csv as pacsv

    n = 0
    if fmt == "csv":  # the header by the csv module: pyarrow quotes every header name
        csv.writer(stream, lineterminator="\n").writerow(rel.columns)
    for batch in rel.to_arrow_reader(65536):
        if fmt == "csv":
            sink = pa.BufferOutputStream()
            pacsv.write_csv(pa.Table.from_batches([batch]), sink,
                            write_options=pacsv.WriteOptions(include_header=False, quoting_style="needed"))
            stream.write(sink.getvalue().to_pybytes().decode())
        else:
            for row in batch.to_pylist():  # NaN / inf are not JSON: null
                stream.write(json.dumps(_nan_to_none(row), default=str) + "\n")
        n += batch.num_rows
    stream.flush()
    return n


def _nan_to_none(row: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
