"""Galleries: storage, the refinement rule against a numpy brute force, sources, crash safety."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _eval_fixtures import world  # noqa: F401 - the fixture

from geosurge_index.errors import FormatError, UserError
from geosurge_index.gallery.build import add_gallery, list_galleries, remove_gallery
from geosurge_index.gallery.refine import RefineSettings
from geosurge_index.gallery.store import Gallery, GalleryEntry, add_to_ivf, new_ivf, normalise_rows
from geosurge_index.index import GeoIndex
from geosurge_index.metrics import haversine_km
from geosurge_index.pred_store import pred_schema


@pytest.fixture
def index_copy(world, tmp_path):  # noqa: F811
    d = tmp_path / "index"
    shutil.copytree(world.index_dir, d)
    return d


def memory_gallery(name, emb, lat, lon, cells, n_lists, storage="flat"):
    index = new_ivf(n_lists, emb.shape[1], storage)
    add_to_ivf(index, normalise_rows(emb), cells, 0)
    meta = pa.table({"id": pa.array([f"{name}-{i}" for i in range(len(lat))]), "lat": lat, "lon": lon,
                     "cell": pa.array(cells, pa.int32()), "source": pa.array(["t"] * len(lat))})
    entry = GalleryEntry(name, f"gallery-{name}.g1.faiss", f"gallery-{name}.g1.parquet", 1, len(lat),
                         storage, emb.shape[1])
    return Gallery(entry, index, meta)


def references(index, rng, n=600):
    """References: noisy copies of finest-cell vectors, placed at random points."""
    finest = index.engine.vectors[-1].numpy()
    cells = rng.integers(0, finest.shape[0], n)
    emb = finest[cells] + 0.3 * rng.normal(size=(n, finest.shape[1])).astype(np.float32) / np.sqrt(finest.shape[1])
    lat = rng.uniform(-60, 60, n)
    lon = rng.uniform(-180, 180, n)
    return emb.astype(np.float32), lat, lon, cells.astype(np.int64)


def queries(index, rng, n=200):
    finest = index.engine.vectors[-1].numpy()
    c = rng.integers(0, finest.shape[0], n)
    q = finest[c] + 0.3 * rng.normal(size=(n, finest.shape[1])) / np.sqrt(finest.shape[1])
    return q.astype(np.float32)


def test_refinement_equals_numpy_brute_force(world):  # noqa: F811
    rng = np.random.default_rng(0)
    index = GeoIndex.open(world.index_dir, device="cpu")
    n_lists = index.tree.sizes[-1]
    galleries = [memory_gallery(f"g{g}", *references(index, rng), n_lists) for g in range(2)]
    for g in galleries:
        index.add_gallery(g)
    q = queries(index, rng)
    settings = RefineSettings(cells=3)
    index.use_galleries(None, settings)
    plain = index.engine.search(q, top_k=5)
    res = index.search(q, top_k=5)
    assert np.array_equal(res.topk_cells, plain.topk_cells)
    ref = res.refinement
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    n_found = 0
    for i in range(len(q)):
        chosen = set(plain.topk_cells[i, :3].tolist()) - {-1}
        best = (-np.inf, None, None)
        for g in galleries:
            emb = g.index.reconstruct_n(0, g.index.ntotal)  # flat storage: the stored vectors
            members = np.flatnonzero(np.isin(g.cell, list(chosen)))
            if members.size:
                sims = emb[members] @ qn[i]
                j = members[int(np.argmax(sims))]
                if sims.max() > best[0]:
                    best = (float(sims.max()), g, j)
        if best[1] is None:
            assert ref.point_source[i] == 0 and ref.neighbour_id[i] is None
            assert res.lat[i] == plain.lat[i] and res.lon[i] == plain.lon[i]
        else:
            n_found += 1
            assert ref.point_source[i] == 1
            assert ref.neighbour_id[i] == f"{best[1].name}-{best[2]}"
            assert ref.gallery[i] == best[1].name
            assert ref.similarity[i] == pytest.approx(best[0], abs=1e-5)
            assert (res.lat[i], res.lon[i]) == (best[1].lat[best[2]], best[1].lon[best[2]])
        assert (ref.cell_lat[i], ref.cell_lon[i]) == (plain.lat[i], plain.lon[i])
    assert 0 < n_found < len(q) or n_found == len(q)
    assert n_found > len(q) // 2


def test_reference_in_an_unchosen_cell_is_never_consulted(world):  # noqa: F811
    index = GeoIndex.open(world.index_dir, device="cpu")
    rng = np.random.default_rng(1)
    q = queries(index, rng, 20)
    plain = index.engine.search(q, top_k=5)
    n_lists = index.tree.sizes[-1]
    # each query's exact copy sits in a cell the search did not pick; a weaker one in its best cell
    elsewhere = np.array([next(c for c in range(n_lists) if c not in set(plain.topk_cells[i].tolist()))
                          for i in range(len(q))])
    emb = np.concatenate([q, q + 0.5 * rng.normal(size=q.shape).astype(np.float32)])
    cells = np.concatenate([elsewhere, plain.topk_cells[:, 0]]).astype(np.int64)
    lat = np.concatenate([np.full(len(q), 10.0), np.full(len(q), -10.0)])
    index.add_gallery(memory_gallery("g", emb, lat, np.zeros(2 * len(q)), cells, n_lists))
    index.use_galleries(None, RefineSettings(cells=5))
    res = index.search(q, top_k=5)
    assert np.all(res.lat == -10.0)
    # the neighbour is one of the weaker copies (several queries may share a best cell)
    assert all(int(i.split("-")[1]) >= len(q) for i in res.refinement.neighbour_id)
    assert np.all(res.refinement.similarity < 0.999)


def test_fallback_to_the_cell_mean_when_the_chosen_cells_are_empty(world):  # noqa: F811
    index = GeoIndex.open(world.index_dir, device="cpu")
    rng = np.random.default_rng(2)
    q = queries(index, rng, 30)
    plain = index.engine.search(q, top_k=5)
    n_lists = index.tree.sizes[-1]
    used = set(plain.topk_cells[:, :2].ravel().tolist())
    free = np.array([c for c in range(n_lists) if c not in used][:5])
    index.add_gallery(memory_gallery("g", q[:5], np.zeros(5), np.zeros(5), free, n_lists))
    index.use_galleries("g", RefineSettings(cells=2))
    res = index.search(q, top_k=5)
    assert np.all(res.refinement.point_source == 0)
    assert np.array_equal(res.lat, plain.lat) and np.array_equal(res.lon, plain.lon)
    table = index.to_arrow(res, [str(i) for i in range(len(q))])
    assert table.schema.equals(pred_schema())
    assert set(table["point_source"].to_pylist()) == {"cell_mean"}
    assert table["neighbour_id"].null_count == len(q)
    # refine_cells 0 and "none" switch refinement off
    index.use_galleries("none")
    assert index.search(q, top_k=5).refinement is None


def test_mean_rule_averages_agreeing_neighbours(world):  # noqa: F811
    index = GeoIndex.open(world.index_dir, device="cpu")
    rng = np.random.default_rng(3)
    q = queries(index, rng, 10)
    plain = index.engine.search(q, top_k=5)
    n_lists = index.tree.sizes[-1]
    noise = 0.05 * rng.normal(size=q.shape).astype(np.float32)
    emb = np.concatenate([q, q + noise, q + 4 * noise])  # best: the exact copy at 45.0
    cells = np.tile(plain.topk_cells[:, 0], 3).astype(np.int64)
    lat = np.concatenate([np.full(10, 45.0), np.full(10, 45.001), np.full(10, 5.0)])
    lon = np.zeros(30)
    index.add_gallery(memory_gallery("g", emb, lat, lon, cells, n_lists))
    index.use_galleries(None, RefineSettings(cells=1, rule="mean", neighbours=3, agree_km=1.0))
    res = index.search(q, top_k=5)
    assert np.all(res.refinement.point_source == 2)
    assert np.allclose(res.lat, 45.0005, atol=2e-5)


# --- on disk ------------------------------------------------------------------------------------


def pred_dir_with_embeddings(world, root: Path, n=120, dim=16, seed=0):  # noqa: F811
    """A PRED_DIR (one shard, embeddings) and a truth CSV for its ids: n points near the world's truth."""
    rng = np.random.default_rng(seed)
    idx = GeoIndex.open(world.index_dir, device="cpu")
    k = rng.integers(0, len(world.lat), n)
    lat = world.lat[k] + rng.normal(0, 0.001, n)
    lon = world.lon[k] + rng.normal(0, 0.001, n)
    from geosurge_index.cells import assign_points
    from geosurge_index.index import IndexCells

    with IndexCells.open(world.index_dir) as ic:
        cell = assign_points(ic.partition(), lat, lon)[:, -1]
    finest = idx.engine.vectors[-1].numpy()
    cell = np.where(cell >= 0, cell, rng.integers(0, finest.shape[0], n))
    emb = (finest[cell] + 0.3 * rng.normal(size=(n, dim)) / np.sqrt(dim)).astype(np.float32)
    ids = [f"ref-{i:04d}.jpg" for i in range(n)]
    res = idx.engine.search(emb, top_k=3)
    table = idx.to_arrow(res, ids, [f"/photos/{i}" for i in ids], None, emb)
    d = root / "refs-pred"
    d.mkdir(parents=True)
    pq.write_table(table, d / "part-00000.parquet")
    truth = root / "refs.csv"
    with open(truth, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "lat", "lon"])
        for i, a, b in zip(ids, lat, lon, strict=True):
            w.writerow([i, a, b])
    return d, truth, emb, lat, lon, ids


