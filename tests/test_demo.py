"""A miniature `geosurge demo`: every stage runs, the artefacts exist, the table is printed, and
a second run reuses what is built."""

from __future__ import annotations

import json
import shutil

import pytest

from geosurge_index.cli import main
from geosurge_index.demo import DemoSettings, dump_toml, run_demo
from geosurge_index.metrics import THRESHOLDS_KM

RECIPE = {
    "out": "unused",  # the demo points it into OUT/run
    "model": {"preset": "tiny"},
    "data": {"class_maps": "precomputed", "val_fraction": 0.1, "calibration_fraction": 0.2},  # 27 to calibrate
    "train": {"epochs": 1, "batch_size": 16, "effective_batch": 16, "max_steps_per_epoch": 3,
              "workers": 0, "lr": 1e-3, "seed": 0},
}


@pytest.fixture(scope="module")
def mini_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    recipe = root / "recipe-in.toml"
    recipe.write_text(dump_toml(RECIPE) + "\n")
    settings = DemoSettings(out_dir=root / "out", n_train=150, n_test=16, recipe=recipe, tau_min=2,
                            tau_max=(60, 40, 30, 20, 12, 8, 5), progress=False, archive_trips=3)
    return settings, run_demo(settings)


def test_every_stage_runs_and_writes_its_artefacts(mini_demo, capsys):
    settings, result = mini_demo
    assert [(s.name, s.status) for s in result.stages] == [
        (name, "ran") for name in ("world-train", "world-test", "partition", "segmenter", "train-maps", "train",
                                   "export", "calibrate", "gallery", "locate", "locate-no-maps", "evaluate", "sql",
                                   "map", "world-archive", "archive")], result.stages
    out = settings.out_dir
    for rel in ("world/train/manifest.csv", "world/test/manifest.csv", "cells/partition.json",
                "recipe.toml", "run/run.json", "index/manifest.json", "eval/accuracy.txt",
                "segmenter/segmenter.json", "segmenter/segmenter.safetensors",
                "eval/accuracy.json", "eval/model.json", "map/predictions.png", "eval/archive.json",
                "world/archive/truth.csv", "index/calibration.json", "eval/confidence.png"):
        assert (out / rel).is_file(), rel
    assert list((out / "predictions").glob("part-*.parquet"))
    assert list((out / "predictions-no-maps").glob("part-*.parquet"))
    assert list((out / "world/test-no-maps/images").glob("*.jpg")) and not list(
        (out / "world/test-no-maps/images").glob("*.classmap.png"))
    assert len(list((out / "sql").glob("*.csv"))) == 2
    assert len(list((out / "world/train/images").glob("*.classmap.png"))) == 150
    # the model trained on the shipped segmenter's maps of the training photos
    assert len(list((out / "world/train-segmented/images").glob("*.classmap.png"))) == 150
    recipe = (out / "recipe.toml").read_text()
    assert "train-segmented" in recipe and str(out / "world/train/manifest.csv") not in recipe


def test_the_accuracy_table_has_its_rows(mini_demo):
    settings, result = mini_demo
    assert list(result.table) == ["GeoSURGE, with class maps", "GeoSURGE, without class maps (the index's segmenter)",
                                  "with the training set as gallery", "same model, finest level", "random cell",
                                  "densest cell"]
    assert list(result.archive_table) == ["cell mean (no gallery)", "its tagged photos as gallery",
                                          "training set as gallery"]
    for acc in result.archive_table.values():
        assert sorted(acc) == sorted(THRESHOLDS_KM)
    for acc in result.table.values():
        assert sorted(acc) == sorted(THRESHOLDS_KM)
        values = [acc[t] for t in THRESHOLDS_KM]
        assert all(0 <= v <= 100 for v in values) and values == sorted(values)  # within more km: more
    saved = json.loads((settings.out_dir / "eval/accuracy.json").read_text())
    assert saved["densest cell"]["2500"] == pytest.approx(result.table["densest cell"][2500.0])
    text = (settings.out_dir / "eval/accuracy.txt").read_text()
    assert "2500 km" in text and "random cell" in text
    assert "with class maps" in text and "without class maps (the index's segmenter)" in text


def test_the_index_ships_the_trained_segmenter(mini_demo):
    from geosurge_index.model import load_encoder
    from geosurge_index.model.small_segmenter import SmallSegmenter

    settings, _ = mini_demo
    encoder = load_encoder(settings.out_dir / "index")
    assert isinstance(encoder.segmenter, SmallSegmenter) and encoder.config.segmenter.is_trained
    training = json.loads((settings.out_dir / "segmenter/segmenter.json").read_text())["training"]
    assert training["n_train"] + training["n_val"] == 150  # every training photo (fewer than the draw)


def test_a_second_run_reuses_everything(mini_demo, capsys):
    settings, _ = mini_demo
    again = run_demo(settings)
    assert {s.status for s in again.stages} == {"reused"}
    assert again.table == mini_demo[1].table
    printed = capsys.readouterr().out
    assert "% of 16 test photos within" in printed and f"written under {settings.out_dir}" in printed


def test_a_redone_stage_redoes_the_stages_after_it(mini_demo):
    settings, _ = mini_demo
    (settings.out_dir / ".demo" / "locate.json").unlink()  # as if locate had been interrupted
    again = run_demo(settings)
    status = {s.name: s.status for s in again.stages}
    assert {status[n] for n in ("world-train", "world-test", "partition", "segmenter", "train-maps", "train",
                                "export", "gallery", "locate-no-maps")} == {"reused"}
    assert {status[n] for n in ("locate", "evaluate", "sql", "map")} == {"ran"}


def test_an_interrupted_training_run_resumes(tmp_path, capsys):
    recipe = tmp_path / "recipe-in.toml"
    recipe.write_text(dump_toml({**RECIPE, "train": {**RECIPE["train"], "epochs": 2}}) + "\n")
    settings = DemoSettings(out_dir=tmp_path / "out", n_train=60, n_test=4, recipe=recipe, progress=False,
                            archive_trips=0)
    run_demo(settings)
    out = settings.out_dir
    (out / ".demo" / "train.json").unlink()  # as if killed during epoch 2
    shutil.rmtree(out / "run" / "epoch-0002")
    capsys.readouterr()
    again = run_demo(settings)
    assert {s.name: s.status for s in again.stages}["train"] == "ran"
    assert "resuming it" in capsys.readouterr().out and (out / "run" / "epoch-0002").is_dir()
    # Other data (another seed): the old run is not resumed but replaced.
    other = run_demo(DemoSettings(**{**settings.__dict__, "seed": 1}))
    assert {s.name: s.status for s in other.stages}["train"] == "ran"
    assert "resuming it" not in capsys.readouterr().out


def test_cli_refuses_bad_tau(tmp_path, capsys):
    code = main(["demo", "--out", str(tmp_path / "x"), "--tau-max", "10,x"])
    assert code == 2
    assert "--tau-max" in capsys.readouterr().err
