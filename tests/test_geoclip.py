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
