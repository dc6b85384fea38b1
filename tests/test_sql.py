"""`geosurge sql`: views, macros, parameters, output formats, read-only index, and every recipe
under queries/ against a small real index."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from _eval_fixtures import world  # noqa: F401  (the shared fixture)

from geosurge_index import sql
from geosurge_index.benchmarks import read_truth
from geosurge_index.cli import main
from geosurge_index.errors import FormatError, UserError
from geosurge_index.evaluation import evaluate_predictions
from geosurge_index.metrics import haversine_km

QUERIES = sorted((Path(__file__).parent.parent / "queries").glob("*.sql"))


def _session(world, truth=True, params=None):  # noqa: F811
    return sql.connect(world.index_dir, predictions=world.pred_dir,
                       truth=read_truth(world.truth_csv) if truth else None, params=params)


def _rows(world, script, params=None):  # noqa: F811
    con = _session(world, params=params)
    try:
        rel = sql.run(con, script)
        return rel.columns, rel.fetchall()
    finally:
        con.close()


def _recipe(name: str) -> str:
    return (Path(__file__).parent.parent / "queries" / name).read_text()


def _predictions(world):  # noqa: F811
    return pq.read_table(sorted(world.pred_dir.glob("part-*.parquet"))).to_pylist()


def test_views_and_tables(world):  # noqa: F811
    _, rows = _rows(world, "SELECT (SELECT count(*) FROM cells), (SELECT count(*) FROM levels), "
                           "(SELECT count(*) FROM predictions), (SELECT count(*) FROM truth)")
    n_cells = sum(r.num_rows for r in [pq.read_table(world.cells_dir / "cells.parquet")])
    assert rows == [(n_cells, 7, 288, 300)]
    cols, _ = _rows(world, "SELECT * FROM cells LIMIT 1")
    assert {"country_code", "country_name", "admin1", "town", "area_km2", "s2_token"} <= set(cols)
    cols, _ = _rows(world, "SELECT * FROM truth LIMIT 1")
    assert cols[:4] == ["id", "truth_id", "lat", "lon"] and "true_cell_l7" in cols


def test_haversine_macro_matches_numpy(world):  # noqa: F811
    rng = np.random.default_rng(1)
    pts = rng.uniform([-90, -180, -90, -180], [90, 180, 90, 180], (200, 4))
    values = ", ".join("(" + ", ".join(repr(float(x)) for x in row) + ")" for row in pts)
    _, rows = _rows(world, f"SELECT haversine_km(a, b, c, d), within_km(a, b, c, d, 5000), "
                           f"geoguessr_score(haversine_km(a, b, c, d)) FROM (VALUES {values}) v(a, b, c, d)")
    ours = haversine_km(pts[:, 0], pts[:, 1], pts[:, 2], pts[:, 3])
    np.testing.assert_allclose([r[0] for r in rows], ours, rtol=1e-12)
    assert [r[1] for r in rows] == list(ours <= 5000)
    np.testing.assert_allclose([r[2] for r in rows], 5000 * np.exp(-ours / 1492.7), rtol=1e-12)
    _, rows = _rows(world, "SELECT haversine_km(NULL, 0, 0, 1), haversine_km(0, 0, 0, 180)")
    assert rows[0][0] is None and rows[0][1] == pytest.approx(np.pi * 6371.0088)


# --- read-only ----------------------------------------------------------------------------------

@pytest.mark.parametrize("statement", [
    "UPDATE cells SET n_samples = 0",
    "UPDATE idx.cells SET n_samples = 0",
    "DELETE FROM idx.main.cells",
    "DROP TABLE idx.cells",
    "INSERT INTO idx.levels SELECT * FROM idx.levels",
    "CREATE TABLE idx.evil (a INT)",
    "ALTER TABLE idx.cells ADD COLUMN x INT",
])
def test_writes_to_the_index_fail_clearly(world, statement):  # noqa: F811
    db = world.index_dir / "cells.duckdb"
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    con = _session(world, truth=False)
    try:
        with pytest.raises(UserError, match="read-only"):
            sql.run(con, statement)
    finally:
        con.close()
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    _, rows = _rows(world, "SELECT count(*), min(n_samples) > 0 FROM cells")
    assert rows[0][1] is True


@pytest.mark.parametrize("statement", [
    "DETACH idx", "ATTACH '{db}' AS w", "LOAD spatial", "INSTALL spatial",
    "COPY (SELECT 1 AS a) TO '{db}' (FORMAT csv)",
])
def test_attach_detach_load_copy_refused(world, statement):  # noqa: F811
    db = world.index_dir / "cells.duckdb"
    before = db.read_bytes()
    con = _session(world, truth=False)
    try:
        with pytest.raises(UserError, match="not allowed"):
            sql.run(con, statement.format(db=db) + "; SELECT 1")
    finally:
        con.close()
    assert db.read_bytes() == before


@pytest.mark.parametrize("statement", [
    "PREPARE p AS COPY (SELECT 1 AS a) TO '{out}' (FORMAT csv); EXECUTE p",
    "SET profiling_output = '{out}'; PRAGMA enable_profiling",
    "SET log_query_path = '{out}'",
    "SET lock_configuration = false",
    "SET autoinstall_known_extensions = true",
])
def test_no_file_writes_through_prepare_or_settings(world, tmp_path, statement):  # noqa: F811
    out = tmp_path / "written.txt"
    con = _session(world, truth=False)
    try:
        with pytest.raises(UserError, match="not allowed|read-only"):
            sql.run(con, statement.format(out=out) + "; SELECT 1")
        assert sql.run(con, "SET VARIABLE v = 3; SELECT getvariable('v')").fetchall() == [(3,)]
    finally:
        con.close()
    assert not out.exists()


def test_output_over_the_index_database_is_refused(world, capsys):  # noqa: F811
    db = world.index_dir / "cells.duckdb"
    before = db.read_bytes()
    assert main(["sql", str(world.index_dir), "SELECT 1 AS a", "--format", "csv", "--output", str(db)]) == 2
    assert "never changes" in capsys.readouterr().err
    assert db.read_bytes() == before


def test_cli_update_fails_with_clear_error(world, capsys):  # noqa: F811
    db = world.index_dir / "cells.duckdb"
    before = db.read_bytes()
    assert main(["sql", str(world.index_dir), "DROP VIEW cells; DROP TABLE idx.main.cells"]) == 2
    err = capsys.readouterr().err
    assert "read-only" in err and "Traceback" not in err
    assert db.read_bytes() == before


# --- errors, params, formats --------------------------------------------------------------------

def test_missing_view_hint_and_bad_sql(world):  # noqa: F811
    con = sql.connect(world.index_dir)
    try:
        with pytest.raises(UserError, match="pass --predictions PRED_DIR"):
            sql.run(con, "SELECT * FROM predictions")
        with pytest.raises(UserError, match="pass --truth FILE"):
            sql.run(con, "SELECT * FROM truth")
        with pytest.raises(UserError, match="SQL"):
            sql.run(con, "SELEC 1")
        with pytest.raises(UserError, match="no statement"):
            sql.run(con, "  ")
    finally:
        con.close()


def test_bad_index_dir(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        sql.connect(tmp_path / "nope")
    with pytest.raises(FormatError, match="has no cells.duckdb"):
        sql.connect(tmp_path)
    # a cells.duckdb alone is not an index: the manifest is checked first, as every command does
    (tmp_path / "cells.duckdb").write_bytes(b"not a database")
    with pytest.raises(FormatError, match="no manifest.json"):
        sql.connect(tmp_path)


def test_parse_param():
    assert sql.parse_param("radius_km=25") == ("radius_km", 25)
    assert sql.parse_param("lat=-48.85") == ("lat", -48.85)
    assert sql.parse_param("name = Paris ") == ("name", "Paris")
    for bad in ("noequals", "1x=2", "a-b=3", "=4"):
        with pytest.raises(UserError):
            sql.parse_param(bad)


def test_output_formats(world, tmp_path, capsys):  # noqa: F811
    q = "SELECT level, count(*) AS n FROM cells GROUP BY level ORDER BY level"
    base = ["sql", str(world.index_dir), q]
    assert main(base + ["--format", "csv", "--output", str(tmp_path / "a.csv")]) == 0
    assert (tmp_path / "a.csv").read_text().splitlines()[0] == "level,n"
    assert main(base + ["--format", "parquet", "--output", str(tmp_path / "a.parquet")]) == 0
    assert pq.read_table(tmp_path / "a.parquet").column("level").to_pylist() == list(range(1, 8))
    assert main(base + ["--format", "json", "--output", str(tmp_path / "a.json")]) == 0
    lines = [json.loads(x) for x in (tmp_path / "a.json").read_text().splitlines()]
    assert [x["level"] for x in lines] == list(range(1, 8))
    capsys.readouterr()
    assert main(base + ["--format", "csv"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "level,n" and len(out) == 8
    assert main(base + ["--format", "json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 7
    assert main(base) == 0
    assert "level" in capsys.readouterr().out
    assert main(base + ["--format", "parquet"]) == 2
    assert "needs --output" in capsys.readouterr().err


def test_cli_query_after_options_and_file(world, tmp_path, capsys):  # noqa: F811
    assert main(["sql", str(world.index_dir), "--predictions", str(world.pred_dir), "--format", "csv",
                 "SELECT count(*) AS n FROM predictions WHERE error IS NULL"]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", "278"]
    f = tmp_path / "q.sql"
    f.write_text("SET VARIABLE k = coalesce(getvariable('k'), 1);\nSELECT getvariable('k') * 2 AS x;\n")
    assert main(["sql", str(world.index_dir), "-f", str(f), "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["x", "2"]
    assert main(["sql", str(world.index_dir), "-f", str(f), "--param", "k=21", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["x", "42"]
    assert main(["sql", str(world.index_dir), "SELECT 1", "-f", str(f)]) == 2
    assert "exactly one" in capsys.readouterr().err


# --- the recipes --------------------------------------------------------------------------------

def test_there_are_at_least_six_documented_recipes():
    assert len(QUERIES) >= 6
    readme = (Path(__file__).parent.parent / "queries" / "README.md").read_text()
    for q in QUERIES:
        assert q.name in readme
        assert q.read_text().startswith("--"), f"{q.name} has no header comment"


@pytest.mark.parametrize("path", QUERIES, ids=lambda p: p.name)
def test_every_recipe_runs(world, path, tmp_path):  # noqa: F811
    code = main(["sql", str(world.index_dir), "--predictions", str(world.pred_dir), "--truth",
                 str(world.truth_csv), "-f", str(path), "--format", "csv", "--output", str(tmp_path / "o.csv")])
    assert code == 0
    assert (tmp_path / "o.csv").read_text().strip()


def test_accuracy_recipe_equals_eval(world):  # noqa: F811
    cols, rows = _rows(world, _recipe("accuracy.sql"))
    got = dict(zip(cols, rows[0], strict=True))
    r = evaluate_predictions(world.pred_dir, read_truth(world.truth_csv), world.index_dir)
    assert got["images"] == 300 and got["with_point"] == 300 - world.n_missing - world.n_errors
    for t in (1, 25, 200, 750, 2500):
        assert got[f"pct_{t}km"] == pytest.approx(round(r.accuracy_pct[float(t)], 2))
    assert got["median_km"] == pytest.approx(round(r.median_km, 1))
    assert got["geoguessr"] == pytest.approx(round(r.geoguessr, 1))


def test_level_agreement_recipe_equals_eval(world):  # noqa: F811
    _, rows = _rows(world, _recipe("level_agreement.sql"))
    r = evaluate_predictions(world.pred_dir, read_truth(world.truth_csv), world.index_dir)
    assert [row[0] for row in rows] == list(range(1, 8))
    for level, images, same, inside in rows:
        assert images == 300
        assert same == pytest.approx(round(r.cell_accuracy_pct[level], 2))
        assert inside == pytest.approx(round(r.truth_in_cell_pct[level], 2))


def test_within_radius_recipe(world):  # noqa: F811
    preds = [p for p in _predictions(world) if p["error"] is None]
    lat, lon = np.array([p["lat"] for p in preds]), np.array([p["lon"] for p in preds])
    for centre, radius in (((48.8584, 2.2945), 25), ((-18.14, 178.44), 300), ((0.0, -30.0), 10)):
        params = {"lat": centre[0], "lon": centre[1], "radius_km": radius}
        _, rows = _rows(world, _recipe("within_radius.sql"), params)
        d = haversine_km(lat, lon, *centre)
        expect = sorted(p["id"] for p, k in zip(preds, d, strict=True) if k <= radius)
        assert sorted(r[0] for r in rows) == expect
        assert [r[4] for r in rows] == sorted(r[4] for r in rows)  # nearest first
    _, rows = _rows(world, _recipe("within_radius.sql"))  # defaults: 25 km of the Eiffel Tower
    assert len(rows) == int((haversine_km(lat, lon, 48.8584, 2.2945) <= 25).sum()) > 0


def test_top_cells_and_country_recipes(world):  # noqa: F811
    preds = [p for p in _predictions(world) if p["error"] is None]
    counts = np.bincount([p["cell_l7"] for p in preds])
    cols, rows = _rows(world, _recipe("top_cells.sql"), {"top": 5})
    assert len(rows) == 5
    got = [dict(zip(cols, r, strict=True)) for r in rows]
    assert [g["predictions"] for g in got] == sorted(counts, reverse=True)[:5]
    assert all(counts[g["cell_index"]] == g["predictions"] for g in got)
    assert all(g["country_name"] for g in got)
    cols, rows = _rows(world, _recipe("predictions_per_country.sql"))
    assert sum(r[cols.index("predictions")] for r in rows) == len(preds)
    assert sum(r[cols.index("pct")] for r in rows) == pytest.approx(100, abs=0.1)


def test_low_confidence_and_error_recipes(world):  # noqa: F811
    preds = [p for p in _predictions(world) if p["error"] is None]
    _, rows = _rows(world, _recipe("low_confidence.sql"), {"max_probability": 0.9})
    expect = sorted(p["id"] for p in preds if p["probability"] < 0.9)
    assert expect and sorted(r[0] for r in rows) == expect
    assert [r[2] for r in rows] == sorted(r[2] for r in rows)
    assert all(r[4] >= 0 for r in rows)  # margin to the runner-up
    _, rows = _rows(world, _recipe("error_kinds.sql"))
    assert rows[0][:2] == ("not_an_image", world.n_errors)


def test_likely_within_recipe(world, tmp_path):  # noqa: F811
    """Rows with the confidence columns (as `geosurge locate` writes them) over the world's index."""
    import numpy as np

    from geosurge_index.confidence import ConfidenceModel
    from geosurge_index.confidence import search as confident_search
    from geosurge_index.index import GeoIndex
    from geosurge_index.pred_store import PredStore

    index = GeoIndex.open(world.index_dir, device="cpu", encoder=False)
    emb = np.random.default_rng(0).standard_normal((60, index.dim)).astype(np.float32)
    result, conf = confident_search(index, ConfidenceModel.for_index(index), emb, 5)
    store = PredStore(tmp_path / "preds")
    store.dir.mkdir(parents=True)
    store.write_chunk(0, index.to_arrow(result, [f"q{i}" for i in range(60)], confidence=conf))
    preds = pq.read_table(sorted(store.dir.glob("part-*.parquet"))).to_pylist()
    bar = sorted(p["p_within_2500km"] for p in preds)[len(preds) // 2]  # about half pass

    def run(params):
        con = sql.connect(world.index_dir, predictions=store.dir, params=params)
        try:
            rel = sql.run(con, _recipe("likely_within.sql"))
            return rel.columns, rel.fetchall()
        finally:
            con.close()

    cols, rows = run({"km": 2500, "min_probability": bar})
    expect = sorted(p["id"] for p in preds if p["p_within_2500km"] >= bar)
    assert expect and sorted(r[0] for r in rows) == expect
    got = [r[cols.index("p_within")] for r in rows]
    assert got == sorted(got, reverse=True)
    with pytest.raises(Exception, match="km must be one of"):
        run({"km": 30})


# --- the index is opened as every command opens it -------------------------------------------------

def _tree_hash(*folders) -> dict:
    """sha256 of every file under the folders (what "no index file changed" is checked against)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in folders for p in sorted(Path(d).rglob("*")) if p.is_file()}


@pytest.fixture()
def victim(world, tmp_path):  # noqa: F811
    """A copy of the world's index and PRED_DIR that a test may attack."""
    index = tmp_path / "index"
    pred = tmp_path / "pred"
    shutil.copytree(world.index_dir, index)
    shutil.copytree(world.pred_dir, pred)
    return index, pred


def _cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["sql", *map(str, argv)])
    return code, capsys.readouterr().err


