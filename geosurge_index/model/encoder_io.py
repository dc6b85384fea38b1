"""The visual encoder alone, as shipped inside an index: `encoder.safetensors` + `encoder.json`.

A config-built backbone/segmenter travels inside the safetensors (so a query host rebuilds exactly
the trained encoder); a pretrained one is named in the JSON by hub id or path and loaded with
`from_pretrained`, with only its trained (unfrozen) layers stored.

A segmenter trained alone (`geosurge_index.segmenter_train`) is kept in a folder of its own,
`segmenter.safetensors` + `segmenter.json` (format `geosurge-segmenter` v1: its `SegmenterConfig`,
the classes it predicts, how it was trained); `with_segmenter` puts it into an encoder, so that
`geosurge export --segmenter SEG_DIR` ships it inside the index's encoder files.
"""

from __future__ import annotations

import os
from pathlib import Path

from geosurge_index.errors import FormatError
from geosurge_index.formats import read_json
from geosurge_index.model.checkpoint import (
    load_stored_state,
    read_safetensors,
    write_json,
    write_safetensors,
)
from geosurge_index.model.config import NUM_ADE20K_CLASSES, ModelConfig, SegmenterConfig

ENCODER_FORMAT = "geosurge-encoder"
# v1: a GeoSURGE encoder (its model config). v2: `kind` names another encoder (e.g. "geoclip",
# `model/geoclip_encoder.py`), whose fields follow; GeoSURGE encoders are still written as v1.
ENCODER_VERSION = 2
ENCODER_JSON = "encoder.json"
ENCODER_WEIGHTS = "encoder.safetensors"
SEGMENTER_FORMAT = "geosurge-segmenter"
SEGMENTER_VERSION = 1
SEGMENTER_JSON = "segmenter.json"
SEGMENTER_WEIGHTS = "segmenter.safetensors"


