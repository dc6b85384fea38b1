"""What `geosurge locate` and `geosurge export` write, opened by the tools of the field: an older
DuckDB on cells.duckdb, geopandas on the GeoParquet shards, polars / pandas / DuckDB on PRED_DIR
as a folder; and a PRED_DIR of the older layout (run files at the top level) still resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _locate_fixtures import write_folder, write_tar

from geosurge_index import pred_store, s2
from geosurge_index.cli import main as cli_main
from geosurge_index.errors import UserError
from geosurge_index.geoparquet import GEO_KEY
from geosurge_index.index import CELLS_DB, OLDEST_DUCKDB

# the Makefile installs the oldest DuckDB that opens an index here (make install)
OLD_DUCKDB_DIR = Path(os.environ.get("GEOSURGE_OLD_DUCKDB", Path(sys.prefix) / "old-duckdb"))
NEW_COLUMNS = ("topk_tokens", "geometry")


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    from geosurge_index.synthetic import random_index

    return random_index(tmp_path_factory.mktemp("idx") / "index", n_points=1500, place_names=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    write_folder(root / "imgs", n_extra=2)  # good images and a few that fail to decode
    write_tar(root / "shard.tar", 4)
    return [str(root / "imgs"), str(root / "shard.tar")]


def _locate(index_dir, inputs, out) -> None:
    argv = ["locate", str(index_dir), *inputs, "--out", str(out), "--chunk-size", "4", "--workers", "0",
            "--device", "cpu", "--top-k", "3"]
    assert cli_main(argv) == 0


@pytest.fixture(scope="module")
def run_dir(index_dir, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "preds"
    _locate(index_dir, inputs, out)
    return out


def test_cells_duckdb_opens_in_the_oldest_duckdb(index_dir):
    if not (OLD_DUCKDB_DIR / "duckdb").is_dir():
        pytest.skip(f"no DuckDB {OLDEST_DUCKDB} in {OLD_DUCKDB_DIR} (make install puts it there)")
    import duckdb

    with duckdb.connect(str(Path(index_dir) / CELLS_DB), read_only=True) as con:
        want = con.execute("SELECT (SELECT count(*) FROM cells), (SELECT count(*) FROM levels)").fetchone()
    code = f"""
