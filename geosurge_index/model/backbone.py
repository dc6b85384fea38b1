"""The RGB backbone: transformers `CLIPVisionModel`, pretrained or config-built, mostly frozen."""

from __future__ import annotations

import torch
from torch import nn

from geosurge_index.errors import UserError
from geosurge_index.model.config import BackboneConfig


def _clip_config(arch: dict):
    from transformers import CLIPVisionConfig

    arch = {k: v for k, v in arch.items() if k not in ("model_type", "transformers_version")}
    return CLIPVisionConfig(**arch)


def load_pretrained(name_or_path: str, what: str, cls):
    """`cls.from_pretrained` with a clear error when the weights are neither local nor cached."""
    try:
        return cls.from_pretrained(name_or_path)
    except Exception as err:  # noqa: BLE001 - OSError, HF hub errors, ValueError ...
        raise UserError(
            f"{what} {name_or_path!r} could not be loaded ({type(err).__name__}: {err}). Give a local "
            "directory saved with save_pretrained, or a hub id present in the Hugging Face cache."
        ) from err


class Backbone(nn.Module):
    """CLIP vision tower returning all tokens (B, 1 + grid^2, width); frozen except the last N layers.

    Frozen layers run under `torch.no_grad` so they keep no activations for backward: this is what
    lets large batches fit with a frozen ViT-L.
    """

    def __init__(self, cfg: BackboneConfig, arch: dict, *, weights: bool = True):
        super().__init__()
        from transformers import CLIPVisionModel

        if cfg.pretrained is not None and weights:
            self.clip = load_pretrained(cfg.pretrained, "backbone", CLIPVisionModel)
        else:
            self.clip = CLIPVisionModel(_clip_config(arch))
        n = len(self.clip.encoder.layers)
        if not 0 <= cfg.unfreeze_last_n <= n:
            raise UserError(f"model.backbone.unfreeze_last_n = {cfg.unfreeze_last_n}: the backbone has {n} layers")
        self.n_frozen_layers = n - cfg.unfreeze_last_n
        self.pretrained = cfg.pretrained is not None
        for p in self.clip.parameters():
            p.requires_grad_(False)
        for layer in self.clip.encoder.layers[self.n_frozen_layers :]:
            for p in layer.parameters():
                p.requires_grad_(True)
        self.width = self.clip.config.hidden_size

    def stored_prefixes_excluded(self) -> list[str]:
        """State-dict prefixes (relative to this module) that are NOT saved: frozen pretrained weights,
        which `from_pretrained` restores. `post_layernorm` is never used, so never saved."""
        excluded = ["clip.post_layernorm."]
        if self.pretrained:
            excluded += ["clip.embeddings.", "clip.pre_layrnorm."]
            excluded += [f"clip.encoder.layers.{i}." for i in range(self.n_frozen_layers)]
        return excluded

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        clip = self.clip
        with torch.no_grad():
            h = clip.pre_layrnorm(clip.embeddings(pixel_values))
            for layer in clip.encoder.layers[: self.n_frozen_layers]:
                h = layer(h, None)
        for layer in clip.encoder.layers[self.n_frozen_layers :]:
            h = layer(h, None)
        return h
