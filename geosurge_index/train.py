"""The training loop: recipe -> RUN_DIR with one checkpoint per epoch and a metrics log.

One process, or many under `torchrun` (DistributedDataParallel; NCCL on GPUs, gloo on CPUs).
AdamW, gradient accumulation up to the effective batch, lr x `lr_decay` per epoch, early
stopping on validation loss, autocast on CUDA (`devices.autocast_dtype`: bf16 where the GPU has it
natively, else fp16 with a gradient scaler) and fp32 on CPU (where bf16 is ~5x slower).

Resuming is exact: the batch order of an epoch is a function of (seed, epoch, rank, world size),
and a checkpoint holds the optimizer, scheduler, RNG states and the position in the epoch.

RUN_DIR layout: `epoch-NNNN/` checkpoints (ARCHITECTURE.md), `partial/` (a mid-epoch checkpoint
when `checkpoint_every_steps` is set), `metrics.jsonl` (one JSON object per epoch),
`run.json` (best and last checkpoint), `recipe.toml` (a copy of the recipe).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
import tomllib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geosurge_index.errors import FormatError, UserError
from geosurge_index.model.config import PRESETS, ModelConfig

TRAIN_STATE_FORMAT = "geosurge-train-state"
TRAIN_STATE_VERSION = 1
TRAIN_RUN_FORMAT = "geosurge-run"  # RUN_DIR/run.json (pred_store.RUN_FORMAT: PRED_DIR)


# ---------------------------------------------------------------------------------------------
# Recipe
# ---------------------------------------------------------------------------------------------


@dataclass
class SyntheticData:
    """Generate a procedural demo world (`demo_world`) and partition it: a self-contained recipe."""

    dir: str = "runs/tiny-data"
    train: int = 2000
    val: int = 200
    seed: int = 0
    tau_min: int = 5
    tau_max: list[int] = field(default_factory=lambda: [400, 200, 100, 60, 40, 25, 15])


@dataclass
class DataSettings:
    cells: str = ""  # CELLS_DIR from `geosurge partition` (of the training coordinates)
    train: str | list[str] = ""  # manifest(s) (CSV/Parquet: path, lat, lon) or .tar shards / globs / folders
    val: str | list[str] | None = None  # same forms; None: hold out `val_fraction` of train
    val_fraction: float = 0.02
    # held out of train (after val) for `geosurge calibrate`: written to RUN_DIR/calibration.csv (0: none)
    calibration_fraction: float = 0.05
    path_column: str = "path"
    class_maps: str = "auto"  # auto: precomputed where present, segmenter otherwise | precomputed | segmenter
    draft: bool = True  # JPEG DCT-scaled decoding (2-6x faster, <2 grey levels off)
    synthetic: SyntheticData | None = None


@dataclass
class TrainSettings:
    epochs: int = 10
    batch_size: int = 64  # per process, per micro-batch
    effective_batch: int = 1024  # accumulated over micro-batches and processes
    lr: float = 1e-4
    weight_decay: float = 1e-4
    lr_decay: float = 0.5  # lr multiplied by this after every epoch
    patience: int = 4  # stop after this many epochs without a better validation loss
    seed: int = 0
    precision: str = "auto"  # auto (CUDA: bf16 where native, else fp16; CPU: fp32) | bf16 | fp16 | fp32
    workers: int = 4  # DataLoader decoding processes (0: decode in the main process)
    eval_batch_size: int = 0  # 0: batch_size
    device: str = "auto"
    threads: int = 0  # torch CPU threads per process (0: torch's default; 1 avoids OpenMP spin on a busy host)
    max_steps_per_epoch: int = 0  # 0: the whole split (a smoke-test cap otherwise)
    checkpoint_every_steps: int = 0  # also write RUN_DIR/partial every N optimizer steps (0: off)
    keep_checkpoints: int = 0  # keep only the last N epoch checkpoints besides the best (0: all)
    # the loss's negatives (model/loss.py): "all" cells of each level (a softmax over the level, as at
    # inference) or "in_batch" (InfoNCE over the distinct cells of the batch). Validation always
    # scores as inference does (all cells).
    negatives: str = "all"


@dataclass
class Recipe:
    model: ModelConfig
    data: DataSettings
    train: TrainSettings
    out: str = "runs/geosurge"
    source: str = ""


def _build(cls, d: dict, where: str):
    try:
        return cls(**d)
    except TypeError as err:
        raise UserError(f"recipe [{where}]: {err}") from err


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def model_config_from(d: dict) -> ModelConfig:
    """[model] of a recipe: `preset` (full | tiny) then any field overridden."""
    d = dict(d)
    preset = d.pop("preset", "full")
    if preset not in PRESETS:
        raise UserError(f"recipe [model] preset = {preset!r}: choose one of {', '.join(PRESETS)}")
    return ModelConfig.from_dict(_merge(PRESETS[preset]().to_dict(), d)).validate()


def load_recipe(path: str | os.PathLike) -> Recipe:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as err:
        raise UserError(f"recipe {path} does not exist") from err
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise UserError(f"recipe {path} is not valid TOML: {err}") from err
    unknown = set(raw) - {"model", "data", "train", "out"}
    if unknown:
        raise UserError(f"recipe {path}: unknown sections {sorted(unknown)} (known: model, data, train, out)")
    data = dict(raw.get("data", {}))
    synth = data.pop("synthetic", None)
    data = _build(DataSettings, data, "data")
    if synth is not None:
        data.synthetic = _build(SyntheticData, synth, "data.synthetic")
    if data.class_maps not in ("auto", "precomputed", "segmenter"):
        raise UserError(f"recipe [data] class_maps = {data.class_maps!r}: auto, precomputed or segmenter")
    train = _build(TrainSettings, raw.get("train", {}), "train")
    from geosurge_index.model.loss import NEGATIVES

    if train.negatives not in NEGATIVES:
        raise UserError(f"recipe [train] negatives = {train.negatives!r}: choose one of {', '.join(NEGATIVES)}")
    if train.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise UserError(f"recipe [train] precision = {train.precision!r}: auto, bf16, fp16 or fp32")
    if train.batch_size < 1 or train.effective_batch < 1 or train.epochs < 1 or train.patience < 1:
        raise UserError("recipe [train]: batch_size, effective_batch, epochs and patience must be positive")
    if not train.lr_decay > 0:
        raise UserError(f"recipe [train] lr_decay = {train.lr_decay}: the lr is multiplied by it every epoch, "
                        "so it must be positive (1 = no decay)")
    if data.synthetic is None and not (data.cells and data.train):
        raise UserError(f"recipe {path}: [data] needs `cells` (a CELLS_DIR) and `train` (manifests or shards)")
    return Recipe(model_config_from(raw.get("model", {})), data, train, str(raw.get("out", "runs/geosurge")), str(path))


def prepare_synthetic(data: DataSettings, progress: bool = True) -> DataSettings:
    """Render the demo world's train/val photos and partition the train locations (once; reused)."""
    from geosurge_index import cells as cells_mod
    from geosurge_index.demo_world import WorldConfig, existing_split, generate_split

    s = data.synthetic
    root = Path(s.dir)
    cfg = WorldConfig()
    splits = {}
    for name, n, seed in (("train", s.train, s.seed), ("val", s.val, s.seed + 1)):
        d = root / name
        splits[name] = existing_split(d, n, seed, cfg, prefix=name) or generate_split(
            d, n, seed, cfg, prefix=name, progress=progress)
    cells_dir = root / "cells"
    settings = cells_mod.PartitionSettings(tau_min=s.tau_min, tau_max=tuple(s.tau_max))
    if not (cells_dir / cells_mod.META_FILE).is_file():
        from geosurge_index.coords import read_coordinates

        coords = read_coordinates(splits["train"].manifest)
        part = cells_mod.partition(coords.lat, coords.lon, settings, source=str(splits["train"].manifest))
        cells_mod.write_cells_dir(cells_dir, part.cells, part.assignments, coords.rows)
    return DataSettings(**{**asdict(data), "synthetic": s, "cells": str(cells_dir),
                           "train": str(splits["train"].manifest), "val": str(splits["val"].manifest)})


