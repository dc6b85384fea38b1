"""The coarse-to-fine engine: exhaustive vs. a numpy reference, beam vs. exhaustive, normalisation,
prediction rows, and the `geosurge search` CLI round trip."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from geosurge_index import s2
from geosurge_index import search as search_mod
from geosurge_index.errors import UserError
from geosurge_index.index import GeoIndex, export_index
from geosurge_index.pred_store import pred_schema
from geosurge_index.search import (
    DEFAULT_BEAM,
    CellTree,
    SearchEngine,
    default_beam,
    parse_beam,
    result_to_arrow,
)
from geosurge_index.synthetic import synthetic_hierarchy, synthetic_queries


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def reference(h, queries: np.ndarray) -> np.ndarray:
    """Brute force in float64: log of the product of per-level softmax probabilities of every
    finest cell's path, renormalised over all finest cells -> (n, n_finest) log-probabilities."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    q = q.astype(np.float64)
    path = np.arange(h.sizes[-1])
    total = np.zeros((q.shape[0], h.sizes[-1]))
    for lv in range(len(h.sizes) - 1, -1, -1):
        logp = _log_softmax(q @ h.tables[lv].astype(np.float64).T / h.temperatures[lv])
        total += logp[:, path]
        path = h.parents[lv][path] if lv else path
    return _log_softmax(total)


