"""Semantic segmenters giving ADE20K class maps (B, S, S) int64 from CLIP-normalised pixels.

Segmentation is the costly part of the encoder (OneFormer Swin-L ~8 s/image on a CPU), so the
usual path is to compute class maps once and store them beside the images
(`images.class_map_path`); these modules run only when no map is given. The segmenter is never
trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from geosurge_index.geometry import CLIP_MEAN, CLIP_STD
from geosurge_index.model.backbone import load_pretrained
from geosurge_index.model.config import SegmenterConfig

# Both OneFormer and SegFormer ADE20K checkpoints expect ImageNet normalisation of [0, 1] pixels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ONEFORMER_TASK = "the task is semantic"


def _strip(arch: dict) -> dict:
    return {k: v for k, v in arch.items() if k not in ("model_type", "transformers_version")}


class Segmenter(nn.Module):
    """Base: re-normalises the encoder's input for the segmenter, runs it at `input_size`, and
    returns the arg-max class map at the encoder's resolution."""

    def __init__(self, cfg: SegmenterConfig):
        super().__init__()
        self.input_size = cfg.input_size
        self.pretrained = cfg.pretrained is not None
        clip_mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        clip_std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        # x_seg = (x_clip * clip_std + clip_mean - mean) / std, as one affine map
        self.register_buffer("scale", clip_std / std, persistent=False)
        self.register_buffer("shift", (clip_mean - mean) / std, persistent=False)

    def train(self, mode: bool = True) -> Segmenter:
        return super().train(False)  # never trained: no dropout, frozen norms, whatever the parent's mode

    def class_scores(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, s, s) segmenter-normalised -> (B, C, h, w) per-class scores."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = pixel_values.shape[-1]
        x = pixel_values * self.scale + self.shift
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        scores = self.class_scores(x)
        scores = F.interpolate(scores.float(), size=(size, size), mode="bilinear", align_corners=False)
        return scores.argmax(dim=1)


class OneFormerSegmenter(Segmenter):
    """`OneFormerForUniversalSegmentation` in its semantic task. The class scores are those of the
    image processor's `post_process_semantic_segmentation` (softmax over classes without the null
    class, times sigmoid masks, summed over queries), computed here in batch on the model's device."""

    def __init__(self, cfg: SegmenterConfig, arch: dict, *, weights: bool = True):
        super().__init__(cfg)
        from transformers import OneFormerConfig, OneFormerForUniversalSegmentation

        if self.pretrained and weights:
            self.model = load_pretrained(cfg.pretrained, "segmenter", OneFormerForUniversalSegmentation)
            task = _tokenize_task(cfg.pretrained, self.model.config.task_seq_len)
        else:
            arch = _strip(arch)
            if isinstance(arch.get("backbone_config"), dict):
                from transformers import SwinConfig

                arch["backbone_config"] = SwinConfig(**_strip(arch["backbone_config"]))
            self.model = OneFormerForUniversalSegmentation(OneFormerConfig(**arch))
            task = _synthetic_task_ids(self.model.config.task_seq_len)
        self.model.eval()
        self.model.requires_grad_(False)
        self.register_buffer("task_inputs", task, persistent=False)

    def class_scores(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x, task_inputs=self.task_inputs.expand(x.shape[0], -1))
        classes = out.class_queries_logits.float().softmax(dim=-1)[..., :-1]
        masks = out.masks_queries_logits.float().sigmoid()
        return torch.einsum("bqc,bqhw->bchw", classes, masks)


class SegFormerSegmenter(Segmenter):
    """`SegformerForSemanticSegmentation` (b0: ~0.3 s/image on a CPU): the fast setting."""

    def __init__(self, cfg: SegmenterConfig, arch: dict, *, weights: bool = True):
        super().__init__(cfg)
        from transformers import SegformerConfig, SegformerForSemanticSegmentation

        if self.pretrained and weights:
            self.model = load_pretrained(cfg.pretrained, "segmenter", SegformerForSemanticSegmentation)
        else:
            self.model = SegformerForSemanticSegmentation(SegformerConfig(**_strip(arch)))
        self.model.eval()
        self.model.requires_grad_(False)

    def class_scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def build_segmenter(cfg: SegmenterConfig, arch: dict | None, *, weights: bool = True) -> Segmenter | None:
    if cfg.kind == "none":
        return None
    cls = {"oneformer": OneFormerSegmenter, "segformer": SegFormerSegmenter}[cfg.kind]
    return cls(cfg, arch or {}, weights=weights)


def _tokenize_task(name_or_path: str, length: int) -> torch.Tensor:
    """OneFormer's task input, as its processor makes it: the CLIP tokenisation of the task text,
    padded to `task_seq_len`. (`from_pretrained(dir)`: in transformers 5, building a CLIPTokenizer
    from vocab/merges file arguments silently ignores them.)"""
    from transformers import AutoTokenizer

    tok = load_pretrained(name_or_path, "OneFormer tokenizer", AutoTokenizer)
    ids = tok(ONEFORMER_TASK, padding="max_length", max_length=length, truncation=True)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


def _synthetic_task_ids(length: int) -> torch.Tensor:
    """For a config-built (random) OneFormer no tokenizer is needed: any fixed ids will do. These are
    CLIP's ids for <start> "the task is semantic" <end>, zero-padded."""
    ids = [49406, 518, 6557, 533, 21079, 49407]
    return torch.tensor([ids + [0] * (length - len(ids))], dtype=torch.long)
