"""Precomputing semantic class maps once per image: `<stem>.classmap.png` beside each image.

Segmentation is the costly part of the encoder (OneFormer Swin-L ~8 s/image on a CPU), so
training and bulk locate read stored maps instead (`images.class_map_path`).

One geometry for stored and on-the-fly maps: a stored map is the segmenter's output for the very
crop the backbone sees (the centre crop at the encoder's side, `geometry.centre_crop`), computed
by the same `Segmenter.forward` the encoder calls when no map is given (CLIP pixels of the crop ->
the segmenter's input size -> class scores -> arg-max at the encoder's side). It is stored at
that side with a text chunk saying so (`geometry.centre_crop_header`); the reader stage's
`CropPlan.cut_class_map` then returns it unchanged for a centre crop, so a model sees the same
map whether it was precomputed or computed on the fly (tests/test_segment.py checks they are
equal). Ten-crop needs a map per crop: stored maps are not used there, the segmenter runs on each.
`segment_images` is the library behind `geosurge segment`.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from geosurge_index import geometry
from geosurge_index.images import ImageDecodeError, class_map_path, decode_image
from geosurge_index.model.segmenter import Segmenter

# The side of the crop the default backbone sees (CLIP ViT-L/14-336); `geosurge segment --image-size`.
DEFAULT_IMAGE_SIZE = 336


@torch.no_grad()
def segment_pil(segmenter: Segmenter, img: Image.Image, image_size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """RGB PIL -> uint8 (image_size, image_size) ADE20K ids of its centre crop at `image_size`:
    exactly the map the encoder's segmenter computes on the fly for that crop (same pixels, same
    `Segmenter.forward`)."""
    device = next(segmenter.model.parameters()).device
    px = geometry.centre_crop(*img.size, image_size).cut_pixels(img)  # (1, S, S, 3): the reader's crop
    labels = segmenter(geometry.clip_normalise(px, device))
    return labels[0].to(torch.uint8).cpu().numpy()


def save_class_map(path: str | os.PathLike, class_map: np.ndarray, width: int, height: int, **extra) -> None:
    """Write a centre-crop class map (uint8 (S, S)) of a `width` x `height` image as an 8-bit PNG
    tagged with its region (`geometry.centre_crop_header`), atomically (temporary + rename)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(geometry.CLASS_MAP_KEY, geometry.centre_crop_header(width, height, class_map.shape[0], **extra))
    out = Path(path)
    tmp = Path(str(out) + ".tmp")
    Image.fromarray(np.ascontiguousarray(class_map, np.uint8), "L").save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, out)


