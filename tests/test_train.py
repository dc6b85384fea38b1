"""Training: the tiny model learns, resuming is exact, bad images are skipped, data readers."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from geosurge_index import cells as cells_mod
from geosurge_index.errors import UserError
from geosurge_index.model.config import tiny_config
from geosurge_index.train import (
    DataSettings,
    Recipe,
    Trainer,
    TrainSettings,
    load_recipe,
    parent_tensors,
    search_tables,
    validation_best,
)
from geosurge_index.train_data import BatchDataset, epoch_batches, read_split

TAU = (40, 20, 10, 6, 4, 3, 2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenMP threads spin on a busy shared CPU
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """64 demo-world photos (with class maps) and a partition of their locations."""
    from geosurge_index.coords import read_coordinates
    from geosurge_index.demo_world import generate_split

    root = tmp_path_factory.mktemp("world")
    split = generate_split(root / "train", 64, seed=3, progress=False)
    coords = read_coordinates(split.manifest)
    part = cells_mod.partition(coords.lat, coords.lon, cells_mod.PartitionSettings(tau_min=1, tau_max=TAU))
    cells_mod.write_cells_dir(root / "cells", part.cells, part.assignments, coords.rows)
    return root, split.manifest


def recipe(world, **train) -> Recipe:
    root, manifest = world
    settings = dict(epochs=2, batch_size=16, effective_batch=32, lr=3e-3, seed=5, workers=0, patience=100)
    settings.update(train)
    # validation = the training set; no calibration split (it would be validated on, unseen)
    return Recipe(tiny_config(), DataSettings(cells=str(root / "cells"), train=str(manifest), val=str(manifest),
                                              calibration_fraction=0.0),
                  TrainSettings(**settings), source="test")


def test_tiny_model_overfits_a_small_set(world, tmp_path):
    res = Trainer(recipe(world, epochs=14, effective_batch=16, lr_decay=0.9), tmp_path / "run", progress=False).run()
    first, last = res.metrics[0], res.metrics[-1]
    assert res.metrics[1]["lr"] == pytest.approx(3e-3 * 0.9) and last["lr"] == pytest.approx(3e-3 * 0.9 ** 13)
    assert last["train_loss"] < 0.6 * first["train_loss"]
    # validation here is the training set itself: accuracy far above chance at every level
    cells = cells_mod.read_cells(world[0] / "cells")
    for lvl, acc in enumerate(last["val_acc_per_level"]):
        chance = 100.0 / len(cells.levels[lvl])
        assert acc > max(3 * chance, 40.0), (lvl, acc, chance)
    assert last["val_acc_per_level"][-1] > 10 * 100.0 / len(cells.levels[-1])
    assert last["val_within_km"]["750"] > 50.0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 14 and set(json.loads(lines[0])["val_within_km"]) == {"1", "25", "200", "750", "2500"}
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["last_checkpoint"] == "epoch-0014" and run["best_checkpoint"].startswith("epoch-")
    ck = tmp_path / "run" / "epoch-0014"
    assert {p.name for p in ck.iterdir()} >= {"config.json", "model.safetensors", "train_state.safetensors",
                                              "train_state.json", "cells.parquet", "partition.json"}


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(world, tmp_path, monkeypatch):
    Trainer(recipe(world), tmp_path / "a", progress=False).run()
    want = _weights(tmp_path / "a" / "epoch-0002")

    # stopped after epoch 1, resumed
    Trainer(recipe(world, epochs=1), tmp_path / "b", progress=False).run()
    res = Trainer(recipe(world), tmp_path / "b", resume=True, progress=False).run()
    assert res.epochs_run == 2
    _assert_same(want, _weights(tmp_path / "b" / "epoch-0002"))

    # killed in the middle of epoch 2, right after a mid-epoch checkpoint
    real_save = Trainer._save

    def save_then_die(self, name, epoch_done, metrics=None):
        out = real_save(self, name, epoch_done, metrics)
        if name == "partial" and epoch_done == 1:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(Trainer, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        Trainer(recipe(world, checkpoint_every_steps=1), tmp_path / "c", progress=False).run()
    monkeypatch.setattr(Trainer, "_save", real_save)
    state = json.loads((tmp_path / "c" / "partial" / "train_state.json").read_text())
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 2
    Trainer(recipe(world, checkpoint_every_steps=1), tmp_path / "c", resume=True, progress=False).run()
    _assert_same(want, _weights(tmp_path / "c" / "epoch-0002"))
    assert not (tmp_path / "c" / "partial").exists()


def test_checkpoints_record_the_batch_order_of_the_run_that_wrote_them(world, tmp_path, monkeypatch):
    """A run resumed at an epoch boundary with another process count (allowed) must record its own
    count, seed and batch size, so that a later mid-epoch resume is checked against those."""
    Trainer(recipe(world, epochs=1), tmp_path / "r", progress=False).run()
    f = tmp_path / "r" / "epoch-0001" / "train_state.json"
    state = json.loads(f.read_text())
    assert (state["world_size"], state["seed"], state["batch_size"]) == (1, 5, 16)
    f.write_text(json.dumps({**state, "world_size": 2, "seed": 9}))  # as if trained by 2 processes, seed 9
    real_save = Trainer._save

    def save_then_die(self, name, epoch_done, metrics=None):
        out = real_save(self, name, epoch_done, metrics)
        if name == "partial":
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(Trainer, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        Trainer(recipe(world, checkpoint_every_steps=1), tmp_path / "r", resume=True, progress=False).run()
    monkeypatch.setattr(Trainer, "_save", real_save)
    partial = json.loads((tmp_path / "r" / "partial" / "train_state.json").read_text())
    assert (partial["world_size"], partial["seed"], partial["batch_in_epoch"]) == (1, 5, 2)
    with pytest.raises(UserError, match="batch_size 16 -> 8"):
        Trainer(recipe(world, batch_size=8), tmp_path / "r", resume=True, progress=False).run()


def test_a_split_smaller_than_one_optimizer_step_is_refused(world, tmp_path):
    # 64 samples, micro-batches of 16, effective batch 128: no epoch would ever step the optimizer
    with pytest.raises(UserError, match="fewer than one optimizer step of 128"):
        Trainer(recipe(world, effective_batch=128), tmp_path / "r", progress=False).run()


def test_early_stopping_after_patience_epochs_without_improvement(world, tmp_path):
    # lr 0: the validation loss never improves after the first epoch
    res = Trainer(recipe(world, epochs=6, lr=0.0, patience=2), tmp_path / "run", progress=False).run()
    assert res.stopped_early and res.epochs_run == 3 and res.best_epoch == 1
    assert json.loads((tmp_path / "run" / "run.json").read_text())["best_checkpoint"] == "epoch-0001"


def test_fresh_run_refuses_a_used_run_dir(world, tmp_path):
    Trainer(recipe(world, epochs=1), tmp_path / "r", progress=False).run()
    with pytest.raises(UserError, match="--resume"):
        Trainer(recipe(world, epochs=1), tmp_path / "r", progress=False).run()
    with pytest.raises(UserError, match="does not exist"):
        Trainer(recipe(world), tmp_path / "nothing", resume=True, progress=False).run()


def test_unreadable_images_are_skipped_and_counted(world, tmp_path):
    root, manifest = world
    lines = manifest.read_text().splitlines()
    header, rows = lines[0], lines[1:]
    base = manifest.parent
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    lat, lon = rows[0].split(",")[1:3]
    bad = [f"{tmp_path / 'empty.jpg'},{lat},{lon},bad-0", f"{tmp_path / 'text.jpg'},{lat},{lon},bad-1"]
    good = [",".join([str(base / r.split(",")[0])] + r.split(",")[1:]) for r in rows[:62]]
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("\n".join([header] + good + bad) + "\n")
    r = recipe(world, epochs=1)
    r.data.train = str(mixed)
    res = Trainer(r, tmp_path / "run", progress=False).run()
    assert res.metrics[0]["skipped_images"] == {"zero_bytes": 1, "not_an_image": 1}
    assert res.metrics[0]["train_samples"] == 62


def test_an_undecodable_micro_batch_still_goes_through_the_model(world, tmp_path, monkeypatch):
    """Under DDP a backward without a forward skips the gradient all-reduce on that process alone
    and desynchronises the others: every micro-batch, even one with no readable image, must run
    the (wrapped) model's forward, with a zero loss."""
    from geosurge_index.model.geosurge import GeoSurgeModel

    root, manifest = world
    lat, lon = manifest.read_text().splitlines()[1].split(",")[1:3]
    (tmp_path / "empty.jpg").write_bytes(b"")
    bad = tmp_path / "bad.csv"
    bad.write_text("path,lat,lon,id\n" + "".join(f"{tmp_path / 'empty.jpg'},{lat},{lon},b{i}\n" for i in range(32)))
    calls, real_forward = [], GeoSurgeModel.forward

    def counting_forward(self, *args):
        out = real_forward(self, *args)
        calls.append(float(out[0].detach()))
        return out

    monkeypatch.setattr(GeoSurgeModel, "forward", counting_forward)
    r = recipe(world, epochs=1)
    r.data.train = str(bad)
    res = Trainer(r, tmp_path / "run", progress=False).run()
    assert calls == [0.0, 0.0]  # 32 rows = 2 micro-batches of 16, both forwarded, both loss 0
    assert res.metrics[0]["train_samples"] == 0
    assert res.metrics[0]["skipped_images"] == {"zero_bytes": 32}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_validation_best_is_the_engines_exhaustive_best(world, seed):
    from geosurge_index.model.geo import GeoEmbeddings
    from geosurge_index.search import CellTree, SearchEngine

    cells = cells_mod.read_cells(world[0] / "cells")
    torch.manual_seed(seed)
    geo = GeoEmbeddings([len(lc) for lc in cells.levels], dim=12, init_std=1.0)
    with torch.no_grad():  # random temperatures, one per level
        geo.log_temperature.copy_(torch.log(torch.rand(cells.n_levels) * 0.3 + 0.03))
    emb = torch.nn.functional.normalize(torch.randn(37, 12), dim=-1)
    tables, temps = search_tables(geo)
    best = validation_best(emb, tables, temps, parent_tensors(cells, "cpu"))
    assert best.dtype == torch.int64 and best.shape == (37,)

    tree = CellTree.from_parents([lc.parent_index for lc in cells.levels], [lc.mean_lat for lc in cells.levels],
                                 [lc.mean_lon for lc in cells.levels], [[""] * len(lc) for lc in cells.levels])
    engine = SearchEngine(tree, [t.numpy() for t in tables], temps.double().numpy())
    ex = engine.search(emb.numpy(), top_k=1, exhaustive=True)
    np.testing.assert_array_equal(best.numpy(), ex.best_cells[:, -1])
    # ... which is the best product of per-level softmax probabilities along the path
    logp = [lp.detach() for lp in (torch.log_softmax(geo.logits(emb, lv), -1) for lv in range(cells.n_levels))]
    paths = tree.ancestors(np.arange(tree.sizes[-1]))
    brute = sum(logp[lv][:, paths[:, lv]] for lv in range(cells.n_levels))
    np.testing.assert_array_equal(best.numpy(), brute.argmax(1).numpy())


