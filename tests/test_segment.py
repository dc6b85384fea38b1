"""`geosurge segment`: class maps written once beside the images, with a config-built SegFormer
saved and loaded by `from_pretrained` exactly as real weights are."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _locate_fixtures import bad_images, encode, photo, write_tar
from PIL import Image

from geosurge_index.cli import build_parser
from geosurge_index.cli import main as cli_main
from geosurge_index.images import class_map_path, decode_image


@pytest.fixture(scope="module")
def seg_dir(tmp_path_factory):
    """A tiny random-weight SegFormer (tests/test_model.py's tiny config) saved with save_pretrained."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    from geosurge_index.model import tiny_config

    arch = {k: v for k, v in tiny_config("segformer").segmenter.arch.items() if k != "model_type"}
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("seg") / "segformer"
    SegformerForSemanticSegmentation(SegformerConfig(**arch)).save_pretrained(out)
    return out


def segment(*argv) -> int:
    return cli_main(["segment", *map(str, argv)])


def test_maps_written_beside_images_bad_ones_counted_existing_kept(seg_dir, tmp_path, capsys):
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    sizes = {imgs / "a.jpg": (120, 90), imgs / "sub" / "b.png": (70, 100)}
    for i, (p, (w, h)) in enumerate(sizes.items()):
        p.write_bytes(encode(photo(w, h, seed=i), "JPEG" if p.suffix == ".jpg" else "PNG"))
    bad = bad_images()
    (imgs / "empty.jpg").write_bytes(bad["empty.jpg"][0])
    (imgs / "truncated.jpg").write_bytes(bad["truncated.jpg"][0])
    done = imgs / "done.png"  # already has a map: kept as it is without --overwrite
    done.write_bytes(encode(photo(80, 80, seed=5), "PNG"))
    Image.fromarray(np.full((64, 64), 7, np.uint8), "L").save(class_map_path(done))
    other = tmp_path / "elsewhere" / "c.webp"  # reached through a manifest, listed twice
    other.parent.mkdir()
    other.write_bytes(encode(photo(64, 96, seed=3), "WEBP"))
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,id\nelsewhere/c.webp,1\nelsewhere/c.webp,2\n")

    argv = [imgs, manifest, "--segmenter", "segformer", "--pretrained", seg_dir, "--input-size", 64,
            "--image-size", 48, "--device", "cpu"]
    assert segment(*argv) == 0
    err = capsys.readouterr().err
    assert "6 images: 3 maps written, 1 skipped (map exists), 2 errors" in err, err
    assert "truncated 1" in err and "zero_bytes 1" in err and "empty.jpg" in err

    from geosurge_index.model.classmaps import load_segmenter, segment_pil

    seg = load_segmenter("segformer", str(seg_dir), 64, "cpu")
    for p in {**sizes, other: (64, 96)}:
        m = Image.open(class_map_path(p))
        assert m.mode == "L" and m.size == (48, 48)  # the centre crop at --image-size
        arr = np.asarray(m)
        assert arr.max() < 150  # ADE20K ids
        np.testing.assert_array_equal(arr, segment_pil(seg, decode_image(p), 48))  # the given weights
    assert not class_map_path(imgs / "empty.jpg").exists() and not class_map_path(imgs / "truncated.jpg").exists()
    assert (np.asarray(Image.open(class_map_path(done))) == 7).all()
    assert not list(tmp_path.rglob("*.tmp"))

    # run again: nothing to do, nothing loaded; --overwrite recomputes the old map
    assert segment(*argv) == 0
    assert "0 maps written, 4 skipped (map exists), 2 errors" in capsys.readouterr().err
    assert segment(*argv, "--overwrite") == 0
    assert "4 maps written, 0 skipped" in capsys.readouterr().err
    assert (np.asarray(Image.open(class_map_path(done))) != 7).any()


def test_maps_are_used_by_locate_not_listed_as_images(seg_dir, tmp_path):
    from geosurge_index import sources

    (tmp_path / "x.jpg").write_bytes(encode(photo(90, 60, seed=1), "JPEG"))
    assert segment(tmp_path, "--segmenter", "segformer", "--pretrained", seg_dir, "--input-size", 64,
                   "--device", "cpu") == 0
    table = sources.read_folder(tmp_path)
    assert table.column("file").to_pylist() == [str(tmp_path / "x.jpg")]
    assert sources.class_map_source(str(tmp_path / "x.jpg"), -1, -1, -1) == class_map_path(tmp_path / "x.jpg")


def test_clear_errors(seg_dir, tmp_path, capsys):
    write_tar(tmp_path / "shard.tar", 2)
    assert segment(tmp_path / "shard.tar", "--pretrained", seg_dir) == 2
    assert "WebDataset shard" in capsys.readouterr().err
    (tmp_path / "imgs").mkdir()
    assert segment(tmp_path / "imgs") == 2
    assert "no images found" in capsys.readouterr().err
    (tmp_path / "imgs" / "a.png").write_bytes(encode(photo(), "PNG"))
    assert segment(tmp_path / "imgs", "--segmenter", "segformer", "--pretrained", tmp_path / "no-weights") == 2
    assert "no-weights" in capsys.readouterr().err
    assert segment(tmp_path / "nope") == 2
    assert "does not exist" in capsys.readouterr().err


def test_help_and_defaults_agree_with_the_model_config(capsys):
    from geosurge_index.cli import segment as seg_cli
    from geosurge_index.model.config import DEFAULT_ONEFORMER, DEFAULT_SEGFORMER, SegmenterConfig

    assert seg_cli.PRETRAINED == {"oneformer": DEFAULT_ONEFORMER, "segformer": DEFAULT_SEGFORMER}
    from geosurge_index.model.classmaps import DEFAULT_IMAGE_SIZE
    from geosurge_index.model.config import SEGMENTER_INPUT_SIZE, full_config

    assert seg_cli.INPUT_SIZE == SEGMENTER_INPUT_SIZE
    assert SegmenterConfig().input_size == SEGMENTER_INPUT_SIZE["oneformer"] == 640
    assert seg_cli.DEFAULT_IMAGE_SIZE == DEFAULT_IMAGE_SIZE == full_config().image_size
    with pytest.raises(SystemExit):
        build_parser().parse_args(["segment", "--help"])
    out = capsys.readouterr().out
    for text in ("once", "every epoch", "--segmenter", "--pretrained", "--input-size", "--image-size",
                 "--overwrite", "classmap.png", "centre crop"):
        assert text in out


def test_segment_never_reaches_for_the_network(tmp_path):
    """With HF_HUB_OFFLINE unset and a hub id that is not in the cache, `geosurge segment` says so
    in one line (and how to allow a download) without opening a connection or resolving a name."""
    import os
    import subprocess
    import sys

    (tmp_path / "a.jpg").write_bytes(encode(photo(), "JPEG"))
    guard = ("import socket, sys\n"
             "def refuse(*a, **k):\n"
             "    print('NETWORK ATTEMPT', a[:2], file=sys.stderr, flush=True)\n"
             "    raise OSError('network attempted')\n"
             "socket.socket.connect = refuse; socket.getaddrinfo = refuse; socket.create_connection = refuse\n"
             "from geosurge_index.cli import main; sys.exit(main())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty cache
    res = subprocess.run([sys.executable, "-c", guard, "segment", str(tmp_path), "--segmenter", "segformer",
                          "--pretrained", "nobody/no-such-segmenter", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "NETWORK ATTEMPT" not in res.stderr and "Traceback" not in res.stderr
    assert "nobody/no-such-segmenter" in res.stderr and "--download" in res.stderr
    assert not class_map_path(tmp_path / "a.jpg").exists()


@pytest.mark.parametrize("kind", ["segformer", "oneformer"])
def test_precomputed_and_on_the_fly_class_maps_are_identical(kind, tmp_path):
    """One class-map geometry: `geosurge segment`'s stored map, cut by the reader stage, equals the
    map the encoder's segmenter computes on the fly for the same image (the centre crop the
    backbone sees, at the segmenter's input size), and so do the embeddings. Ten-crop does not use
    the stored centre-crop map: the segmenter runs on each crop."""
    from geosurge_index.geometry import clip_normalise
    from geosurge_index.locate.decode import DecodeSpec, decode_any
    from geosurge_index.locate.predictor import Predictor
    from geosurge_index.model import VisualEncoder, tiny_config
    from geosurge_index.model.classmaps import write_class_maps

    torch.manual_seed(0)
    cfg = tiny_config(kind)
    cfg.segmenter.input_size = 80  # not the encoder's side: the crop is resized for the segmenter
    enc = VisualEncoder(cfg).eval()
    paths = []
    for i, (w, h) in enumerate([(120, 90), (70, 100), (64, 64), (300, 77)]):
        p = tmp_path / f"img{i}.jpg"
        p.write_bytes(encode(photo(w, h, seed=i), "JPEG"))
        paths.append(p)
    assert write_class_maps(paths, enc.segmenter, progress=False, image_size=enc.image_size) == {"written": 4}
    spec = DecodeSpec(enc.image_size)
    predictor = Predictor(enc, None, "cpu")
    labels: set[int] = set()
    for p in paths:
        stored = decode_any(p, spec)  # a path: its <stem>.classmap.png is read and cut
        fresh = decode_any(p.read_bytes(), spec)  # bytes: no map, the segmenter will run
        assert stored.class_map is not None and fresh.class_map is None
        np.testing.assert_array_equal(stored.pixels, fresh.pixels)
        with torch.no_grad():
            on_the_fly = enc.segment(clip_normalise(fresh.pixels[None]))[0].numpy()
        np.testing.assert_array_equal(stored.class_map, on_the_fly)
        labels.update(np.unique(on_the_fly).tolist())
        e_stored = predictor.encode(stored.pixels[None], stored.class_map[None], np.array([True]))
        e_fresh = predictor.encode(fresh.pixels[None], np.zeros_like(stored.class_map[None]), np.array([False]))
        np.testing.assert_allclose(e_stored, e_fresh, atol=1e-6)
        ten = decode_any(p, DecodeSpec(enc.image_size, ten_crop=True))
        assert ten.error is None and ten.class_map is None and ten.pixels.shape[0] == 10
    assert len(labels) > (2 if kind == "segformer" else 0)  # real maps (a random OneFormer may be flat)


def test_whole_image_maps_are_still_cut_by_the_crop_boxes():
    """Maps without the crop-region header (the demo world's, maps written by older versions) cover
    the whole image and are cut with the plan's boxes, as before."""
    from geosurge_index import geometry

    m = np.zeros((60, 90), np.uint8)
    m[:, 45:] = 7  # right half
    plan = geometry.centre_crop(90, 60, 30)
    out = plan.cut_class_map(m)
    assert out.shape == (1, 30, 30) and (out[0, :, :15] == 0).all() and (out[0, :, 15:] == 7).all()
    assert geometry.ten_crop(90, 60, 30).cut_class_map(m).shape == (10, 30, 30)
    bad = Image.fromarray(m, "L")
    bad.info[geometry.CLASS_MAP_KEY] = '{"format": "geosurge-classmap", "format_version": 9, "region": "x"}'
    with pytest.raises(ValueError, match="this version reads"):
        plan.cut_class_map(bad)
