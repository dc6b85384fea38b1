"""Image geometry: where the model's crops lie in an image, and CLIP normalisation.

A `CropPlan` says where the crops of one image are: resize the image (aspect kept) so that its
short side is the crop size (centre crop) or `TEN_CROP_SCALE` times it (ten-crop), cut squares
at fixed corners of that resize, and for ten-crop add their mirror images. The plan is made once
from the image's size and applied both to its pixels (bicubic) and to its class map (nearest
neighbour, whatever the map's resolution: the boxes are scaled to the map), so a class map is
always cut exactly like its image.

Class maps come in two kinds (`class_map_region`): a map of the whole image (any resolution, the
demo world's ground truth, maps written before crop-region maps existed), which is cut with the
plan's boxes; and a map of the centre crop (`geosurge segment` today: the segmenter's output for
the very crop the backbone sees, at the encoder's side, tagged with a PNG text chunk), which a
centre-crop plan takes whole and a ten-crop plan cannot use (`cut_class_map` -> None: the
segmenter then runs on each of the ten crops, as it does with no map at all).

Pixels stay uint8 until they reach the model's device; `normalise` / `clip_normalise` turn them
into the float input there (torch is imported only by those two).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

# Test-time ten-crop (the paper's evaluation setting): the 4 corner crops and the centre crop of a
# resize to 1.143x the crop size, then their mirror images.
TEN_CROP_SCALE = 1.143
TEN_CROPS = 10

# CLIP's normalisation (openai/clip-vit-*): the backbone expects it.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


# The PNG text chunk marking a class map of a crop region (see the module docstring).
CLASS_MAP_KEY = "geosurge-classmap"
CLASS_MAP_FORMAT = "geosurge-classmap"
CLASS_MAP_VERSION = 2  # 1: a map of the whole image (no text chunk)
CENTRE_CROP_REGION = "centre_crop"


def class_map_region(class_map: Image.Image) -> dict | None:
    """The crop-region header of a class map (`CLASS_MAP_KEY` text chunk), or None for a map of
    the whole image. ValueError for a header this version cannot read."""
    raw = class_map.info.get(CLASS_MAP_KEY) if isinstance(class_map, Image.Image) else None
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
        version = int(meta["format_version"])
        region = meta["region"]
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"class map header {CLASS_MAP_KEY!r} is not valid ({err})") from None
    if meta.get("format") != CLASS_MAP_FORMAT or version > CLASS_MAP_VERSION or region != CENTRE_CROP_REGION:
        raise ValueError(f"class map of format {meta.get('format')!r} v{version}, region {region!r}: this "
                         f"version reads {CLASS_MAP_FORMAT} v{CLASS_MAP_VERSION} maps of the {CENTRE_CROP_REGION}")
    return meta


def centre_crop_header(width: int, height: int, size: int, **extra) -> str:
    """The text-chunk value that marks a map as the `size` x `size` centre crop of a `width` x
    `height` image (`class_map_region` reads it)."""
    return json.dumps({"format": CLASS_MAP_FORMAT, "format_version": CLASS_MAP_VERSION,
                       "region": CENTRE_CROP_REGION, "image": [int(width), int(height)], "size": int(size),
                       **extra}, sort_keys=True)


def short_side_size(width: int, height: int, short: int) -> tuple[int, int]:
    """The size of a resize that keeps the aspect and puts the short side at `short`; the long
    side is `int(short * long / short_side)` (truncated), exactly as torchvision's `Resize(short)`
    and transformers' CLIP processor compute it, so a crop equals CLIP's own preprocessing."""
    if width <= height:
        return short, max(short, int(short * height / width))
    return max(short, int(short * width / height)), short


@dataclass(frozen=True)
class CropPlan:
    """The crops of one image: resize it to `resized` (w, h), cut `size` x `size` squares whose
    top-left corners in that resize are `corners`, then, with `mirror`, append each crop's mirror
    image (so crop i + len(corners) mirrors crop i)."""

    size: int
    resized: tuple[int, int]
    corners: tuple[tuple[int, int], ...]
    mirror: bool = False

    @property
    def n_crops(self) -> int:
        return len(self.corners) * (2 if self.mirror else 1)

    @property
    def is_centre(self) -> bool:
        """One unmirrored crop, centred in a resize whose short side is the crop size: `centre_crop`."""
        (w, h), s = self.resized, self.size
        return not self.mirror and min(w, h) == s and self.corners == (((w - s) // 2, (h - s) // 2),)

    def source_boxes(self, width: int, height: int) -> list[tuple[float, float, float, float]]:
        """The crop boxes in the coordinates of a `width` x `height` picture of the same scene
        (the image itself, or its class map at another resolution)."""
        (rw, rh), s = self.resized, self.size
        # multiply first: (x + s) * width / rw is exactly width at the right edge, never above it
        return [(x * width / rw, y * height / rh, min(width, (x + s) * width / rw), min(height, (y + s) * height / rh))
                for x, y in self.corners]

    def _stack(self, crops: list[Image.Image]) -> np.ndarray:
        """The crops, then with `mirror` their mirror images, as one uint8 array (PIL's flip is
        faster than a copy of a reversed numpy view)."""
        if self.mirror:
            crops = crops + [c.transpose(Image.FLIP_LEFT_RIGHT) for c in crops]
        first = np.asarray(crops[0], dtype=np.uint8)
        out = np.empty((len(crops), *first.shape), dtype=np.uint8)
        for i, c in enumerate(crops):
            out[i] = first if i == 0 else np.asarray(c, dtype=np.uint8)
        return out

    def cut_pixels(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> uint8 (n_crops, size, size, 3): one bicubic resize, then the crops.
        (Equal to a bicubic resize of each `source_boxes` box, which is what the map gets; one
        resize of the whole image is cheaper when the crops overlap, as the ten crops do.)"""
        big = img.resize(self.resized, Image.BICUBIC)
        s = self.size
        return self._stack([big.crop((x, y, x + s, y + s)) for x, y in self.corners])

    def cut_class_map(self, class_map: Image.Image | np.ndarray) -> np.ndarray | None:
        """An 8-bit class map of the image -> uint8 (n_crops, size, size), or None.

        A map of the whole image (any resolution, same scene): the plan's boxes, nearest-neighbour.
        A map of the centre crop (`class_map_region`): this plan's crop when the plan is a centre
        crop (nearest-neighbour to `size`: unchanged when the map was made at this size, which is
        how the precomputed map equals the one the segmenter computes on the fly); None for any
        other plan (ten-crop), whose crops the map does not cover."""
        m = class_map if isinstance(class_map, Image.Image) else Image.fromarray(np.asarray(class_map, np.uint8), "L")
        s = self.size
        if class_map_region(m) is not None:
            if not self.is_centre:
                return None
            return self._stack([m if m.size == (s, s) else m.resize((s, s), Image.NEAREST)])
        return self._stack([m.resize((s, s), Image.NEAREST, box=box) for box in self.source_boxes(*m.size)])


