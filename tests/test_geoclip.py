"""GeoCLIP imported as an index: fidelity against the `geoclip` package itself (a test dependency,
installed with --no-deps), the importer, the commands that read the index, and bad input.

CLIP ViT-L/14's weights cannot be downloaded here: the CLIP tower is a small config-built
CLIPModel (fixed seed) saved with save_pretrained, loaded by both sides from the same folder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
geoclip = pytest.importorskip("geoclip")

from geosurge_index.errors import UserError  # noqa: E402
from geosurge_index.importers import geoclip as imp  # noqa: E402

GALLERY_LIMIT = 1500


def _save_clip(folder, projection_dim: int = 768, seed: int = 0, image_size: int = 224):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        projection_dim=projection_dim,
        text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                         vocab_size=100, bos_token_id=0, eos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           patch_size=14, image_size=image_size))
    CLIPModel(cfg).eval().save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)  # CLIP's 224 px processor, as GeoCLIP loads it
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return _save_clip(tmp_path_factory.mktemp("clip") / "clip-small")


@pytest.fixture(scope="module")
def pkg():
    return imp.find_geoclip_package()


@pytest.fixture(scope="module")
def their_geoclip(clip_dir):
    """The package's own GeoCLIP with its shipped weights and the shared small CLIP."""
    from geoclip import GeoCLIP

    return GeoCLIP(from_pretrained=True, clip_path=str(clip_dir)).eval()


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, clip_dir):
    out = tmp_path_factory.mktemp("geoclip") / "index"
    imp.import_geoclip(imp.ImportSettings(out=out, clip=str(clip_dir), gallery_limit=GALLERY_LIMIT,
                                          place_names=False, progress=False))
    return out


def test_location_encoder_matches_geoclip(pkg):
    from geoclip import LocationEncoder

    rng = np.random.default_rng(0)
    lat = np.concatenate([rng.uniform(-90, 90, 800), [90, -90, 0, 0, 45.5]])
    lon = np.concatenate([rng.uniform(-180, 180, 800), [0, 180, -180, 180, -179.999]])
    pts = torch.tensor(np.stack([lat, lon], 1), dtype=torch.float32)
    theirs = LocationEncoder().eval()  # loads the package's shipped weights
    ours = imp.load_location_encoder(pkg)
    with torch.no_grad():
        a, b = theirs(pts), ours(pts)
    assert float((a - b).abs().max()) < 1e-5
    # the unit vectors the index stores
    emb = ours.embed(lat, lon, batch_size=300)
    assert np.abs(emb - torch.nn.functional.normalize(a, dim=1).numpy()).max() < 1e-5


def test_image_features_and_preprocessing_match_geoclip(pkg, clip_dir, their_geoclip):
    from PIL import Image

    from geosurge_index import geometry
    from geosurge_index.model.geoclip_encoder import GeoClipImageEncoder, load_clip_vision

    ours = GeoClipImageEncoder(load_clip_vision(str(clip_dir)), imp.load_image_head(pkg)).eval()
    rng = np.random.default_rng(1)
    for w, h in [(640, 480), (480, 640), (1000, 333), (300, 300), (801, 599), (225, 1001)]:
        img = Image.fromarray(rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)).resize(
            (w, h), Image.BICUBIC)
        theirs_px = their_geoclip.image_encoder.preprocess_image(img)
        ours_px = geometry.clip_normalise(geometry.centre_crop(w, h, 224).cut_pixels(img))
        assert float((theirs_px - ours_px).abs().max()) < 1e-6, (w, h)
        with torch.no_grad():
            theirs_f = their_geoclip.image_encoder(theirs_px)
            ours_f = ours.features(ours_px)
            unit = ours(ours_px, None)
        assert float((theirs_f - ours_f).abs().max()) < 1e-5
        assert torch.allclose(unit, torch.nn.functional.normalize(theirs_f, dim=1), atol=1e-6)


def test_scaled_thresholds():
    s = imp.scaled_partition_settings(100_000)
    assert s.tau_max == (530, 265, 136, 68, 34, 17, 11) and s.tau_min == 1
    assert imp.scaled_partition_settings(4_720_000).tau_max == (25000, 12500, 6400, 3200, 1600, 800, 500)