def test_parent_tensors_refuse_an_orphan(world):
    from geosurge_index.errors import FormatError

    cells = cells_mod.read_cells(world[0] / "cells")
    parents = parent_tensors(cells, "cpu")
    assert [len(p) for p in parents] == [len(lc) for lc in cells.levels] and (parents[0] == -1).all()
    cells.levels[2].parent_index[0] = -1
    with pytest.raises(FormatError, match="no parent"):
        parent_tensors(cells, "cpu")


def test_batches_are_a_function_of_seed_epoch_and_rank():
    a = epoch_batches(100, 8, seed=1, epoch=0)
    np.testing.assert_array_equal(np.concatenate(a), np.concatenate(epoch_batches(100, 8, seed=1, epoch=0)))
    assert not np.array_equal(np.concatenate(a), np.concatenate(epoch_batches(100, 8, seed=1, epoch=1)))
    r0, r1 = epoch_batches(100, 8, 1, 0, rank=0, world=2), epoch_batches(100, 8, 1, 0, rank=1, world=2)
    assert len(r0) == len(r1) == 6
    both = np.concatenate([np.concatenate([x, y]) for x, y in zip(r0, r1, strict=True)])
    np.testing.assert_array_equal(both, np.concatenate(epoch_batches(100, 16, 1, 0)))
    with pytest.raises(UserError):
        epoch_batches(10, 8, 1, 0, world=2)