def write_class_maps(paths: list[str | os.PathLike], segmenter: Segmenter, *, overwrite: bool = False,
                     progress: bool = True, image_size: int = DEFAULT_IMAGE_SIZE) -> Counter:
    """Write `<stem>.classmap.png` beside every image (skipping existing maps unless `overwrite`):
    the map of its centre crop at `image_size` (the side the encoder takes; `segment_pil`).
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
        cm = segment_pil(segmenter, img, image_size)
        save_class_map(out, cm, *img.size, input_size=int(segmenter.input_size))
        counts["written"] += 1
    return counts


def load_segmenter(kind: str, pretrained: str, input_size: int | None, device="auto", *,
                   download: bool = False) -> Segmenter:
    """A pretrained segmenter (`kind` oneformer or segformer) from `from_pretrained` (a folder or
    the Hugging Face cache), on `device` (`devices.resolve_device`). Nothing is downloaded unless
    `download`: a hub id is first resolved to its folder in the cache (`local_weights`). `kind`
    small: a trained small segmenter's folder (`encoder_io.load_segmenter`), at its own input
    size unless `input_size` is given."""
    from geosurge_index.devices import resolve_device
    from geosurge_index.errors import FormatError, UserError
    from geosurge_index.model.config import SegmenterConfig
    from geosurge_index.model.segmenter import build_segmenter

    if input_size is not None and input_size < 32:
        raise UserError(f"input size {input_size}: too small for a segmenter (at least 32)")
    if kind == "small":
        from geosurge_index.model.encoder_io import load_segmenter as load_trained

        try:
            _, seg = load_trained(pretrained, resolve_device(device))
        except FormatError as err:
            raise UserError(f"--pretrained {pretrained}: not a trained small segmenter ({err})") from None
        if input_size is not None:
            seg.input_size = input_size
        return seg
    if input_size is None:
        raise UserError(f"segmenter {kind}: give its input size")
    local = local_weights(pretrained, download=download)
    cfg = SegmenterConfig(kind=kind, pretrained=local, arch=None, input_size=input_size)
    return build_segmenter(cfg, None).to(resolve_device(device))


def local_weights(name_or_path: str, *, download: bool = False) -> str:
    """A folder of pretrained weights for `from_pretrained`: `name_or_path` itself when it is a
    folder, else the hub id's snapshot in the Hugging Face cache, looked up with
    `local_files_only=True` (no network, whatever HF_HUB_OFFLINE says); `download` fetches it
    instead. UserError when it is neither."""
    from geosurge_index.errors import UserError

    if os.path.isdir(name_or_path):
        return name_or_path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name_or_path, local_files_only=not download)
    except Exception as err:  # noqa: BLE001 - not cached, not a valid id, no network ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        how = ("could not be downloaded" if download else
               "is neither a local folder nor in the Hugging Face cache (nothing is downloaded without "
               "--download)")
        raise UserError(f"segmenter weights {name_or_path!r} {how} ({type(err).__name__}: {first}). Give a "
                        "folder saved with save_pretrained, or a hub id already in the cache") from None


@dataclass
class SegmentSummary:
    """What a `segment_images` run did, per image (`line()`: the report `geosurge segment` prints)."""

    images: int = 0
    written: int = 0
    existing: int = 0
    errors: Counter = field(default_factory=Counter)  # kind -> count
    first_error: dict = field(default_factory=dict)  # kind -> "path: message" of its first case

    def line(self) -> str:
        n_err = sum(self.errors.values())
        out = (f"segment: {self.images} images: {self.written} maps written, {self.existing} skipped "
               f"(map exists), {n_err} errors")
        if self.errors:
            out += "\n  errors by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items()))
            out += "".join(f"\n  first {k}: {msg}" for k, msg in sorted(self.first_error.items()))
        return out


def segment_images(paths: list, segmenter, *, overwrite: bool = False,
                   image_size: int = DEFAULT_IMAGE_SIZE) -> SegmentSummary:
    """Write `<stem>.classmap.png` beside each image with `model.classmaps.write_class_maps`, one
    image at a time so that a failure is counted against its image and the run goes on."""
    from geosurge_index.progress import bar

    summary = SegmentSummary(images=len(paths))
    with bar(total=len(paths), desc="segment", unit="img") as pbar:
        for p in paths:
            try:
                counts = write_class_maps([p], segmenter, overwrite=overwrite, progress=False,
                                          image_size=image_size)
            except OSError as err:  # the map could not be written (read-only folder, full disk)
                counts = Counter({"write_failed": 1})
                summary.first_error.setdefault("write_failed", f"{p}: {err}")
            except (RuntimeError, ValueError) as err:  # the segmenter failed on this image
                counts = Counter({"segment_failed": 1})
                summary.first_error.setdefault("segment_failed", f"{p}: {type(err).__name__}: {err}")
            summary.written += counts.pop("written", 0)
            summary.existing += counts.pop("existing", 0)
            for kind in counts:
                if kind not in summary.first_error:
                    summary.first_error[kind] = _decode_message(p)
            summary.errors.update(counts)
            pbar.update(1)
            if summary.errors:
                pbar.set_postfix(errors=sum(summary.errors.values()), refresh=False)
    return summary


def _decode_message(path) -> str:
    """The decoder's message for an image write_class_maps counted as bad (it keeps only the kind);
    asked once per kind."""
    try:
        decode_image(path)
    except ImageDecodeError as err:
        return f"{path}: {err.message}"
    return f"{path}: cannot be decoded"
