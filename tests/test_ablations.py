"""`geosurge ablations --quick`: every variant of the paper's ablations builds, trains one step
and evaluates on a tiny demo world; the table and its JSON have every row and threshold."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from geosurge_index.cli import main as cli_main


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenMP threads spin on a busy shared CPU
    yield
    torch.set_num_threads(n)


def test_level_subsets_end_with_the_finest():
    from geosurge_index.ablations import level_subset

    assert level_subset(7, 7) == list(range(7))
    assert level_subset(7, 1) == [6]
    assert level_subset(7, 3) == [0, 3, 6]
    assert len(level_subset(7, 5)) == 5 and level_subset(7, 5)[-1] == 6


@pytest.mark.slow
def test_quick_ablations_run_every_variant(tmp_path, capsys, monkeypatch):
    from geosurge_index.ablations import TRAININGS, rows
    from geosurge_index.metrics import THRESHOLDS_KM

    monkeypatch.chdir(tmp_path)  # the recipe is found beside the package
    out = tmp_path / "abl"
    code = cli_main(["ablations", "--quick", "--out", str(out),
                     "--json", str(tmp_path / "t.json"), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    for r in rows(4):
        assert r.name in text
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["format"] == "geosurge-ablations"
    assert {r["training"] for r in data["rows"]} == set(TRAININGS)  # every variant trained and evaluated
    assert set(data["trainings"]) == set(TRAININGS)
    for r in data["rows"]:
        assert set(r["mean"]) == {f"{t:g}" for t in THRESHOLDS_KM}
        assert all(0 <= v <= 100 for v in r["mean"].values())
        assert r["std"]["25"] == 0.0  # one seed: no spread
    # the runs exist: each variant really trained (a checkpoint per run)
    for key in TRAININGS:
        assert list((out / "runs" / f"{key}-seed0").glob("epoch-0001/model.safetensors"))


def test_demo_has_an_ablations_flag(capsys):
    with pytest.raises(SystemExit):
        cli_main(["demo", "--help"])
    help_text = capsys.readouterr().out
    assert "--ablations" in help_text and "--seeds" in help_text and "--json" in help_text


def test_trainings_filter_names_a_bad_key_and_keeps_the_rows_of_the_others(tmp_path):
    from geosurge_index.ablations import AblationSettings, run_ablations
    from geosurge_index.errors import UserError

    with pytest.raises(UserError, match="readout-nope"):
        run_ablations(AblationSettings(out_dir=tmp_path, trainings=("readout-gated", "readout-nope"), progress=False))
    with pytest.raises(UserError, match="no row left"):  # a training outside the chosen groups
        run_ablations(AblationSettings(out_dir=tmp_path, only=("head",), trainings=("readout-gated",),
                                       progress=False))


def test_world_option_names_its_world_and_folder(tmp_path):
    from geosurge_index.ablations import AblationSettings, roll_maps_in_batch, world_config
    from geosurge_index.errors import UserError

    assert world_config("plain", 32).map_cue_levels == ()
    assert world_config("map-cues", 32).map_cue_levels == (4, 6)
    assert AblationSettings(out_dir=tmp_path).world_dir == tmp_path  # the plain world where it always was
    assert AblationSettings(out_dir=tmp_path, world="map-cues").world_dir == tmp_path / "map-cues"
    with pytest.raises(UserError, match="--world nope"):
        AblationSettings(world="nope")
    maps = np.arange(3)[:, None, None] * np.ones((3, 2, 2), np.uint8)
    rolled, has = roll_maps_in_batch(maps, np.array([True, False, True]))
    assert [int(m[0, 0]) for m in rolled] == [2, 0, 1] and has.tolist() == [True, True, False]


@pytest.mark.slow
def test_map_cue_world_and_rolled_map_probe(tmp_path, capsys, monkeypatch):
    """`--world map-cues --probe-rolled-maps` on a tiny world: the world has the cues, every row gets
    a rolled twin with its paired change; no fusion cannot notice the swap, a fused model can."""
    from geosurge_index.ablations import embed_test
    from geosurge_index.cells import read_cells
    from geosurge_index.model.checkpoint import load_checkpoint
    from geosurge_index.train_data import read_split

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "abl"
    code = cli_main(["ablations", "--quick", "--out", str(out), "--world", "map-cues", "--probe-rolled-maps",
                     "--only", "fusion read-out", "--trainings", "readout-cls+clip,no-fusion",
                     "--json", str(tmp_path / "t.json"), "--no-progress"])
    assert code == 0
    assert "map-cues world" in capsys.readouterr().out
    world = json.loads((out / "map-cues" / "world" / "train" / "world.json").read_text())
    assert world["config"]["map_cue_levels"] == [4, 6]
    assert not (out / "world").exists()  # the plain world's folder is left alone
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["settings"]["world"] == "map-cues"
    rolled = {r["training"]: r for r in data["rows"] if r["rolled_maps"]}
    assert set(rolled) == {"readout-cls+clip", "no-fusion"} and len(data["rows"]) == 4
    assert set(rolled["no-fusion"]["delta_mean"].values()) == {0.0}  # CLIP alone never reads the map
    # a fused model's embeddings do change when the maps are swapped
    ckpt = next((out / "map-cues" / "runs" / "readout-cls+clip-seed0").glob("epoch-*"))
    model = load_checkpoint(ckpt, "cpu").model
    cells_dir = next((out / "map-cues").glob("cells-*"))
    test = read_split("test", str(out / "map-cues" / "world" / "test" / "manifest.csv"), read_cells(cells_dir))
    own, ok = embed_test(model, test, ten_crop=False)
    swapped, _ = embed_test(model, test, ten_crop=False, roll_maps=True)
    assert ok.all() and not np.allclose(own, swapped, atol=1e-4)
