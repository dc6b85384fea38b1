"""The small segmenter (`model.segmenter.kind = "small"`): a few strided conv blocks and a
two-step upsampling decoder with skips (a miniature U-Net, ~0.5 M parameters at the default widths),
fast on a CPU at a few hundred pixels.

It is config-built (`SegmenterConfig.arch`, see `config.SMALL_SEGMENTER_ARCH`) and trained on class
maps by `geosurge_index.segmenter_train` (the demo world ships ground-truth maps for every photo);
its weights travel in our safetensors like any config-built part, so an index carries it whole.
It predicts only the ADE20K ids in `arch["labels"]` (those its training maps hold); every other
class scores `ABSENT_SCORE`, so the arg-max never picks a class it never saw.

Layout: stem conv /2 -> conv (skip A, /2) -> conv /4 -> conv (skip B, /4) -> conv /8 -> dilated
convs (/8, `arch.dilations`: wider context) [+ the global average's projection, `arch.context`] -> up x2 + B -> conv
-> up x2 + A -> conv -> 1x1 head: scores at 1/2 of the input, which `Segmenter._segment`
upsamples to the encoder's size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from geosurge_index.errors import UserError
from geosurge_index.model.config import NUM_ADE20K_CLASSES, SegmenterConfig
from geosurge_index.model.segmenter import SEGMENTER_KINDS, Segmenter

ABSENT_SCORE = -1e4  # the score of classes the segmenter does not predict (finite: bilinear-safe, bf16-safe)


def _block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallConvNet(nn.Module):
    """(B, 3, s, s) -> (B, len(labels), s/2, s/2) logits over its own labels."""

    def __init__(self, widths: list[int], n_labels: int, context: bool = True, dilations: tuple = (2,)):
        super().__init__()
        if len(widths) != 3 or min(widths) < 1:
            raise UserError(f"small segmenter: widths must be 3 positive numbers, got {widths}")
        a, b, c = (int(w) for w in widths)
        self.stem = nn.Sequential(_block(3, a, stride=2), _block(a, a))  # /2: skip A
        self.down1 = nn.Sequential(_block(a, b, stride=2), _block(b, b))  # /4: skip B
        # /8: dilated blocks see most of the picture (a building's full height, a roof's shape)
        self.down2 = nn.Sequential(_block(b, c, stride=2), *(_block(c, c, dilation=int(d)) for d in dilations))
        # the whole picture's gist (biome, region), added everywhere: what a class is often depends
        # on the scene (a beach's sand, a palm's crown, a skyscraper's full height)
        self.context = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1), nn.ReLU(inplace=True)) \
            if context else None
        self.up1 = _block(c + b, b)
        self.up2 = _block(b + a, a)
        self.head = nn.Conv2d(a, n_labels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip_a = self.stem(x)
        skip_b = self.down1(skip_a)
        y = self.down2(skip_b)
        if self.context is not None:
            y = y + self.context(y)
        y = F.interpolate(y, size=skip_b.shape[-2:], mode="bilinear", align_corners=False)
        y = self.up1(torch.cat([y, skip_b], dim=1))
        y = F.interpolate(y, size=skip_a.shape[-2:], mode="bilinear", align_corners=False)
        y = self.up2(torch.cat([y, skip_a], dim=1))
        return self.head(y)


def arch_labels(arch: dict) -> list[int]:
    labels = [int(v) for v in arch.get("labels", range(NUM_ADE20K_CLASSES))]
    if not labels or len(set(labels)) != len(labels) or not all(0 <= v < NUM_ADE20K_CLASSES for v in labels):
        raise UserError(f"small segmenter: `labels` must be distinct ADE20K ids 0..{NUM_ADE20K_CLASSES - 1}")
    return labels


class SmallSegmenter(Segmenter):
    """The `Segmenter` around `SmallConvNet`: scores for all 150 ADE20K classes, `ABSENT_SCORE`
    for those outside its labels."""

    # fp32 activations per input pixel: ~(2a + b + c/2 + 3(a+b)/4 ...) channels at the reduced
    # sizes plus the 150 class scores at 1/4 of the pixels; a generous round figure.
    bytes_per_input_pixel = 768

    def __init__(self, cfg: SegmenterConfig, arch: dict, *, weights: bool = True):
        super().__init__(cfg)
        del weights  # config-built: its weights come with our safetensors, whatever the caller loads
        labels = arch_labels(arch)
        self.model = SmallConvNet(list(arch.get("widths", [32, 64, 96])), len(labels),
                                  context=bool(arch.get("context", False)),
                                  dilations=tuple(arch.get("dilations", (2,))))
        self.register_buffer("labels", torch.tensor(labels, dtype=torch.long), persistent=False)
        self.model.eval()
        self.model.requires_grad_(False)

    def label_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, s, s) segmenter-normalised -> (B, len(labels), s/2, s/2): what training fits."""
        return self.model(x.contiguous(memory_format=torch.channels_last))  # faster CPU convolutions

    def class_scores(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.label_logits(x)
        b, _, h, w = logits.shape
        out = torch.full((b, NUM_ADE20K_CLASSES, h, w), ABSENT_SCORE, dtype=logits.dtype, device=logits.device)
        out[:, self.labels] = logits
        return out


SEGMENTER_KINDS["small"] = SmallSegmenter
