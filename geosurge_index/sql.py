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

`run` executes a script of statements and returns the last one's result. Only queries run
(`statement_refusal`, from DuckDB's own parser: SELECT/WITH/FROM/VALUES, EXPLAIN of a query,
DESCRIBE, SHOW, SUMMARIZE, PIVOT/UNPIVOT, SET/RESET VARIABLE); every other statement (COPY,
IMPORT/EXPORT DATABASE, ATTACH, INSTALL/LOAD, UPDATE EXTENSIONS, PRAGMA, CALL, CREATE, INSERT,
...) is refused before any statement of the script runs, and the configuration is locked (some
settings write files). Reading the user's own files (read_csv, read_parquet) stays allowed.
Results leave through `write_result`, which refuses an output inside the index or PRED_DIR
(`check_output`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from geosurge_index.coords import Coordinates
from geosurge_index.errors import FormatError, UserError
from geosurge_index.index import CELLS_DB, IndexCells, index_file, read_checked_tree, verify_index
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

# Statements a session may run: queries, and SET/RESET VARIABLE (parameters). DuckDB's parser
# classes DESCRIBE, SHOW, SUMMARIZE, UNPIVOT, FROM-first and VALUES as SELECT; a PIVOT whose
# columns are found from the data as MULTI (an enum type, then the query), and so would be any
# statement holding such a PIVOT (`COPY (PIVOT ...) TO`): a MULTI passes only when it parses as
# a subquery, which only a query does. EXPLAIN passes when the statement it explains does
# (EXPLAIN ANALYZE runs it). Anything else, including statement kinds this DuckDB's Python API
# cannot name (UPDATE EXTENSIONS), is refused.
ALLOWED = ("SELECT/WITH/FROM/VALUES, EXPLAIN, DESCRIBE, SHOW, SUMMARIZE, PIVOT/UNPIVOT, "
           "SET VARIABLE/RESET VARIABLE")
_YIELDS_ROWS = {"SELECT", "EXPLAIN", "MULTI"}


def connect(
    index_dir: str | os.PathLike | None = None,
    *,
    predictions: str | os.PathLike | None = None,
    truth: Coordinates | None = None,
    params: dict | None = None,
    verify: bool = True,
):
    """An in-memory DuckDB connection with the views and macros above (see the module doc).

    The index is opened as every command opens it: the manifest's format and version, then
    cells.duckdb (the one index file SQL reads) against its size and, unless verify=False, its
    sha256, then the structural check of its tables (`index.read_checked_tree`): a damaged file
    is a FormatError naming it, never answers from it.
    `truth` (from `benchmarks.read_truth`) becomes the `truth` table: its ids are matched to the
    prediction ids (`benchmarks.match_ids`) and, with an index, its points placed in the cells.
    """
    import duckdb

    if index_dir is not None:
        index_file(index_dir, CELLS_DB)  # the file SQL reads is named first when it is absent
        manifest = verify_index(index_dir, checksums=verify, files=[CELLS_DB])
        read_checked_tree(index_dir, manifest)
    con = duckdb.connect(":memory:")
    con.execute(MACROS)
    if index_dir is not None:
        db = Path(index_dir) / CELLS_DB
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


def _kind(st) -> str:
    try:
        return st.type.name
    except ValueError:  # a type newer than the Python enum (UPDATE EXTENSIONS in DuckDB 2.0)
        return "UNKNOWN"


def _words(query: str) -> list[tuple[int, str]]:
    """(offset, text) of each token of `query`, by DuckDB's tokenizer (comments are not tokens)."""
    import duckdb

    tokens = duckdb.tokenize(query)
    ends = [a for a, _ in tokens[1:]] + [len(query)]
    # the keyword or identifier a token starts with, else its first character (an operator)
    return [(a, re.match(r"[A-Za-z_]\w*|\S|", query[a:b]).group(0).upper())
            for (a, kind), b in zip(tokens, ends, strict=True) if kind != duckdb.token_type.comment]


def _parse_one(con, text: str):
    """The single statement `text` parses to, or None (a parse error, or several statements)."""
    import duckdb

    try:
        sts = con.extract_statements(text)
    except duckdb.Error:
        return None
    return sts[0] if len(sts) == 1 else None


def statement_refusal(con, st) -> str | None:
    """None when the parsed statement `st` may run (a query, SET/RESET VARIABLE); else why not."""
    kind = _kind(st)
    words = _words(st.query)
    if kind == "SELECT":
        return None
    if kind == "SET":
        if [w for _, w in words[:2]] in (["SET", "VARIABLE"], ["RESET", "VARIABLE"]):
            return None
        return "settings cannot change in a read-only session (some write files); SET VARIABLE works"
    if kind == "MULTI":
        body = st.query[:words[-1][0]] if words and words[-1][1] == ";" else st.query
        # a query parses as a subquery; COPY, INSERT, CREATE ... do not ("\n": past a -- comment)
        if _parse_one(con, f"SELECT * FROM (\n{body}\n)") is not None:
            return None
        return "only queries may run"
    if kind == "EXPLAIN":
        i = 1
        if i < len(words) and words[i][1] in ("ANALYZE", "ANALYSE"):
            i += 1
        if i < len(words) and words[i][1] == "(":  # EXPLAIN (FORMAT json) ...: skip the options
            depth = 1
            while depth and i + 1 < len(words):
                i += 1
                depth += {"(": 1, ")": -1}.get(words[i][1], 0)
            i += 1
        inner = _parse_one(con, st.query[words[i][0]:]) if i < len(words) else None
        if inner is None:
            return "EXPLAIN of what it explains could not be parsed"
        why = statement_refusal(con, inner)
        return None if why is None else f"it explains a statement that is refused: {why}"
    return "only queries may run"


def run(con, script: str):
    """Execute every statement of `script`; return the last one's relation (None if it yields no rows).

    Every statement is checked first (`statement_refusal`): one that is not a query refuses the
    whole script before anything runs. DuckDB's errors become UserError with the statement's
    first line, so the CLI prints them cleanly; a write to the index is reported as such.
    """
    import duckdb

    try:
        statements = con.extract_statements(script)
    except duckdb.Error as err:
        raise UserError(f"SQL: {_first_line(err)}") from err
    if not statements:
        raise UserError("SQL: no statement given")
    for st in statements:
        why = statement_refusal(con, st)
        if why is not None:
            kind = _kind(st)
            words = _words(st.query)
            head = " ".join(st.query[words[0][0] if words else 0:].split())[:60]  # past comments
            hint = "; write results with --format and --output" if kind in ("COPY", "EXPORT") else ""
            named = "" if kind == "UNKNOWN" else f" ({kind})"
            raise UserError(f"SQL: `{head}`{named} is not allowed in this read-only session: {why} "
                            f"({ALLOWED}){hint}")
    result = None
    for i, st in enumerate(statements):
        try:
            if i == len(statements) - 1 and _kind(st) in _YIELDS_ROWS:
                result = con.sql(st.query)
            else:
                con.execute(st.query).fetchall()  # DuckDB 2 wants each result consumed
        except duckdb.Error as err:
            raise UserError(_explain(err, st.query, con)) from err
    return result


def _explain(err: Exception, query: str, con=None) -> str:
    msg = _first_line(err)
    head = " ".join(query.strip().split())[:80]
    if con is not None and "Corrupt database" in msg:
        dbs = ", ".join(str(p) for p in sorted(_attached_files(con))) or "the index's cells.duckdb"
        return f"{dbs}: cannot read the cells database (damaged? run `geosurge verify`): {msg}"
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
    con, rel, fmt: str = "table", output: str | os.PathLike | None = None, *, max_rows: int = 50,
    protect: Sequence[str | os.PathLike | None] = (),
) -> int:
    """Write a relation as a table (stdout), CSV, JSON (one object per line) or Parquet.

    Files are written by DuckDB's COPY (streaming, any size); stdout gets Arrow batches. Returns
    the number of rows written (-1 for `table`, which does not count them). `output` must not
    lie in a `protect` folder or be a `protect` file (the INDEX_DIR and PRED_DIR), nor in the
    folder of a database attached to `con` (`check_output`). A query that fails while its rows
    are produced is a UserError.
    """
    import duckdb

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if rel is None:
        return 0
    try:
        if fmt == "table":
            if output is not None:
                raise UserError("--format table prints to the terminal; use csv, json or parquet with --output")
            rel.show(max_rows=max_rows, max_width=shutil.get_terminal_size((160, 40)).columns)
            return -1
        if output is not None:
            out = check_output(output, [*protect, *(p.parent for p in _attached_files(con))])
            options = {"csv": "FORMAT csv, HEADER true", "json": "FORMAT json", "parquet": "FORMAT parquet"}[fmt]
            rel.to_view("_result", replace=True)
            # the resolved path: what was checked is what is written (and never a URL)
            counted = con.execute(f"COPY (SELECT * FROM _result) TO {_sql_str(str(out))} ({options})").fetchall()
            return int(counted[0][0]) if counted else -1
        if fmt == "parquet":
            raise UserError("--format parquet needs --output FILE")
        return _write_stream(rel, fmt, sys.stdout)
    except duckdb.Error as err:
        raise UserError(_explain(err, "the last statement", con)) from err


