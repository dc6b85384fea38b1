"""GeoSURGE = visual encoder + per-level geographic embeddings."""

from __future__ import annotations

import torch
from torch import nn

from geosurge_index.model.config import ModelConfig
from geosurge_index.model.encoder import VisualEncoder
from geosurge_index.model.geo import ClassifierHead, GeoEmbeddings
from geosurge_index.model.loss import hierarchical_info_nce


class GeoSurgeModel(nn.Module):
    def __init__(self, config: ModelConfig, cells_per_level: list[int], *, weights: bool = True):
        super().__init__()
        self.config = config
        self.encoder = VisualEncoder(config, weights=weights)
        if config.head == "classifier":
            self.geo = ClassifierHead(cells_per_level, config.embed_dim)
        else:
            self.geo = GeoEmbeddings(cells_per_level, config.embed_dim, config.init_temperature,
                                     config.geo_init_std)
        self.negatives = "all"  # the loss's negatives (`loss.NEGATIVES`); the trainer sets its recipe's

    def forward(self, pixel_values: torch.Tensor, class_map: torch.Tensor | None, targets: torch.Tensor):
        """-> (loss, per-level loss (L,), per-level correct count (L,), embeddings (B, d))."""
        emb = self.encoder(pixel_values, class_map)
        loss, per_level, correct = hierarchical_info_nce(emb, self.geo, targets, negatives=self.negatives)
        return loss, per_level, correct, emb

    def stored_state_dict(self) -> dict[str, torch.Tensor]:
        state = {"encoder." + k: v for k, v in self.encoder.stored_state_dict().items()}
        state.update({"geo." + k: v for k, v in self.geo.state_dict().items()})
        return state


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; works on the meta device."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return total, trainable


def parameter_report(model: GeoSurgeModel) -> list[tuple[str, int, int]]:
    """[(part, total, trainable)] for the backbone, segmenter, fusion, head and geo tables."""
    enc = model.encoder
    parts: list[tuple[str, nn.Module | None]] = [
        ("backbone (CLIP vision)", enc.backbone),
        ("segmenter", enc.segmenter),
        ("semantic tokens + fusion", enc.fusion),
        ("head (LayerNorm + Linear)", nn.ModuleList([m for m in (enc.head_norm, enc.clip_norm, enc.head)
                                                     if m is not None])),
        ("fusion read-out", enc.readout),
        ("classification head" if model.config.head == "classifier" else "geographic embeddings + temperatures",
         model.geo),
    ]
    rows = [(name, *count_parameters(m)) for name, m in parts if m is not None]
    rows.append(("total", *count_parameters(model)))
    return rows
