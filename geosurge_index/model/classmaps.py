"""Precomputing semantic class maps once per image: `<stem>.classmap.png` beside each image.

Segmentation is the costly part of the encoder (OneFormer Swin-L ~8 s/image on a CPU), so
training and bulk locate read stored maps instead (`images.class_map_path`, `images.load_class_map`).
A map covers the whole image (aspect kept, short side = the segmenter's input size), so
`load_class_map` can crop it exactly as `Preprocess` crops the image.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from geosurge_index import geometry
from geosurge_index.images import ImageDecodeError, class_map_path, decode_image
from geosurge_index.model.segmenter import IMAGENET_MEAN, IMAGENET_STD, Segmenter


@torch.no_grad()
def segment_pil(segmenter: Segmenter, img: Image.Image) -> np.ndarray:
    """RGB PIL -> uint8 (h, w) ADE20K ids, at the image's aspect with the short side at the
    segmenter's input size."""
    nw, nh = geometry.short_side_size(*img.size, segmenter.input_size)
    device = next(segmenter.model.parameters()).device
    px = np.asarray(img.resize((nw, nh), Image.BICUBIC), dtype=np.uint8)[None]
    x = geometry.normalise(px, IMAGENET_MEAN, IMAGENET_STD, device)
    scores = F.interpolate(segmenter.class_scores(x).float(), size=(nh, nw), mode="bilinear", align_corners=False)
    return scores.argmax(1)[0].to(torch.uint8).cpu().numpy()


def write_class_maps(paths: list[str | os.PathLike], segmenter: Segmenter, *, overwrite: bool = False,
                     progress: bool = True) -> Counter:
    """Write `<stem>.classmap.png` beside every image (skipping existing maps unless `overwrite`).
    Returns counts: written, existing, and one entry per decode-error kind (never raises on a bad image)."""
    from geosurge_index.progress import bar

    counts: Counter = Counter()
    segmenter.eval()
    for p in bar(paths, desc="class maps", unit="img") if progress else paths:
        out = class_map_path(p)
        if out.exists() and not overwrite:
            counts["existing"] += 1
            continue
        try:
            img = decode_image(p)
        except ImageDecodeError as err:
            counts[err.kind] += 1
            continue
        cm = segment_pil(segmenter, img)
        tmp = Path(str(out) + ".tmp")
        Image.fromarray(cm, "L").save(tmp, format="PNG")
        os.replace(tmp, out)
        counts["written"] += 1
    return counts
