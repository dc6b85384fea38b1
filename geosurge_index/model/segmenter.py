"""Semantic segmenters giving ADE20K class maps (B, S, S) int64 from CLIP-normalised pixels.

Segmentation is the costly part of the encoder (OneFormer Swin-L ~8 s/image on a CPU), so the
usual path is to compute class maps once and store them beside the images
(`images.class_map_path`); these modules run only when no map is given. The segmenter is never
trained with the model (the small one, `small_segmenter.py`, is trained alone on class maps).

Memory. A batch is segmented in sub-batches sized by a memory budget (`Segmenter.sub_batch`): at
512 px OneFormer Swin-L holds ~60 MB per image in each window-attention score tensor, so bulk
locate's CUDA batch of 256 in one call would need tens of GB. The budget is
GEOSURGE_SEGMENTER_MEMORY_MB when set, else half the memory free on the device (CUDA:
`torch.cuda.mem_get_info` plus torch's unused cache), at most 4 GiB on the CPU. The class scores are
upsampled to the output size and arg-maxed in chunks of classes (`upsample_argmax`), never as a
whole (B, 150, S, S) float32 tensor; the result is identical to one upsample + argmax (bit for bit:
see `upsample_argmax`).
"""

from __future__ import annotations

import os

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

MEMORY_ENV = "GEOSURGE_SEGMENTER_MEMORY_MB"
CPU_BUDGET = 4 << 30  # bytes: the CPU default cap (a tenth of a large host's RAM, most of a laptop's)
BUDGET_FRACTION = 0.5  # of the free device memory: the rest is headroom for fragmentation, other stages
UPSAMPLE_CHUNK_BYTES = 256 << 20  # upsampled scores held at once by `upsample_argmax`


def _strip(arch: dict) -> dict:
    return {k: v for k, v in arch.items() if k not in ("model_type", "transformers_version")}