@pytest.mark.parametrize("storage", ["flat", "fp16", "pq"])
def test_gallery_survives_export_and_open_with_checksums(world, index_copy, tmp_path, storage):  # noqa: F811
    pred, truth, emb, lat, lon, ids = pred_dir_with_embeddings(world, tmp_path, n=600)
    report = add_gallery(index_copy, [pred], "refs", truth=truth, storage=storage, progress=False)
    assert report.n_added + sum(report.rejected.values()) == 600
    assert set(report.rejected) <= {"no_cell"}
    manifest = json.loads((index_copy / "manifest.json").read_text())
    entry = manifest["galleries"][0]
    assert entry["storage"] == storage and entry["n_refs"] == report.n_added
    assert entry["index_file"] in manifest["files"] and entry["meta_file"] in manifest["files"]
    index = GeoIndex.open(index_copy, device="cpu")
    assert index.selected_galleries == ("refs",)
    res = index.search(emb, top_k=3)
    assert res.refinement is not None
    if storage == "flat":  # a reference searched by its own embedding finds itself when its cell is chosen
        kept = {i for i, _ in enumerate(ids)}
        own = [i for i in range(len(ids)) if res.refinement.neighbour_id[i] == ids[i]]
        assert len(own) > 0.5 * len(kept)
        assert all(res.refinement.similarity[i] == pytest.approx(1.0, abs=1e-5) for i in own)
        d = haversine_km(res.lat[own], res.lon[own], lat[own], lon[own])
        assert np.all(d < 1e-6)
    # a flipped byte in the gallery's file is caught by the checksum
    gfile = index_copy / entry["index_file"]
    data = bytearray(gfile.read_bytes())
    data[len(data) // 2] ^= 0xFF
    gfile.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="sha256"):
        GeoIndex.open(index_copy, device="cpu")
    # a truncated file, even without checksums
    gfile.write_bytes(bytes(data[:-10]))
    with pytest.raises(FormatError, match="bytes"):
        GeoIndex.open(index_copy, device="cpu", verify=False)


