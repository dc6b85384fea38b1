"""Decoding images robustly, and turning them into model inputs.

Every decode failure is an `ImageDecodeError` with a short `kind` (zero_bytes, unreadable,
not_an_image, truncated, too_many_pixels, unsupported_format) so that bulk runs can write an
error row and count errors by kind, never crash.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# A decompression-bomb cap: 12 MP photos are common, 100 MP panoramas are not bombs; 20000x20000 is.
DEFAULT_MAX_PIXELS = 100_000_000
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "MPO"})  # MPO: multi-picture JPEG from cameras

# CLIP's normalisation (openai/clip-vit-*): the backbone expects it.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

ImageFile.LOAD_TRUNCATED_IMAGES = False

TEN_CROP_SCALE = 1.143  # ten-crop boxes are cut from a resize to this x the crop size (`Preprocess`)


class ImageDecodeError(ValueError):
    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


ImageInput = "str | os.PathLike | bytes | Image.Image"

ROTATING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the picture by 90 or 270 degrees


def check_pixel_cap(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageDecodeError(
            "too_many_pixels", f"{width}x{height} = {width * height} pixels exceeds the cap of {max_pixels}"
        )


def probe_image(source, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Path or bytes -> the opened image with only its header read: the format is checked and
    the pixel cap applied (a rotation-invariant product, so EXIF is not needed), nothing is
    decoded. This is how decompression bombs are refused before any pixel is allocated."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = "<bytes>"
    else:
        name = os.fspath(source)
        try:
            data = Path(name).read_bytes()
        except OSError as err:
            raise ImageDecodeError("unreadable", f"{name}: {err.strerror or err}") from err
    if not data:
        raise ImageDecodeError("zero_bytes", f"{name} is empty")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as err:
        raise ImageDecodeError("not_an_image", f"{name} is not a recognised image") from err
    except Image.DecompressionBombError as err:
        raise ImageDecodeError("too_many_pixels", f"{name}: {err}") from err
    if img.format not in SUPPORTED_FORMATS:
        raise ImageDecodeError(
            "unsupported_format", f"{name} is {img.format}; supported: JPEG, PNG, WebP"
        )
    check_pixel_cap(*img.size, max_pixels)
    return img


@dataclass(frozen=True)
class SizedImage:
    """A decoded image and the photo's true size. `image` may be smaller than the photo (JPEG
    draft decoding scales by DCT); `width`/`height` are the photo's as it is seen, after EXIF
    rotation and before any draft scaling."""

    image: Image.Image  # RGB, EXIF orientation applied
    width: int
    height: int


def decode_image_with_size(
    source, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> SizedImage:
    """Path, bytes or PIL image -> an RGB PIL image with EXIF orientation applied, and the photo's
    true size (see `SizedImage`).

    `draft_size` lets JPEG decoding scale by DCT (2-6x faster) to at least that many pixels on
    the short side; the model resizes afterwards anyway.
    """
    if isinstance(source, Image.Image):
        img = source
        check_pixel_cap(*img.size, max_pixels)
    else:
        img = probe_image(source, max_pixels=max_pixels)
    w, h = img.size  # the stored size, before draft scaling
    try:
        if draft_size and img.format in ("JPEG", "MPO"):
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        # Read after load: a PNG's EXIF may follow its pixels (getexif would load it anyway).
        if img.getexif().get(0x0112) in ROTATING_ORIENTATIONS:
            w, h = h, w
        img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError("truncated", f"cannot decode: {err}") from err
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # alpha composited on white
            img = Image.alpha_composite(bg, rgba).convert("RGB")
        else:
            img = img.convert("RGB")  # L, I;16, CMYK, YCbCr, P ...
    return SizedImage(img, w, h)


def decode_image(
    source, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> Image.Image:
    """Path, bytes or PIL image -> an RGB PIL image with EXIF orientation applied
    (`decode_image_with_size` without the size)."""
    return decode_image_with_size(source, max_pixels=max_pixels, draft_size=draft_size).image


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side to `size` (bicubic), centre-crop `size` x `size`, CLIP-normalise."""

    size: int = 336

    def resize_crop(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        scale = self.size / min(w, h)
        nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        return img.crop((left, top, left + self.size, top + self.size))

    def to_array(self, img: Image.Image) -> np.ndarray:
        """RGB PIL -> float32 (3, size, size), normalised."""
        arr = np.asarray(self.resize_crop(img), dtype=np.float32) / 255.0
        return ((arr - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1).copy()

    def ten_crop_pixels(self, img: Image.Image) -> np.ndarray:
        """Test-time ten-crop as uint8 (10, size, size, 3): the 4 corners and the centre at `size`
        from a 1.143x resize, then their mirror images (`model.inference.ten_crop_class_maps` cuts
        class maps with the same boxes)."""
        big = round(self.size * TEN_CROP_SCALE)
        w, h = img.size
        scale = big / min(w, h)
        img = img.resize((max(big, round(w * scale)), max(big, round(h * scale))), Image.BICUBIC)
        W, H = img.size
        s = self.size
        boxes = [(0, 0), (W - s, 0), (0, H - s), (W - s, H - s), ((W - s) // 2, (H - s) // 2)]
        crops = [img.crop((x, y, x + s, y + s)) for x, y in boxes]
        crops += [c.transpose(Image.FLIP_LEFT_RIGHT) for c in crops]
        return np.stack([np.asarray(c, dtype=np.uint8) for c in crops])

    def ten_crop_arrays(self, img: Image.Image) -> np.ndarray:
        """`ten_crop_pixels`, CLIP-normalised: float32 (10, 3, size, size)."""
        arr = self.ten_crop_pixels(img).astype(np.float32) / 255.0
        return ((arr - CLIP_MEAN) / CLIP_STD).transpose(0, 3, 1, 2).copy()


def class_map_path(image_path: str | os.PathLike) -> Path:
    """Where a precomputed semantic class map lives: beside the image, `<stem>.classmap.png`."""
    p = Path(image_path)
    return p.with_name(p.stem + ".classmap.png")


def open_class_map(source) -> Image.Image:
    """A class-map PNG (path, bytes or file object) -> the PIL image (8-bit: ADE20K ids 0..149,
    255 = unlabelled), whole and unresized."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    name = getattr(source, "name", source if isinstance(source, (str, os.PathLike)) else "<bytes>")
    m = Image.open(source)
    if m.mode not in ("L", "P"):
        raise ImageDecodeError("bad_class_map", f"{name}: class maps are 8-bit single-channel PNGs")
    return m


def load_class_map(path, size: int) -> np.ndarray:
    """A class-map PNG (path, bytes or file object) -> int64 (size, size).

    Resized (nearest) and centre-cropped exactly as `Preprocess` crops the image, so that the
    map stays aligned with the pixels.
    """
    m = open_class_map(path)
    w, h = m.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    m = m.resize((nw, nh), Image.NEAREST)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(m.crop((left, top, left + size, top + size)), dtype=np.int64)
