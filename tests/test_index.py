"""INDEX_DIR: export, manifest checks, the cells database and its place names, open + search."""

from __future__ import annotations

import json
import shutil

import duckdb
import numpy as np
import pytest

from geosurge_index.errors import FormatError, UserError
from geosurge_index.index import (
    CELLS_DB,
    INDEX_FORMAT_VERSION,
    MANIFEST,
    PLACE_COLUMNS,
    GeoIndex,
    IndexCells,
    export_index,
    read_manifest,
    verify_index,
)
from geosurge_index.placenames import reverse_geocode
from geosurge_index.synthetic import synthetic_hierarchy, synthetic_queries

TAU = [800, 400, 200, 100, 50, 25, 12]


@pytest.fixture(scope="module")
def hierarchy():
    return synthetic_hierarchy(400, dim=24, seed=7)


@pytest.fixture(scope="module")
def exported(hierarchy, tmp_path_factory):
    h = hierarchy
    out = tmp_path_factory.mktemp("idx") / "index"

    def encoder_writer(d):  # stands in for model.save_encoder
        (d / "encoder.safetensors").write_bytes(b"weights")
        (d / "encoder.json").write_text("{}")

    # unnormalised tables: export normalises them
    tables = [t * (1 + np.arange(len(t), dtype=np.float32)[:, None]) for t in h.tables]
    export_index(tables, h.temperatures, h.cells_table(), out, encoder_writer=encoder_writer,
                 tau_max=TAU, source="unit test")
    return out


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_export_writes_the_contract(exported, hierarchy):
    names = sorted(p.name for p in exported.iterdir())
    assert names == sorted([*(f"level_{i}.faiss" for i in range(1, 8)), CELLS_DB, MANIFEST,
                            "encoder.safetensors", "encoder.json"])
    m = read_manifest(exported)
    assert m["format_version"] == INDEX_FORMAT_VERSION and m["dim"] == 24 and m["encoder"] is True
    assert [e["n_cells"] for e in m["levels"]] == hierarchy.sizes
    assert [e["tau_max"] for e in m["levels"]] == TAU
    assert set(m["files"]) == set(names) - {MANIFEST}
    assert {"faiss", "numpy", "duckdb", "pyarrow"} <= set(m["library_versions"])

    import faiss

    idx = faiss.read_index(str(exported / "level_3.faiss"))
    assert isinstance(idx, faiss.IndexFlatIP) and idx.ntotal == hierarchy.sizes[2]
    vecs = idx.reconstruct_n(0, idx.ntotal)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(vecs, hierarchy.tables[2], atol=1e-5)

    con = duckdb.connect(str(exported / CELLS_DB), read_only=True)
    levels = con.execute("SELECT level, tau_max, n_cells, temperature FROM levels ORDER BY level").fetchall()
    assert [r[0] for r in levels] == list(range(1, 8)) and [r[1] for r in levels] == TAU
    assert [r[2] for r in levels] == hierarchy.sizes
    np.testing.assert_allclose([r[3] for r in levels], hierarchy.temperatures)
    n, n_named = con.execute("SELECT count(*), count(country_code) FROM cells").fetchone()
    assert n == sum(hierarchy.sizes) and n_named == n  # every cell has a mean point -> a name
    cols = {r[0] for r in con.execute("DESCRIBE cells").fetchall()}
    assert {"s2_token", "parent_index", "mean_lat", "area_km2", "country_code", "country_name",
            "admin1", "town", "town_distance_km"} <= cols
    con.close()


def test_open_and_search_equal_in_memory(exported, hierarchy):
    h = hierarchy
    q, _ = synthetic_queries(h, 30, seed=5)
    disk = GeoIndex.open(exported, device="cpu")
    assert disk.levels == 7 and disk.dim == 24 and disk.device == "cpu" and disk.has_encoder
    mem = GeoIndex.from_arrays(h.tables, h.temperatures, h.tree())
    for kwargs in ({"exhaustive": True}, {"beam": 2}):
        a, b = disk.search(q, top_k=4, **kwargs), mem.search(q, top_k=4, **kwargs)
        np.testing.assert_array_equal(a.topk_cells, b.topk_cells)
        np.testing.assert_allclose(a.topk_probs, b.topk_probs, rtol=1e-4)
        np.testing.assert_array_equal(a.lat, b.lat)
    assert disk.tree.tokens[6].to_pylist() == mem.tree.tokens[6].to_pylist()
    faiss_backend = GeoIndex.open(exported, device="cpu", backend="faiss", verify=False)
    np.testing.assert_array_equal(faiss_backend.search(q, beam=2).topk_cells,
                                  disk.search(q, beam=2).topk_cells)


def test_missing_file(exported, tmp_path):
    d = _copy(exported, tmp_path)
    (d / "level_4.faiss").unlink()
    with pytest.raises(FormatError, match="level_4.faiss is missing"):
        GeoIndex.open(d)
    d2 = _copy(exported, tmp_path / "b")
    (d2 / MANIFEST).unlink()
    with pytest.raises(FormatError, match="no manifest.json"):
        GeoIndex.open(d2)