def test_append_list_remove_and_rerun(world, index_copy, tmp_path):  # noqa: F811
    pred, truth, emb, *_ = pred_dir_with_embeddings(world, tmp_path, n=80)
    first = add_gallery(index_copy, [pred], "a", truth=truth, progress=False)
    again = add_gallery(index_copy, [pred], "a", truth=truth, progress=False)
    assert again.already_added and again.n_refs == first.n_refs
    pred2, truth2, *_ = pred_dir_with_embeddings(world, tmp_path / "more", n=50, seed=5)
    # the same ids again: duplicates are counted, not added
    present = set(pq.read_table(index_copy / list_galleries(index_copy)[0].meta_file)["id"].to_pylist())
    more = add_gallery(index_copy, [pred2], "a", truth=truth2, progress=False)
    assert 0 < more.rejected["duplicate_id"] <= len(present & {f"ref-{i:04d}.jpg" for i in range(50)})
    all_ids = pq.read_table(index_copy / list_galleries(index_copy)[0].meta_file)["id"].to_pylist()
    assert len(all_ids) == len(set(all_ids)) == more.n_refs
    assert more.n_refs == first.n_refs + more.n_added
    assert more.n_added + sum(more.rejected.values()) == 50
    entry = list_galleries(index_copy)[0]
    assert entry.generation == 2 and len(entry.additions) == 2
    add_gallery(index_copy, [pred], "b", truth=truth, storage="fp16", progress=False)
    assert [g.name for g in list_galleries(index_copy)] == ["a", "b"]
    from geosurge_index.index_check import check_index

    checks = check_index(index_copy)
    assert all(c.ok for c in checks) and sum(c.what.startswith("gallery ") for c in checks) == 2
    with pytest.raises(UserError, match="stores flat"):
        add_gallery(index_copy, [pred], "a", truth=truth, storage="pq", progress=False)
    index = GeoIndex.open(index_copy, device="cpu")
    index.use_galleries("b")
    assert index.selected_galleries == ("b",)
    with pytest.raises(UserError, match="not in"):
        index.use_galleries("zzz")
    remove_gallery(index_copy, "a")
    assert [g.name for g in list_galleries(index_copy)] == ["b"]
    assert not list(index_copy.glob("gallery-a.*"))
    GeoIndex.open(index_copy, device="cpu")


