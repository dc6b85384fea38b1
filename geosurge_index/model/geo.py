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


class ClassifierHead(nn.Module):
    """The ablation of the geographic embeddings: a plain classification head, `Linear(dim,
    n_cells)` with a bias, over the cells of the finest level only. Logits are `emb @ W.T + b`
    (no normalisation of W, no temperature). It has the interface of `GeoEmbeddings` that the loss
    and the training loop use; it is meant for a one-level partition (its finest level), and cannot
    be exported as an index (FAISS scores cosines, not biased logits)."""

    is_classifier = True

    def __init__(self, cells_per_level: list[int], dim: int):
        super().__init__()
        if len(cells_per_level) != 1:
            raise ValueError(f"a classification head takes one level (the finest cells), got {len(cells_per_level)} "
                             "levels: partition with the finest tau_max alone")
        self.cells_per_level = [int(n) for n in cells_per_level]
        self.classifier = nn.Linear(dim, self.cells_per_level[0])

    @property
    def levels(self) -> int:
        return 1

    @property
    def temperatures(self) -> torch.Tensor:
        return torch.ones(1, device=self.classifier.weight.device)

    def logits(self, emb: torch.Tensor, level: int) -> torch.Tensor:
        if level != 0:
            raise IndexError(f"a classification head has one level, asked for level index {level}")
        with torch.autocast(emb.device.type, enabled=False):
            return F.linear(emb.float(), self.classifier.weight.float(), self.classifier.bias.float())
