"""Checkpoint directories: safetensors weights + JSON config (never pickle), and their readers.

Layout (ARCHITECTURE.md): `config.json`, `model.safetensors`, optional `train_state.safetensors` +
`train_state.json` (what `--resume` needs, written by `geosurge_index.train`), and copies of the
partition's `cells.parquet` + `partition.json`. Frozen pretrained weights are not stored: the
config names them and `from_pretrained` restores them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geosurge_index.errors import FormatError, UserError
from geosurge_index.formats import read_json
from geosurge_index.model.config import ModelConfig

CHECKPOINT_FORMAT = "geosurge-checkpoint"
CHECKPOINT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CELLS_FILES = ("cells.parquet", "partition.json")


def read_safetensors(path: Path, device: str = "cpu") -> dict:
    """All tensors of a safetensors file; FormatError when missing or corrupted."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FormatError(f"{path} is missing")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise FormatError(f"{path} is corrupted or not a safetensors file ({err})") from err


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def write_json(path: Path, obj: dict) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def load_stored_state(module, state: dict, excluded: list[str], source: Path) -> None:
    """`load_state_dict` that allows exactly the excluded (pretrained, frozen) keys to be absent."""
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(tuple(excluded))]
    if missing or result.unexpected_keys:
        raise FormatError(
            f"{source} does not match its config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    cells_per_level: list[int]
    epoch: int
    meta: dict[str, Any] = field(default_factory=dict)
    model: Any = None  # GeoSurgeModel once loaded


def save_checkpoint(
    directory: str | os.PathLike,
    model,
    *,
    epoch: int,
    cells_dir: str | os.PathLike,
    extra: dict[str, Any] | None = None,
    train_state: tuple[dict, dict] | None = None,
) -> Path:
    """Write a complete checkpoint atomically (a temp dir renamed into place)."""
    import torch
    import transformers

    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name in CELLS_FILES:
        src = Path(cells_dir) / name
        if not src.is_file():
            raise FormatError(f"{src} is missing: a checkpoint carries the partition it was trained on")
        shutil.copy2(src, tmp / name)
    write_safetensors(tmp / WEIGHTS_FILE, model.stored_state_dict(), {"format": CHECKPOINT_FORMAT})
    meta = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "model": model.config.to_dict(),
        "cells_per_level": model.geo.cells_per_level,
        "epoch": int(epoch),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        **(extra or {}),
    }
    write_json(tmp / CONFIG_FILE, meta)
    if train_state is not None:
        tensors, state_meta = train_state
        write_safetensors(tmp / "train_state.safetensors", tensors)
        write_json(tmp / "train_state.json", state_meta)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def read_checkpoint_meta(directory: str | os.PathLike) -> Checkpoint:
    directory = Path(directory)
    if not directory.is_dir():
        raise FormatError(f"checkpoint {directory} is not a directory")
    meta = read_json(directory / CONFIG_FILE, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    try:
        config = ModelConfig.from_dict(meta["model"])
        cells = [int(n) for n in meta["cells_per_level"]]
        epoch = int(meta["epoch"])
    except (KeyError, TypeError, ValueError) as err:
        raise FormatError(f"{directory / CONFIG_FILE} lacks a valid model config ({err})") from err
    return Checkpoint(directory, config, cells, epoch, meta)


def load_checkpoint(directory: str | os.PathLike, device: str = "cpu", *, weights: bool = True) -> Checkpoint:
    """A checkpoint with its `GeoSurgeModel` (eval mode) on `device`. `weights=False` builds pretrained
    parts from their configs instead of loading them (tests, inspection)."""
    from geosurge_index.model.geosurge import GeoSurgeModel

    ckpt = read_checkpoint_meta(directory)
    state = read_safetensors(ckpt.path / WEIGHTS_FILE)
    model = GeoSurgeModel(ckpt.config, ckpt.cells_per_level, weights=weights)
    excluded = ["encoder." + p for p in model.encoder.excluded_state_prefixes()]
    load_stored_state(model, state, excluded, ckpt.path / WEIGHTS_FILE)
    ckpt.model = model.to(device).eval()
    return ckpt


def read_geo_tables(directory: str | os.PathLike) -> tuple[list[np.ndarray], np.ndarray]:
    """The geographic embeddings of a checkpoint without building the model: ([float32 (n_l, d)
    L2-normalised rows, one per level, coarsest first], float32 temperatures (levels,)).
    Row i of level l is cell_index i of that level in the checkpoint's cells.parquet."""
    from safetensors import SafetensorError, safe_open

    ckpt = read_checkpoint_meta(directory)
    if ckpt.config.head != "geo":
        raise UserError(f"checkpoint {ckpt.path} was trained with a plain classification head (model.head = "
                        f"{ckpt.config.head!r}, an ablation): it has no geographic embeddings to export or search")
    path = ckpt.path / WEIGHTS_FILE
    if not path.is_file():
        raise FormatError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="np") as f:
            tables = [f.get_tensor(f"geo.tables.{i}") for i in range(len(ckpt.cells_per_level))]
            temps = np.exp(f.get_tensor("geo.log_temperature").astype(np.float64))
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise FormatError(f"{path} is corrupted or lacks the geographic tables ({err})") from err
    out = []
    for i, (t, n) in enumerate(zip(tables, ckpt.cells_per_level, strict=True)):
        if t.ndim != 2 or t.shape[0] != n:
            raise FormatError(f"{path}: level {i + 1} table has shape {t.shape}, config says {n} cells")
        t = t.astype(np.float32)
        out.append(t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12))
    return out, temps.astype(np.float32)
