"""The small segmenter: it trains on a tiny demo world's class maps and beats chance, it travels
whole inside the encoder files (and so inside an index), and its config says it is trained."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from geosurge_index import demo_world as dw
from geosurge_index.errors import FormatError, UserError
from geosurge_index.geometry import clip_normalise
from geosurge_index.model import (
    ModelConfig,
    SegmenterConfig,
    VisualEncoder,
    load_encoder,
    save_encoder,
    tiny_config,
)
from geosurge_index.model.encoder_io import load_segmenter, with_segmenter
from geosurge_index.model.small_segmenter import ABSENT_SCORE, SmallSegmenter
from geosurge_index.segmenter_train import SegmenterTrainSettings, read_labelled, train_segmenter

SIZE = 64  # the tiny model's input size (tiny_config)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("segworld")
    dw.generate_split(root / "train", 120, seed=3, cfg=dw.WorldConfig(image_size=SIZE), prefix="t", progress=False)
    return root / "train"


@pytest.fixture(scope="module")
def trained(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg") / "segmenter"
    settings = SegmenterTrainSettings(epochs=4, batch_size=16, val_fraction=0.2, seed=0, progress=False)
    return train_segmenter([tiny_world / "manifest.csv"], out, image_size=SIZE, settings=settings), out


def test_the_small_segmenter_trains_and_beats_chance(trained):
    res, _ = trained
    assert res.n_train == 96 and res.n_val == 24 and res.n_without_map == 0
    assert res.history[-1] < res.history[0]  # the loss went down
    # chance = always the commonest class of the training maps, on the same held-out pixels
    assert res.pixel_accuracy > res.chance_accuracy + 0.15, (res.pixel_accuracy, res.chance_accuracy)
    assert set(res.labels) <= set(dw.CLASS_IDS.values())


def test_the_saved_segmenter_is_the_trained_one(trained, tiny_world):
    res, out = trained
    meta = json.loads((out / "segmenter.json").read_text())
    assert meta["format"] == "geosurge-segmenter" and meta["training"]["pixel_accuracy"] == res.pixel_accuracy
    cfg, seg = load_segmenter(out)
    assert isinstance(seg, SmallSegmenter) and cfg.kind == "small" and cfg.is_trained
    assert cfg.arch["labels"] == res.labels and "held-out pixel accuracy" in cfg.trained_on
    pixels, maps, _ = read_labelled([tiny_world / "manifest.csv"], SIZE, progress=False)
    with torch.inference_mode():
        pred = seg(clip_normalise(pixels)).numpy()
    assert np.isin(pred, res.labels).all()  # classes it never saw are never predicted
    assert np.mean(pred == maps) > 0.5
    scores = seg.class_scores(torch.zeros(1, 3, SIZE, SIZE))
    absent = [c for c in range(150) if c not in res.labels]
    assert torch.all(scores[:, absent] == ABSENT_SCORE)


def test_a_segmenter_folder_travels_inside_the_encoder_files(trained, tmp_path):
    _, out = trained
    torch.manual_seed(0)
    encoder = VisualEncoder(tiny_config()).eval()
    assert not encoder.config.segmenter.is_trained  # config-built SegFormer: random weights
    with_segmenter(encoder, out)
    save_encoder(encoder, tmp_path / "enc")
    saved = json.loads((tmp_path / "enc" / "encoder.json").read_text())["model"]["segmenter"]
    assert saved["kind"] == "small" and saved["trained_on"]
    back = load_encoder(tmp_path / "enc")
    assert back.config.segmenter.is_trained
    _, seg = load_segmenter(out)
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.inference_mode():
        assert torch.equal(back.segment(x), seg(x))  # the weights came through exactly
        assert torch.allclose(back(x), encoder(x), atol=1e-6)  # and the encoder, with no class map


def test_export_ships_the_segmenter_in_the_index(trained, tmp_path):
    from geosurge_index.index import GeoIndex, export_checkpoint
    from geosurge_index.synthetic import random_index

    _, out = trained
    random_index(tmp_path / "plain", n_points=600)  # leaves its checkpoint in plain.build/ckpt
    index = export_checkpoint(tmp_path / "plain.build" / "ckpt", tmp_path / "index", place_names=False,
                              segmenter=out)
    manifest = json.loads((index / "manifest.json").read_text())
    assert "encoder.safetensors" in manifest["files"]  # its weights are checksummed with the encoder
    GeoIndex.open(index)  # verifies the checksums
    encoder = load_encoder(index)
    assert isinstance(encoder.segmenter, SmallSegmenter) and encoder.config.segmenter.is_trained
    assert not load_encoder(tmp_path / "plain").config.segmenter.is_trained


def test_small_segmenter_config_rules(tmp_path):
    cfg = tiny_config(segmenter="small")
    assert cfg.segmenter.kind == "small" and not cfg.segmenter.is_trained
    assert "trained_on" not in cfg.to_dict()["segmenter"]  # absent unless set: older readers still read it
    assert ModelConfig.from_dict(cfg.to_dict()).segmenter == cfg.segmenter
    with pytest.raises(UserError, match="config-built"):
        ModelConfig.from_dict({**cfg.to_dict(), "segmenter": {"kind": "small", "pretrained": "x", "arch": None}}
                              ).validate()
    assert SegmenterConfig(kind="none", pretrained=None).is_trained  # nothing to train
    assert SegmenterConfig().is_trained  # pretrained OneFormer
    with pytest.raises(FormatError, match="does not exist"):
        load_segmenter(tmp_path / "nowhere")


def test_training_needs_class_maps(tmp_path):
    from tests._locate_fixtures import encode, photo

    (tmp_path / "a.jpg").write_bytes(encode(photo(seed=1), "JPEG"))
    (tmp_path / "b.jpg").write_bytes(encode(photo(seed=2), "JPEG"))
    with pytest.raises(UserError, match="0 of the inputs have a class map"):
        train_segmenter([tmp_path], tmp_path / "seg", image_size=32,
                        settings=SegmenterTrainSettings(epochs=1, progress=False))


def test_geosurge_segment_stores_the_small_segmenters_maps(trained, tiny_world, tmp_path, capsys):
    """`geosurge segment --segmenter small --pretrained SEG_DIR` writes the very maps an encoder
    shipping that segmenter computes on the fly (what `geosurge demo` trains its model on)."""
    import shutil

    from PIL import Image

    from geosurge_index.cli import main as cli_main
    from geosurge_index.images import class_map_path

    _, out = trained
    photos = tmp_path / "photos"
    photos.mkdir()
    for img in sorted((tiny_world / "images").glob("*.jpg"))[:6]:
        shutil.copyfile(img, photos / img.name)
    assert cli_main(["segment", str(photos), "--segmenter", "small", "--pretrained", str(out),
                     "--image-size", str(SIZE), "--device", "cpu"]) == 0
    imgs = sorted(photos.glob("*.jpg"))
    stored = np.stack([np.asarray(Image.open(class_map_path(p))) for p in imgs])
    pixels = torch.as_tensor(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in imgs]))
    _, seg = load_segmenter(out)
    with torch.inference_mode():
        on_the_fly = seg(clip_normalise(pixels)).numpy()
    assert stored.shape == on_the_fly.shape and np.mean(stored == on_the_fly) > 0.999
    capsys.readouterr()
    assert cli_main(["segment", str(photos), "--segmenter", "small"]) == 2
    assert "--pretrained SEG_DIR" in capsys.readouterr().err
    assert cli_main(["segment", str(photos), "--segmenter", "small", "--pretrained", str(tmp_path),
                     "--overwrite"]) == 2
    assert "not a trained small segmenter" in capsys.readouterr().err