def test_webdataset_shards_are_read_with_coordinates_and_class_maps(world, tmp_path):
    root, manifest = world
    rows = [r.split(",") for r in manifest.read_text().splitlines()[1:6]]
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, (path, lat, lon, _) in enumerate(rows):
            img = manifest.parent / path
            members = {f"{i:09d}.jpg": img.read_bytes(),
                       f"{i:09d}.classmap.png": img.with_name(img.stem + ".classmap.png").read_bytes()}
            meta = {"latitude": float(lat), "longitude": float(lon)} if i != 4 else {"caption": "no location"}
            members[f"{i:09d}.json"] = json.dumps(meta).encode()
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    cells = cells_mod.read_cells(root / "cells")
    split = read_split("train", str(tmp_path / "*.tar"), cells)
    assert len(split) == 4 and split.n_dropped_invalid == 1
    np.testing.assert_allclose(split.lat, [float(r[1]) for r in rows[:4]])
    np.testing.assert_array_equal(split.targets, cells_mod.assign_points(cells, split.lat, split.lon))
    rows_, batch = BatchDataset(split, [np.arange(4)], 64)[0]
    assert batch.ok.all() and batch.has_map.all() and batch.pixels.shape == (4, 64, 64, 3)


def test_recipes_parse_and_reject_mistakes(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    tiny = load_recipe(repo / "build" / "tiny.toml")
    assert tiny.model.image_size == 64 and tiny.data.synthetic is not None
    full = load_recipe(repo / "build" / "mp16.toml")
    assert full.model.backbone.pretrained == "openai/clip-vit-large-patch14-336"
    assert full.train.effective_batch == 1024 and full.train.lr == 1e-4 and full.train.patience == 4
    # the rest of the GeoSURGE paper's training set-up (arXiv 2510.01448; README.md)
    assert full.train.weight_decay == 1e-4 and full.train.lr_decay == 0.5 and full.train.precision == "auto"
    m = full.model
    assert m.segmenter.pretrained == "shi-labs/oneformer_ade20k_swin_large" and m.backbone.unfreeze_last_n == 0
    assert (m.fusion.enabled, m.fusion.blocks, m.fusion.query_dim, m.fusion.latent_dim) == (True, 3, 128, 64)
    assert m.embed_dim == 768 and m.init_temperature == 0.07 and m.image_size == 336
    bad = tmp_path / "bad.toml"
    bad.write_text('[modle]\npreset = "tiny"\n')
    with pytest.raises(UserError, match="unknown sections"):
        load_recipe(bad)
    bad.write_text('[model]\npreset = "tiny"\n[data]\ncells = "c"\ntrain = "t"\nclass_maps = "sometimes"\n')
    with pytest.raises(UserError, match="class_maps"):
        load_recipe(bad)
    bad.write_text('[model]\npreset = "huge"\n[data]\ncells = "c"\ntrain = "t"\n')
    with pytest.raises(UserError, match="preset"):
        load_recipe(bad)
    bad.write_text('[data]\ncells = "c"\ntrain = "t"\n[train]\npatience = 0\n')
    with pytest.raises(UserError, match="patience"):
        load_recipe(bad)
    bad.write_text('[data]\ncells = "c"\ntrain = "t"\n[train]\nnegatives = "some"\n')
    with pytest.raises(UserError, match="negatives"):
        load_recipe(bad)
    ok = tmp_path / "ok.toml"
    ok.write_text('[model]\npreset = "tiny"\n[model.fusion]\nreadout = "cls"\n[data]\ncells = "c"\ntrain = "t"\n'
                  '[train]\nnegatives = "in_batch"\n')
    r = load_recipe(ok)
    assert r.train.negatives == "in_batch" and r.model.fusion.readout == "cls"
    assert full.train.negatives == "all"  # the default: a softmax over all cells of each level


def test_in_batch_negatives_train_and_validate(world, tmp_path):
    r = recipe(world, epochs=1, negatives="in_batch")
    res = Trainer(r, tmp_path / "run", progress=False, log=lambda m: None).run()
    m = res.metrics[0]
    assert math.isfinite(m["train_loss"]) and math.isfinite(m["val_loss"]) and m["train_samples"] == 64


def test_cli_trains_a_self_contained_synthetic_recipe(tmp_path, monkeypatch):
    from geosurge_index.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.toml").write_text(
        'out = "runs/x"\n[model]\npreset = "tiny"\n'
        '[data.synthetic]\ndir = "data"\ntrain = 48\nval = 8\ntau_min = 1\ntau_max = [30, 15, 8, 4, 3, 2, 2]\n'
        '[train]\nepochs = 1\nbatch_size = 16\neffective_batch = 16\nworkers = 0\nthreads = 1\n')
    assert main(["train", "r.toml", "--no-progress"]) == 0
    assert (tmp_path / "runs" / "x" / "epoch-0001" / "model.safetensors").is_file()
    assert (tmp_path / "data" / "cells" / "cells.parquet").is_file()
    assert main(["train", "r.toml", "--no-progress"]) == 2  # used run dir without --resume: a clean error


