"""The GeoSURGE model: full-size shapes and counts on the meta device, the tiny model's behaviour,
and the encoder / checkpoint files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from geosurge_index.errors import FormatError, UserError
from geosurge_index.model import (
    GeoSurgeModel,
    VisualEncoder,
    encoder_image_size,
    full_config,
    hierarchical_info_nce,
    load_checkpoint,
    load_encoder,
    parameter_report,
    read_geo_tables,
    save_checkpoint,
    save_encoder,
    tiny_config,
)
from geosurge_index.model.fusion import patch_histograms

CELLS = [3, 5, 7, 9, 11, 13, 15]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # On a busy shared CPU, OpenMP threads spin-wait: one thread is many times faster.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def full_meta():
    with torch.device("meta"):
        return GeoSurgeModel(full_config(), [3298, 7202, 12893, 16000, 19000, 21000, 23000], weights=False)


def test_full_size_parameter_counts(full_meta):
    parts = {name: (total, trainable) for name, total, trainable in parameter_report(full_meta)}
    assert parts["backbone (CLIP vision)"] == (303_507_456, 0)  # ViT-L/14-336, frozen by default
    assert parts["segmenter"][1] == 0
    assert 210e6 < parts["segmenter"][0] < 225e6  # OneFormer Swin-L ADE20K (219 M measured)
    geo_total = sum([3298, 7202, 12893, 16000, 19000, 21000, 23000]) * 768 + 7
    assert parts["geographic embeddings + temperatures"] == (geo_total, geo_total)
    if full_meta.config.fusion.readout == "cls+clip":  # LN(fused CLS) + LN(CLIP CLS) + Linear(128 + 1024 -> 768)
        head = 2 * 128 + 2 * 1024 + (128 + 1024) * 768 + 768
    else:  # "cls": LN(fused CLS) + Linear(128 -> 768)
        head = 2 * 128 + 128 * 768 + 768
    assert parts["head (LayerNorm + Linear)"] == (head,) * 2


def test_full_size_shapes_on_meta(full_meta):
    enc = full_meta.encoder
    assert enc.image_size == 336 and enc.grid == 24 and enc.embed_dim == 768
    x = torch.empty(2, 3, 336, 336, device="meta")
    cm = torch.empty(2, 336, 336, dtype=torch.long, device="meta")
    tokens = enc.backbone(x)
    assert tokens.shape == (2, 577, 1024)  # CLS + 24x24 patches
    assert enc.fusion.tokens(cm).shape == (2, 577, 128)
    assert enc(x, cm).shape == (2, 768)


def test_unfreezing_last_layers_is_a_setting():
    cfg = full_config()
    cfg.backbone.unfreeze_last_n = 2
    with torch.device("meta"):
        enc = VisualEncoder(cfg, weights=False)
    per_layer = sum(p.numel() for p in enc.backbone.clip.encoder.layers[0].parameters())
    trainable = sum(p.numel() for p in enc.backbone.parameters() if p.requires_grad)
    assert trainable == 2 * per_layer
    with pytest.raises(UserError):
        cfg.backbone.unfreeze_last_n = 25
        with torch.device("meta"):
            VisualEncoder(cfg, weights=False)


def test_patch_histograms_match_a_direct_count():
    g = torch.Generator().manual_seed(0)
    cm = torch.randint(0, 150, (2, 16, 16), generator=g)
    cm[0, :4, :4] = 255  # an unlabelled patch
    cm[1, 0, 0] = 255
    h = patch_histograms(cm, 4, 150)
    assert h.shape == (2, 16, 150)
    for b in range(2):
        for p in range(16):
            r, c = divmod(p, 4)
            vals = cm[b, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4].flatten()
            vals = vals[vals < 150]
            want = torch.bincount(vals, minlength=150).float()
            want = want / max(len(vals), 1)
            assert torch.allclose(h[b, p], want)
    assert h[0, 0].sum() == 0


@pytest.mark.parametrize("segmenter", ["segformer", "oneformer"])
def test_tiny_encoder_runs_its_segmenter_without_a_class_map(segmenter):
    torch.manual_seed(0)
    enc = VisualEncoder(tiny_config(segmenter)).eval()
    x = torch.randn(2, 3, 64, 64)
    cm = enc.segment(x)
    assert cm.shape == (2, 64, 64) and cm.dtype == torch.int64
    assert int(cm.min()) >= 0 and int(cm.max()) < 150
    with torch.no_grad():
        a, b = enc(x), enc(x, cm)
    assert a.shape == (2, 768)
    assert torch.allclose(a.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(a, b, atol=1e-5)  # None means: run the configured segmenter


def test_fusion_switch_and_class_map_matters():
    torch.manual_seed(0)
    on = VisualEncoder(tiny_config()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        e1 = on(x, torch.zeros(2, 64, 64, dtype=torch.long))
        e2 = on(x, torch.full((2, 64, 64), 7, dtype=torch.long))
    assert not torch.allclose(e1, e2)  # the semantic path reaches the embedding
    cfg = tiny_config("none")
    cfg.fusion.enabled = False
    off = VisualEncoder(cfg).eval()
    assert off.fusion is None and off.segmenter is None
    with torch.no_grad():
        e = off(x)
    assert e.shape == (2, 768)
    with pytest.raises(ValueError):
        off(torch.randn(2, 3, 32, 32))


def test_loss_masks_samples_without_a_cell():
    torch.manual_seed(0)
    model = GeoSurgeModel(tiny_config(), CELLS)
    emb = torch.nn.functional.normalize(torch.randn(4, 768), dim=-1)
    targets = torch.tensor([[0, 1, 2, 3, 4, 5, -1]] * 4)
    targets[1, 3] = -1
    loss, per_level, correct = hierarchical_info_nce(emb, model.geo, targets)
    assert per_level[6] == 0 and correct[6] == 0
    # with temperature 0.07 and near-orthogonal random cells, each level's loss is close to log(n)
    for lvl in range(6):
        assert abs(float(per_level[lvl]) - math.log(CELLS[lvl])) < 1.0
    loss.backward()
    assert model.geo.tables[6].grad is None or float(model.geo.tables[6].grad.abs().sum()) == 0.0
    assert float(model.geo.tables[0].grad.abs().sum()) > 0
    assert torch.allclose(model.geo.temperatures, torch.full((7,), 0.07))


def test_encoder_files_round_trip(tmp_path):
    torch.manual_seed(1)
    enc = VisualEncoder(tiny_config()).eval()
    save_encoder(enc, tmp_path)
    meta = json.loads((tmp_path / "encoder.json").read_text())
    assert meta["format"] == "geosurge-encoder" and meta["image_size"] == 64
    assert encoder_image_size(tmp_path) == 64
    back = load_encoder(tmp_path, "cpu")
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(enc(x), back(x), atol=1e-6)  # config-built segmenter travelled too


def test_pretrained_backbone_is_referenced_not_copied(tmp_path):
    from safetensors import safe_open
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = tiny_config("none")
    torch.manual_seed(2)
    arch = {k: v for k, v in cfg.backbone.arch.items() if k != "model_type"}
    CLIPVisionModel(CLIPVisionConfig(**arch)).save_pretrained(tmp_path / "clip")
    cfg.backbone.pretrained, cfg.backbone.arch, cfg.backbone.unfreeze_last_n = str(tmp_path / "clip"), None, 1
    enc = VisualEncoder(cfg).eval()
    with torch.no_grad():  # pretend training changed the unfrozen last layer
        enc.backbone.clip.encoder.layers[1].mlp.fc2.bias.add_(0.5)
    save_encoder(enc, tmp_path / "enc")
    with safe_open(str(tmp_path / "enc" / "encoder.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any(k.startswith(("backbone.clip.encoder.layers.0.", "backbone.clip.embeddings.")) for k in keys)
    assert "backbone.clip.encoder.layers.1.mlp.fc2.bias" in keys
    back = load_encoder(tmp_path / "enc")
    x = torch.randn(2, 3, 64, 64)
    cm = torch.randint(0, 150, (2, 64, 64))
    with torch.no_grad():
        assert torch.allclose(enc(x, cm), back(x, cm), atol=1e-6)


def test_missing_pretrained_weights_give_a_clear_error(tmp_path):
    cfg = tiny_config("none")
    cfg.backbone.pretrained = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="could not be loaded"):
        VisualEncoder(cfg)


def _cells_dir(tmp_path):
    d = tmp_path / "cells"
    d.mkdir()
    (d / "cells.parquet").write_bytes(b"placeholder")
    (d / "partition.json").write_text("{}")
    return d


def test_checkpoint_round_trip_and_geo_tables(tmp_path):
    torch.manual_seed(3)
    model = GeoSurgeModel(tiny_config(), CELLS).eval()
    with torch.no_grad():
        model.geo.log_temperature.copy_(torch.log(torch.linspace(0.05, 0.11, 7)))
    ck = save_checkpoint(tmp_path / "epoch-0001", model, epoch=1, cells_dir=_cells_dir(tmp_path))
    assert {p.name for p in ck.iterdir()} >= {"config.json", "model.safetensors", "cells.parquet", "partition.json"}
    back = load_checkpoint(ck)
    assert back.epoch == 1 and back.cells_per_level == CELLS
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(back.model.encoder(x), model.encoder(x), atol=1e-6)
    tables, temps = read_geo_tables(ck)
    assert [t.shape for t in tables] == [(n, 768) for n in CELLS]
    np.testing.assert_allclose(np.linalg.norm(tables[2], axis=1), 1.0, rtol=1e-5)
    want = torch.nn.functional.normalize(model.geo.tables[2].detach(), dim=-1).numpy()
    np.testing.assert_allclose(tables[2], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(temps, np.linspace(0.05, 0.11, 7), rtol=1e-5)


def test_corrupted_checkpoints_raise_format_error(tmp_path):
    model = GeoSurgeModel(tiny_config(), CELLS)
    ck = save_checkpoint(tmp_path / "ck", model, epoch=1, cells_dir=_cells_dir(tmp_path))
    weights = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    with pytest.raises(FormatError, match="corrupted"):
        load_checkpoint(ck)
    with pytest.raises(FormatError, match="corrupted"):
        read_geo_tables(ck)
    (ck / "model.safetensors").write_bytes(weights)
    meta = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(FormatError, match="format_version 99"):
        load_checkpoint(ck)
    (ck / "config.json").write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        load_checkpoint(ck)
    (ck / "config.json").unlink()
    with pytest.raises(FormatError, match="missing"):
        read_geo_tables(ck)


def test_model_info_cli_counts_the_full_model(capsys):
    from geosurge_index.cli import main

    assert main(["model-info", "--json", "--cells-per-level", "10,20,30,40,50,60,70"]) == 0
    info = json.loads(capsys.readouterr().out)
    parts = {p["part"]: p for p in info["parts"]}
    assert parts["backbone (CLIP vision)"]["total"] == 303_507_456
    assert info["image_size"] == 336


def test_ten_crop_class_maps_align_with_image_crops_and_average():
    from PIL import Image

    from geosurge_index.geometry import clip_normalise
    from geosurge_index.images import Preprocess
    from geosurge_index.model import embed_ten_crop, ten_crop_class_maps

    cols = (np.arange(100)[None, :].repeat(80, 0) * 2).astype(np.uint8)  # value encodes the column
    rgb = Image.fromarray(np.stack([cols] * 3, -1))
    maps = ten_crop_class_maps(Image.fromarray(cols, "L"), 64)
    pixels = Preprocess(64).ten_crop_pixels(rgb)
    assert maps.shape == (10, 64, 64) and pixels.shape == (10, 64, 64, 3)
    assert np.abs(pixels[..., 0].astype(int) - maps).mean() < 2  # same geometry, mirrors included
    crops = clip_normalise(pixels).numpy()
    torch.manual_seed(0)
    enc = VisualEncoder(tiny_config()).eval()
    x = torch.as_tensor(crops)[None].repeat(2, 1, 1, 1, 1)
    cm = torch.as_tensor(maps % 150)[None].repeat(2, 1, 1, 1)
    with torch.no_grad():
        e = embed_ten_crop(enc, x, cm)
        single = enc(x[0], cm[0])
    assert e.shape == (2, 768)
    want = torch.nn.functional.normalize(single.mean(0), dim=0)
    assert torch.allclose(e[0], want, atol=1e-5) and torch.allclose(e[0], e[1], atol=1e-6)


def test_pretrained_segmenter_is_loaded_from_its_directory(tmp_path):
    from safetensors import safe_open
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    cfg = tiny_config("segformer")
    torch.manual_seed(4)
    arch = {k: v for k, v in cfg.segmenter.arch.items() if k != "model_type"}
    SegformerForSemanticSegmentation(SegformerConfig(**arch)).save_pretrained(tmp_path / "seg")
    cfg.segmenter.pretrained, cfg.segmenter.arch = str(tmp_path / "seg"), None
    enc = VisualEncoder(cfg).eval()
    save_encoder(enc, tmp_path / "enc")
    with safe_open(str(tmp_path / "enc" / "encoder.safetensors"), "pt") as f:
        assert not any(k.startswith("segmenter.") for k in f.keys())
    back = load_encoder(tmp_path / "enc")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(enc.segment(x), back.segment(x))
        assert torch.allclose(enc(x), back(x), atol=1e-6)


def test_class_maps_are_written_once_beside_the_images(tmp_path):
    from PIL import Image

    from geosurge_index.images import class_map_path, load_class_map
    from geosurge_index.model.classmaps import write_class_maps

    torch.manual_seed(0)
    enc = VisualEncoder(tiny_config("segformer")).eval()
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(120, 90), (70, 100)]):
        p = tmp_path / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    (tmp_path / "bad.jpg").write_bytes(b"")
    counts = write_class_maps(paths + [tmp_path / "bad.jpg"], enc.segmenter, progress=False)
    assert counts == {"written": 2, "zero_bytes": 1}
    m = Image.open(class_map_path(paths[0]))
    assert m.mode == "L" and m.size == (336, 336)  # the centre crop at the default encoder side
    counts = write_class_maps(paths, enc.segmenter, progress=False, overwrite=True, image_size=64)
    assert counts == {"written": 2}
    m = Image.open(class_map_path(paths[0]))
    assert m.mode == "L" and m.size == (64, 64)  # the centre crop the tiny encoder sees
    cm = load_class_map(class_map_path(paths[0]), 64)
    assert cm.shape == (64, 64) and cm.max() < 150
    assert write_class_maps(paths, enc.segmenter, progress=False) == {"existing": 2}


def test_in_batch_info_nce_equals_a_hand_computed_value():
    """In-batch negatives: at each level a softmax over the distinct cells of the batch's valid
    samples; samples sharing a cell share its column; -1 targets are masked out."""
    import math

    from geosurge_index.model.geo import GeoEmbeddings
    from geosurge_index.model.loss import hierarchical_info_nce

    geo = GeoEmbeddings([4], dim=2, init_temperature=0.5)
    with torch.no_grad():  # unit cell vectors at 0, 90, 180, 270 degrees
        geo.tables[0].copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    targets = torch.tensor([[0], [1], [1], [-1]])  # cells 0 and 1 present; the last sample has none
    with torch.no_grad():
        loss, per_level, correct = hierarchical_info_nce(emb, geo, targets, negatives="in_batch")
    # candidates: cells 0 and 1 only; logits = cos / 0.5
    def nll(cos_pos, cos_neg):
        return -math.log(math.exp(cos_pos / 0.5) / (math.exp(cos_pos / 0.5) + math.exp(cos_neg / 0.5)))
    expected = (nll(1.0, 0.0) + nll(0.8, 0.6) + nll(1.0, 0.0)) / 3
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(per_level[0]) == pytest.approx(expected, rel=1e-6)
    assert int(correct[0]) == 3
    # all-cells negatives differ: cells 2 and 3 join every denominator
    with torch.no_grad():
        all_loss, _, _ = hierarchical_info_nce(emb, geo, targets)
    den = lambda cos: sum(math.exp(c / 0.5) for c in cos)  # noqa: E731
    expected_all = (-math.log(math.exp(2) / den([1, 0, -1, 0])) - math.log(math.exp(1.6) / den([0.6, 0.8, -0.6, -0.8]))
                    - math.log(math.exp(2) / den([0, 1, 0, -1]))) / 3
    assert float(all_loss) == pytest.approx(expected_all, rel=1e-6)
    with pytest.raises(ValueError, match="negatives"):
        hierarchical_info_nce(emb, geo, targets, negatives="nope")


def test_fusion_readouts_and_old_configs_keep_their_readout(tmp_path):
    """`fusion.readout`: 'cls' (the fused CLS alone), 'cls+clip' (with CLIP's CLS beside it), 'joint'
    (CLIP's CLS attending to semantic + CLIP tokens) or 'gated' (CLIP's CLS + gate * fused CLS); each
    builds, embeds, gives `forward_histograms` (the ONNX graph) the same answer and saves / loads;
    an encoder.json written before the option existed loads with the read-out it was trained with."""
    from geosurge_index.model.config import DEFAULT_READOUT, LEGACY_READOUT, READOUTS, ModelConfig

    assert LEGACY_READOUT == "cls" and set(READOUTS) == {"cls", "cls+clip", "joint", "gated"}
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    cm = torch.randint(0, 150, (2, 64, 64))
    for readout in READOUTS:
        cfg = tiny_config()
        cfg.fusion.readout = readout
        enc = VisualEncoder(cfg).eval()
        assert (enc.clip_norm is not None) == (readout == "cls+clip")
        assert (enc.readout is not None) == (readout in ("joint", "gated"))
        assert enc.head.in_features == {"cls": 32, "cls+clip": 32 + 64, "joint": 64, "gated": 64}[readout]
        with torch.no_grad():
            out = enc(x, cm)
            via_hist = enc.forward_histograms(x, patch_histograms(cm, enc.grid, 150))
        assert out.shape == (2, 768) and torch.allclose(out.norm(dim=-1), torch.ones(2), atol=1e-5)
        assert torch.allclose(out, via_hist, atol=1e-6)
        save_encoder(enc, tmp_path / readout)
        back = load_encoder(tmp_path / readout)
        assert back.config.fusion.readout == readout
        with torch.no_grad():
            assert torch.allclose(back(x, cm), out, atol=1e-6)
    # an old encoder.json: no `readout` key -> "cls", no `token_norm` key -> off, and its weights load
    cfg = tiny_config()
    cfg.fusion.readout = "cls"
    cfg.fusion.token_norm = False
    enc = VisualEncoder(cfg).eval()
    save_encoder(enc, tmp_path)
    meta = json.loads((tmp_path / "encoder.json").read_text())
    del meta["model"]["fusion"]["readout"]
    (tmp_path / "encoder.json").write_text(json.dumps(meta))
    back = load_encoder(tmp_path)
    assert "token_norm" not in meta["model"]["fusion"]
    assert back.config.fusion.readout == "cls" and back.clip_norm is None and not back.config.fusion.token_norm
    with torch.no_grad():
        assert torch.allclose(enc(x, cm), back(x, cm), atol=1e-6)
    assert ModelConfig().fusion.readout == DEFAULT_READOUT  # new configs: the measured default
    bad = tiny_config().to_dict()
    bad["fusion"]["readout"] = "mean"
    with pytest.raises(UserError, match="readout"):
        ModelConfig.from_dict(bad).validate()


def test_gated_readout_starts_as_no_fusion_and_learns_to_use_the_class_map():
    """'gated' with its gate at 0 is the no-fusion model exactly (same backbone and head weights);
    one optimizer step opens the gate, after which the class map changes the embedding."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    cm = torch.randint(0, 150, (4, 64, 64))
    cfg = tiny_config()
    cfg.fusion.readout = "gated"
    gated = VisualEncoder(cfg)
    off_cfg = tiny_config()
    off_cfg.fusion.enabled = False
    off = VisualEncoder(off_cfg)
    missing, unexpected = off.load_state_dict(gated.state_dict(), strict=False)
    assert not missing and all(k.startswith(("fusion.", "readout.", "segmenter.")) for k in unexpected)
    gated.eval()
    off.eval()
    with torch.no_grad():
        assert torch.equal(gated(x, cm), off(x))
        assert torch.equal(gated(x, cm), gated(x, torch.zeros_like(cm)))  # gate 0: the map is unused
    gated.train()
    opt = torch.optim.SGD(gated.parameters(), lr=0.5)
    target = torch.nn.functional.normalize(torch.randn(4, 768), dim=-1)
    (-(gated(x, cm) * target).sum()).backward()
    assert gated.readout.gate.grad.abs().sum() > 0  # the gradient reaches the closed gate
    opt.step()
    gated.eval()
    with torch.no_grad():
        assert not torch.allclose(gated(x, cm), gated(x, torch.zeros_like(cm)), atol=1e-6)


def test_joint_readout_uses_the_class_map():
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.fusion.readout = "joint"
    enc = VisualEncoder(cfg).eval()
    x = torch.randn(2, 3, 64, 64)
    cm = torch.randint(0, 150, (2, 64, 64))
    with torch.no_grad():
        assert not torch.allclose(enc(x, cm), enc(x, torch.zeros_like(cm)), atol=1e-4)


def test_classifier_head_trains_on_one_level_and_cannot_be_exported(tmp_path):
    from geosurge_index.model.geo import ClassifierHead

    cfg = tiny_config()
    cfg.head = "classifier"
    with pytest.raises(ValueError, match="one level"):
        GeoSurgeModel(cfg, [3, 5])
    model = GeoSurgeModel(cfg, [5])
    assert isinstance(model.geo, ClassifierHead)
    x = torch.randn(2, 3, 64, 64)
    loss, per_level, correct, emb = model(x, torch.zeros(2, 64, 64, dtype=torch.long), torch.tensor([[1], [4]]))
    loss.backward()
    assert float(model.geo.classifier.weight.grad.abs().sum()) > 0
    assert per_level.shape == (1,) and emb.shape == (2, 768)


def test_token_norm_is_saved_only_when_on_and_makes_the_map_count(tmp_path):
    """`fusion.token_norm`: a LayerNorm on the semantic tokens, on for new configs; encoder.json
    carries the key only when it is on (older readers keep reading files of models without it;
    files without it load as off, as they were trained), and at initialisation the class map moves
    the fused CLS more with it than without."""
    from geosurge_index.model.config import DEFAULT_TOKEN_NORM, LEGACY_TOKEN_NORM, ModelConfig

    assert DEFAULT_TOKEN_NORM is True and LEGACY_TOKEN_NORM is False
    assert ModelConfig().fusion.token_norm is True and tiny_config().to_dict()["fusion"]["token_norm"] is True
    off = tiny_config()
    off.fusion.token_norm = False
    assert "token_norm" not in off.to_dict()["fusion"]
    assert ModelConfig.from_dict(off.to_dict()).fusion.token_norm is False
    assert ModelConfig.from_dict(tiny_config().to_dict()).fusion.token_norm is True
    torch.manual_seed(0)
    x = torch.randn(8, 3, 64, 64)
    cm = torch.randint(0, 150, (8, 64, 64)) // 30 * 30  # a few classes in blobs of ids
    cm = torch.repeat_interleave(torch.repeat_interleave(cm[:, ::16, ::16], 16, 1), 16, 2)
    moves = {}
    for norm in (False, True):
        torch.manual_seed(1)
        cfg = tiny_config()
        cfg.fusion.token_norm = norm
        enc = VisualEncoder(cfg).eval()
        assert (enc.fusion.tokens.norm is not None) == norm
        with torch.no_grad():
            tokens = enc.backbone(x)
            hist = patch_histograms(cm, enc.grid, 150)
            own = enc.fusion.from_histograms(hist, tokens)
            rolled = enc.fusion.from_histograms(torch.roll(hist, 1, 0), tokens)
            moves[norm] = float(((own - rolled).norm(dim=-1) / own.norm(dim=-1)).mean())
            out = enc(x, cm)
            assert torch.allclose(out, enc.forward_histograms(x, hist), atol=1e-6)
        save_encoder(enc, tmp_path / str(norm))
        back = load_encoder(tmp_path / str(norm))
        assert back.config.fusion.token_norm is norm
        assert ("token_norm" in json.loads((tmp_path / str(norm) / "encoder.json").read_text())["model"]["fusion"]) == norm
        with torch.no_grad():
            assert torch.allclose(back(x, cm), out, atol=1e-6)
    assert moves[True] > 2 * moves[False]