def centre_crop(width: int, height: int, size: int) -> CropPlan:
    """Short side resized to `size`, the centred `size` x `size` square."""
    w, h = short_side_size(width, height, size)
    return CropPlan(size, (w, h), (((w - size) // 2, (h - size) // 2),))


def ten_crop(width: int, height: int, size: int) -> CropPlan:
    """Short side resized to `TEN_CROP_SCALE` x `size`; the 4 corner squares and the centre one,
    then their mirror images."""
    w, h = short_side_size(width, height, round(size * TEN_CROP_SCALE))
    s = size
    corners = ((0, 0), (w - s, 0), (0, h - s), (w - s, h - s), ((w - s) // 2, (h - s) // 2))
    return CropPlan(size, (w, h), corners, mirror=True)


def crop_plan(width: int, height: int, size: int, *, ten: bool = False) -> CropPlan:
    return ten_crop(width, height, size) if ten else centre_crop(width, height, size)


# -- normalisation (torch) ----------------------------------------------------------------------


@lru_cache(maxsize=32)
def _constants(mean: tuple[float, ...], std: tuple[float, ...], device):
    import torch

    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


def normalise(pixels, mean, std, device=None, *, non_blocking: bool = False):
    """uint8 (B, S, S, 3) (numpy or torch) -> float32 (B, 3, S, S) = (pixels / 255 - mean) / std,
    on `device` (default: where the pixels are). The uint8 crosses to the device (4x less than
    float32; `non_blocking` from pinned memory) and the arithmetic runs there."""
    import torch

    if isinstance(pixels, np.ndarray) and not pixels.flags.writeable:  # e.g. np.asarray of a PIL image
        pixels = pixels.copy()
    x = torch.as_tensor(pixels)
    if device is not None:
        x = x.to(device, non_blocking=non_blocking)
    m, s = _constants(tuple(float(v) for v in mean), tuple(float(v) for v in std), x.device)
    return x.permute(0, 3, 1, 2).float().div_(255.0).sub_(m).div_(s)


def clip_normalise(pixels, device=None, *, non_blocking: bool = False):
    """uint8 (B, S, S, 3) -> CLIP-normalised float32 (B, 3, S, S) on `device`: the visual
    encoder's input, for the predictor, training and the segmenter alike."""
    return normalise(pixels, CLIP_MEAN, CLIP_STD, device, non_blocking=non_blocking)