def test_fp16_trains_with_a_gradient_scaler_and_resumes_it(world, tmp_path):
    """fp16 (the CUDA fallback where a GPU has no native bf16) on CPU autocast: loss scaling on,
    its state saved with the checkpoint and restored on resume; bf16 and fp32 runs have none."""
    t = Trainer(recipe(world, epochs=1, precision="fp16", max_steps_per_epoch=2, effective_batch=16),
                tmp_path / "h", progress=False)
    res = t.run()
    assert t.amp_dtype == torch.float16 and t.scaler.is_enabled()
    assert np.isfinite(res.metrics[0]["train_loss"]) and t.state["global_step"] == 2
    saved = json.loads((tmp_path / "h" / "epoch-0001" / "train_state.json").read_text())["grad_scaler"]
    assert saved["scale"] == t.scaler.get_scale()
    assert saved["_growth_tracker"] == t.scaler.state_dict()["_growth_tracker"]
    # each step either grew the tracker or overflowed in fp16 (the step skipped, the scale halved, the
    # tracker reset: the first step of the tiny model with fusion.token_norm does), so from the initial
    # 2**16 two steps end at (2**16, 2), (2**15, 1) or (2**15, 0)
    overflows = round(math.log2(65536.0 / saved["scale"]))
    assert overflows < 2 and saved["_growth_tracker"] <= 2 - overflows
    again = Trainer(recipe(world, epochs=2, precision="fp16", max_steps_per_epoch=2, effective_batch=16),
                    tmp_path / "h", resume=True, progress=False)
    again.run()
    resumed = again.scaler.state_dict()  # continued from the saved state (two more steps), not reset
    assert (resumed["scale"], resumed["_growth_tracker"]) == (saved["scale"], saved["_growth_tracker"] + 2)
    fp32 = Trainer(recipe(world, epochs=1, max_steps_per_epoch=1), tmp_path / "f", progress=False)
    fp32.run()
    assert fp32.amp_dtype is None and not fp32.scaler.is_enabled()
    assert "grad_scaler" not in json.loads((tmp_path / "f" / "epoch-0001" / "train_state.json").read_text())


