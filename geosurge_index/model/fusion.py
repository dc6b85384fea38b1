"""Semantic tokens from a class map, and the latent cross-attention blocks fusing them with CLIP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from geosurge_index.model.config import FusionConfig


def patch_histograms(class_map: torch.Tensor, grid: int, num_classes: int) -> torch.Tensor:
    """(B, S, S) int class ids -> (B, grid*grid, C) class frequencies per patch (rows sum to 1, or 0
    for a patch with no labelled pixel). Ids outside 0..C-1 (255 = unlabelled) are ignored.

    One scatter-add, no one-hot of the whole map: at B=1024, S=336 a one-hot would be 17 G values.
    """
    b, s, s2 = class_map.shape
    if s != s2 or s % grid:
        raise ValueError(f"class map must be square with a side divisible by {grid}, got {tuple(class_map.shape)}")
    p = s // grid
    cm = class_map.long()
    valid = (cm >= 0) & (cm < num_classes)
    rows = torch.arange(s, device=cm.device) // p
    patch = (rows.view(s, 1) * grid + rows.view(1, s)).expand(b, s, s)
    batch = torch.arange(b, device=cm.device).view(b, 1, 1) * (grid * grid)
    # Invalid pixels add 0 (no boolean indexing: shapes stay data-independent, meta device works).
    index = ((batch + patch) * num_classes + cm.clamp(0, num_classes - 1)).reshape(-1)
    counts = torch.zeros(b * grid * grid * num_classes, device=cm.device)
    counts.index_add_(0, index, valid.reshape(-1).to(counts.dtype))
    counts = counts.view(b, grid * grid, num_classes)
    return counts / counts.sum(-1, keepdim=True).clamp_min(1.0)


class SemanticTokens(nn.Module):
    """Class map -> (B, 1 + grid^2, d): a learned CLS query, then Linear(histogram) + position;
    with `token_norm`, LayerNorm(Linear(histogram)) + position (see `FusionConfig.token_norm`)."""

    def __init__(self, num_classes: int, grid: int, dim: int, token_norm: bool = False):
        super().__init__()
        self.num_classes, self.grid = num_classes, grid
        self.proj = nn.Linear(num_classes, dim)
        self.norm = nn.LayerNorm(dim) if token_norm else None
        self.pos = nn.Parameter(torch.randn(1, grid * grid, dim) * 0.02)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)

    def forward(self, class_map: torch.Tensor) -> torch.Tensor:
        return self.from_histograms(patch_histograms(class_map, self.grid, self.num_classes))

    def from_histograms(self, hist: torch.Tensor) -> torch.Tensor:
        """(B, grid^2, C) patch histograms -> tokens. The ONNX export starts here: the histogram's
        scatter-add has no exact ONNX form (ScatterElements drops duplicate indices)."""
        tokens = self.proj(hist.to(self.proj.weight.dtype))
        if self.norm is not None:
            tokens = self.norm(tokens)
        tokens = tokens + self.pos
        return torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)


class LatentCrossAttention(nn.Module):
    """Multi-head cross-attention whose queries, keys and values live at a small latent width
    (`latent_dim`, e.g. 64) rather than the token widths (128 queries, 1024 CLIP keys): the
    attention maps and projections stay cheap at batch 1024."""

    def __init__(self, query_dim: int, kv_dim: int, latent_dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(query_dim, latent_dim)
        self.k = nn.Linear(kv_dim, latent_dim)
        self.v = nn.Linear(kv_dim, latent_dim)
        self.out = nn.Linear(latent_dim, query_dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        m = kv.shape[1]
        h = self.heads
        q = self.q(x).view(b, n, h, -1).transpose(1, 2)
        k = self.k(kv).view(b, m, h, -1).transpose(1, 2)
        v = self.v(kv).view(b, m, h, -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(b, n, -1))


class FusionBlock(nn.Module):
    """Cross-attention (semantic queries over CLIP tokens), then (optionally) latent self-attention
    among the semantic tokens, then MLP; each residual + LayerNorm.

    Why the self-attention: with cross-attention alone every query evolves independently, so the
    CLS query (the one read out) would never see the semantic patch tokens and the class map could
    not change the embedding. The paper's summary does not say how its CLS mixes with them; this
    is the project's choice (`fusion.self_attention`, on by default)."""

    def __init__(self, cfg: FusionConfig, kv_dim: int):
        super().__init__()
        d = cfg.query_dim
        self.attn = LatentCrossAttention(d, kv_dim, cfg.latent_dim, cfg.heads, cfg.dropout)
        self.norm1 = nn.LayerNorm(d)
        self.self_attn = None
        if cfg.self_attention:
            self.self_attn = LatentCrossAttention(d, d, cfg.latent_dim, cfg.heads, cfg.dropout)
            self.norm_self = nn.LayerNorm(d)
        hidden = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(hidden, d))
        self.norm2 = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, kv))
        if self.self_attn is not None:
            x = self.norm_self(x + self.self_attn(x, x))
        return self.norm2(x + self.mlp(x))