@pytest.fixture(scope="module")
def small():
    h = synthetic_hierarchy(600, dim=32, seed=3, child_noise=0.8, temperature=0.07)
    q, truth = synthetic_queries(h, 64, query_noise=1.5, seed=4)
    return h, q, truth


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_exhaustive_matches_numpy_reference(small, backend):
    h, q, _ = small
    index = GeoIndex.from_arrays(h.tables, h.temperatures, h.tree(), backend=backend)
    res = index.search(q, top_k=7, exhaustive=True, batch_size=20)
    ref = reference(h, q)
    order = np.argsort(-ref, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(res.topk_cells, order)
    np.testing.assert_allclose(res.topk_probs, np.exp(np.take_along_axis(ref, order, 1)), rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(res.probability, res.topk_probs[:, 0], rtol=1e-6)
    # the best cell at every level is the path of the best finest cell
    np.testing.assert_array_equal(res.best_cells[:, -1], res.topk_cells[:, 0])
    for lv in range(len(h.sizes) - 1, 0, -1):
        np.testing.assert_array_equal(res.best_cells[:, lv - 1], h.parents[lv][res.best_cells[:, lv]])
    np.testing.assert_array_equal(res.lat, h.mean_lat[-1][res.topk_cells[:, 0]])
    np.testing.assert_array_equal(res.lon, h.mean_lon[-1][res.topk_cells[:, 0]])
    assert res.topk_cells.dtype == np.int32 and res.best_cells.dtype == np.int32
    assert res.topk_probs.dtype == np.float32 and res.best_cells.shape == (64, 7)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_wide_beam_equals_exhaustive(seed, backend):
    # random hierarchies, dead ends included (branching 0 has probability 0.1 here)
    h = synthetic_hierarchy(300 + 100 * seed, dim=16, seed=seed, child_noise=1.0,
                            branching=(0.1, 0.3, 0.3, 0.1, 0.2))
    tree = h.tree()
    assert not all(lv.all() for lv in tree.live[:-1]), "want dead-end cells in the test"
    q, _ = synthetic_queries(h, 50, query_noise=2.0, seed=seed + 10)
    index = GeoIndex.from_arrays(h.tables, h.temperatures, tree, backend=backend)
    ex = index.search(q, top_k=10, exhaustive=True)
    wide = max(h.sizes)
    for beam in (wide, [wide] * 6):
        bm = index.search(q, top_k=10, beam=beam, batch_size=17)
        np.testing.assert_array_equal(bm.topk_cells, ex.topk_cells)
        np.testing.assert_allclose(bm.topk_probs, ex.topk_probs, rtol=1e-4, atol=1e-7)
        np.testing.assert_array_equal(bm.best_cells, ex.best_cells)


def test_faiss_level1_scorer_scatters_all_cosines(small):
    import faiss

    from geosurge_index.index import _FaissLevel1

    h, q, _ = small
    index = faiss.IndexFlatIP(h.tables[0].shape[1])
    index.add(h.tables[0])
    scorer = _FaissLevel1(index, "cpu")  # the GPU path's scatter logic, on the CPU
    np.testing.assert_allclose(scorer(q), q @ h.tables[0].T, rtol=1e-5, atol=1e-6)


def test_probabilities_normalisation(small):
    h, q, _ = small
    index = GeoIndex.from_arrays(h.tables, h.temperatures, h.tree())
    n_finest = h.sizes[-1]
    ex = index.search(q, top_k=n_finest, exhaustive=True)
    # exhaustive: a distribution over every finest cell
    np.testing.assert_allclose(ex.topk_probs.sum(axis=1), 1.0, rtol=1e-4)
    assert (np.diff(ex.topk_probs, axis=1) <= 1e-7).all()
    for beam in (1, 3):
        bm = index.search(q, top_k=n_finest, beam=beam)
        explored = bm.topk_cells >= 0
        assert explored.sum(axis=1).max() < n_finest  # the beam did not see everything
        # beam: a distribution over the explored candidates only; padding is -1 / 0
        np.testing.assert_allclose(bm.topk_probs.sum(axis=1), 1.0, rtol=1e-4)
        assert (bm.topk_probs[~explored] == 0).all()
        # ... so it can only over-estimate the exhaustive probability of the same cell
        full = np.zeros((q.shape[0], n_finest))
        np.put_along_axis(full, ex.topk_cells.astype(np.int64), ex.topk_probs, axis=1)
        rows, cols = np.nonzero(explored)
        assert (bm.topk_probs[rows, cols] >= full[rows, bm.topk_cells[rows, cols]] * (1 - 1e-4)).all()


def test_beam_keeps_only_paths_reaching_finest_level():
    # level-1 cell 0 is a dead end but the closest to the query: B=1 must skip it
    dim = 8
    e = np.eye(dim, dtype=np.float32)
    tables = [e[[0, 1]], e[[1, 2]]]
    tree = CellTree.from_parents([None, np.array([1, 1])], [np.zeros(2)] * 2, [np.zeros(2)] * 2,
                                 [["a", "b"], ["c", "d"]])
    assert tree.live[0].tolist() == [False, True]
    index = GeoIndex.from_arrays(tables, [0.1, 0.1], tree)
    res = index.search(e[[0]] + 0.1 * e[[2]], top_k=3, beam=1)
    assert res.topk_cells.tolist() == [[1, 0, -1]]
    assert res.topk_probs[0, 2] == 0 and res.best_cells.tolist() == [[1, 1]]


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_single_level_tree_searches_with_any_beam(backend):
    # a 1-level partition (one tau_max value) expands no level: the default beam must not fail
    e = np.eye(4, dtype=np.float32)
    tree = CellTree.from_parents([None], [np.zeros(3)], [np.zeros(3)], [["a", "b", "c"]])
    index = GeoIndex.from_arrays([e[:3]], [0.1], tree, backend=backend)
    assert parse_beam(None, 1) == () and parse_beam(4, 1) == ()
    for beam in (4, None):
        res = index.search(e[[1]], top_k=2, beam=beam)
        assert res.topk_cells[0, 0] == 1 and res.best_cells.tolist() == [[1]]
    ex = index.search(e[[1]], top_k=2, exhaustive=True)
    np.testing.assert_allclose(ex.topk_probs, res.topk_probs, rtol=1e-6)


def test_bad_inputs(small):
    h, q, _ = small
    index = GeoIndex.from_arrays(h.tables, h.temperatures, h.tree())
    with pytest.raises(UserError, match="shape"):
        index.search(q[:, :5])
    bad = q.copy()
    bad[3, 0] = np.nan
    with pytest.raises(UserError, match="NaN"):
        index.search(bad)
    with pytest.raises(UserError, match="beam"):
        index.search(q, beam=[2, 2])
    assert parse_beam("4,4,8,8,16,16", 7) == (4, 4, 8, 8, 16, 16)
    assert parse_beam(3, 7) == (3,) * 6
    assert len(index.search(q[:0])) == 0


def test_synthetic_hierarchy_is_a_real_s2_tree(small):
    h = small[0]
    for lv in range(1, 7):
        parent_ids = h.s2_ids[lv - 1][h.parents[lv]]
        assert s2.contains(parent_ids, h.s2_ids[lv]).all()
        assert len(np.unique(h.s2_ids[lv])) == h.sizes[lv]


def test_result_to_arrow_rows(small):
    h, q, _ = small
    tree = h.tree()
    index = GeoIndex.from_arrays(h.tables, h.temperatures, tree)
    res = index.search(q[:3], top_k=4)
    errors = [None, "not_an_image: cannot decode", None, None]
    table = result_to_arrow(res, tree, ["a", "b", "c", "d"], ["pa", None, "pc", "pd"], errors,
                            embeddings=q[:3])
    assert table.schema.equals(pred_schema(save_embeddings=True))
    rows = table.to_pylist()
    assert rows[1]["error"] == errors[1] and rows[1]["lat"] is None and rows[1]["topk_cells"] is None
    assert rows[1]["token_l7"] is None and rows[1]["embedding"] is None
    tokens = [s2.ids_to_tokens(ids) for ids in h.s2_ids]
    for row, r in zip([rows[0], rows[2], rows[3]], range(3), strict=True):
        assert row["lat"] == res.lat[r] and row["error"] is None and row["id"] in "acd"
        assert row["topk_cells"] == res.topk_cells[r].tolist()
        assert [row[f"cell_l{lv}"] for lv in range(1, 8)] == res.best_cells[r].tolist()
        assert [row[f"token_l{lv}"] for lv in range(1, 8)] == [
            tokens[lv][res.best_cells[r, lv]] for lv in range(7)]
        np.testing.assert_allclose(row["embedding"], q[r], rtol=1e-6)
    with pytest.raises(ValueError):
        result_to_arrow(res, tree, ["a", "b"], None, None)
    assert result_to_arrow(None, tree, ["x"], None, ["zero_bytes: empty"]).num_rows == 1


def test_search_cli_round_trip(tmp_path, small):
    from geosurge_index.cli import main

    h, q, _ = small
    idx = export_index(h.tables, h.temperatures, h.cells_table(), tmp_path / "index", place_names=False)
    index = GeoIndex.open(idx)
    expected = index.search(q, top_k=3, beam=2)

    np.save(tmp_path / "emb.npy", q)
    assert main(["search", str(idx), "--embeddings", str(tmp_path / "emb.npy"), "--out",
                 str(tmp_path / "out.parquet"), "--top-k", "3", "--beam", "2", "--batch-size", "10"]) == 0
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.schema.equals(pred_schema())
    assert out["id"].to_pylist() == [str(i) for i in range(len(q))]
    assert out["topk_cells"].to_pylist() == expected.topk_cells.tolist()
    np.testing.assert_allclose(out["lat"].to_numpy(), expected.lat)
    np.testing.assert_allclose(out["probability"].to_numpy(), expected.probability, rtol=1e-5)
    # refuses to overwrite without --overwrite
    assert main(["search", str(idx), "--embeddings", str(tmp_path / "emb.npy"), "--out",
                 str(tmp_path / "out.parquet")]) == 2

    # Parquet input with ids, a missing, a short and a zero embedding: one row each, in order
    # (and one of tiny values whose float32 norm underflows to 0: an error row, not a failed run)
    emb = [q[0].tolist(), None, q[1][:5].tolist(), [0.0] * q.shape[1], q[2].tolist(), [1e-40] * q.shape[1]]
    pq.write_table(pa.table({"id": ["u", "v", "w", "x", "y", "z"],
                             "embedding": pa.array(emb, pa.list_(pa.float32()))}), tmp_path / "emb.parquet")
    assert main(["search", str(idx), "--embeddings", str(tmp_path / "emb.parquet"), "--out",
                 str(tmp_path / "out2.parquet"), "--top-k", "3", "--beam", "2", "--exhaustive"]) == 0
    rows = pq.read_table(tmp_path / "out2.parquet").to_pylist()
    assert [r["id"] for r in rows] == ["u", "v", "w", "x", "y", "z"]
    assert [r["error"].split(":")[0] if r["error"] else None for r in rows] == [
        None, "missing_embedding", "bad_embedding", "bad_embedding", None, "bad_embedding"]
    ex = index.search(q[[0, 2]], top_k=3, exhaustive=True)
    assert [rows[0]["topk_cells"], rows[4]["topk_cells"]] == ex.topk_cells.tolist()
    assert rows[1]["lat"] is None and rows[1]["cell_l1"] is None

    # a wrong-width .npy is refused as a whole, with the file named
    np.save(tmp_path / "bad.npy", q[:, :4])
    assert main(["search", str(idx), "--embeddings", str(tmp_path / "bad.npy"), "--out",
                 str(tmp_path / "out3.parquet")]) == 2
    assert not (tmp_path / "out3.parquet").exists()


def test_parse_beam_rule():
    # no beam given: DEFAULT_BEAM fitted to the tree (cut; the last value repeated when deeper)
    assert parse_beam(None, 7) == DEFAULT_BEAM == parse_beam(DEFAULT_BEAM, 7)
    assert parse_beam(None, 3) == DEFAULT_BEAM[:2] == parse_beam(DEFAULT_BEAM, 3) == default_beam(3)
    assert default_beam(9) == DEFAULT_BEAM + (DEFAULT_BEAM[-1],) * 2
    # one value: every expanded level
    assert parse_beam(8, 4) == parse_beam("8", 4) == parse_beam([8], 4) == (8, 8, 8)
    # a schedule: exactly one value per expanded level, whatever its values
    assert parse_beam("4, 4,8", 4) == (4, 4, 8)
    for bad in ("4,4,8,8,16,16", [4, 4], "1,2,3,4,5,6"):
        with pytest.raises(UserError, match=r"levels 1\.\.3 of this 4-level tree: 3 values"):
            parse_beam(bad, 4)
    with pytest.raises(UserError, match="level 1 of this 2-level tree"):
        parse_beam("4,4", 2)
    with pytest.raises(UserError, match=">= 1"):
        parse_beam("4,0,8", 4)
    with pytest.raises(UserError, match="integer"):
        parse_beam("4,x", 4)
    # the default's values written out for a shallower tree: still cut, for one release, loudly
    with pytest.warns(DeprecationWarning, match="omit the beam"):
        assert parse_beam("512,256,128,64,32,16", 3) == (512, 256)


def _brute_level_probabilities(h, q: np.ndarray, paths: np.ndarray) -> np.ndarray:
    """What `Locator` computed before: a full softmax over every cell of every level, in float64."""
    x = q.astype(np.float64) / np.linalg.norm(q, axis=1, keepdims=True)
    out = np.empty(paths.shape)
    for lv, table in enumerate(h.tables):
        logp = _log_softmax(x @ table.astype(np.float64).T / h.temperatures[lv])
        out[:, lv] = np.exp(np.take_along_axis(logp, paths[:, lv:lv + 1].astype(np.int64), 1)[:, 0])
    return out


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_level_probabilities_equal_the_full_softmax(seed, backend, monkeypatch):
    h = synthetic_hierarchy(300 + 200 * seed, dim=16, seed=seed, child_noise=1.0)
    q, _ = synthetic_queries(h, 40, query_noise=2.0, seed=seed + 5)
    index = GeoIndex.from_arrays(h.tables, h.temperatures, h.tree(), backend=backend)
    res = index.search(q, top_k=3)
    rng = np.random.default_rng(seed)
    other = h.tree().ancestors(rng.integers(0, h.sizes[-1], len(q)))  # any path, not only the best
    for paths in (res.best_cells, other):
        want = _brute_level_probabilities(h, q, paths)
        got = index.engine.level_probabilities(q, paths)
        assert got.dtype == np.float64 and got.shape == paths.shape
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-9)
    # chunked normalisers: no (queries x cells) score matrix above the budget, same answer
    budget = 1000
    shapes = []
    real = search_mod.level_logits

    def spy(qq, table, temperature):
        shapes.append((qq.shape[0], table.shape[0]))
        return real(qq, table, temperature)

    monkeypatch.setattr(search_mod, "CHUNK_ELEMENTS", budget)
    monkeypatch.setattr(search_mod, "level_logits", spy)
    chunked = index.engine.level_probabilities(q, res.best_cells, batch_size=16)
    assert shapes and max(a * b for a, b in shapes) <= max(budget, max(h.sizes))
    assert all(a * b <= budget for a, b in shapes if b <= budget)
    np.testing.assert_allclose(chunked, _brute_level_probabilities(h, q, res.best_cells), rtol=2e-5, atol=1e-9)


def test_level_probabilities_through_a_level1_scorer(small):
    import faiss

    from geosurge_index.index import _FaissLevel1

    h, q, _ = small
    flat = faiss.IndexFlatIP(h.tables[0].shape[1])
    flat.add(h.tables[0])
    engine = SearchEngine(h.tree(), h.tables, h.temperatures, level1_scorer=_FaissLevel1(flat, "cpu"))
    res = engine.search(q, top_k=2, exhaustive=True)
    np.testing.assert_allclose(engine.level_probabilities(q, res.best_cells),
                               _brute_level_probabilities(h, q, res.best_cells), rtol=2e-5, atol=1e-9)


def test_level_probabilities_bad_paths(small):
    h, q, _ = small
    engine = GeoIndex.from_arrays(h.tables, h.temperatures, h.tree()).engine
    with pytest.raises(UserError, match="shape"):
        engine.level_probabilities(q, np.zeros((len(q), 3), np.int32))
    bad = np.zeros((len(q), 7), np.int32)
    bad[0, 6] = h.sizes[-1]
    with pytest.raises(UserError, match="out of range"):
        engine.level_probabilities(q, bad)
    assert engine.level_probabilities(q[:0], np.zeros((0, 7), np.int32)).shape == (0, 7)