def test_recipe_precision_names(tmp_path):
    p = tmp_path / "r.toml"
    body = '[data]\ncells = "c"\ntrain = "t.csv"\n[train]\nprecision = "{}"\n'
    p.write_text(body.format("fp16"))
    assert load_recipe(p).train.precision == "fp16"
    p.write_text(body.format("half"))
    with pytest.raises(UserError, match="auto, bf16, fp16 or fp32"):
        load_recipe(p)


def test_a_calibration_split_is_kept_aside_and_written_as_a_manifest(world, tmp_path):
    """`[data] calibration_fraction`: those photos are neither trained nor validated on, and
    RUN_DIR/calibration.csv lists them (id, path, lat, lon) for `geosurge calibrate`."""
    import csv

    root, manifest = world
    r = Recipe(tiny_config(), DataSettings(cells=str(root / "cells"), train=str(manifest), val_fraction=0.1,
                                           calibration_fraction=0.25),
               TrainSettings(epochs=1, batch_size=8, effective_batch=8, seed=5, workers=0), source="test")
    trainer = Trainer(r, tmp_path / "run", progress=False)
    trainer.run()
    rows = list(csv.DictReader(open(tmp_path / "run" / "calibration.csv")))
    held = {row["id"] for row in rows}
    assert len(rows) == len(trainer.calibration_split) == round(0.25 * (64 - round(0.1 * 64)))
    seen = set(trainer.train_split.table.column("id").to_pylist()) | set(trainer.val_split.table.column("id").to_pylist())
    assert not held & seen and all(Path(row["path"]).is_file() for row in rows)
    state = json.loads((tmp_path / "run" / "epoch-0001" / "train_state.json").read_text())
    assert state["calibration_fraction"] == 0.25