def check_output(output: str | os.PathLike, protect: Sequence[str | os.PathLike | None]) -> Path:
    """The resolved --output path, after refusing one that is, or lies inside, a protected path
    (a folder, or a file such as a single PRED_DIR .parquet): compared as resolved paths
    (symlinks followed) and, for an existing output file, by (device, inode) against every file
    in the protected folders (a hard link)."""
    out = Path(output)
    if out.name in ("", ".", ".."):
        raise UserError(f"--output {out}: not a file name")
    out = out.parent.resolve() / out.name  # a symlinked folder: resolved
    if out.is_symlink() or out.exists():
        out = out.resolve()  # a symlink to a file: its target is what COPY would overwrite
    if not out.parent.is_dir():
        raise UserError(f"--output {output}: folder {out.parent} does not exist")
    try:
        st = os.stat(out)
        inode = (st.st_dev, st.st_ino)
    except OSError:
        inode = None
    for p in (Path(p) for p in protect if p is not None):
        root = p.resolve()
        if out == root or root in out.parents:
            raise UserError(f"--output {output} is inside {p}, which geosurge sql never changes "
                            "(it reads the index and the predictions only); write the result elsewhere")
        if inode is not None and inode in _inodes(root):
            raise UserError(f"--output {output} is a hard link to a file in {p}, which geosurge sql "
                            "never changes; write the result elsewhere")
    return out


def _inodes(root: Path) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of `root` (a file) or of every file under it (a folder)."""
    paths = [root] if not root.is_dir() else [Path(d) / f for d, _, files in os.walk(root) for f in files]
    found = set()
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        found.add((st.st_dev, st.st_ino))
    return found


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
