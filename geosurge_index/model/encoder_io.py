"""The visual encoder alone, as shipped inside an index: `encoder.safetensors` + `encoder.json`.

A config-built backbone/segmenter travels inside the safetensors (so a query host rebuilds exactly
the trained encoder); a pretrained one is named in the JSON by hub id or path and loaded with
`from_pretrained`, with only its trained (unfrozen) layers stored.
"""

from __future__ import annotations

import os
from pathlib import Path

from geosurge_index.formats import read_json
from geosurge_index.model.checkpoint import (
    load_stored_state,
    read_safetensors,
    write_json,
    write_safetensors,
)
from geosurge_index.model.config import ModelConfig

ENCODER_FORMAT = "geosurge-encoder"
ENCODER_VERSION = 1
ENCODER_JSON = "encoder.json"
ENCODER_WEIGHTS = "encoder.safetensors"


def save_encoder(encoder, directory: str | os.PathLike) -> tuple[Path, Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / ENCODER_WEIGHTS
    tmp = directory / (ENCODER_WEIGHTS + ".tmp")
    write_safetensors(tmp, encoder.stored_state_dict(), {"format": ENCODER_FORMAT})
    os.replace(tmp, weights)
    write_json(
        directory / ENCODER_JSON,
        {
            "format": ENCODER_FORMAT,
            "format_version": ENCODER_VERSION,
            "model": encoder.config.to_dict(),
            "image_size": encoder.image_size,
            "embed_dim": encoder.embed_dim,
            "fusion": encoder.fusion is not None,
        },
    )
    return weights, directory / ENCODER_JSON


def read_encoder_config(directory: str | os.PathLike) -> ModelConfig:
    meta = read_json(Path(directory) / ENCODER_JSON, ENCODER_FORMAT, ENCODER_VERSION)
    return ModelConfig.from_dict(meta["model"])


def load_encoder(directory: str | os.PathLike, device: str = "cpu", *, weights: bool = True):
    """-> `VisualEncoder` in eval mode on `device` (FormatError on missing/corrupted files)."""
    from geosurge_index.model.encoder import VisualEncoder

    directory = Path(directory)
    config = read_encoder_config(directory)
    state = read_safetensors(directory / ENCODER_WEIGHTS)
    encoder = VisualEncoder(config, weights=weights)
    load_stored_state(encoder, state, encoder.excluded_state_prefixes(), directory / ENCODER_WEIGHTS)
    return encoder.to(device).eval()


def encoder_image_size(directory: str | os.PathLike) -> int:
    """The square side the encoder in `directory` takes, from encoder.json alone (no torch model)."""
    meta = read_json(Path(directory) / ENCODER_JSON, ENCODER_FORMAT, ENCODER_VERSION)
    return int(meta["image_size"])
