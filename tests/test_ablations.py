"""`geosurge ablations --quick`: every variant of the paper's ablations builds, trains one step
and evaluates on a tiny demo world; the table and its JSON have every row and threshold."""

from __future__ import annotations

import json

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