def test_sql_checks_the_manifest(victim, capsys):
    index, _ = victim
    m = json.loads((index / "manifest.json").read_text())
    m["format_version"] += 1
    (index / "manifest.json").write_text(json.dumps(m))
    code, err = _cli(capsys, index, "SELECT count(*) FROM cells")
    assert code == 2 and "newer" in err and "Traceback" not in err
    (index / "manifest.json").unlink()
    code, err = _cli(capsys, index, "SELECT 1")
    assert code == 2 and "no manifest.json" in err


def test_damaged_cells_database_is_one_clear_line(victim, capsys):
    index, _ = victim
    db = index / "cells.duckdb"
    data = bytearray(db.read_bytes())
    for k in range(len(data) // 3, len(data), 61):  # same size, many blocks damaged
        data[k] ^= 0xFF
    db.write_bytes(bytes(data))
    code, err = _cli(capsys, index, "SELECT level, count(*), sum(mean_lat) FROM cells GROUP BY level")
    assert code == 2 and "cells.duckdb does not match its sha256" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, err = _cli(capsys, index, "--no-verify", "SELECT level, count(*), sum(mean_lat) FROM cells GROUP BY level")
    assert code == 2 and str(db) in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_structurally_damaged_cells_table_is_refused(victim, capsys):
    """A valid DuckDB file whose tables disagree with the manifest (a checksum pass skipped, or a
    file rewritten along with its checksum): the structural check names it."""
    import duckdb

    from geosurge_index.index import _sha256

    index, _ = victim
    db = index / "cells.duckdb"
    con = duckdb.connect(str(db))
    con.execute("UPDATE cells SET cell_index = cell_index + 1 WHERE level = 3 AND cell_index >= 2")
    con.execute("CHECKPOINT")
    con.close()
    m = json.loads((index / "manifest.json").read_text())
    m["files"]["cells.duckdb"] = {"sha256": _sha256(db), "bytes": db.stat().st_size}
    (index / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FormatError, match="cells.duckdb: cell_index is not dense"):
        sql.connect(index)
    code, err = _cli(capsys, index, "SELECT count(*) FROM cells")
    assert code == 2 and "not dense" in err


def test_a_query_failing_while_it_runs_is_one_clear_line(world, capsys):  # noqa: F811
    for fmt in ("table", "csv", "json"):
        code, err = _cli(capsys, world.index_dir, "SELECT 'a'::INT AS x", "--format", fmt)
        assert code == 2 and "SQL error" in err and "Traceback" not in err


# --- only queries run --------------------------------------------------------------------------------

ALLOWED_STATEMENTS = [
    "SELECT count(*) FROM cells",
    "WITH c AS (SELECT * FROM cells) SELECT level, count(*) FROM c GROUP BY level",
    "FROM levels",
    "VALUES (1, 2)",
    "EXPLAIN SELECT * FROM cells",
    "EXPLAIN ANALYZE SELECT count(*) FROM cells",
    "DESCRIBE cells",
    "SHOW TABLES",
    "SUMMARIZE levels",
    "PIVOT (SELECT level, n_samples FROM cells) ON level USING sum(n_samples)",
    "SELECT * FROM (PIVOT (SELECT level, n_samples FROM cells) ON level USING sum(n_samples))",
    "UNPIVOT levels ON tau_max, n_cells INTO NAME k VALUE v",
    "SET VARIABLE k = 3; SELECT getvariable('k')",
    "SET VARIABLE k = 3; RESET VARIABLE k; SELECT getvariable('k')",
    "SELECT count(*) FROM read_csv('{truth}')",
    "SELECT count(*) FROM read_parquet('{shard}')",
]


@pytest.mark.parametrize("statement", ALLOWED_STATEMENTS)
def test_queries_run(world, statement):  # noqa: F811
    shard = sorted(world.pred_dir.glob("part-*.parquet"))[0]
    _, rows = _rows(world, statement.format(truth=world.truth_csv, shard=shard))
    assert rows


def _hostile_statements(index: Path, pred: Path, tmp: Path) -> list[str]:
    """Statements that would change a file or reach beyond the session, each refused."""
    hostile = tmp / "hostile_export"
    hostile.mkdir(exist_ok=True)
    # IMPORT DATABASE runs a folder's schema.sql: here, a COPY over a level file of the index
    (hostile / "schema.sql").write_text(f"COPY (SELECT 'x' AS a) TO '{index / 'level_7.faiss'}' (FORMAT csv);\n")
    (hostile / "load.sql").write_text("")
    out = tmp / "written.csv"
    shard = sorted(pred.glob("part-*.parquet"))[0]
    return [
        f"IMPORT DATABASE '{hostile}'",
        "UPDATE EXTENSIONS",
        "UPDATE EXTENSIONS (spatial)",
        "INSTALL spatial",
        "FORCE INSTALL spatial",
        "LOAD spatial",
        f"ATTACH '{index / 'cells.duckdb'}' AS w",
        f"ATTACH '{tmp / 'new.duckdb'}' AS w",
        "DETACH idx",
        f"COPY (SELECT 1 AS a) TO '{index / 'manifest.json'}' (FORMAT csv)",
        f"COPY (SELECT 1 AS a) TO '{shard}' (FORMAT parquet)",
        f"COPY (PIVOT (SELECT level, n_samples FROM cells) ON level USING sum(n_samples)) TO '{out}'",
        f"EXPLAIN ANALYZE COPY (SELECT 1 AS a) TO '{out}' (FORMAT csv)",
        f"EXPORT DATABASE '{tmp / 'export'}'",
        "COPY FROM DATABASE idx TO memory",
        "PRAGMA version",
        "PRAGMA enable_profiling",
        "CALL pragma_version()",
        "CHECKPOINT",
        "CREATE TABLE t AS SELECT 1 AS a",
        "CREATE TABLE t AS PIVOT (SELECT level, n_samples FROM cells) ON level USING sum(n_samples)",
        "CREATE MACRO m(a) AS a",
        "CREATE SECRET (TYPE s3, KEY_ID 'a', SECRET 'b')",
        "INSERT INTO idx.levels SELECT * FROM idx.levels",
        "UPDATE idx.cells SET n_samples = 0",
        "DELETE FROM idx.cells",
        "DROP VIEW cells",
        "ALTER TABLE idx.cells ADD COLUMN x INT",
        "PREPARE p AS SELECT 1",
        "SET threads = 1",
        "SET GLOBAL lock_configuration = false",
        "RESET lock_configuration",
        "USE idx",
        "BEGIN TRANSACTION",
        "VACUUM",
    ]


def test_hostile_statements_are_refused_and_change_nothing(victim, tmp_path, capsys):
    index, pred = victim
    before = _tree_hash(index, pred)
    statements = _hostile_statements(index, pred, tmp_path)
    for statement in statements:
        con = sql.connect(index, predictions=pred)
        try:
            with pytest.raises(UserError, match="not allowed in this read-only session") as err:
                sql.run(con, "SELECT 1; " + statement + "; SELECT 2")
            assert "\n" not in str(err.value)
        finally:
            con.close()
        code, err = _cli(capsys, index, "--predictions", pred, statement)
        assert code == 2 and "not allowed" in err and "Traceback" not in err, statement
        assert len(err.strip().splitlines()) == 1
    assert _tree_hash(index, pred) == before  # no index or prediction file changed
    assert not (tmp_path / "written.csv").exists() and not (tmp_path / "export").exists()
    assert not (tmp_path / "new.duckdb").exists()


def test_every_recipe_passes_the_allow_list(world):  # noqa: F811
    con = _session(world)
    try:
        for path in QUERIES:
            for st in con.extract_statements(path.read_text()):
                assert sql.statement_refusal(con, st) is None, (path.name, st.query)
    finally:
        con.close()


# --- --output never lands in the index or the predictions ----------------------------------------

def _output_targets(index: Path, pred: Path, tmp: Path) -> list[Path]:
    shard = sorted(pred.glob("part-*.parquet"))[0]
    (tmp / "link_manifest.json").symlink_to(index / "manifest.json")
    (tmp / "link_dir").symlink_to(index)
    os.link(index / "level_1.faiss", tmp / "hard_level_1.faiss")
    os.link(shard, tmp / "hard_shard.parquet")
    return [index / "manifest.json", index / "level_1.faiss", index / "cells.duckdb", index / "new.csv",
            index / ".." / index.name / "level_2.faiss", shard, pred / "new.csv",
            tmp / "link_manifest.json", tmp / "link_dir" / "level_3.faiss", tmp / "link_dir" / "new.csv",
            tmp / "hard_level_1.faiss", tmp / "hard_shard.parquet"]


def test_output_inside_the_index_or_predictions_is_refused(victim, tmp_path, capsys):
    index, pred = victim
    targets = _output_targets(index, pred, tmp_path)
    before = _tree_hash(index, pred)
    for target in targets:
        for fmt in ("csv", "parquet"):
            code, err = _cli(capsys, index, "--predictions", pred, "SELECT 1 AS a",
                             "--format", fmt, "--output", target)
            assert code == 2 and "never changes" in err, (target, err)
    assert _tree_hash(index, pred) == before
    assert not (index / "new.csv").exists() and not (pred / "new.csv").exists()
    # elsewhere it writes, and the predictions may be given as one Parquet file
    shard = sorted(pred.glob("part-*.parquet"))[0]
    code, err = _cli(capsys, index, "--predictions", shard, "SELECT count(*) AS n FROM predictions",
                     "--format", "csv", "--output", tmp_path / "ok.csv")
    assert code == 0 and (tmp_path / "ok.csv").read_text().startswith("n\n")
    code, err = _cli(capsys, index, "--predictions", shard, "SELECT 1 AS a", "--format", "csv",
                     "--output", shard)
    assert code == 2 and "never changes" in err
    assert _tree_hash(index, pred) == before


def test_help_says_it_writes_only_output(capsys):
    with pytest.raises(SystemExit):
        main(["sql", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "never writes anywhere but --output" in text and "read_csv" in text
