"""ONNX Runtime encoders (issue 17) on a tiny config-built index: export, agreement with torch,
the same rows from Locator and bulk locate with either runtime, and the fallbacks.

Tolerances: fp32 ONNX embeddings within 1e-4 (max abs) of torch and the same cells; int8
embeddings at cosine >= 0.99 and top-1 finest cell agreeing on >= 90% of 12 photos (at this
size the tiny random model's cells are close together, so a 1e-3 change can flip a near-tie).
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from _locate_fixtures import encode, photo

pytest.importorskip("onnxruntime")

from geosurge_index.cli import main as cli_main  # noqa: E402
from geosurge_index.errors import UserError  # noqa: E402
from geosurge_index.index import read_manifest, verify_index  # noqa: E402
from geosurge_index.index_onnx import onnx_entries  # noqa: E402
from geosurge_index.locate import LocateJob, Locator, Predictor, run_job  # noqa: E402
from geosurge_index.model import load_encoder  # noqa: E402
from geosurge_index.model.onnx_runtime import OnnxFallbackWarning, choose_runtime, open_encoder  # noqa: E402
from geosurge_index.settings import InferenceSettings  # noqa: E402


@pytest.fixture(scope="module")
def plain_index(tmp_path_factory):
    from geosurge_index.synthetic import random_index

    return random_index(tmp_path_factory.mktemp("onnx") / "index", n_points=1500)


@pytest.fixture(scope="module")
def index_dir(plain_index, tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx-export") / "index"
    shutil.copytree(plain_index, d)
    assert cli_main(["export-onnx", str(d)]) == 0
    return d


@pytest.fixture(scope="module")
def photos():
    return [encode(photo(seed=i), "JPEG") for i in range(12)]


def _locate(index_dir, runtime, photos):
    loc = Locator.open(index_dir, settings=InferenceSettings(device="cpu", runtime=runtime, top_k=3))
    return loc, loc.locate(photos, return_embeddings=True)


def test_export_lists_the_files_with_checksums_and_keeps_the_index_valid(index_dir):
    m = verify_index(index_dir)  # the ONNX section does not change what `verify_index` checks
    entries = onnx_entries(m)
    assert set(entries) == {"encoder_fp32", "encoder_int8", "segmenter_fp32"}
    for e in entries.values():
        assert (index_dir / e["file"]).stat().st_size == e["bytes"] and len(e["sha256"]) == 64
    assert entries["encoder_fp32"]["check"]["max_abs"] < 1e-4
    assert entries["encoder_int8"]["check"]["cosine_min"] >= 0.99
    assert entries["segmenter_fp32"]["check"]["pixel_agreement"] > 0.99
    assert m["onnx"]["opset"] == 17 and m["onnx"]["onnxruntime"]


def test_onnx_encoder_agrees_with_torch_with_and_without_class_maps(index_dir):
    torch_enc = load_encoder(index_dir, "cpu")
    g = torch.Generator().manual_seed(7)
    s = torch_enc.image_size
    x = torch.randn(3, 3, s, s, generator=g)
    maps = torch.randint(0, 150, (3, s, s), generator=g)
    with torch.inference_mode():
        ref_map, ref_seg = torch_enc(x, maps), torch_enc(x, None)
    fp32 = open_encoder(index_dir, torch.device("cpu"), "onnx-fp32")
    assert (fp32.runtime, fp32.image_size, fp32.embed_dim) == ("onnx-fp32", s, torch_enc.embed_dim)
    assert (fp32(x, maps) - ref_map).abs().max() < 1e-4
    assert (fp32(x, None) - ref_seg).abs().max() < 1e-4  # the exported segmenter
    assert torch.equal(fp32.segment(x), torch_enc.segment(x))
    int8 = open_encoder(index_dir, torch.device("cpu"), "onnx-int8")
    cos = (int8(x, maps) * ref_map).sum(1)
    assert cos.min() >= 0.99


def test_locator_gives_the_same_rows_with_either_runtime(index_dir, photos):
    loc, ref = _locate(index_dir, "torch", photos)
    assert loc.predictor.encoder.runtime == "torch"
    loc, fp32 = _locate(index_dir, "onnx-fp32", photos)
    assert loc.predictor.encoder.runtime == "onnx-fp32"
    for a, b in zip(ref, fp32, strict=True):
        assert np.abs(np.array(a.embedding) - np.array(b.embedding)).max() < 1e-4
        assert [c.cell_index for c in a.cells] == [c.cell_index for c in b.cells]
        assert a.probability == pytest.approx(b.probability, abs=1e-4)
    loc, auto = _locate(index_dir, "auto", photos)
    assert loc.predictor.encoder.runtime == "onnx-fp32"  # auto: fp32 (int8's top-1 agreement not measured)
    loc, int8 = _locate(index_dir, "onnx", photos)
    assert loc.predictor.encoder.runtime == "onnx-int8"  # onnx: the fastest whose export check held
    cos = [float(np.dot(a.embedding, b.embedding)) for a, b in zip(ref, int8, strict=True)]
    top1 = np.mean([a.cells[-1].cell_index == b.cells[-1].cell_index for a, b in zip(ref, int8, strict=True)])
    assert min(cos) >= 0.99 and top1 >= 0.9


def test_bulk_locate_gives_the_same_rows_with_either_runtime(index_dir, photos, tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, b in enumerate(photos[:6]):
        (folder / f"{i}.jpg").write_bytes(b)
    tables = {}
    for runtime in ("torch", "onnx-fp32"):
        out = tmp_path / runtime
        argv = ["locate", str(index_dir), str(folder), "--out", str(out), "--device", "cpu",
                "--workers", "0", "--runtime", runtime, "--save-embeddings"]
        assert cli_main(argv) == 0
        tables[runtime] = pq.read_table(sorted(out.glob("part-*.parquet"))).sort_by("id").to_pylist()
    for a, b in zip(tables["torch"], tables["onnx-fp32"], strict=True):
        assert a["topk_cells"] == b["topk_cells"] and a["cell_l7"] == b["cell_l7"]
        assert np.abs(np.array(a["embedding"]) - np.array(b["embedding"])).max() < 1e-4
    # the job carries the setting to the runner's predictor
    from geosurge_index.locate import runner

    opened = []
    real_open = Predictor.open

    def spy(*args, **kwargs):
        opened.append(real_open(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(runner.Predictor, "open", spy)
    job = LocateJob(index_dir=str(index_dir), inputs=[str(folder)], out_dir=str(tmp_path / "j"),
                    device="cpu", workers=0, runtime="onnx-int8")
    assert run_job(job)["images"] == 6 and opened[0].encoder.runtime == "onnx-int8"
    # a setting that changes rows: recorded, so a resume under another runtime is refused, naming it
    from geosurge_index import pred_store
    from geosurge_index.errors import UserError

    assert pred_store.read_run(tmp_path / "j")["settings"]["runtime"] == "onnx-int8"
    with pytest.raises(UserError, match="runtime"):
        run_job(LocateJob(index_dir=str(index_dir), inputs=[str(folder)], out_dir=str(tmp_path / "j"),
                          device="cpu", workers=0, runtime="torch"))
    assert "runtime" not in LocateJob(index_dir="i", inputs=["x"], out_dir="o").output_settings()


def _damaged(index_dir, tmp_path, *, corrupt=(), remove=()):
    d = tmp_path / "copy"
    shutil.copytree(index_dir, d)
    for name in corrupt:
        data = bytearray((d / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (d / name).write_bytes(bytes(data))
    for name in remove:
        (d / name).unlink()
    return d


def test_a_corrupt_int8_file_falls_back_to_fp32_with_a_warning(index_dir, tmp_path):
    d = _damaged(index_dir, tmp_path, corrupt=["encoder.int8.onnx"])
    with pytest.warns(OnnxFallbackWarning, match="sha256"):
        pred = Predictor.open(d, "cpu", runtime="onnx")
    assert pred.encoder.runtime == "onnx-fp32"
    with pytest.raises(UserError, match="encoder.int8.onnx does not match its sha256"):
        Predictor.open(d, "cpu", runtime="onnx-int8")


def test_missing_onnx_files_fall_back_to_torch_or_refuse_when_explicit(index_dir, tmp_path):
    d = _damaged(index_dir, tmp_path, remove=["encoder.onnx", "encoder.int8.onnx"])
    verify_index(d)  # the index itself is intact
    with pytest.warns(OnnxFallbackWarning, match="missing.*the torch encoder runs instead"):
        loc = Locator.open(d, device="cpu")
    assert loc.predictor.encoder.runtime == "torch"
    for runtime in ("onnx", "onnx-fp32"):
        with pytest.raises(UserError, match="encoder.onnx is missing"):
            Predictor.open(d, "cpu", runtime=runtime)


def test_a_missing_segmenter_graph_means_the_torch_segmenter(index_dir, tmp_path):
    d = _damaged(index_dir, tmp_path, remove=["segmenter.onnx"])
    with pytest.warns(OnnxFallbackWarning, match="segmenter.onnx is missing"):
        enc = open_encoder(d, torch.device("cpu"), "onnx-fp32")
    x = torch.randn(2, 3, enc.image_size, enc.image_size)
    with torch.inference_mode():
        ref = load_encoder(d, "cpu")(x, None)
    assert (enc(x, None) - ref).abs().max() < 1e-4


def test_an_index_without_onnx_files_runs_torch_silently(plain_index):
    m = read_manifest(plain_index)
    assert "onnx" not in m
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_runtime(plain_index, m, "auto", "cpu").name == "torch"
    assert choose_runtime(plain_index, m, "auto", "cuda").name == "torch"
    with pytest.raises(UserError, match="no fp32 ONNX encoder"):
        choose_runtime(plain_index, m, "onnx", "cpu")


def test_auto_skips_an_int8_file_whose_export_check_failed(index_dir, tmp_path):
    d = _damaged(index_dir, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["onnx"]["files"]["encoder_int8"]["check"]["cosine_min"] = 0.5
    assert choose_runtime(d, m, "auto", "cpu").name == "onnx-fp32"
    assert choose_runtime(d, m, "onnx-int8", "cpu").name == "onnx-int8"  # asked for: it runs


def test_dynamic_int8_without_photos_and_static_refused_without_them(index_dir, plain_index, tmp_path):
    check = onnx_entries(read_manifest(index_dir))["encoder_int8"]["check"]
    assert check["method"] == "dynamic" and "top1_agreement" not in check
    d = tmp_path / "index"
    shutil.copytree(plain_index, d)
    with pytest.raises(UserError, match="static int8 needs calibration photos"):
        cli_main_raising(["export-onnx", str(d), "--int8-method", "static"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):  # the error names the input
        cli_main_raising(["export-onnx", str(d), "--calibration-images", str(tmp_path / "empty")])
    assert "onnx" not in read_manifest(d)


def cli_main_raising(argv):
    from geosurge_index.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args)


def test_runtime_setting_from_the_environment_and_bad_values():
    assert InferenceSettings.from_env({"GEOSURGE_RUNTIME": "onnx-int8"}).runtime == "onnx-int8"
    assert InferenceSettings().runtime == "auto"
    with pytest.raises(UserError, match="GEOSURGE_RUNTIME: setting runtime must be one of"):
        InferenceSettings.from_env({"GEOSURGE_RUNTIME": "tensorrt"})


def test_export_with_onnx_writes_the_fp32_encoder_only_when_asked(plain_index, tmp_path):
    ckpt = plain_index.with_name(plain_index.name + ".build") / "ckpt"  # random_index's checkpoint
    out = tmp_path / "index"
    assert cli_main(["export", str(ckpt), "--out", str(out), "--no-place-names", "--onnx",
                     "--onnx-no-int8", "--onnx-no-segmenter"]) == 0
    assert set(onnx_entries(read_manifest(out))) == {"encoder_fp32"}
    assert not (out / "encoder.int8.onnx").exists()
    assert Predictor.open(out, "cpu").encoder.runtime == "onnx-fp32"