def save_encoder(encoder, directory: str | os.PathLike) -> tuple[Path, Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / ENCODER_WEIGHTS
    tmp = directory / (ENCODER_WEIGHTS + ".tmp")
    write_safetensors(tmp, encoder.stored_state_dict(), {"format": ENCODER_FORMAT})
    os.replace(tmp, weights)
    if hasattr(encoder, "encoder_json"):  # another kind of encoder: its own fields (v2)
        meta = {"format": ENCODER_FORMAT, "format_version": 2, **encoder.encoder_json()}
    else:
        meta = {
            "format": ENCODER_FORMAT,
            "format_version": 1,
            "kind": "geosurge",
            "model": encoder.config.to_dict(),
            "image_size": encoder.image_size,
            "embed_dim": encoder.embed_dim,
            "fusion": encoder.fusion is not None,
        }
    write_json(directory / ENCODER_JSON, meta)
    return weights, directory / ENCODER_JSON


def read_encoder_meta(directory: str | os.PathLike) -> dict:
    """encoder.json (checked header), with `kind` filled in ("geosurge" for v1 files)."""
    meta = read_json(Path(directory) / ENCODER_JSON, ENCODER_FORMAT, ENCODER_VERSION)
    return {"kind": "geosurge", **meta}


def read_encoder_config(directory: str | os.PathLike) -> ModelConfig:
    meta = read_encoder_meta(directory)
    if meta["kind"] != "geosurge":
        raise FormatError(f"{Path(directory) / ENCODER_JSON} describes a {meta['kind']!r} encoder, not a "
                          "GeoSURGE model config")
    return ModelConfig.from_dict(meta["model"])


def load_encoder(directory: str | os.PathLike, device: str = "cpu", *, weights: bool = True):
    """-> the index's visual encoder in eval mode on `device`: a `VisualEncoder`, or the encoder
    of the kind encoder.json names (FormatError on missing/corrupted files or an unknown kind)."""
    from geosurge_index.model.encoder import VisualEncoder

    directory = Path(directory)
    meta = read_encoder_meta(directory)
    if meta["kind"] == "geoclip":
        from geosurge_index.model.geoclip_encoder import load_geoclip_encoder

        state = read_safetensors(directory / ENCODER_WEIGHTS)
        return load_geoclip_encoder(meta, state, directory, weights=weights).to(device).eval()
    config = read_encoder_config(directory)
    state = read_safetensors(directory / ENCODER_WEIGHTS)
    encoder = VisualEncoder(config, weights=weights)
    load_stored_state(encoder, state, encoder.excluded_state_prefixes(), directory / ENCODER_WEIGHTS)
    return encoder.to(device).eval()


def encoder_image_size(directory: str | os.PathLike) -> int:
    """The square side the encoder in `directory` takes, from encoder.json alone (no torch model)."""
    return int(read_encoder_meta(directory)["image_size"])


# --- a segmenter trained alone ---------------------------------------------------------------------

def save_segmenter(segmenter, config: SegmenterConfig, directory: str | os.PathLike,
                   training: dict | None = None) -> Path:
    """Write a config-built segmenter's weights and config to `directory` (JSON last)."""
    import dataclasses

    if config.pretrained is not None:
        raise ValueError("save_segmenter stores config-built segmenters; a pretrained one is named by its path")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (SEGMENTER_WEIGHTS + ".tmp")
    write_safetensors(tmp, segmenter.state_dict(), {"format": SEGMENTER_FORMAT})
    os.replace(tmp, directory / SEGMENTER_WEIGHTS)
    write_json(directory / SEGMENTER_JSON, {
        "format": SEGMENTER_FORMAT,
        "format_version": SEGMENTER_VERSION,
        "segmenter": dataclasses.asdict(config),
        "training": training or {},
    })
    return directory


def read_segmenter_config(directory: str | os.PathLike) -> SegmenterConfig:
    from geosurge_index.errors import FormatError

    path = Path(directory) / SEGMENTER_JSON
    meta = read_json(path, SEGMENTER_FORMAT, SEGMENTER_VERSION)
    try:
        return SegmenterConfig(**meta["segmenter"])
    except (KeyError, TypeError) as err:
        raise FormatError(f"{path}: bad segmenter config ({err})") from err


def load_segmenter(directory: str | os.PathLike, device: str = "cpu"):
    """-> (SegmenterConfig, `Segmenter` in eval mode on `device`) from a `save_segmenter` folder
    (FormatError when a file is missing, corrupt, or does not match its config)."""
    from geosurge_index.errors import FormatError
    from geosurge_index.model.segmenter import build_segmenter

    directory = Path(directory)
    if not directory.is_dir():
        raise FormatError(f"segmenter folder {directory} does not exist (written by the segmenter training)")
    config = read_segmenter_config(directory)
    segmenter = build_segmenter(config, config.arch, weights=False)
    if segmenter is None:
        raise FormatError(f"{directory / SEGMENTER_JSON}: kind none is not a segmenter")
    load_stored_state(segmenter, read_safetensors(directory / SEGMENTER_WEIGHTS), [],
                      directory / SEGMENTER_WEIGHTS)
    return config, segmenter.to(device).eval()


def with_segmenter(encoder, directory: str | os.PathLike):
    """`encoder` with its segmenter (config and weights) replaced by the one saved in `directory`;
    the encoder files then carry it (`save_encoder`). UserError when the encoder has no use for one
    (fusion off) or the class count differs."""
    from geosurge_index.errors import UserError

    if encoder.fusion is None:
        raise UserError("this encoder has fusion off (CLIP alone): it has no use for a segmenter")
    config, segmenter = load_segmenter(directory)
    if encoder.config.num_classes != NUM_ADE20K_CLASSES:
        raise UserError(f"the encoder reads {encoder.config.num_classes} classes; segmenters give "
                        f"ADE20K's {NUM_ADE20K_CLASSES}")
    encoder.segmenter = segmenter
    encoder.config.segmenter = config
    encoder.config.validate()
    return encoder
