"""The training loss: InfoNCE per level against all cells of that level, summed over levels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from geosurge_index.model.geo import GeoEmbeddings


def hierarchical_info_nce(
    emb: torch.Tensor, geo: GeoEmbeddings, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """emb (B, d) unit; targets (B, L) cell_index per level, -1 = no cell at that level (masked out).

    Returns (loss, per-level mean loss (L,), per-level correct-count (L,)). A level's term is the mean
    over its valid samples (0 when it has none); the loss is the sum of the level terms.
    """
    if targets.ndim != 2 or targets.shape[1] != geo.levels or targets.shape[0] != emb.shape[0]:
        raise ValueError(f"targets must be (B={emb.shape[0]}, {geo.levels}), got {tuple(targets.shape)}")
    terms, correct = [], []
    for lvl in range(geo.levels):
        t = targets[:, lvl].long()
        valid = t >= 0
        logits = geo.logits(emb, lvl)
        ce = F.cross_entropy(logits, t.clamp_min(0), reduction="none")
        n = valid.sum()
        terms.append((ce * valid).sum() / n.clamp_min(1))
        correct.append(((logits.argmax(-1) == t) & valid).sum())
    per_level = torch.stack(terms)
    return per_level.sum(), per_level.detach(), torch.stack(correct)
