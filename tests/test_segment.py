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
            "--device", "cpu"]
    assert segment(*argv) == 0
    err = capsys.readouterr().err
    assert "6 images: 3 maps written, 1 skipped (map exists), 2 errors" in err, err
    assert "truncated 1" in err and "zero_bytes 1" in err and "empty.jpg" in err

    from geosurge_index.model.classmaps import load_segmenter, segment_pil

    seg = load_segmenter("segformer", str(seg_dir), 64, "cpu")
    for p, (w, h) in {**sizes, other: (64, 96)}.items():
        m = Image.open(class_map_path(p))
        scale = 64 / min(w, h)
        assert m.mode == "L" and m.size == (max(64, round(w * scale)), max(64, round(h * scale)))
        arr = np.asarray(m)
        assert arr.max() < 150  # ADE20K ids
        np.testing.assert_array_equal(arr, segment_pil(seg, decode_image(p)))  # the given weights
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
    assert seg_cli.DEFAULT_INPUT_SIZE == SegmenterConfig().input_size
    with pytest.raises(SystemExit):
        build_parser().parse_args(["segment", "--help"])
    out = capsys.readouterr().out
    for text in ("once", "every epoch", "--segmenter", "--pretrained", "--input-size", "--overwrite", "classmap.png"):
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