def test_cell_tables_modes(pkg):
    from geosurge_index.cells import assign_points, partition

    loc = imp.load_location_encoder(pkg)
    gallery = imp.geoclip_gallery(pkg, location_encoder=loc, limit=150)
    cells = partition(gallery.lat, gallery.lon, imp.scaled_partition_settings(150)).cells
    points = imp.cell_tables(cells, gallery, loc, "points")
    mean_point = imp.cell_tables(cells, gallery, loc, "mean-point")
    assigned = assign_points(cells, gallery.lat, gallery.lon)
    for li, lv in enumerate(cells.levels):
        for c in (0, len(lv.s2_id) // 2, len(lv.s2_id) - 1):
            inside = assigned[:, li] == c
            assert inside.any()
            np.testing.assert_allclose(points[li][c], gallery.embeddings[inside].mean(0) * inside.sum(),
                                       rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(mean_point[li], loc.embed(lv.mean_lat, lv.mean_lon), atol=1e-6)


def test_imported_index_answers_like_geoclip(index_dir, their_geoclip, tmp_path):
    """The index's encoder reproduces GeoCLIP's features end to end (decode -> crop -> encoder),
    its level softmax is GeoCLIP's (temperature 1/logit scale), and every command that reads an
    index works on it."""
    from geosurge_index.cli import main
    from geosurge_index.index import GeoIndex, read_manifest
    from geosurge_index.locate import Locator
    from geosurge_index.service.state import manifest_summary
    from geosurge_index.synthetic import write_synthetic_jpegs

    m = read_manifest(index_dir)
    assert m["dim"] == 512 and m["model"]["kind"] == "geoclip" and m["model"]["licence"] == "MIT"
    assert m["model"]["provenance"]["package"] == "geoclip 1.3.0"
    assert manifest_summary(index_dir)["manifest"]["model"]["kind"] == "geoclip"  # /v1/index
    enc = json.loads((index_dir / "encoder.json").read_text())
    assert enc["kind"] == "geoclip" and enc["embed_dim"] == 512 and enc["licence"] == "MIT"
    scale = float(their_geoclip.logit_scale.detach().exp())
    assert all(abs(e["temperature"] - 1 / scale) < 1e-9 for e in m["levels"])

    paths = sorted(write_synthetic_jpegs(tmp_path / "imgs", 3, 500, 375))
    loc = Locator.open(index_dir, device="cpu", draft_size=0)  # draft 0: full decode, as GeoCLIP
    preds = loc.locate([str(p) for p in paths], top_k=3, return_embeddings=True)
    assert all(p.error is None for p in preds)
    emb = np.asarray([p.embedding for p in preds], np.float32)
    from PIL import Image

    with torch.no_grad():
        theirs = torch.cat([their_geoclip.image_encoder(their_geoclip.image_encoder.preprocess_image(
            Image.open(p).convert("RGB"))) for p in paths])
    np.testing.assert_allclose(emb, torch.nn.functional.normalize(theirs, dim=1).numpy(), atol=1e-5)

    # each level's probabilities are GeoCLIP's softmax (logit scale x cosine) over the level's cells
    index = GeoIndex.open(index_dir, device="cpu", encoder=False)
    res = index.search(emb, top_k=1, exhaustive=True)
    probs = index.engine.level_probabilities(emb, res.best_cells)
    for lv in (0, index.levels - 1):
        table = index.engine.vectors[lv].numpy()
        p_theirs = torch.softmax(torch.tensor(scale * (emb @ table.T), dtype=torch.float64), dim=1).numpy()
        np.testing.assert_allclose(probs[:, lv], p_theirs[np.arange(3), res.best_cells[:, lv]], rtol=1e-3)

    # the commands that read an index, unchanged
    assert main(["verify", str(index_dir)]) == 0
    out = tmp_path / "preds"
    assert main(["locate", str(index_dir), str(tmp_path / "imgs"), "--out", str(out), "--workers", "0",
                 "--device", "cpu", "--save-embeddings"]) == 0
    assert main(["sql", str(index_dir), "--predictions", str(out), "SELECT count(*) AS n FROM predictions p "
                 "JOIN cells c ON c.level = 7 AND c.cell_index = p.cell_l7"]) == 0
    assert main(["search", str(index_dir), "--embeddings", str(out), "--out", str(tmp_path / "re.parquet"),
                 "--device", "cpu"]) == 0
    import pyarrow.parquet as pq

    again = pq.read_table(tmp_path / "re.parquet")
    first = pq.read_table(out).sort_by("id")
    assert again.num_rows == 3 and sorted(again["cell_l7"].to_pylist()) == sorted(first["cell_l7"].to_pylist())


def test_model_info_shows_provenance(index_dir, capsys):
    from geosurge_index.cli import main

    assert main(["model-info", str(index_dir)]) == 0
    out = capsys.readouterr().out
    assert "geoclip" in out and "512" in out and "MIT" in out and "geoclip 1.3.0" in out
    assert main(["model-info", str(index_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "geoclip" and info["embed_dim"] == 512


def test_wrong_geoclip_version_is_refused(monkeypatch, tmp_path, clip_dir):
    monkeypatch.setattr(imp, "package_version", lambda: "1.2.0")
    with pytest.raises(UserError, match=r"found geoclip 1\.2\.0.*supports geoclip 1\.3\.0"):
        imp.import_geoclip(imp.ImportSettings(out=tmp_path / "idx", clip=str(clip_dir)))
    assert not (tmp_path / "idx").exists()
    monkeypatch.setattr(imp, "package_version", lambda: None)
    with pytest.raises(UserError, match="not installed.*pip install --no-deps geoclip==1.3.0"):
        imp.find_geoclip_package()


def test_wrong_clip_architecture_refused_before_writing(tmp_path):
    bad = _save_clip(tmp_path / "clip-512", projection_dim=512)
    out = tmp_path / "idx"
    with pytest.raises(UserError, match="512-d features.*768"):
        imp.import_geoclip(imp.ImportSettings(out=out, clip=str(bad), gallery_limit=50, progress=False))
    assert not out.exists()
    with pytest.raises(UserError, match="336 px"):
        imp.import_geoclip(imp.ImportSettings(out=out, clip=str(_save_clip(tmp_path / "clip-336", image_size=336)),
                                              progress=False))
    assert not out.exists()


def test_missing_clip_says_what_to_run(tmp_path):
    missing = "geosurge-tests/no-such-clip"  # a hub id in no cache: local files only, no network
    with pytest.raises(UserError) as err:
        imp.import_geoclip(imp.ImportSettings(out=tmp_path / "idx", clip=missing, progress=False))
    msg = str(err.value)
    assert f"--clip {missing} --allow-download" in msg and f"huggingface-cli download {missing}" in msg
    assert not (tmp_path / "idx").exists()


def test_encoder_kinds_in_encoder_json(tmp_path):
    """GeoSURGE encoders stay v1 files (older readers open them; a v1 file without `kind` is one);
    another kind is v2, and an unknown kind is a clear FormatError."""
    from geosurge_index.errors import FormatError
    from geosurge_index.model import VisualEncoder, load_encoder, save_encoder, tiny_config
    from geosurge_index.model.encoder_io import read_encoder_config

    torch.manual_seed(0)
    save_encoder(VisualEncoder(tiny_config()).eval(), tmp_path)
    meta = json.loads((tmp_path / "encoder.json").read_text())
    assert meta["format_version"] == 1 and meta["kind"] == "geosurge"
    del meta["kind"]  # as written before encoder kinds existed
    (tmp_path / "encoder.json").write_text(json.dumps(meta))
    assert load_encoder(tmp_path).embed_dim == tiny_config().embed_dim
    (tmp_path / "encoder.json").write_text(json.dumps({**meta, "format_version": 2, "kind": "other"}))
    with pytest.raises(FormatError, match="'other' encoder"):
        load_encoder(tmp_path)
    with pytest.raises(FormatError, match="'other' encoder"):
        read_encoder_config(tmp_path)


# --- the GPS gallery inside the index (references of locations) -----------------------------------


def _their_rule(their_geoclip, queries: np.ndarray) -> np.ndarray:
    """GeoCLIP's own answer, computed by the package: the row of its GPS gallery (the first
    GALLERY_LIMIT points, as the index) whose location features are most similar (its forward's
    logits = logit scale x cosine, whose argmax is predict's top-1)."""
    with torch.no_grad():
        loc = torch.nn.functional.normalize(their_geoclip.location_encoder(
            their_geoclip.gps_gallery[:GALLERY_LIMIT]), dim=1)
        logits = their_geoclip.logit_scale.exp() * (torch.from_numpy(queries) @ loc.T)
    return logits.argmax(dim=1).numpy()


def _rows(result) -> np.ndarray:
    ids = result.refinement.neighbour_id
    return np.array([int(i.removeprefix("gps-")) if i is not None else -1 for i in ids])


def test_gps_gallery_is_a_gallery_of_the_index(index_dir, capsys):
    from geosurge_index.cli import main
    from geosurge_index.gallery.build import list_galleries
    from geosurge_index.index import read_manifest, verify_index

    (entry,) = list_galleries(index_dir)
    assert entry.name == imp.GALLERY_NAME and entry.references == "locations" and entry.n_refs == GALLERY_LIMIT
    assert entry.dim == 512 and entry.storage == "flat" and entry.additions[0]["sources"][0].startswith("geoclip 1.3.0")
    m = read_manifest(index_dir)
    assert all(len(m["files"][f]["sha256"]) == 64 for f in entry.files)  # checksummed like every file
    verify_index(index_dir, checksums=True)
    assert main(["gallery", "list", str(index_dir)]) == 0
    out = capsys.readouterr().out
    assert imp.GALLERY_NAME in out and "locations" in out and str(GALLERY_LIMIT) in out



def test_the_imported_index_searches_wide_by_default(index_dir):
    """GeoCLIP's answers need the wide setting: the importer records it as the index's default."""
    from geosurge_index.index import GeoIndex, read_manifest

    assert read_manifest(index_dir)["search_defaults"] == imp.SEARCH_DEFAULTS
    index = GeoIndex.open(index_dir, device="cpu", encoder=False)
    assert index.refine_settings.cells == imp.SEARCH_DEFAULTS["refine_cells"]
    q = np.random.default_rng(1).standard_normal((20, index.dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    by_default, explicit = index.search(q, top_k=3), index.search(q, top_k=3, beam=imp.SEARCH_DEFAULTS["beam"])
    np.testing.assert_array_equal(by_default.topk_cells, explicit.topk_cells)
    np.testing.assert_array_equal(by_default.lat, explicit.lat)


def test_widest_setting_answers_geoclips_point(index_dir, their_geoclip, pkg):
    """Every cell scored and refinement inside the best 50 finest cells: the point is GeoCLIP's
    own top-1 gallery point for >= 95% of queries (all finest cells: GeoCLIP's rule over the whole
    gallery, so every query). Queries: location embeddings of points off the gallery, computed by
    the package, mixed with noise to cosines 0.5 / 0.3 (real image embeddings need the real CLIP)."""
    from geosurge_index.gallery.refine import RefineSettings
    from geosurge_index.index import GeoIndex

    rng = np.random.default_rng(3)
    lat, lon = rng.uniform(-60, 70, 300), rng.uniform(-180, 180, 300)
    with torch.no_grad():
        u = torch.nn.functional.normalize(their_geoclip.location_encoder(
            torch.tensor(np.stack([lat, lon], 1), dtype=torch.float32)), dim=1).numpy()
    r = rng.standard_normal(u.shape).astype(np.float32)
    r -= np.sum(r * u, axis=1, keepdims=True) * u
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    cos = np.repeat([0.5, 0.3], 150)[:, None].astype(np.float32)
    q = cos * u + np.sqrt(1 - cos**2) * r
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    theirs = _their_rule(their_geoclip, q)

    index = GeoIndex.open(index_dir, device="cpu", encoder=False)
    assert index.selected_galleries == (imp.GALLERY_NAME,)  # used by default
    index.use_galleries(None, RefineSettings(cells=50))
    wide = index.search(q, top_k=1, exhaustive=True)
    assert np.mean(_rows(wide) == theirs) >= 0.95
    lat_t, lon_t = their_geoclip.gps_gallery[theirs].double().numpy().T
    same = (np.abs(wide.lat - lat_t) < 1e-4) & (np.abs(wide.lon - lon_t) < 1e-4)
    assert np.mean(same) >= 0.95
    index.use_galleries(None, RefineSettings(cells=index.tree.sizes[-1]))
    every = index.search(q, top_k=1, exhaustive=True)
    assert np.mean(_rows(every) == theirs) >= 0.99
    # the default setting: a point of the gallery (refined), GeoCLIP's for most queries
    index.use_galleries(None, RefineSettings())
    default = index.search(q, top_k=1)
    assert set(default.refinement.point_source.tolist()) == {1}  # "neighbour"
    assert np.mean(_rows(default) == theirs) >= 0.8


def test_images_answer_geoclips_predict(index_dir, their_geoclip, tmp_path):
    """End to end on JPEGs: `geosurge locate` (decode, crop, encoder, search, the GPS gallery)
    against the package's own predict on the same files, at the widest setting."""
    from geosurge_index.gallery.refine import RefineSettings
    from geosurge_index.index import GeoIndex
    from geosurge_index.locate import Locator
    from geosurge_index.metrics import haversine_km
    from geosurge_index.synthetic import write_synthetic_jpegs

    paths = sorted(write_synthetic_jpegs(tmp_path / "imgs", 8, 400, 300, seed=5))
    preds = Locator.open(index_dir, device="cpu", draft_size=0).locate([str(p) for p in paths],
                                                                       return_embeddings=True)
    emb = np.asarray([p.embedding for p in preds], np.float32)
    index = GeoIndex.open(index_dir, device="cpu", encoder=False)
    index.use_galleries(None, RefineSettings(cells=50))
    wide = index.search(emb, top_k=1, exhaustive=True)
    full = their_geoclip.gps_gallery
    their_geoclip.gps_gallery = full[:GALLERY_LIMIT]
    try:
        theirs = np.array([their_geoclip.predict(str(p), top_k=1)[0][0].double().numpy() for p in paths])
    finally:
        their_geoclip.gps_gallery = full
    d = haversine_km(wide.lat, wide.lon, theirs[:, 0], theirs[:, 1])
    assert np.mean(d < 0.01) >= 0.95, d
    assert np.array_equal(_rows(wide), _their_rule(their_geoclip, emb))
    assert all(p.error is None and p.point_source == "neighbour" for p in preds)


def test_add_references_checks_rows_and_reruns_are_noops(index_dir, tmp_path):
    """The array entry point shares the checks and the atomic write of `gallery add`."""
    import shutil

    from geosurge_index.gallery.build import add_gallery, add_references, list_galleries
    from geosurge_index.index import verify_index

    idx = tmp_path / "idx"
    shutil.copytree(index_dir, idx)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((6, 512)).astype(np.float32)
    emb[1] = np.nan
    emb[2] = 0
    gallery = list_galleries(idx)[0]
    import pyarrow.parquet as pq

    meta = pq.read_table(idx / gallery.meta_file)
    lat = np.r_[meta["lat"].to_numpy()[:3], 95.0, meta["lat"].to_numpy()[4:6]]
    lon = meta["lon"].to_numpy()[:6]
    ids = ["a", "b", "c", "d", "e", "a"]
    rep = add_references(idx, "extra", ids, lat, lon, emb, source="test arrays", progress=False)
    assert rep.n_added == 2 and rep.rejected == {"bad_embedding": 2, "bad_coordinates": 1, "duplicate_id": 1}
    again = add_references(idx, "extra", ids, lat, lon, emb, source="test arrays", progress=False)
    assert again.already_added and again.n_refs == 2
    verify_index(idx, checksums=True)
    assert [g.name for g in list_galleries(idx)] == [imp.GALLERY_NAME, "extra"]
    with pytest.raises(UserError, match="256-d embeddings.*takes 512-d"):
        add_references(idx, "x", ["z"], [0.0], [0.0], np.ones((1, 256), np.float32), source="s", progress=False)
    with pytest.raises(UserError, match="2 ids, 1 latitudes"):
        add_references(idx, "x", ["y", "z"], [0.0], [0.0, 1.0], np.ones((2, 512)), source="s", progress=False)
    with pytest.raises(UserError, match="holds locations; it cannot take images"):
        add_gallery(idx, [str(tmp_path)], imp.GALLERY_NAME, progress=False)


def test_import_without_gps_gallery(tmp_path, clip_dir):
    out = tmp_path / "idx"
    imp.import_geoclip(imp.ImportSettings(out=out, clip=str(clip_dir), gallery_limit=300, place_names=False,
                                          progress=False, gps_gallery=False))
    from geosurge_index.gallery.build import list_galleries

    assert list_galleries(out) == []
    with pytest.raises(UserError, match="--gallery-storage 'zip'"):
        imp.import_geoclip(imp.ImportSettings(out=tmp_path / "other", clip=str(clip_dir), gallery_storage="zip"))
    assert not (tmp_path / "other").exists()
