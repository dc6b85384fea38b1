"""The training loss: InfoNCE per level, summed over levels.

Negatives (`negatives`, the recipe's `[train] negatives`):
- "all" (the default): a softmax over all cells of the level, cosine / temperature (the
  project's reading of the paper; the inference softmax is the same one).
- "in_batch": in-batch InfoNCE (another reading of the paper's wording): at each level, a softmax
  over the distinct cells that the batch's valid samples belong to; a sample's positive is its own
  cell, its negatives are the other cells present in the batch. Samples sharing a cell share one
  column (no false negatives from duplicates). Its per-level "correct" count is the argmax over
  those candidates, so it is not comparable with the "all" count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from geosurge_index.model.geo import GeoEmbeddings

NEGATIVES = ("all", "in_batch")


def hierarchical_info_nce(
    emb: torch.Tensor, geo: GeoEmbeddings, targets: torch.Tensor, *, negatives: str = "all",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """emb (B, d) unit; targets (B, L) cell_index per level, -1 = no cell at that level (masked out).

    Returns (loss, per-level mean loss (L,), per-level correct-count (L,)). A level's term is the mean
    over its valid samples (0 when it has none); the loss is the sum of the level terms.
    """
    if targets.ndim != 2 or targets.shape[1] != geo.levels or targets.shape[0] != emb.shape[0]:
        raise ValueError(f"targets must be (B={emb.shape[0]}, {geo.levels}), got {tuple(targets.shape)}")
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives = {negatives!r}: choose one of {', '.join(NEGATIVES)}")
    terms, correct = [], []
    for lvl in range(geo.levels):
        t = targets[:, lvl].long()
        valid = t >= 0
        logits = geo.logits(emb, lvl)
        if negatives == "in_batch":
            logits, t = in_batch_logits(logits, t, valid)
        ce = F.cross_entropy(logits, t.clamp_min(0), reduction="none")
        n = valid.sum()
        terms.append((ce * valid).sum() / n.clamp_min(1))
        correct.append(((logits.argmax(-1) == t) & valid).sum())
    per_level = torch.stack(terms)
    return per_level.sum(), per_level.detach(), torch.stack(correct)


def in_batch_logits(logits: torch.Tensor, t: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n_cells) logits of every cell, targets (B,) -> the logits of the distinct target cells
    of the valid samples only (B, U) and each target's column there (-1 where invalid). The
    columns are the sorted distinct cells (`torch.unique`), so the result does not depend on the
    order of the batch."""
    cells = torch.unique(t[valid])  # sorted
    if cells.numel() == 0:  # no valid sample: one dummy column, masked out by `valid`
        cells = torch.zeros(1, dtype=t.dtype, device=t.device)
    column = torch.searchsorted(cells, t.clamp_min(0))
    return logits.index_select(1, cells), torch.where(valid, column, torch.full_like(t, -1))