# ---------------------------------------------------------------------------------------------
# Distributed set-up
# ---------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device) -> Dist:
    """Reads torchrun's environment; one process when WORLD_SIZE is unset or 1. `device`: this
    process's torch.device (already current: `setup_process`), or the old 'cuda' / 'cpu' kind.
    NCCL gets `device_id`, so that the process group binds to this process's GPU at once (no
    guessing from the current device, no stray context on GPU 0)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch
    import torch.distributed as tdist

    if not tdist.is_initialized():
        dev = torch.device(device)
        if dev.type == "cuda":
            kwargs = {"device_id": dev} if dev.index is not None else {}
            tdist.init_process_group(backend="nccl", **kwargs)
        else:
            tdist.init_process_group(backend="gloo")
    return Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def setup_process(device_name: str):
    """-> (Dist, torch.device): this process's device (under torchrun 'cuda' / 'auto' is
    cuda:LOCAL_RANK and an explicit cuda:N is refused), made current with `set_device` BEFORE the
    process group starts, which then gets it as `device_id`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0
    device = resolve_device(device_name, local_rank)  # set_device on CUDA
    return init_distributed(device), device


def resolve_device(name: str, dist_local_rank: int):
    """`devices.resolve_device` with 'cuda' -> cuda:{dist_local_rank}, made this process's GPU."""
    import torch

    from geosurge_index.devices import resolve_device as resolve

    device = resolve(name, local_rank=dist_local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _barrier(dist: Dist) -> None:
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()


# ---------------------------------------------------------------------------------------------
# Train state (what --resume needs), as safetensors + JSON
# ---------------------------------------------------------------------------------------------


def pack_train_state(optimizer, scheduler, state: dict) -> tuple[dict, dict]:
    import torch

    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {
        "format": TRAIN_STATE_FORMAT,
        "format_version": TRAIN_STATE_VERSION,
        **state,
        "optimizer_param_groups": opt["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict(),
        "rng_numpy": _jsonable(np.random.get_state()),
        "rng_python": _jsonable(random.getstate()),
    }
    return tensors, meta


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return {"__ndarray__": x.tolist(), "dtype": str(x.dtype)}
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x


def _from_json(x):
    if isinstance(x, dict) and "__ndarray__" in x:
        return np.asarray(x["__ndarray__"], dtype=x["dtype"])
    if isinstance(x, list):
        return tuple(_from_json(v) for v in x)
    return x


def unpack_train_state(ckpt_dir: Path, optimizer, scheduler) -> dict:
    import torch

    from geosurge_index.formats import read_json
    from geosurge_index.model.checkpoint import read_safetensors

    meta = read_json(ckpt_dir / "train_state.json", TRAIN_STATE_FORMAT, TRAIN_STATE_VERSION)
    tensors = read_safetensors(ckpt_dir / "train_state.safetensors")
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, d in meta["optimizer_scalars"].items():
        state.setdefault(int(pid), {}).update(d)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_param_groups"]})
        scheduler.load_state_dict(meta["scheduler"])
    except (ValueError, KeyError, RuntimeError) as err:
        raise FormatError(f"{ckpt_dir}/train_state.*: does not match this model's parameters ({err})") from err
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    np.random.set_state(_from_json(meta["rng_numpy"]))
    py = meta["rng_python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    return meta


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the most optimizer steps among epoch-* and partial/."""
    best, best_step = None, -1
    for d in sorted(run_dir.glob("epoch-[0-9][0-9][0-9][0-9]")) + [run_dir / "partial"]:
        f = d / "train_state.json"
        if not f.is_file():
            continue
        try:
            step = int(json.loads(f.read_text())["global_step"])
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
            raise FormatError(f"{f} is unreadable ({err}); remove that checkpoint to resume from an earlier one") from err
        if step > best_step:
            best, best_step = d, step
    return best


# ---------------------------------------------------------------------------------------------
# Evaluation helpers
# ---------------------------------------------------------------------------------------------


def parent_tensors(cells, device) -> list:
    """Per level, the int64 parent cell_index of its cells on `device` (level 1: all -1), as the
    exhaustive search (`search.exhaustive_topk`) takes them."""
    import torch

    out = []
    for li, lc in enumerate(cells.levels):
        parent = np.asarray(lc.parent_index, dtype=np.int64)
        if li and (parent < 0).any():
            raise FormatError("cells table: a cell below level 1 has no parent")
        out.append(torch.as_tensor(parent, device=device))
    return out


def search_tables(geo) -> tuple[list, Any]:
    """The geo embeddings as the engine scores them: L2-normalised float32 tables and the
    temperatures, detached (no autograd), on the training device."""
    import torch
    import torch.nn.functional as F

    if getattr(geo, "is_classifier", False):  # the ablation head is not scored by the engine
        return [], None
    with torch.no_grad():
        tables = [F.normalize(t.detach().float(), dim=-1) for t in geo.tables]
        return tables, geo.temperatures.detach().float()


def validation_best(emb, tables: list, temperatures, parents: list) -> Any:
    """(B,) int64 best finest cell per row by the product of per-level probabilities along its
    path, over every finest cell: the search engine's exhaustive mode (`search.exhaustive_topk`)
    on the training device. `tables`, `temperatures`: from `search_tables`; `parents`: from
    `parent_tensors`."""
    import torch
    import torch.nn.functional as F

    from geosurge_index.search import exhaustive_topk

    with torch.inference_mode(), torch.autocast(emb.device.type, enabled=False):
        q = F.normalize(emb.detach().float(), dim=-1)
        cells, _ = exhaustive_topk(q, tables, temperatures, parents, top_k=1)
    return cells[:, 0]


def normalise_pixels(pixels, device):
    """uint8 (B, S, S, 3) -> CLIP-normalised float (B, 3, S, S) on `device` (`geometry.clip_normalise`)."""
    from geosurge_index.geometry import clip_normalise

    return clip_normalise(pixels, device, non_blocking=True)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    epochs_run: int
    best_epoch: int | None
    best_val_loss: float
    last_checkpoint: Path | None
    stopped_early: bool
    metrics: list[dict] = field(default_factory=list)


class Trainer:
    def __init__(self, recipe: Recipe, run_dir: str | os.PathLike | None = None, *, resume: bool = False,
                 progress: bool = True, log=None):
        self.recipe = recipe
        self.run_dir = Path(run_dir or recipe.out)
        self.resume = resume
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    # -- set-up ------------------------------------------------------------------------------
    def _setup(self):
        import torch

        from geosurge_index.cells import read_cells
        from geosurge_index.devices import autocast_dtype
        from geosurge_index.locate.job import available_cores
        from geosurge_index.model.checkpoint import load_stored_state, read_checkpoint_meta, read_safetensors
        from geosurge_index.model.geosurge import GeoSurgeModel
        from geosurge_index.train_data import holdout, read_split

        r, ts = self.recipe, self.recipe.train
        self.dist, self.device = setup_process(ts.device)
        if ts.threads:
            torch.set_num_threads(ts.threads)
        elif self.device.type == "cpu" and self.dist.world > 1:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.dist.world))
            torch.set_num_threads(max(1, available_cores() // local))
        self.amp_dtype = autocast_dtype(self.device, ts.precision)  # None: fp32
        self.amp = self.amp_dtype is not None
        # fp16 gradients underflow without loss scaling; bf16 and fp32 need none (scaler disabled)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        ckpt_dir = None
        if self.resume:
            if not self.run_dir.is_dir():
                raise UserError(f"--resume: run directory {self.run_dir} does not exist")
            ckpt_dir = find_resume_checkpoint(self.run_dir)
            if ckpt_dir is None:
                raise UserError(f"--resume: no checkpoint with a train state in {self.run_dir}")
        elif self.run_dir.exists() and (any(self.run_dir.glob("epoch-[0-9]*")) or (self.run_dir / "partial").exists()):
            raise UserError(f"{self.run_dir} already holds checkpoints: pass --resume, or choose another --out")

        data = r.data
        if data.synthetic is not None:
            if self.dist.main:
                data = prepare_synthetic(data, progress=self.progress)
            _barrier(self.dist)
            if not self.dist.main:
                data = prepare_synthetic(data, progress=False)  # finds the rendered files
        self.data = data

        if ckpt_dir is not None:  # the checkpoint's config and partition win over the recipe's
            meta = read_checkpoint_meta(ckpt_dir)
            self.config = meta.config
            self.cells = read_cells(ckpt_dir)
            self.cells_dir = ckpt_dir
        else:
            self.config = r.model
            self.cells = read_cells(data.cells)
            self.cells_dir = Path(data.cells)
        sizes = [len(lc) for lc in self.cells.levels]
        if min(sizes) < 1:
            raise UserError(f"partition {self.cells_dir}: a level has no cells ({sizes}); lower tau_min")

        torch.manual_seed(ts.seed)
        np.random.seed(ts.seed)
        random.seed(ts.seed)
        self.model = GeoSurgeModel(self.config, sizes).to(self.device)
        self.model.negatives = ts.negatives
        if ckpt_dir is not None:
            excluded = ["encoder." + p for p in self.model.encoder.excluded_state_prefixes()]
            load_stored_state(self.model, read_safetensors(ckpt_dir / "model.safetensors", str(self.device)),
                              excluded, ckpt_dir / "model.safetensors")

        self.train_split = read_split("train", data.train, self.cells, path_column=data.path_column, drop_no_cell=True)
        if data.val:
            self.val_split = read_split("val", data.val, self.cells, path_column=data.path_column)
        else:
            self.train_split, self.val_split = holdout(self.train_split, data.val_fraction, ts.seed)
        self.calibration_split = None
        frac = calibration_fraction(data, ckpt_dir)
        if frac > 0:  # photos the model never trains on, for `geosurge calibrate`
            self.train_split, self.calibration_split = holdout(self.train_split, frac, ts.seed + 1)
        self.state_extra = {"calibration_fraction": frac}
        self.parents = parent_tensors(self.cells, self.device)
        finest = self.cells.levels[-1]
        self.finest_latlon = np.stack([finest.mean_lat, finest.mean_lon], axis=1)

        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if name.endswith("log_temperature") else decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": ts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=ts.lr)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=ts.lr_decay)
        self.ddp = self.model
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.accum = max(1, ts.effective_batch // (ts.batch_size * self.dist.world))
        per_step = ts.batch_size * self.dist.world * self.accum
        if len(self.train_split) < per_step:  # an epoch would take no optimizer step and learn nothing
            raise UserError(f"the training split has {len(self.train_split)} samples, fewer than one optimizer "
                            f"step of {per_step} (batch_size {ts.batch_size} x {self.dist.world} processes x "
                            f"{self.accum} accumulation): lower [train] effective_batch")

        self.state = {"epoch": 0, "batch_in_epoch": 0, "global_step": 0, "best_val_loss": math.inf,
                      "best_epoch": None, "bad_epochs": 0}
        # what this run's batch order depends on: saved with every checkpoint, always this run's values
        order = {"world_size": self.dist.world, "seed": ts.seed, "batch_size": ts.batch_size}
        if ckpt_dir is not None:
            meta = unpack_train_state(ckpt_dir, self.optimizer, self.scheduler)
            for k in self.state:
                if k in meta:
                    self.state[k] = meta[k]
            if self.scaler.is_enabled() and meta.get("grad_scaler"):
                self.scaler.load_state_dict(meta["grad_scaler"])
            if self.state["best_val_loss"] is None:
                self.state["best_val_loss"] = math.inf
            changed = [f"{k} {meta[k]} -> {v}" for k, v in order.items() if k in meta and meta[k] != v]
            if self.state["batch_in_epoch"] and changed:
                raise UserError(f"{ckpt_dir} stopped mid-epoch; its batch order depends on the number of "
                                f"processes, [train] seed and batch_size, which changed ({', '.join(changed)}): "
                                "resume with the same values")
            self.log(f"resuming from {ckpt_dir} (epoch {self.state['epoch'] + 1}, "
                     f"batch {self.state['batch_in_epoch']}, step {self.state['global_step']})")
        self.state.update(order)
        self.skipped: Counter = Counter()

    # -- helpers -----------------------------------------------------------------------------
    def _loader(self, split, batches):
        import torch

        from geosurge_index.train_data import BatchDataset

        ds = BatchDataset(split, batches, self.config.image_size, draft=self.data.draft)
        w, prefetch = self._loader_size()
        # pinning happens on the current device, which `resolve_device` made this process's GPU
        return torch.utils.data.DataLoader(
            ds, batch_size=None, shuffle=False, num_workers=w, pin_memory=self.device.type == "cuda",
            prefetch_factor=prefetch, worker_init_fn=_worker_init if w else None)

    def _loader_size(self) -> tuple[int, int | None]:
        """Workers and prefetch fitted to free /dev/shm (`locate.job.plan_loader`), said once."""
        if getattr(self, "_loader_plan", None) is None:
            from geosurge_index.locate.job import batch_bytes, plan_loader, shm_free_bytes

            ts = self.recipe.train
            size = batch_bytes(max(ts.batch_size, ts.eval_batch_size or 0), self.config.image_size)
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.dist.world))
            free = shm_free_bytes()
            # the processes of this machine share /dev/shm: each may take its part
            self._loader_plan = plan_loader(self.device.type == "cuda", size, ts.workers,
                                            shm_free=None if free is None else free // max(1, local),
                                            what="training data")
            if self.dist.main:
                self.log(self._loader_plan.line)
        return self._loader_plan.workers, self._loader_plan.prefetch

    def _inputs(self, split, rows, batch):
        """DecodedBatch -> (pixels, class_map | None, targets, rows kept), counting skipped images."""
        import torch

        for err in batch.errors:
            if err is not None:
                self.skipped[err.split(":", 1)[0]] += 1
        ok_rows = np.asarray(rows)[batch.ok]
        cm = None
        keep = np.ones(len(ok_rows), dtype=bool)
        if self.config.fusion.enabled:
            mode = self.data.class_maps
            if mode == "auto" and self.model.encoder.segmenter is None:
                mode = "precomputed"  # no segmenter to fill the gaps: images without a map are skipped
            if mode == "precomputed":
                keep = batch.has_map.copy()
                self.skipped["missing_class_map"] += int((~keep).sum())
            if mode != "segmenter" and keep.any():
                cm = torch.as_tensor(batch.class_maps).to(self.device).long()
                if mode == "auto" and not batch.has_map.all():
                    # fill the maps that were not precomputed with the segmenter's
                    need = torch.as_tensor(~batch.has_map, device=self.device)
                    px = normalise_pixels(batch.pixels, self.device)
                    with torch.no_grad(), self._autocast():
                        cm[need] = self.model.encoder.segment(px[need])
        x = normalise_pixels(batch.pixels, self.device) if len(ok_rows) else None
        if not keep.all():
            sel = torch.as_tensor(np.flatnonzero(keep), device=self.device)
            x = x.index_select(0, sel)
            cm = cm.index_select(0, sel) if cm is not None else None
            ok_rows = ok_rows[keep]
        targets = torch.as_tensor(split.targets[ok_rows], device=self.device).long()
        return x, cm, targets, ok_rows

    def _placeholder_inputs(self):
        """One black image (and an all-background class map) whose targets are -1 at every level."""
        import torch

        s = self.config.image_size
        x = torch.zeros(1, 3, s, s, device=self.device)
        cm = torch.zeros(1, s, s, dtype=torch.long, device=self.device) if self.config.fusion.enabled else None
        return x, cm, torch.full((1, self.cells.n_levels), -1, dtype=torch.long, device=self.device)

    def _autocast(self):
        import torch

        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp)

    def _save(self, name: str, epoch_done: int, metrics: dict | None = None) -> Path | None:
        from geosurge_index.model.checkpoint import save_checkpoint

        path = None
        if self.dist.main:
            extra = {"recipe": self.recipe.source, "global_step": self.state["global_step"]}
            if metrics is not None:
                extra["metrics"] = metrics
            state = {**self.state, **getattr(self, "state_extra", {})}
            if self.scaler.is_enabled():
                state["grad_scaler"] = self.scaler.state_dict()
            path = save_checkpoint(self.run_dir / name, self.model, epoch=epoch_done, cells_dir=self.cells_dir,
                                   extra=extra, train_state=pack_train_state(self.optimizer, self.scheduler, state))
        _barrier(self.dist)
        return path or self.run_dir / name

    # -- train / validate --------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> dict:

        from geosurge_index.progress import bar
        from geosurge_index.train_data import epoch_batches

        ts = self.recipe.train
        batches = epoch_batches(len(self.train_split), ts.batch_size, ts.seed, epoch, self.dist.rank, self.dist.world)
        if ts.max_steps_per_epoch:
            batches = batches[: ts.max_steps_per_epoch * self.accum]
        n_micro = (len(batches) // self.accum) * self.accum  # whole optimizer steps only
        batches = batches[:n_micro]
        start = self.state["batch_in_epoch"]
        levels = self.cells.n_levels
        sums = {"loss": 0.0, "n": 0, "level_loss": np.zeros(levels), "correct": np.zeros(levels), "valid": np.zeros(levels)}
        t0, seen = time.time(), 0
        self.ddp.train()
        pb = bar(total=len(batches) * ts.batch_size * self.dist.world, desc=f"epoch {epoch + 1}", unit="img",
                 initial=start * ts.batch_size * self.dist.world) if self.progress and self.dist.main else None
        for i, (rows, batch) in enumerate(self._loader(self.train_split, batches[start:]), start=start):
            x, cm, targets, _ = self._inputs(self.train_split, rows, batch)
            last = (i + 1) % self.accum == 0
            sync = self.ddp.no_sync() if (self.dist.world > 1 and not last) else contextlib.nullcontext()
            real = x is not None and len(x) > 0
            if not real:
                # Nothing decodable. Still a forward through DDP (a backward without one skips DDP's
                # all-reduce on this process only and desynchronises the others): one placeholder
                # sample with no cell at any level, whose loss and gradients are exactly 0.
                x, cm, targets = self._placeholder_inputs()
            with sync:
                with self._autocast():
                    loss, per_level, correct, _ = self.ddp(x, cm, targets)
                if real:
                    n = len(targets)
                    sums["loss"] += float(loss.detach()) * n
                    sums["n"] += n
                    valid = (targets >= 0).sum(0).cpu().numpy()
                    sums["level_loss"] += per_level.float().cpu().numpy() * valid
                    sums["correct"] += correct.cpu().numpy()
                    sums["valid"] += valid
                self.scaler.scale(loss / self.accum).backward()
            if last:
                self.scaler.step(self.optimizer)  # optimizer.step(), skipped on inf/nan fp16 gradients
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.state["global_step"] += 1
                self.state["batch_in_epoch"] = i + 1
                if ts.checkpoint_every_steps and self.state["global_step"] % ts.checkpoint_every_steps == 0 \
                        and i + 1 < len(batches):
                    self._save("partial", epoch)
            seen += len(rows) * self.dist.world
            if pb is not None:
                pb.update(len(rows) * self.dist.world)
                if sums["n"]:
                    pb.set_postfix(loss=f"{sums['loss'] / sums['n']:.3f}", refresh=False)
        if pb is not None:
            pb.close()
        dt = max(time.time() - t0, 1e-9)
        totals = self._reduce(np.concatenate([[sums["loss"], sums["n"]], sums["level_loss"], sums["correct"], sums["valid"]]))
        n = max(totals[1], 1)
        lv = totals[2: 2 + levels]
        corr = totals[2 + levels: 2 + 2 * levels]
        valid = np.maximum(totals[2 + 2 * levels:], 1)
        return {"train_loss": totals[0] / n, "train_samples": int(totals[1]),
                "train_loss_per_level": (lv / valid).round(4).tolist(),
                "train_acc_per_level": (100 * corr / valid).round(2).tolist(),
                "samples_per_s": round(seen / dt, 2), "train_seconds": round(dt, 1)}

    def _reduce(self, arr: np.ndarray) -> np.ndarray:
        if self.dist.world == 1:
            return arr
        import torch
        import torch.distributed as tdist

        t = torch.as_tensor(arr, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return t.cpu().numpy()

    def _reduce_counter(self, counts: Counter) -> dict[str, int]:
        if self.dist.world > 1:
            import torch.distributed as tdist

            parts: list = [None] * self.dist.world
            tdist.all_gather_object(parts, dict(counts))
            counts = sum((Counter(p) for p in parts), Counter())
        return {k: int(v) for k, v in sorted(counts.items())}

    def _gather(self, arr: np.ndarray) -> np.ndarray:
        if self.dist.world == 1:
            return arr
        import torch.distributed as tdist

        out: list = [None] * self.dist.world
        tdist.all_gather_object(out, arr)
        return np.concatenate(out)

    def validate(self) -> dict:
        import torch

        from geosurge_index.metrics import THRESHOLDS_KM, accuracy_at, haversine_km
        from geosurge_index.train_data import eval_batches

        ts = self.recipe.train
        split = self.val_split
        levels = self.cells.n_levels
        batches = eval_batches(len(split), ts.eval_batch_size or ts.batch_size, self.dist.rank, self.dist.world)
        self.model.eval()
        loss_sum = np.zeros(levels)
        valid_sum = np.zeros(levels)
        correct_sum = np.zeros(levels)
        rows_all, pred_all = [], []
        tables, temperatures = search_tables(self.model.geo)  # scored as the exported index is
        with torch.no_grad():
            for rows, batch in self._loader(split, batches):
                x, cm, targets, ok_rows = self._inputs(split, rows, batch)
                if x is None or not len(x):
                    continue
                with self._autocast():
                    emb = self.model.encoder(x, cm)
                from geosurge_index.model.loss import hierarchical_info_nce

                _, per_level, correct = hierarchical_info_nce(emb.float(), self.model.geo, targets)
                valid = (targets >= 0).sum(0).cpu().numpy()
                loss_sum += per_level.cpu().numpy() * valid
                valid_sum += valid
                correct_sum += correct.cpu().numpy()
                if getattr(self.model.geo, "is_classifier", False):  # the ablation head: its own argmax
                    best = self.model.geo.logits(emb, 0).argmax(-1)
                else:
                    best = validation_best(emb, tables, temperatures, self.parents)
                rows_all.append(ok_rows)
                pred_all.append(best.cpu().numpy())
        totals = self._reduce(np.concatenate([loss_sum, valid_sum, correct_sum]))
        loss_l, valid_l, corr_l = totals[:levels], np.maximum(totals[levels: 2 * levels], 1), totals[2 * levels:]
        rows = self._gather(np.concatenate(rows_all) if rows_all else np.zeros(0, np.int64))
        pred = self._gather(np.concatenate(pred_all) if pred_all else np.zeros(0, np.int64))
        plat, plon = self.finest_latlon[pred, 0], self.finest_latlon[pred, 1]
        dist_km = haversine_km(plat, plon, split.lat[rows], split.lon[rows])
        # an image that could not be read counts as a miss: the denominator is the whole split
        d_all = np.full(len(split), np.inf)
        d_all[rows] = dist_km
        acc = accuracy_at(d_all, THRESHOLDS_KM)
        per_level = loss_l / valid_l
        return {"val_loss": float(per_level.sum()), "val_samples": len(split), "val_evaluated": int(len(rows)),
                "val_loss_per_level": per_level.round(4).tolist(),
                "val_acc_per_level": (100 * corr_l / valid_l).round(2).tolist(),
                "val_within_km": {f"{k:g}": round(v, 2) for k, v in acc.items()},
                "val_median_km": float(np.median(d_all)) if len(d_all) else math.nan}

    # -- main --------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        self._setup()
        ts = self.recipe.train
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.recipe.source and Path(self.recipe.source).is_file() and not (self.run_dir / "recipe.toml").exists():
                shutil.copy2(self.recipe.source, self.run_dir / "recipe.toml")
            from geosurge_index.devices import dtype_name
            from geosurge_index.model.geosurge import parameter_report

            total = parameter_report(self.model)[-1]
            self.log(f"train {len(self.train_split)} / val {len(self.val_split)} samples "
                     f"(dropped: {self.train_split.n_dropped_invalid} bad coordinates, "
                     f"{self.train_split.n_dropped_no_cell} outside every cell); {self.dist.world} process(es) "
                     f"on {self.device}, {dtype_name(self.amp_dtype)}; micro-batch {ts.batch_size} x "
                     f"{self.accum} accumulation x {self.dist.world} = {ts.batch_size * self.accum * self.dist.world}; "
                     f"parameters {total[2]:,} trainable / {total[1]:,} total")
        if self.dist.main and self.calibration_split is not None:
            path = write_calibration_manifest(self.calibration_split, self.run_dir)
            self.log(f"{len(self.calibration_split)} photos held out for calibration: {path} "
                     f"(after export: geosurge calibrate INDEX_DIR --truth {path})")
        metrics_all: list[dict] = []
        last_ckpt, stopped = None, False
        epoch = self.state["epoch"]
        while epoch < ts.epochs:
            if self.state["bad_epochs"] >= ts.patience:
                stopped = True
                break
            t0 = time.time()
            self.skipped = Counter()
            m = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"]}
            m.update(self._train_epoch(epoch))
            m.update(self.validate())
            m["skipped_images"] = self._reduce_counter(self.skipped)
            m["temperatures"] = [round(float(t), 5) for t in self.model.geo.temperatures.detach().cpu()]
            m["epoch_seconds"] = round(time.time() - t0, 1)
            m["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            improved = m["val_loss"] < self.state["best_val_loss"]
            if improved:
                self.state["best_val_loss"], self.state["best_epoch"], self.state["bad_epochs"] = m["val_loss"], epoch + 1, 0
            else:
                self.state["bad_epochs"] += 1
            self.scheduler.step()
            epoch += 1
            self.state["epoch"], self.state["batch_in_epoch"] = epoch, 0
            last_ckpt = self._save(f"epoch-{epoch:04d}", epoch, m)
            if self.dist.main:
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(m) + "\n")
                self._write_run_json(last_ckpt)
                shutil.rmtree(self.run_dir / "partial", ignore_errors=True)
                self._prune()
                self.log(f"epoch {epoch}: train loss {m['train_loss']:.4f}, val loss {m['val_loss']:.4f}, "
                         f"within 25/200/750 km {m['val_within_km']['25']}/{m['val_within_km']['200']}/"
                         f"{m['val_within_km']['750']}%, {m['samples_per_s']} img/s"
                         + (f", skipped {m['skipped_images']}" if m["skipped_images"] else ""))
            metrics_all.append(m)
        if self.state["bad_epochs"] >= ts.patience and epoch < ts.epochs:
            stopped = True
        if stopped and self.dist.main:
            self.log(f"early stop: {ts.patience} epochs without a better validation loss "
                     f"(best: epoch {self.state['best_epoch']})")
        _barrier(self.dist)
        return TrainResult(self.run_dir, epoch, self.state["best_epoch"], self.state["best_val_loss"],
                           last_ckpt, stopped, metrics_all)

    def _write_run_json(self, last: Path) -> None:
        from geosurge_index.model.checkpoint import write_json

        best = self.state["best_epoch"]
        write_json(self.run_dir / "run.json", {
            "format": TRAIN_RUN_FORMAT, "format_version": 1, "last_checkpoint": last.name,
            "best_checkpoint": f"epoch-{best:04d}" if best else None, "best_val_loss": self.state["best_val_loss"],
            "epochs_done": self.state["epoch"], "global_step": self.state["global_step"]})

    def _prune(self) -> None:
        keep = self.recipe.train.keep_checkpoints
        if not keep:
            return
        best = self.state["best_epoch"]
        ckpts = sorted(self.run_dir.glob("epoch-[0-9][0-9][0-9][0-9]"))
        for d in ckpts[:-keep]:
            if best is None or d.name != f"epoch-{best:04d}":
                shutil.rmtree(d, ignore_errors=True)


def calibration_fraction(data: DataSettings, ckpt_dir: Path | None) -> float:
    """The share of the train split held out for calibration: the recipe's, or on --resume the
    checkpoint's (0 for one written before the option existed), so a resumed run trains on the
    same photos."""
    frac = float(data.calibration_fraction)
    if ckpt_dir is not None:
        try:
            frac = float(json.loads((ckpt_dir / "train_state.json").read_text()).get("calibration_fraction", 0.0))
        except (OSError, ValueError):
            frac = 0.0
    if not 0 <= frac < 1:
        raise UserError(f"recipe [data] calibration_fraction = {frac}: must be in [0, 1)")
    return frac


def write_calibration_manifest(split, run_dir: Path) -> Path:
    """RUN_DIR/calibration.csv (id, path, lat, lon) of the held-out calibration photos: a manifest
    `geosurge calibrate` reads as truth and as the photos. Photos inside tar shards get their
    sample key as id and an empty path (give the shards as INPUT to `geosurge calibrate`)."""
    import csv

    run_dir.mkdir(parents=True, exist_ok=True)
    t = split.table
    ids, files, offsets = (t.column(c).to_pylist() for c in ("id", "file", "offset"))
    path = run_dir / "calibration.csv"
    tmp = run_dir / ".calibration.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path", "lat", "lon"])
        for i, fl, off, la, lo in zip(ids, files, offsets, split.lat, split.lon, strict=True):
            w.writerow([i, fl if off is None or off < 0 else "", repr(float(la)), repr(float(lo))])
    os.replace(tmp, path)
    return path


def _worker_init(_):
    import torch

    torch.set_num_threads(1)  # workers only decode; the model owns the cores


def train(recipe: Recipe | str | os.PathLike, run_dir=None, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train from a recipe (object or TOML path) into `run_dir` (default: the recipe's `out`)."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    return Trainer(recipe, run_dir, resume=resume, progress=progress).run()