import duckdb, sys
assert duckdb.__version__ == {OLDEST_DUCKDB!r}, duckdb.__version__
con = duckdb.connect(sys.argv[1], read_only=True)
print(con.execute("SELECT (SELECT count(*) FROM cells), (SELECT count(*) FROM levels)").fetchone())
print(con.execute("SELECT country_name FROM cells WHERE country_name IS NOT NULL LIMIT 1").fetchone()[0])
"""
    env = {**os.environ, "PYTHONPATH": str(OLD_DUCKDB_DIR)}
    res = subprocess.run([sys.executable, "-c", code, str(Path(index_dir) / CELLS_DB)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert lines[0] == str(want) and want[0] > 0 and lines[1]


def test_prediction_shards_are_geoparquet(run_dir):
    geopandas = pytest.importorskip("geopandas")
    shard = run_dir / "part-00000.parquet"
    geo = json.loads(pq.read_schema(shard).metadata[GEO_KEY])
    assert geo["primary_column"] == "geometry" and geo["columns"]["geometry"]["encoding"] == "WKB"
    for src in (shard, run_dir):  # a shard, and the folder as one dataset
        gdf = geopandas.read_parquet(src)
        assert gdf.geometry.name == "geometry" and gdf.crs.to_string() == "OGC:CRS84"  # lon, lat on WGS 84
        ok = gdf["error"].isna().to_numpy()
        assert ok.any() and (src == shard or (~ok).any())
        assert gdf.geometry[~ok].isna().all()  # error rows: no point
        np.testing.assert_allclose(gdf.geometry[ok].x, gdf["lon"][ok])
        np.testing.assert_allclose(gdf.geometry[ok].y, gdf["lat"][ok])


def test_every_column_kept_and_topk_tokens_added(run_dir):
    t = pq.read_table(sorted(run_dir.glob("part-*.parquet")))
    assert t.schema.names == pred_store.pred_schema().names  # the old columns first, in their order
    after = t.schema.names.index("error") + 1  # added later, after the old columns, in this order
    assert t.schema.names[after:after + 2] == list(NEW_COLUMNS)
    archive = [n for n, _ in pred_store.ARCHIVE_FIELDS]
    assert t.schema.names[after + 2:after + 2 + len(archive)] == archive
    gallery = [name for name, _ in pred_store.REFINEMENT_FIELDS]  # added after these, by galleries
    confidence = [name for name, _ in pred_store.CONFIDENCE_FIELDS]  # then the confidence
    assert t.schema.names[-len(gallery) - len(confidence):] == gallery + confidence
    for r in t.to_pylist():
        if r["error"] is not None:
            assert r["topk_tokens"] is None and r["geometry"] is None
            continue
        assert len(r["topk_tokens"]) == len(r["topk_cells"]) == 3
        assert r["topk_tokens"][0] == r["token_l7"]  # the best cell is the first of the top k
        assert all(s2.is_valid_id(s2.tokens_to_ids(r["topk_tokens"])))


def test_pred_dir_is_a_folder_every_reader_takes(run_dir):
    import duckdb
    import pandas as pd

    polars = pytest.importorskip("polars")
    n = pq.read_table(sorted(run_dir.glob("part-*.parquet"))).num_rows
    assert polars.scan_parquet(run_dir).select(polars.len()).collect().item() == n
    assert polars.read_parquet(run_dir).height == n
    assert len(pd.read_parquet(run_dir)) == n
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{run_dir}/*.parquet')").fetchall()[0][0] == n
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{run_dir}/**/*.parquet')").fetchall()[0][0] == n
    # beside the shards, only empty files or Parquet (polars reads every other file it finds)
    others = [p for p in run_dir.rglob("*") if p.is_file() and not p.name.startswith("part-")]
    assert others and all(p.stat().st_size == 0 or p.read_bytes()[:4] == b"PAR1" for p in others)
    run, summary = pred_store.read_run(run_dir), pred_store.read_summary(run_dir)
    assert run["format"] == pred_store.RUN_FORMAT and run["n_inputs"] == n
    assert summary["complete"] and summary["images"] == n


def _to_old_layout(out: Path) -> None:
    """A PRED_DIR as the previous version wrote it: _run.json/_lock at the top, no new columns."""
    run = pred_store.read_run(out)
    for p in (out / pred_store.META_DIR).iterdir():
        p.unlink()
    (out / pred_store.META_DIR).rmdir()
    (out / pred_store.RUN_FILE).write_text(json.dumps(run, indent=1))
    (out / pred_store.LOCK_FILE).touch()
    for p in out.glob("part-*.parquet"):
        t = pq.read_table(p)
        t = t.drop_columns(list(NEW_COLUMNS)).replace_schema_metadata(None)
        pq.write_table(t, p, compression="zstd")


def test_old_layout_pred_dir_resumes_in_its_layout(index_dir, inputs, run_dir, tmp_path, capsys):
    out = tmp_path / "old"
    out.mkdir()
    for p in run_dir.glob("part-*.parquet"):
        (out / p.name).write_bytes(p.read_bytes())
    (out / pred_store.META_DIR).mkdir()
    (out / pred_store.META_DIR / pred_store.META_RUN).write_bytes(
        (run_dir / pred_store.META_DIR / pred_store.META_RUN).read_bytes())
    _to_old_layout(out)
    old_schema = pq.read_schema(out / "part-00000.parquet")
    (out / "part-00001.parquet").unlink()  # killed before this chunk was written
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    _locate(index_dir, inputs, out)
    assert "chunks were already done" in capsys.readouterr().err
    assert all((out / k).stat().st_mtime_ns == v for k, v in kept.items())
    assert pq.read_schema(out / "part-00001.parquet").names == old_schema.names  # one schema per folder
    assert not (out / pred_store.META_DIR).exists() and (out / pred_store.SUMMARY_FILE).is_file()
    assert pred_store.read_summary(out)["this_run"]["resumed_chunks"] == len(kept)
    t = pq.read_table(sorted(out.glob("part-*.parquet")))
    want = pq.read_table(sorted(run_dir.glob("part-*.parquet")))
    assert t.column("id").to_pylist() == want.column("id").to_pylist()
    assert t.column("cell_l7").to_pylist() == want.column("cell_l7").to_pylist()


def test_meta_files_are_parquet_of_the_shard_schema(run_dir):
    """polars takes the first file's schema for all: the metadata files must have it too."""
    shard = pq.read_schema(run_dir / "part-00000.parquet")
    for name in (pred_store.META_RUN, pred_store.META_SUMMARY):
        meta = pq.read_table(run_dir / pred_store.META_DIR / name)
        assert meta.num_rows == 0 and meta.schema.equals(shard)
    t = pa.concat_tables([pq.read_table(p) for p in sorted(run_dir.rglob("*.parquet"))])
    assert t.num_rows == pred_store.read_summary(run_dir)["images"]


def test_a_refused_folder_is_left_as_it_was(tmp_path):
    out = tmp_path / "not-a-run"
    out.mkdir()
    pq.write_table(pa.table({"x": [1]}), out / "part-00000.parquet")
    config = pred_store.RunConfig(inputs=["/x"], n_inputs=3, fingerprint="f", chunk_size=2, index_dir="/i",
                                  index_id="a")
    with pytest.raises(UserError, match="not a locate run folder"):
        pred_store.PredStore(out).begin(config)
    assert [p.name for p in out.iterdir()] == ["part-00000.parquet"]
