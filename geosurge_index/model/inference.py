"""Inference-time helpers around `VisualEncoder`: test-time ten-crop averaging.

Ten-crop (the paper's test-time setting, `geometry.ten_crop`): the 4 corner crops and the centre
crop of a `geometry.TEN_CROP_SCALE` resize, and their mirror images; the embedding is the
L2-normalised mean of the ten. Class maps are cut with the same crop plan.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from geosurge_index import geometry
from geosurge_index.geometry import TEN_CROP_SCALE  # noqa: F401 - its old home


def ten_crop_class_maps(class_map: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """A class map (8-bit, any size) -> int64 (10, size, size): the ten crops of the map's own size
    (`geometry.ten_crop`, nearest), aligned with `Preprocess(size).ten_crop_pixels` of an image of
    the map's aspect."""
    img = class_map if isinstance(class_map, Image.Image) else Image.fromarray(np.asarray(class_map, np.uint8), "L")
    crops = geometry.ten_crop(*img.size, size).cut_class_map(img)
    if crops is None:
        raise ValueError("this class map covers the centre crop only (`geosurge segment`): ten-crop needs a map "
                         "of the whole image, or none (the segmenter then runs on each crop)")
    return crops.astype(np.int64)


def embed_ten_crop(encoder, crops: torch.Tensor, class_maps: torch.Tensor | None = None) -> torch.Tensor:
    """crops (B, 10, 3, S, S) CLIP-normalised (+ class maps (B, 10, S, S) or None: the segmenter
    runs per crop) -> (B, d) L2-normalised mean of the ten embeddings."""
    if crops.ndim != 5:
        raise ValueError(f"crops must be (B, n_crops, 3, S, S), got {tuple(crops.shape)}")
    b, n = crops.shape[:2]
    flat_maps = None if class_maps is None else class_maps.reshape(b * n, *class_maps.shape[2:])
    emb = encoder(crops.reshape(b * n, *crops.shape[2:]), flat_maps)
    return F.normalize(emb.view(b, n, -1).mean(dim=1), dim=-1)
