"""The visual encoder: CLIP tokens (+ semantic fusion) -> a 768-d L2-normalised embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from geosurge_index.errors import UserError
from geosurge_index.model.backbone import Backbone
from geosurge_index.model.config import ModelConfig
from geosurge_index.model.fusion import GatedReadout, JointReadout, SemanticFusion, patch_histograms
from geosurge_index.model.segmenter import build_segmenter


class VisualEncoder(nn.Module):
    """`encoder(pixel_values (B,3,S,S), class_map (B,S,S) int64 | None) -> (B, embed_dim)`, unit norm.

    Pixels are CLIP-normalised squares of side `image_size` (`images.Preprocess(encoder.image_size)`).
    With fusion on and no class map given, the configured segmenter computes one.
    """

    def __init__(self, config: ModelConfig, *, weights: bool = True):
        super().__init__()
        config.validate()
        self.config = config
        self.image_size = config.image_size
        self.grid = config.grid
        self.embed_dim = config.embed_dim
        self.backbone = Backbone(config.backbone, config.backbone_arch(), weights=weights)
        width = self.backbone.width
        self.segmenter = None
        self.clip_norm = None
        self.readout = None  # JointReadout / GatedReadout for the CLIP-width read-outs
        if config.fusion.enabled:
            seg_arch = config.segmenter_arch() if config.segmenter.kind != "none" else None
            self.segmenter = build_segmenter(config.segmenter, seg_arch, weights=weights)
            self.fusion = SemanticFusion(config.fusion, config.num_classes, self.grid, width)
            kind = config.fusion.readout
            head_in = config.fusion.query_dim
            if kind == "cls+clip":
                # CLIP's CLS gets its own LayerNorm and joins the fused CLS before the projection:
                # the embedding is W_f LN(fused) + W_c LN(clip) + b, a residual path from CLIP (the
                # no-fusion model is the special case W_f = 0).
                self.clip_norm = nn.LayerNorm(width)
                head_in += width
            elif kind in ("joint", "gated"):
                # a CLIP-width vector (CLIP's CLS plus a fused term) -> LayerNorm -> Linear, as without fusion
                self.readout = (JointReadout if kind == "joint" else GatedReadout)(config.fusion, width)
                head_in = width
        else:
            self.fusion = None
            head_in = width
        self.head_norm = nn.LayerNorm(config.fusion.query_dim if self.clip_norm is not None else head_in)
        self.head = nn.Linear(head_in, config.embed_dim)

    def excluded_state_prefixes(self) -> list[str]:
        """Weights not stored in our safetensors files (restored by `from_pretrained` on load)."""
        out = ["backbone." + p for p in self.backbone.stored_prefixes_excluded()]
        if self.segmenter is not None and self.segmenter.pretrained:
            out.append("segmenter.")
        return out

    def stored_state_dict(self) -> dict[str, torch.Tensor]:
        excluded = tuple(self.excluded_state_prefixes())
        return {k: v for k, v in self.state_dict().items() if not k.startswith(excluded)}

    def segment(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.segmenter is None:
            raise UserError(
                "this encoder has no segmenter (model.segmenter.kind = none): give precomputed class maps"
            )
        return self.segmenter(pixel_values)

    def forward(self, pixel_values: torch.Tensor, class_map: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = pixel_values.shape
        if c != 3 or h != self.image_size or w != self.image_size:
            raise ValueError(f"pixel_values must be (B, 3, {self.image_size}, {self.image_size}), got {tuple(pixel_values.shape)}")
        tokens = self.backbone(pixel_values)
        if self.fusion is None:
            return self._project(tokens[:, 0], tokens)
        if class_map is None:
            class_map = self.segment(pixel_values)
        if tuple(class_map.shape) != (b, h, w):
            raise ValueError(f"class_map must be (B, {h}, {w}), got {tuple(class_map.shape)}")
        hist = patch_histograms(class_map, self.grid, self.config.num_classes)
        return self._read_out(tokens, hist)

    def forward_histograms(self, pixel_values: torch.Tensor, histograms: torch.Tensor | None) -> torch.Tensor:
        """As `forward`, given the class map's `fusion.patch_histograms` (B, grid^2, C) instead of
        the map (None when fusion is off): the graph the ONNX export traces."""
        tokens = self.backbone(pixel_values)
        return self._project(tokens[:, 0], tokens) if self.fusion is None else self._read_out(tokens, histograms)

    def _read_out(self, tokens: torch.Tensor, histograms: torch.Tensor) -> torch.Tensor:
        """CLIP tokens + patch histograms -> the embedding, by the configured `fusion.readout`."""
        if isinstance(self.readout, JointReadout):
            x = self.readout(self.fusion.from_histograms_tokens(histograms, tokens), tokens)
        else:
            x = self.fusion.from_histograms(histograms, tokens)
            if isinstance(self.readout, GatedReadout):
                x = self.readout(x, tokens[:, 0])
        return self._project(x, tokens)

    def _project(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The read-out's last step: LayerNorm, with `cls+clip` CLIP's own CLS beside it, -> Linear -> unit norm."""
        x = self.head_norm(x)
        if self.clip_norm is not None:
            x = torch.cat([x, self.clip_norm(tokens[:, 0]).to(x.dtype)], dim=-1)
        return F.normalize(self.head(x).float(), dim=-1)