def test_checksum_mismatch(exported, tmp_path):
    d = _copy(exported, tmp_path)
    path = d / "level_6.faiss"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # same size, one vector changed
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="level_6.faiss does not match its sha256"):
        GeoIndex.open(d)
    verify_index(d, checksums=False)  # sizes still agree
    path.write_bytes(bytes(data[:-100]))
    with pytest.raises(FormatError, match="truncated"):
        GeoIndex.open(d, verify=False)


def test_newer_format_version(exported, tmp_path):
    d = _copy(exported, tmp_path)
    m = json.loads((d / MANIFEST).read_text())
    m["format_version"] = INDEX_FORMAT_VERSION + 1
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(FormatError, match="newer"):
        GeoIndex.open(d)
    m["format_version"], m["format"] = INDEX_FORMAT_VERSION, "something-else"
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(FormatError, match="format"):
        GeoIndex.open(d)


def test_manifest_must_cover_every_file_read(exported, tmp_path):
    d = _copy(exported, tmp_path)
    good = json.loads((d / MANIFEST).read_text())
    m = json.loads(json.dumps(good))
    del m["files"]["cells.duckdb"]  # the cells table would be read unchecked
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(FormatError, match="cells.duckdb not covered"):
        GeoIndex.open(d)
    m = json.loads(json.dumps(good))
    del m["files"]["level_3.faiss"]["bytes"]
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(FormatError, match="malformed"):
        GeoIndex.open(d)
    m = json.loads(json.dumps(good))
    m["levels"] = "level_1.faiss"
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(FormatError, match="malformed"):
        GeoIndex.open(d)


def test_corrupt_faiss_file_with_matching_manifest_is_a_format_error(exported, tmp_path):
    from geosurge_index.index import _sha256

    d = _copy(exported, tmp_path)
    (d / "level_2.faiss").write_bytes(b"garbage" * 10)
    m = json.loads((d / MANIFEST).read_text())
    m["files"]["level_2.faiss"] = {"sha256": _sha256(d / "level_2.faiss"), "bytes": 70}
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(FormatError, match="FAISS cannot read"):
        GeoIndex.open(d)


def test_export_refuses_bad_input(hierarchy, tmp_path):
    h = hierarchy
    cells = h.cells_table()
    with pytest.raises(FormatError, match="do not match"):
        export_index(h.tables[:6] + [h.tables[6][:-1]], h.temperatures, cells, tmp_path / "a")
    with pytest.raises(FormatError, match="lacks columns"):
        export_index(h.tables, h.temperatures, cells.drop_columns(["mean_lat"]), tmp_path / "b")
    with pytest.raises(UserError, match="temperatures"):
        export_index(h.tables, h.temperatures[:3], cells, tmp_path / "c")
    assert not (tmp_path / "a").exists()
    # a non-empty folder needs overwrite
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        export_index(h.tables, h.temperatures, cells, tmp_path / "d", place_names=False)
    export_index(h.tables, h.temperatures, cells, tmp_path / "d", place_names=False, overwrite=True)
    m = verify_index(tmp_path / "d")
    assert m["encoder"] is False and "encoder.json" not in m["files"]


def test_place_names_of_known_points():
    names = reverse_geocode(np.array([48.8566, -33.87, np.nan, 35.68]),
                            np.array([2.3522, 151.21, 0.0, 139.69]))
    assert names.country_code == ["FR", "AU", None, "JP"]
    assert names.country_name[:2] == ["France", "Australia"] and names.country_name[3] == "Japan"
    assert names.admin1[0] == "Ile-de-France" and names.town[0] == "Paris"
    assert names.town_distance_km[0] < 5 and np.isnan(names.town_distance_km[2])


def test_export_checkpoint_cli_end_to_end(tmp_path):
    """A real checkpoint of a config-built model -> `geosurge export` -> open, encode, search."""
    import torch

    from geosurge_index import cells as cells_mod
    from geosurge_index.cli import main
    from geosurge_index.model import (
        GeoSurgeModel,
        load_encoder,
        read_geo_tables,
        save_checkpoint,
        tiny_config,
    )

    rng = np.random.default_rng(0)
    lat = np.clip(rng.normal(45, 3, 1500), -89, 89)
    lon = rng.normal(5, 5, 1500)
    settings = cells_mod.PartitionSettings(tau_min=5, tau_max=(800, 400, 200, 100, 50, 25, 12))
    part = cells_mod.partition(lat, lon, settings, source="test")
    cells_mod.write_cells_dir(tmp_path / "cells", part.cells, part.assignments)
    torch.manual_seed(0)
    model = GeoSurgeModel(tiny_config(), [len(lc) for lc in part.cells.levels])
    save_checkpoint(tmp_path / "ckpt", model, epoch=0, cells_dir=tmp_path / "cells")

    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "index")]) == 0
    index = GeoIndex.open(tmp_path / "index")
    assert index.has_encoder and index.tree.sizes == [len(lc) for lc in part.cells.levels]
    tables, temps = read_geo_tables(tmp_path / "ckpt")
    np.testing.assert_allclose(index.temperatures, temps, rtol=1e-6)
    encoder = load_encoder(tmp_path / "index")
    size = encoder.image_size
    with torch.inference_mode():
        emb = encoder(torch.rand(3, 3, size, size), None).numpy()
    res = index.search(emb, top_k=3, exhaustive=True)
    assert res.best_cells.shape == (3, 7) and np.isfinite(res.lat).all()
    con = duckdb.connect(str(tmp_path / "index" / CELLS_DB), read_only=True)
    towns = con.execute("SELECT DISTINCT country_code FROM cells").fetchall()
    con.close()
    assert {t[0] for t in towns} & {"FR", "CH", "IT", "DE"}  # points around 45N 5E
    # export_index also takes the partition's CellsTable as it is
    export_index(tables, temps, part.cells, tmp_path / "index2", place_names=False)
    assert GeoIndex.open(tmp_path / "index2").tree.sizes == index.tree.sizes
    # a second export into the same folder is refused without --overwrite
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "index")]) == 2


