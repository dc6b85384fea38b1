"""`geosurge bench gpu` runs, minus CUDA, on the CPU with tiny sizes, and reports every step."""

from __future__ import annotations

import json

import pytest

from geosurge_index.bench import gpu


@pytest.fixture
def small():
    return gpu.GpuCheck(device="cpu", images=4, cells=400, queries=64, train_images=16, segmenter="segformer")


def test_gpu_check_runs_on_the_cpu_and_reports_each_step(small, tmp_path, monkeypatch, capsys):
    def broken(self):
        raise RuntimeError("injected\nsecond line")

    monkeypatch.setattr(gpu._Context, "search_faiss", broken)  # one failing step does not stop the others
    monkeypatch.setenv("GEOSURGE_NO_PROGRESS", "1")
    from geosurge_index.model.segmenter import Segmenter

    segmented, real_segment, real_locate = [], Segmenter._segment, gpu._Context.locate
    monkeypatch.setattr(Segmenter, "_segment", lambda self, x: segmented.append(len(x)) or real_segment(self, x))
    per_run = {}

    def locate(self, with_maps):
        before = len(segmented)
        out = real_locate(self, with_maps)
        per_run[with_maps] = sum(segmented[before:])
        return out

    monkeypatch.setattr(gpu._Context, "locate", locate)
    result = gpu.run_gpu_check(small)
    assert per_run == {True: 0, False: small.images}  # maps given: segmenter skipped; else run once per image
    steps = {s["name"]: s for s in result["steps"]}
    assert list(steps) == ["device", "search torch", "search faiss", "locate maps", "locate segment",
                           "full model", "train", "train fp16", "service"]
    assert steps["search faiss"]["status"] == "FAIL" and steps["search faiss"]["detail"] == "RuntimeError: injected"
    for name in ("device", "search torch", "locate maps", "locate segment", "train", "service"):
        assert steps[name]["status"] == "PASS", (name, steps[name]["detail"], steps[name]["figures"])
    assert steps["full model"]["status"] == steps["train fp16"]["status"] == "SKIP"
    assert steps["locate maps"]["figures"]["images_per_s"] > 0
    assert result["counts"] == {"PASS": 6, "FAIL": 1, "SKIP": 2} and not result["ok"]
    out = capsys.readouterr()
    assert "  FAIL  search faiss" in out.out and "  PASS  service" in out.out
    assert "gpu check: 6 passed, 1 failed, 2 skipped" in out.out
    assert "locate: decoding:" in out.err  # what the loader was sized to


def test_time_budget_skips_the_rest(small, monkeypatch):
    from dataclasses import replace

    result = gpu.run_gpu_check(replace(small, time_budget_s=0.0), say=lambda s: None)
    assert {s["status"] for s in result["steps"][1:]} == {"SKIP"} and result["ok"]


def test_cli_and_make_target(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from geosurge_index.cli import main

    calls = []

    def fake(settings, say=None):
        calls.append(settings)
        return {"ok": False, "steps": [], "counts": {}, "device": "cpu", "wall_s": 0}

    monkeypatch.setattr(gpu, "run_gpu_check", fake)
    assert main(["bench", "gpu", "--device", "cpu", "--images", "3", "--no-full", "--json",
                 str(tmp_path / "r.json")]) == 1
    assert calls[0].device == "cpu" and calls[0].images == 3 and calls[0].full is False
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is False
    makefile = (Path(__file__).parent.parent / "Makefile").read_text()
    assert "gpu-check:" in makefile and "geosurge bench gpu" in makefile


def test_full_model_step_reports_rates_and_flops(small, monkeypatch):
    """The full-size step's code on a tiny model (the real one takes minutes on a CPU)."""
    from dataclasses import replace

    from geosurge_index import model

    monkeypatch.setattr(model, "full_config", lambda: model.tiny_config("oneformer"))
    ctx = gpu._Context(replace(small, full=True, peak_tflops=1.0), None, print)
    ctx.device_step()
    detail, figures = ctx.full_model()
    given, seg = figures["class_map_given"], figures["with_segmenter"]
    assert given["images_per_s"] > 0 and seg["flops_per_image"] > given["flops_per_image"] > 0
    assert seg["fraction_of_bf16_peak"] == seg["flops_per_image"] * seg["images_per_s"] / 1e12
    assert "bf16 peak" in detail and figures["autocast"] == "fp32"
