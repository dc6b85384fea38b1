"""int8 on a small trained demo index (issue 17): `export-onnx --calibration-images` calibrates
static int8 on the demo's training photos, records its top-1 agreement with torch fp32 on held-out
ones, and `--runtime auto` runs int8 exactly when that record is >= 99%.

Tolerance at this size (a demo trained for a few steps, 40 test photos, the tiny 64 px model):
static int8 agrees with torch fp32 on >= 95% of the test photos' top-1 finest cells (2 photos
may flip a near-tie); the full demo's figure (>= 99%) is measured by `geosurge bench cpu
--demo-index` (docs/cpu-inference.md).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from geosurge_index.cli import main as cli_main  # noqa: E402
from geosurge_index.demo import DemoSettings, dump_toml, run_demo  # noqa: E402
from geosurge_index.index import read_manifest  # noqa: E402
from geosurge_index.index_onnx import onnx_entries  # noqa: E402
from geosurge_index.locate import Locator  # noqa: E402
from geosurge_index.model.onnx_runtime import choose_runtime  # noqa: E402
from geosurge_index.settings import InferenceSettings  # noqa: E402
from geosurge_index.sources import image_files  # noqa: E402

pytestmark = pytest.mark.slow

RECIPE = {
    "out": "unused",
    "model": {"preset": "tiny"},
    "data": {"class_maps": "precomputed", "val_fraction": 0.1},
    "train": {"epochs": 1, "batch_size": 16, "effective_batch": 16, "max_steps_per_epoch": 6,
              "workers": 0, "lr": 2e-3, "seed": 0},
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-demo")
    recipe = root / "recipe.toml"
    recipe.write_text(dump_toml(RECIPE) + "\n")
    s = DemoSettings(out_dir=root / "out", n_train=120, n_test=40, recipe=recipe, tau_min=2,
                     tau_max=(60, 40, 30, 20, 12, 8, 5), progress=False, archive_trips=0)
    run_demo(s)
    index = root / "index"
    shutil.copytree(s.out_dir / "index", index)
    assert cli_main(["export-onnx", str(index), "--no-segmenter", "--calibration-images",
                     str(s.out_dir / "world" / "train"), "--calibration-count", "48",
                     "--agreement-count", "40"]) == 0
    return index, s.out_dir / "world" / "test"


def test_static_int8_is_calibrated_and_its_agreement_recorded(demo):
    index, _ = demo
    check = onnx_entries(read_manifest(index))["encoder_int8"]["check"]
    assert check["method"] == "static" and check["calibration_images"] == 48
    assert check["activations"] == "uint8" and check["reduce_range"] is False
    assert check["top1_photos"] == 40 and 0.0 <= check["top1_agreement"] <= 1.0
    assert check["cosine_min"] >= 0.99


def test_int8_agrees_with_torch_on_the_demo_test_photos(demo):
    index, test = demo
    paths = [p for p in image_files([str(test)]) if not p.endswith(".classmap.png")]
    cells, embs = {}, {}
    for runtime in ("torch", "onnx-int8"):
        loc = Locator.open(index, settings=InferenceSettings(device="cpu", runtime=runtime))
        preds = loc.locate(paths, return_embeddings=True, cell_probabilities=False)
        assert all(p.ok for p in preds)
        cells[runtime] = np.array([p.cells[-1].cell_index for p in preds])
        embs[runtime] = np.array([p.embedding for p in preds])
    assert len(paths) == 40
    assert np.mean(cells["torch"] == cells["onnx-int8"]) >= 0.95
    assert (embs["torch"] * embs["onnx-int8"]).sum(1).min() >= 0.99


def test_auto_runs_int8_only_when_its_recorded_agreement_holds(demo, tmp_path):
    index, _ = demo
    m = read_manifest(index)
    check = m["onnx"]["files"]["encoder_int8"]["check"]
    for agreement, want in ((0.995, "onnx-int8"), (0.985, "onnx-fp32")):
        check["top1_agreement"] = agreement
        assert choose_runtime(index, json.loads(json.dumps(m)), "auto", "cpu").name == want
    del check["top1_agreement"]  # dynamic int8 (no photos): nothing measured, so fp32
    assert choose_runtime(index, m, "auto", "cpu").name == "onnx-fp32"
    assert choose_runtime(index, m, "onnx", "cpu").name == "onnx-int8"