class SemanticFusion(nn.Module):
    """Class map + CLIP tokens -> fused CLS (B, query_dim)."""

    def __init__(self, cfg: FusionConfig, num_classes: int, grid: int, kv_dim: int):
        super().__init__()
        self.tokens = SemanticTokens(num_classes, grid, cfg.query_dim, cfg.token_norm)
        self.kv_norm = nn.LayerNorm(kv_dim)  # CLIP's last hidden state is not normalised
        self.blocks = nn.ModuleList([FusionBlock(cfg, kv_dim) for _ in range(cfg.blocks)])

    def forward(self, class_map: torch.Tensor, clip_tokens: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.tokens(class_map), clip_tokens)

    def from_histograms(self, hist: torch.Tensor, clip_tokens: torch.Tensor) -> torch.Tensor:
        """As `forward`, from `patch_histograms` of the class map."""
        return self.fuse(self.tokens.from_histograms(hist), clip_tokens)

    def from_histograms_tokens(self, hist: torch.Tensor, clip_tokens: torch.Tensor) -> torch.Tensor:
        """As `from_histograms`, every fused token (B, 1 + grid^2, query_dim): the "joint" read-out's input."""
        return self.fuse_tokens(self.tokens.from_histograms(hist), clip_tokens)

    def fuse(self, semantic: torch.Tensor, clip_tokens: torch.Tensor) -> torch.Tensor:
        return self.fuse_tokens(semantic, clip_tokens)[:, 0]

    def fuse_tokens(self, semantic: torch.Tensor, clip_tokens: torch.Tensor) -> torch.Tensor:
        x = semantic.to(clip_tokens.dtype)
        kv = self.kv_norm(clip_tokens)
        for block in self.blocks:
            x = block(x, kv)
        return x


# -- read-outs with a CLIP-width output (`fusion.readout` "joint" and "gated"; see encoder.py) -----


class JointReadout(nn.Module):
    """`readout = "joint"`: CLIP's CLS token as the query of one attention over the concatenation of
    the fused semantic tokens (projected to CLIP's width) and CLIP's own tokens, added to CLIP's
    CLS: (B, width). The class map and CLIP's patches compete for the same attention weights, so
    the read-out chooses per image how much of each reaches the embedding."""

    def __init__(self, cfg: FusionConfig, width: int):
        super().__init__()
        self.sem_proj = nn.Linear(cfg.query_dim, width)
        self.kv_norm = nn.LayerNorm(width)
        self.attn = LatentCrossAttention(width, width, cfg.latent_dim, cfg.heads, cfg.dropout)

    def forward(self, fused_tokens: torch.Tensor, clip_tokens: torch.Tensor) -> torch.Tensor:
        clip = self.kv_norm(clip_tokens)
        kv = torch.cat([self.sem_proj(fused_tokens.to(clip.dtype)), clip], dim=1)
        return clip_tokens[:, 0] + self.attn(clip[:, :1], kv)[:, 0]


class GatedReadout(nn.Module):
    """`readout = "gated"`: CLIP's CLS + g * Linear(LayerNorm(fused CLS)), with a per-channel gate g
    initialised at 0: the model starts as the no-fusion model (CLS -> LayerNorm -> Linear) exactly,
    and the fused path only grows where the gradient says it helps."""

    def __init__(self, cfg: FusionConfig, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.query_dim)
        self.proj = nn.Linear(cfg.query_dim, width)
        self.gate = nn.Parameter(torch.zeros(width))

    def forward(self, fused_cls: torch.Tensor, clip_cls: torch.Tensor) -> torch.Tensor:
        return clip_cls + self.gate.to(clip_cls.dtype) * self.proj(self.norm(fused_cls.to(clip_cls.dtype)))
