"""Inference-time helpers around `VisualEncoder`: test-time ten-crop averaging.

Ten-crop (the paper's test-time setting): the 4 corner crops and the centre crop of a 1.143x
resize, and their mirror images (`images.Preprocess.ten_crop_arrays`); the embedding is the
L2-normalised mean of the ten. Class maps, when precomputed, are cut with the same geometry.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

TEN_CROP_SCALE = 1.143  # the same factor as images.Preprocess.ten_crop_arrays


def ten_crop_class_maps(class_map: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """A class map (8-bit, any size) -> int64 (10, size, size), aligned with
    `Preprocess(size).ten_crop_arrays` of its image (nearest-neighbour resize, same boxes, mirrored)."""
    img = class_map if isinstance(class_map, Image.Image) else Image.fromarray(np.asarray(class_map, np.uint8), "L")
    big = round(size * TEN_CROP_SCALE)
    w, h = img.size
    scale = big / min(w, h)
    img = img.resize((max(big, round(w * scale)), max(big, round(h * scale))), Image.NEAREST)
    arr = np.asarray(img)
    H, W = arr.shape
    s = size
    boxes = [(0, 0), (W - s, 0), (0, H - s), (W - s, H - s), ((W - s) // 2, (H - s) // 2)]
    crops = [arr[y:y + s, x:x + s] for x, y in boxes]
    crops += [c[:, ::-1] for c in crops]
    return np.stack(crops).astype(np.int64)


def embed_ten_crop(encoder, crops: torch.Tensor, class_maps: torch.Tensor | None = None) -> torch.Tensor:
    """crops (B, 10, 3, S, S) CLIP-normalised (+ class maps (B, 10, S, S) or None: the segmenter
    runs per crop) -> (B, d) L2-normalised mean of the ten embeddings."""
    if crops.ndim != 5:
        raise ValueError(f"crops must be (B, n_crops, 3, S, S), got {tuple(crops.shape)}")
    b, n = crops.shape[:2]
    flat_maps = None if class_maps is None else class_maps.reshape(b * n, *class_maps.shape[2:])
    emb = encoder(crops.reshape(b * n, *crops.shape[2:]), flat_maps)
    return F.normalize(emb.view(b, n, -1).mean(dim=1), dim=-1)