# --- IndexCells: the one reader of cells.duckdb ---------------------------------------------------

def test_index_cells_tree_places_and_cell(exported, hierarchy):
    with IndexCells.open(exported) as cells:
        tree = cells.tree(7)
        mem = hierarchy.tree()
        assert tree.sizes == hierarchy.sizes and cells.tree().sizes == tree.sizes
        for lv in range(7):
            np.testing.assert_array_equal(tree.parents[lv], mem.parents[lv])
            np.testing.assert_allclose(tree.mean_lat[lv], mem.mean_lat[lv])
        assert tree.tokens[6].to_pylist() == mem.tokens[6].to_pylist()
        # the same rows as a direct DuckDB query
        con = duckdb.connect(str(exported / CELLS_DB), read_only=True)
        want = con.execute("SELECT country_code, town FROM cells WHERE level = 3 ORDER BY cell_index").fetchall()
        row = con.execute("SELECT * FROM cells WHERE level = 2 AND cell_index = 1").fetchone()
        names = [d[0] for d in con.description]
        con.close()
        places = cells.places(3)
        assert list(places) == list(PLACE_COLUMNS) and len(places["town"]) == hierarchy.sizes[2]
        assert list(zip(places["country_code"], places["town"], strict=True)) == want
        got = cells.cell(2, 1)
        assert list(got) == names and got["s2_token"] == row[names.index("s2_token")]
        assert got["mean_lat"] == pytest.approx(row[names.index("mean_lat")])
        json.dumps(got, allow_nan=False)  # JSON-ready
        assert cells.cell(2, 10**6) is None and cells.cell(99, 0) is None
        assert cells.table(level=5).num_rows == hierarchy.sizes[4]
        assert cells.level_table()["tau_max"].to_pylist() == TAU
        part = cells.partition()
        assert [len(lc) for lc in part.levels] == hierarchy.sizes and list(part.tau_max) == TAU
    with pytest.raises(ValueError, match="closed"):
        cells.cell(1, 0)


def test_index_cells_cell_from_many_threads(exported):
    from concurrent.futures import ThreadPoolExecutor

    with IndexCells.open(exported) as cells:
        n1 = cells.table(level=1).num_rows
        keys = [(1 + k % 3, k % n1) for k in range(200)]
        with ThreadPoolExecutor(8) as pool:
            rows = list(pool.map(lambda key: cells.cell(*key), keys))
        assert [(r["level"], r["cell_index"]) for r in rows] == keys


def test_index_cells_without_place_names(hierarchy, tmp_path):
    h = hierarchy
    export_index(h.tables, h.temperatures, h.cells_table(), tmp_path / "i", place_names=False)
    with IndexCells.open(tmp_path / "i") as cells:
        assert cells.places(7) == {c: [None] * h.sizes[6] for c in PLACE_COLUMNS}
        assert "town" not in cells.cell(7, 0)


def test_index_cells_damaged_file_is_a_format_error(exported, tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        IndexCells.open(tmp_path / "nope")
    with pytest.raises(FormatError, match="has no cells.duckdb"):
        IndexCells.open(tmp_path)
    d = _copy(exported, tmp_path)
    (d / CELLS_DB).write_bytes(b"not a database" * 100)
    with pytest.raises(FormatError, match=f"{d / CELLS_DB}: cannot open"):
        IndexCells.open(d)
    with pytest.raises(FormatError, match="cells.duckdb"):  # through GeoIndex.open, no checksums
        GeoIndex.open(d, verify=False)
    other = tmp_path / "other"
    other.mkdir()
    con = duckdb.connect(str(other / CELLS_DB))
    con.execute("CREATE TABLE cells AS SELECT 1 AS level")
    con.close()
    with pytest.raises(FormatError, match="has no table `levels`"):
        IndexCells.open(other)
    con = duckdb.connect(str(other / CELLS_DB))
    con.execute("CREATE TABLE levels AS SELECT 1 AS level")
    con.close()
    with IndexCells.open(other) as cells, pytest.raises(FormatError, match=f"{other / CELLS_DB}: cannot read"):
        cells.tree(1)  # no parent_index, mean_lat, ... columns
