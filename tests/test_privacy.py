"""The precision cap (issue 13, part 1): one rule (`privacy.apply_cap`) on every output path, the
Locator API, bulk locate rows, `geosurge search`, the service (a request may ask coarser, never
finer), and nothing finer than the cap leaves: cells, tokens, top-k, embeddings, unknown columns."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _service_fixtures import jpeg

from geosurge_index import s2
from geosurge_index.calibration import WITHIN_COLUMNS
from geosurge_index.cli import main as cli_main
from geosurge_index.errors import UserError
from geosurge_index.locate import Locator
from geosurge_index.privacy import Cap, apply_cap, cap_cells, capped_cells
from geosurge_index.search import CellTree

PHOTOS = [jpeg(40 + i) for i in range(6)]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    from geosurge_index.synthetic import random_index

    return random_index(tmp_path_factory.mktemp("cap") / "index", n_points=1500, place_names=True)


@pytest.fixture(scope="module")
def locator(index_dir):
    return Locator.open(index_dir, device="cpu", top_k=5)


def extent_of(tree, level: int, cell: int) -> float:
    return float(cap_cells(tree).extent[level - 1][cell])


@pytest.mark.parametrize("km", [25.0, 200.0, 750.0, 2500.0])
def test_locator_answer_is_the_deepest_cell_at_least_the_cap(locator, km):
    tree = locator.index.tree
    free = locator.locate(PHOTOS, return_embeddings=True)
    capped = locator.locate(PHOTOS, cap=Cap(km), return_embeddings=True)
    for f, c in zip(free, capped, strict=True):
        path = [x.cell_index for x in f.cells]
        k = c.cap.answered_level
        assert k >= 1  # level-1 cells of this index are S2 faces, ~9,000 km
        # deepest: the answered cell is at least the cap, the next one down is finer than it
        assert extent_of(tree, k, path[k - 1]) >= km
        assert k == len(path) or extent_of(tree, k + 1, path[k]) < km
        assert (c.lat, c.lon) == (tree.mean_lat[k - 1][path[k - 1]], tree.mean_lon[k - 1][path[k - 1]])
        assert [x.cell_index for x in c.cells] == path[:k]  # nothing below the answered level
        assert c.embedding is None and f.embedding is not None
        assert c.probability >= f.probability - 1e-9
        assert c.cap.s2_token == tree.tokens[k - 1][path[k - 1]].as_py()
        for a in c.alternatives:  # alternatives are capped cells too, never finest cells
            assert a.level is not None and a.level >= 1
            assert extent_of(tree, a.level, a.cell_index) >= km
        assert sum(a.probability for a in c.alternatives) == pytest.approx(
            sum(a.probability for a in f.alternatives), rel=1e-5)
        if c.cap.extent_km >= 100:
            assert c.town is None


def test_cap_by_level_and_the_coarser_of_two(locator):
    by_level = locator.locate(PHOTOS[:2], cap=Cap(level=3))
    assert all(p.cap.answered_level <= 3 and len(p.cells) == p.cap.answered_level for p in by_level)
    assert Cap(25).coarser(Cap(200)) == Cap(200) and Cap(200).coarser(Cap(25)) == Cap(200)
    assert Cap(25, 5).coarser(Cap(level=3)) == Cap(25, 3)
    with pytest.raises(UserError):
        Cap(-1)


def test_locator_cap_from_settings_cannot_be_made_finer(index_dir):
    from geosurge_index.settings import InferenceSettings

    with Locator.open(index_dir, settings=InferenceSettings(device="cpu", cap_km=750)) as loc:
        base = loc.locate(PHOTOS[:3])
        finer = loc.locate(PHOTOS[:3], cap=Cap(1.0))
        coarser = loc.locate(PHOTOS[:3], cap=Cap(2500.0))
    assert all(p.cap.km == 750 for p in base)
    assert [(p.lat, p.lon) for p in finer] == [(p.lat, p.lon) for p in base]
    assert all(c.cap.extent_km >= 2500 and c.cap.answered_level <= b.cap.answered_level
               for c, b in zip(coarser, base, strict=True))


def test_cap_above_level_1_answers_an_s2_ancestor(locator):
    """A tree whose level-1 cells are finer than the cap: the S2 ancestor that is wide enough."""
    t = locator.index.tree
    sub = CellTree.from_parents([None] + t.parents[3:], t.mean_lat[2:], t.mean_lon[2:], t.tokens[2:])
    paths = t.ancestors(np.arange(t.sizes[-1]))[:, 2:]
    ans = capped_cells(paths, sub, Cap(4000.0))
    assert (ans.level[cap_cells(sub).extent[0][paths[:, 0]] < 4000] == 0).all()
    zero = ans.level == 0
    assert zero.any()
    ids = cap_cells(sub).ids[0][paths[zero, 0]]
    assert s2.contains(ans.s2_id[zero], ids).all() and (ans.extent_km[zero] >= 4000).all()
    lat, lon = s2.cell_centers(ans.s2_id[zero])
    assert np.allclose(ans.lat[zero], lat) and np.allclose(ans.lon[zero], lon)


def test_rows_withhold_every_finer_column(locator):
    """Prediction rows: finer cells/tokens, top-k, embeddings and unknown (gallery) columns are
    nulled; radii floored at the answered cell's extent; the answer matches the Locator's."""
    pred = locator.predictor
    from geosurge_index.locate.decode import collate

    decoded = [locator.decode(p) for p in PHOTOS]
    batch = collate(np.arange(len(decoded)), decoded, locator.image_size)
    table, _, emb = pred.predict_full(batch, [f"p{i}" for i in range(len(PHOTOS))], [None] * len(PHOTOS))
    n = table.num_rows
    table = table.append_column("embedding_x", pa.array([[0.1, 0.2]] * n, pa.list_(pa.float32())))
    full_conf = table.column("level_confidence").to_pylist()
    for name, values in (("neighbour_id", pa.array([f"gallery-{i}" for i in range(n)])),
                         ("neighbour_similarity", pa.array(np.full(n, 0.9), pa.float32())),
                         ("r50_km", pa.array(np.full(n, 3.0)))):
        # the galleries' columns (pred_store.REFINEMENT_FIELDS), filled as a refined answer has them
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, values) if i >= 0 else table.append_column(name, values)
    table = table.append_column("refined_lat", pa.array(np.full(n, 48.1)))
    capped = apply_cap(table, locator.index.tree, Cap(200.0))
    direct = locator.locate(PHOTOS, cap=Cap(200.0))
    for i, (row, p) in enumerate(zip(capped.to_pylist(), direct, strict=True)):
        k = p.cap.answered_level
        assert (row["lat"], row["lon"]) == pytest.approx((p.lat, p.lon))
        assert row["probability"] == pytest.approx(p.probability, rel=1e-5)
        assert row["cap_level"] == k and row["cap_km"] == 200.0 and row["cap_token"] == p.cap.s2_token
        assert all(row[f"cell_l{lv}"] is None and row[f"token_l{lv}"] is None for lv in range(k + 1, 8))
        assert all(row[f"cell_l{lv}"] is not None for lv in range(1, k + 1))
        for name in ("topk_cells", "topk_probs", "topk_tokens", "embedding_x", "neighbour_id",
                     "neighbour_similarity", "refined_lat"):
            assert row[name] is None, name
        assert row["r50_km"] >= p.cap.extent_km >= 200
        # the confidence: of the answered cell (level 1's above level 1), radii at least its extent
        assert row["level_confidence"] == pytest.approx(full_conf[i][:max(k, 1)])
        assert row["confidence"] == pytest.approx(row["level_confidence"][-1]) == pytest.approx(p.confidence, rel=1e-4)
        assert row["r90_km"] >= p.cap.extent_km and p.r90_km >= p.cap.extent_km and p.r50_km >= p.cap.extent_km
        assert row["calibrated"] is False and p.calibrated is False
        # P(within t km) is of the uncapped point: withheld in both
        assert all(row[k] is None and getattr(p, k) is None for k in WITHIN_COLUMNS)
        assert row["id"] and row["width"]
    assert apply_cap(table, locator.index.tree, None) is table


def test_bulk_locate_and_search_cap_rows(index_dir, locator, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, data in enumerate(PHOTOS):
        (photos / f"p{i}.jpg").write_bytes(data)
    out = tmp_path / "preds"
    base = ["locate", str(index_dir), str(photos), "--device", "cpu", "--workers", "0"]
    assert cli_main([*base, "--out", str(out), "--cap-km", "200"]) == 0
    rows = {Path(r["path"]).name: r for r in pq.read_table(sorted(out.glob("part-*.parquet"))).to_pylist()}
    direct = locator.locate(sorted(photos.glob("*.jpg")), cap=Cap(200.0))
    for p in direct:
        r = rows[Path(p.id).name]
        assert (r["lat"], r["lon"]) == pytest.approx((p.lat, p.lon)) and r["cap_level"] == p.cap.answered_level
        assert r["topk_cells"] is None and r["cell_l7"] is None or p.cap.answered_level == 7
    capsys.readouterr()
    assert cli_main([*base, "--out", str(out), "--cap-km", "25"]) != 0  # a resume must keep the cap
    assert "settings.cap_km: was 200.0, now 25.0" in capsys.readouterr().err
    assert cli_main([*base, "--out", str(tmp_path / "e"), "--cap-km", "25", "--save-embeddings"]) != 0
    assert "embeddings" in capsys.readouterr().err
    # geosurge search over stored embeddings: the same rule
    emb = np.stack([np.asarray(p.embedding, np.float32) for p in locator.locate(PHOTOS, return_embeddings=True)])
    src = tmp_path / "emb.parquet"
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(len(PHOTOS))],
                             "embedding": pa.array(list(emb), pa.list_(pa.float32()))}), src)
    assert cli_main(["search", str(index_dir), "--embeddings", str(src), "--out", str(tmp_path / "s.parquet"),
                     "--device", "cpu", "--cap-km", "750"]) == 0
    s = pq.read_table(tmp_path / "s.parquet").to_pylist()
    assert all(r["cap_km"] == 750 and r["topk_cells"] is None for r in s)


def test_service_cap_from_settings_coarser_requests_only(index_dir, locator):
    from geosurge_index.service.app import create_app
    from geosurge_index.service.runner import ServerThread
    from geosurge_index.settings import ServiceSettings

    app = create_app(ServiceSettings(index_dir=index_dir, cap_km=200), locator)  # locator has no cap itself
    files = [("images", (f"p{i}.jpg", d, "image/jpeg")) for i, d in enumerate(PHOTOS[:3])]
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        info = c.get("/v1/index").json()
        plain = c.post("/v1/locate", files=files).json()["results"]
        finer = c.post("/v1/locate", files=files, params={"cap_km": 1}).json()["results"]
        coarser = c.post("/v1/locate", files=files, params={"cap_km": 2500}).json()["results"]
        by_level = c.post("/v1/locate", files=files, params={"cap_level": 2}).json()["results"]
        bad = c.post("/v1/locate", files=files, params={"cap_km": -3})
        import json

        immich = c.post("/predict", files=[("image", ("a.jpg", PHOTOS[0], "image/jpeg"))], data={
            "entries": json.dumps({"geolocation": {"visual": {"modelName": "g", "options": {"capKm": 750}}}})}).json()
    assert info["cap"]["km"] == 200 and info["cap"]["capped"]
    assert bad.status_code == 422
    for p, f, c, lv in zip(plain, finer, coarser, by_level, strict=True):
        assert p["cap"]["km"] == 200 and p["cap"]["extent_km"] >= 200
        assert (f["lat"], f["lon"], f["cap"]) == (p["lat"], p["lon"], p["cap"])  # never finer
        assert c["cap"]["km"] == 2500 and c["cap"]["extent_km"] >= 2500
        assert lv["cap"]["answered_level"] <= 2 and lv["cap"]["km"] == 200
        assert len(p["cells"]) == p["cap"]["answered_level"]
        assert all("level" in a for a in p["alternatives"])
    assert immich["geolocation"]["cap"]["km"] == 750