def test_bad_sources_are_counted_or_refused(world, index_copy, tmp_path):  # noqa: F811
    pred, truth, *_ = pred_dir_with_embeddings(world, tmp_path, n=40)
    with pytest.raises(UserError, match="--truth"):
        add_gallery(index_copy, [pred], "x", progress=False)
    with pytest.raises(UserError, match="does not exist"):
        add_gallery(index_copy, [tmp_path / "nope"], "x", truth=truth, progress=False)
    with pytest.raises(UserError, match="gallery name"):
        add_gallery(index_copy, [pred], "bad/name", truth=truth, progress=False)
    # truth: 5 rows missing, 3 out of range -> counted
    rows = list(csv.reader(open(truth)))
    with open(truth, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(rows[0])
        for k, r in enumerate(rows[1:]):
            if k < 5:
                continue
            if k < 8:
                r = [r[0], "123.0", r[2]]
            w.writerow(r)
    rep = add_gallery(index_copy, [pred], "x", truth=truth, progress=False, rejected_out=tmp_path / "rej.parquet")
    assert rep.rejected["no_coordinates"] == 8  # 5 absent + 3 invalid rows of the truth (not used)
    assert rep.n_added + sum(v for k, v in rep.rejected.items() if not k.startswith("truth")) == 40
    assert pq.read_table(tmp_path / "rej.parquet").num_rows == 40 - rep.n_added
    # embeddings of the wrong width: every row is a counted bad_embedding, hence nothing to add
    t = pq.read_table(pred / "part-00000.parquet")
    col = t.schema.get_field_index("embedding")
    short = pa.array([e[:8] for e in t["embedding"].to_pylist()], pa.list_(pa.float32()))
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    pq.write_table(t.set_column(col, "embedding", short), wrong / "part-00000.parquet")
    with pytest.raises(UserError, match="bad_embedding 40"):
        add_gallery(index_copy, [wrong], "y", truth=truth, progress=False)


@pytest.mark.parametrize("crash_at", ["faiss", "parquet", "manifest", "cleanup"])
def test_a_crash_during_add_leaves_the_index_usable_and_a_rerun_completes(world, index_copy, tmp_path,  # noqa: F811
                                                                          monkeypatch, crash_at):
    import geosurge_index.gallery.build as build
    import geosurge_index.index as index_mod

    pred, truth, emb, *_ = pred_dir_with_embeddings(world, tmp_path, n=60)
    before = (index_copy / "manifest.json").read_text()

    class Crash(BaseException):
        pass

    real_write, real_update, real_cleanup = build.write_atomic, index_mod.update_manifest, build._cleanup
    calls = []

    def write(path, fn):
        calls.append(path.suffix)
        if crash_at == "faiss" and path.suffix == ".faiss":
            fn(path.with_name(f".{path.name}.tmp"))  # half-written temporary, then death
            raise Crash
        real_write(path, fn)
        if crash_at == "parquet" and path.suffix == ".parquet":
            raise Crash

    def update(d, change):
        if crash_at == "manifest":
            raise Crash
        return real_update(d, change)

    def cleanup(*a):
        if crash_at == "cleanup":
            raise Crash
        real_cleanup(*a)

    monkeypatch.setattr(build, "write_atomic", write)
    monkeypatch.setattr(index_mod, "update_manifest", update)
    monkeypatch.setattr(build, "_cleanup", cleanup)
    with pytest.raises(Crash):
        add_gallery(index_copy, [pred], "g", truth=truth, progress=False)
    monkeypatch.undo()
    index = GeoIndex.open(index_copy, device="cpu")  # usable: the old manifest, or the complete new one
    if crash_at != "cleanup":
        assert (index_copy / "manifest.json").read_text() == before
        assert index.selected_galleries == ()
    rep = add_gallery(index_copy, [pred], "g", truth=truth, progress=False)
    assert rep.already_added == (crash_at == "cleanup")
    index = GeoIndex.open(index_copy, device="cpu")
    assert index.selected_galleries == ("g",)
    assert len(index.galleries()[0]) == rep.n_refs
    names = sorted(p.name for p in index_copy.iterdir() if p.name.startswith(("gallery-", ".gallery-")))
    entry = list_galleries(index_copy)[0]
    assert names == sorted(entry.files)


def test_eval_sql_recipe_and_map_read_the_refined_point(world, index_copy, tmp_path):  # noqa: F811
    """A gallery holding the truth points themselves: refined answers are exact wherever the search
    picked the true cell; eval, the SQL recipe and the map's points read lat/lon (the refined
    point), and `--point cell` / cell_lat the cell means."""
    from geosurge_index.cells import assign_points
    from geosurge_index.evaluation import evaluate_predictions, point_sources
    from geosurge_index.index import IndexCells
    from geosurge_index.maps import read_prediction_points
    from geosurge_index.pred_store import PredStore
    from geosurge_index.sql import connect

    base = GeoIndex.open(world.index_dir, device="cpu")
    with IndexCells.open(world.index_dir) as ic:
        cells = assign_points(ic.partition(), world.lat, world.lon)[:, -1]
    rng = np.random.default_rng(9)
    finest = base.engine.vectors[-1].numpy()
    inside = cells >= 0
    emb = finest[np.where(inside, cells, 0)] + 0.2 * rng.normal(size=(len(cells), finest.shape[1])).astype(
        np.float32) / 4
    index = GeoIndex.open(world.index_dir, device="cpu")
    index.add_gallery(memory_gallery("truth", emb[inside], world.lat[inside], world.lon[inside],
                                     cells[inside].astype(np.int64), index.tree.sizes[-1]))
    res = index.search(emb.astype(np.float32), top_k=5)
    store = PredStore(tmp_path / "pred")
    store.dir.mkdir(parents=True)
    store.write_chunk(0, index.to_arrow(res, list(world.ids)))
    from geosurge_index.benchmarks import read_truth

    truth = read_truth(world.truth_csv)
    refined = evaluate_predictions(store.dir, truth)
    cell = evaluate_predictions(store.dir, truth, point="cell")
    assert refined.accuracy_pct[1.0] > cell.accuracy_pct[1.0]
    sources = point_sources(store.dir)
    assert sources.get("neighbour", 0) > 0
    con = connect(world.index_dir, predictions=store.dir, truth=truth)
    try:
        rows = con.sql(Path(__file__).resolve().parents[1].joinpath("queries/refinement.sql").read_text()).fetchall()
    finally:
        con.close()
    by = {r[0]: r for r in rows}
    assert by["all"][1] == len(world.ids)
    assert by["all"][3] == pytest.approx(refined.accuracy_pct[1.0], abs=0.01)
    assert by["all"][4] == pytest.approx(cell.accuracy_pct[1.0], abs=0.01)
    pts = read_prediction_points(store.dir)
    assert pts["lat"].to_pylist() == pytest.approx(list(res.lat))
    assert "point_source" in pts.column_names


def test_cli_search_list_remove(world, index_copy, tmp_path, capsys):  # noqa: F811
    from geosurge_index.cli import main

    pred, truth, *_ = pred_dir_with_embeddings(world, tmp_path, n=100)
    assert main(["gallery", "add", str(index_copy), str(pred), "--truth", str(truth), "--name", "refs",
                 "--storage", "fp16", "--rejected", str(tmp_path / "rej.parquet")]) == 0
    assert "references added" in capsys.readouterr().err
    assert main(["gallery", "list", str(index_copy)]) == 0
    assert "refs" in capsys.readouterr().out
    out, none = tmp_path / "s.parquet", tmp_path / "none.parquet"
    assert main(["search", str(index_copy), "--embeddings", str(pred), "--out", str(out)]) == 0
    assert main(["search", str(index_copy), "--embeddings", str(pred), "--out", str(none), "--galleries", "none"]) == 0
    a, b = pq.read_table(out), pq.read_table(none)
    assert "neighbour" in set(a["point_source"].to_pylist()) and set(b["point_source"].to_pylist()) == {"cell_mean"}
    assert a["cell_lat"].to_pylist() == b["lat"].to_pylist()
    assert main(["search", str(index_copy), "--embeddings", str(pred), "--out", str(none), "--overwrite",
                 "--galleries", "nope"]) == 2
    assert "gallery nope is not in" in capsys.readouterr().err
    assert main(["gallery", "remove", str(index_copy), "refs"]) == 0
    assert main(["gallery", "remove", str(index_copy), "refs"]) == 2