class Segmenter(nn.Module):
    """Base: re-normalises the encoder's input (the crop the backbone sees) for the segmenter,
    runs it at `input_size`, and returns the arg-max class map at the encoder's resolution.
    `geosurge segment` stores exactly this map for the centre crop (`model.classmaps.segment_pil`),
    so stored and on-the-fly maps are the same."""

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

    # Working memory per input pixel of one image at `input_size` (activations, fp32, the largest
    # live set of one forward): conservative estimates, overridden by subclasses.
    bytes_per_input_pixel = 1024

    def bytes_per_image(self, out_size: int) -> int:
        """Estimated peak bytes one image takes in `forward`: the model at `input_size` plus its
        upsampled class scores being arg-maxed at `out_size`."""
        return self.bytes_per_input_pixel * self.input_size ** 2 + 2 * 4 * out_size ** 2

    def memory_budget(self, device) -> int:
        """Bytes a forward may take on `device` (see the module's docstring)."""
        env = os.environ.get(MEMORY_ENV, "").strip()
        if env:
            try:
                mb = float(env)
            except ValueError:
                from geosurge_index.errors import UserError

                raise UserError(f"{MEMORY_ENV}={env!r}: expected a number of megabytes") from None
            return max(1, int(mb * (1 << 20)))
        from geosurge_index.devices import free_memory

        free = free_memory(device)
        if torch.device(device).type == "cuda":
            return int(free * BUDGET_FRACTION)
        return min(CPU_BUDGET, int(free * BUDGET_FRACTION)) if free else CPU_BUDGET

    def sub_batch(self, n: int, out_size: int, device) -> int:
        """Images per segmenter call for a batch of `n` (at least 1)."""
        return max(1, min(n, self.memory_budget(device) // self.bytes_per_image(out_size)))

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        n, size = pixel_values.shape[0], pixel_values.shape[-1]
        step = self.sub_batch(n, size, pixel_values.device) if n > 1 else 1
        if step >= n:
            return self._segment(pixel_values)
        out = torch.empty((n, size, size), dtype=torch.int64, device=pixel_values.device)
        for i in range(0, n, step):  # a handful of model calls, not a per-row loop
            out[i:i + step] = self._segment(pixel_values[i:i + step])
        return out

    def _segment(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = pixel_values.shape[-1]
        x = pixel_values * self.scale + self.shift
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return upsample_argmax(self.class_scores(x), (size, size))


CLASS_CHUNK = 64  # classes per chunk: a multiple of any CPU vector width, see `upsample_argmax`


def upsample_argmax(scores: torch.Tensor, size: tuple[int, int],
                    chunk_bytes: int = UPSAMPLE_CHUNK_BYTES) -> torch.Tensor:
    """(B, C, h, w) class scores -> (B, H, W) int64: the argmax over classes of the scores upsampled
    bilinearly (fp32) to `size`, in chunks of images and of classes so that the whole (B, C, H, W)
    upsample is never held (about `chunk_bytes` at a time; at least one image x 64 classes).

    The result equals `F.interpolate(scores.float(), size).argmax(1)` exactly: interpolation treats
    each image and class alone; a later class chunk replaces the running best only where strictly
    greater (ties: the lowest class, as `argmax`); and class chunks are multiples of 64 because
    the CPU kernel vectorises across channels on small maps, so a chunk boundary off the vector
    lanes would change the last bit of some values."""
    b, c = scores.shape[:2]
    h, w = size
    plane = max(1, h * w * 4)  # bytes of one upsampled class of one image
    if c * plane <= chunk_bytes:
        cstep = c
    else:
        cstep = min(c, max(CLASS_CHUNK, chunk_bytes // plane // CLASS_CHUNK * CLASS_CHUNK))
    bstep = max(1, chunk_bytes // (cstep * plane))
    if bstep >= b and cstep >= c:
        return F.interpolate(scores.float(), size=size, mode="bilinear", align_corners=False).argmax(dim=1)
    out = torch.empty((b, h, w), dtype=torch.int64, device=scores.device)
    for i in range(0, b, bstep):  # a few chunks, each a whole-tensor operation
        out[i:i + bstep] = _argmax_over_class_chunks(scores[i:i + bstep], size, cstep)
    return out


def _argmax_over_class_chunks(scores: torch.Tensor, size: tuple[int, int], step: int) -> torch.Tensor:
    best = best_idx = None
    for c0 in range(0, scores.shape[1], step):
        up = F.interpolate(scores[:, c0:c0 + step].float(), size=size, mode="bilinear", align_corners=False)
        val, idx = up.max(dim=1)
        del up
        if best is None:
            best, best_idx = val, idx
        else:
            better = val > best
            best = torch.where(better, val, best)
            best_idx = torch.where(better, idx + c0, best_idx)
    return best_idx


class OneFormerSegmenter(Segmenter):
    """`OneFormerForUniversalSegmentation` in its semantic task. The class scores are those of the
    image processor's `post_process_semantic_segmentation` (softmax over classes without the null
    class, times sigmoid masks, summed over queries), computed here in batch on the model's device,
    in fp32 whatever the autocast (the post-processing it reproduces is fp32: in bf16 near-tie
    pixels would change class)."""

    # Swin-L at 512 px: ~60 MB per window-attention score tensor, a few alive at once, plus the
    # pixel decoder and the per-query masks (~1.5 KB per input pixel in all, fp32).
    bytes_per_input_pixel = 1536

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
        with torch.autocast(x.device.type, enabled=False):  # an fp32 island (see the class docstring)
            classes = out.class_queries_logits.float().softmax(dim=-1)[..., :-1]
            masks = out.masks_queries_logits.float().sigmoid()
            return torch.einsum("bqc,bqhw->bchw", classes, masks)


class SegFormerSegmenter(Segmenter):
    """`SegformerForSemanticSegmentation` (b0: ~0.3 s/image on a CPU): the fast setting."""

    bytes_per_input_pixel = 512  # efficient (reduced-key) attention: far less than Swin's windows

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


# More kinds register here: "small" (model/small_segmenter.py, imported by the model package).
SEGMENTER_KINDS: dict[str, type[Segmenter]] = {}


def build_segmenter(cfg: SegmenterConfig, arch: dict | None, *, weights: bool = True) -> Segmenter | None:
    if cfg.kind == "none":
        return None
    cls = {"oneformer": OneFormerSegmenter, "segformer": SegFormerSegmenter, **SEGMENTER_KINDS}[cfg.kind]
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
