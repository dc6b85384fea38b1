"""Geographic embeddings: one learnable table per hierarchy level, and a temperature per level."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GeoEmbeddings(nn.Module):
    """`tables[l]`: (n_cells at level l+1, dim). Temperatures are learned in log space (always
    positive), initialised at `init_temperature` (0.07)."""

    def __init__(self, cells_per_level: list[int], dim: int, init_temperature: float = 0.07, init_std: float = 0.02):
        super().__init__()
        if any(n < 1 for n in cells_per_level):
            raise ValueError(f"every level needs at least one cell, got {cells_per_level}")
        self.cells_per_level = [int(n) for n in cells_per_level]
        self.tables = nn.ParameterList([nn.Parameter(torch.randn(n, dim) * init_std) for n in self.cells_per_level])
        self.log_temperature = nn.Parameter(torch.full((len(cells_per_level),), math.log(init_temperature)))

    @property
    def levels(self) -> int:
        return len(self.tables)

    @property
    def temperatures(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def logits(self, emb: torch.Tensor, level: int) -> torch.Tensor:
        """(B, dim) unit embeddings -> (B, n_cells) cosine / temperature at level index `level` (0-based)."""
        # fp32 even under bf16 autocast: cosines / 0.07 need more than bf16's 3 digits
        with torch.autocast(emb.device.type, enabled=False):
            table = F.normalize(self.tables[level].float(), dim=-1)
            return emb.float() @ table.T / self.log_temperature[level].float().exp()
