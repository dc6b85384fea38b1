"""Decoding images robustly (crops and normalisation are `geometry`'s).

Every decode failure is an `ImageDecodeError` with a short `kind` (zero_bytes, unreadable,
not_an_image, truncated, too_many_pixels, unsupported_format) so that bulk runs can write an
error row and count errors by kind, never crash.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from geosurge_index import geometry
from geosurge_index.geometry import CLIP_MEAN, CLIP_STD, TEN_CROP_SCALE  # noqa: F401 - their old home

# A decompression-bomb cap: 12 MP photos are common, 100 MP panoramas are not bombs; 20000x20000 is.
DEFAULT_MAX_PIXELS = 100_000_000
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "MPO"})  # MPO: multi-picture JPEG from cameras


def _optional_formats() -> frozenset:
    """HEIC/HEIF through `pillow-heif` (the `heif` extra) and AVIF (Pillow's own, when built with
    libavif, else pillow-heif's), where installed."""
    from PIL import features

    found = set()
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
        found.add("HEIF")
        if hasattr(pillow_heif, "register_avif_opener") and not features.check("avif"):
            pillow_heif.register_avif_opener()
            found.add("AVIF")
    except ImportError:
        pass
    if features.check("avif"):
        found.add("AVIF")
    return frozenset(found)


SUPPORTED_FORMATS = SUPPORTED_FORMATS | _optional_formats()
# ISO-BMFF brands (bytes 8..12 of a HEIF/AVIF file: 'ftyp' + brand) -> the format they hold
_HEIF_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"heim": "HEIC", b"heis": "HEIC", b"hevc": "HEIC",
                b"hevx": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF", b"avis": "AVIF"}
_pillow_limit = threading.Lock()


def _sniff_heif(data: bytes) -> str | None:
    """'HEIC', 'HEIF' or 'AVIF' when `data` is such a file (whether or not it can be decoded here)."""
    return _HEIF_BRANDS.get(data[8:12]) if data[4:8] == b"ftyp" else None


def _open_capped(data: bytes, max_pixels: int) -> Image.Image:
    """Image.open under our pixel cap rather than Pillow's own: Pillow refuses images above twice
    `Image.MAX_IMAGE_PIXELS` (179 MP) whatever `max_pixels` allows. When ours is higher, the
    header is opened again with Pillow's limit raised to ours, for that call only (under a lock:
    the limit is a module global); `check_pixel_cap` then applies ours."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        if Image.MAX_IMAGE_PIXELS is None or max_pixels <= 2 * Image.MAX_IMAGE_PIXELS:
            raise
    with _pillow_limit:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            return Image.open(io.BytesIO(data))
        finally:
            Image.MAX_IMAGE_PIXELS = old

ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(ValueError):
    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


ROTATING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the picture by 90 or 270 degrees


def check_pixel_cap(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageDecodeError(
            "too_many_pixels", f"{width}x{height} = {width * height} pixels exceeds the cap of {max_pixels}"
        )


def probe_image(source, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Path or bytes -> the opened image with only its header read: the format is checked and
    the pixel cap applied (a rotation-invariant product, so EXIF is not needed), nothing is
    decoded. This is how decompression bombs are refused before any pixel is allocated.
    `name` is what error messages call the image (default: the path, or "the image" for bytes)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = name or "the image"
    else:
        name = name or os.fspath(source)
        try:
            data = Path(name).read_bytes()
        except OSError as err:
            raise ImageDecodeError("unreadable", f"{name}: {err.strerror or err}") from err
    if not data:
        raise ImageDecodeError("zero_bytes", f"{name} is empty")
    try:
        img = _open_capped(data, max_pixels)
    except UnidentifiedImageError as err:
        heif = _sniff_heif(data)
        if heif is not None:
            raise ImageDecodeError("unsupported_format", f"{name} is {heif}: install the heif extra "
                                   "(pip install 'geosurge-index[heif]') to read it") from err
        raise ImageDecodeError("not_an_image", f"{name} is not a recognised image") from err
    except Image.DecompressionBombError as err:
        raise ImageDecodeError("too_many_pixels", f"{name}: {err}") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # e.g. a header cut short
        raise ImageDecodeError("truncated", f"{name}: cannot read the header: {err}") from err
    if img.format not in SUPPORTED_FORMATS:
        raise ImageDecodeError(
            "unsupported_format", f"{name} is {img.format}; supported: JPEG, PNG, WebP"
        )
    try:
        check_pixel_cap(*img.size, max_pixels)
    except ImageDecodeError as err:
        raise ImageDecodeError(err.kind, f"{name}: {err.message}") from None
    return img


@dataclass(frozen=True)
class SizedImage:
    """A decoded image and the photo's true size. `image` may be smaller than the photo (JPEG
    draft decoding scales by DCT); `width`/`height` are the photo's as it is seen, after EXIF
    rotation and before any draft scaling."""

    image: Image.Image  # RGB, EXIF orientation applied
    width: int
    height: int


# A pixel budget: `hold(n)` blocks until `n` pixels may be decoded, and gives them back when its
# block ends (the service bounds concurrent decoding by pixels; see `service.budget`).
PixelHold = Callable[[int], AbstractContextManager]

# Modes `Image.reduce` takes as they are (a palette or CMYK image is converted first).
REDUCIBLE_MODES = frozenset({"RGB", "RGBA", "RGBX", "L", "LA", "I", "F"})


def _reduced(img: Image.Image, draft_size: int | None) -> Image.Image:
    """A decoded non-JPEG image at least twice `draft_size` on its short side -> reduced by an
    integer box filter to no less than `draft_size` (JPEG's DCT draft, for formats without one):
    the conversions that follow (alpha compositing, RGB) then touch the small image only."""
    if not draft_size or min(img.size) < 2 * draft_size:
        return img
    if img.mode not in REDUCIBLE_MODES:
        alpha = img.mode == "PA" or "transparency" in img.info
        img = img.convert("RGBA" if alpha else "RGB")
    return img.reduce(min(img.size) // draft_size)


# EXIF orientation -> the transpose that shows the picture upright (as `ImageOps.exif_transpose`)
ORIENTATION_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                         4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                         6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                         8: Image.Transpose.ROTATE_90}


def decode_image_with_size(
    source, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None,
    name: str | None = None, hold: PixelHold | None = None,
) -> SizedImage:
    """Path, bytes or PIL image -> an RGB PIL image with EXIF orientation applied, and the photo's
    true size (see `SizedImage`).

    `draft_size` lets JPEG decoding scale by DCT (2-6x faster) to at least that many pixels on
    the short side, and reduces other formats to about that size right after decoding; the
    model resizes afterwards anyway. `name` is what error messages call the image. `hold`: a
    pixel budget, held around the decoding with the number of pixels it will allocate.
    """
    if isinstance(source, Image.Image):
        img = source
        check_pixel_cap(*img.size, max_pixels)
    else:
        img = probe_image(source, max_pixels=max_pixels, name=name)
    name = name or getattr(img, "filename", None) or "the image"
    w, h = img.size  # the stored size, before draft scaling
    if draft_size and img.format in ("JPEG", "MPO"):
        try:
            img.draft("RGB", (draft_size, draft_size))
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise ImageDecodeError("truncated", f"{name}: cannot decode: {err}") from err
    with hold(img.size[0] * img.size[1]) if hold is not None else nullcontext():
        try:
            img.load()
            # Read after load: a PNG's EXIF may follow its pixels (getexif would load it anyway).
            orientation = img.getexif().get(0x0112)
            if orientation in ROTATING_ORIENTATIONS:
                w, h = h, w
            small = img if img.format in ("JPEG", "MPO") else _reduced(img, draft_size)
            if small is img:
                img = ImageOps.exif_transpose(img)
            else:  # reduced before turning: the full-size picture is never copied
                turn = ORIENTATION_TRANSPOSE.get(orientation)
                img = small if turn is None else small.transpose(turn)
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise ImageDecodeError("truncated", f"{name}: cannot decode: {err}") from err
        img = _rgb(img)
    return SizedImage(img, w, h)


def _rgb(img: Image.Image) -> Image.Image:
    """Any mode -> RGB; transparent pixels composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # alpha composited on white
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")  # L, I;16, CMYK, YCbCr, P ...


def decode_image(
    source, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> Image.Image:
    """Path, bytes or PIL image -> an RGB PIL image with EXIF orientation applied
    (`decode_image_with_size` without the size)."""
    return decode_image_with_size(source, max_pixels=max_pixels, draft_size=draft_size).image


@dataclass(frozen=True)
class Preprocess:
    """The model's crops of an image at `size` (`geometry.centre_crop`, `geometry.ten_crop`):
    short side resized to `size` (bicubic) and the centred square; or the ten test-time crops."""

    size: int = 336

    def resize_crop(self, img: Image.Image) -> Image.Image:
        """RGB PIL -> the centre crop, a `size` x `size` PIL image."""
        return Image.fromarray(geometry.centre_crop(*img.size, self.size).cut_pixels(img)[0])

    def ten_crop_pixels(self, img: Image.Image) -> np.ndarray:
        """Test-time ten-crop as uint8 (10, size, size, 3): the 4 corners and the centre at `size`
        from a `geometry.TEN_CROP_SCALE` resize, then their mirror images."""
        return geometry.ten_crop(*img.size, self.size).cut_pixels(img)


def class_map_path(image_path: str | os.PathLike) -> Path:
    """Where a precomputed semantic class map lives: beside the image, `<stem>.classmap.png`."""
    p = Path(image_path)
    return p.with_name(p.stem + ".classmap.png")


def open_class_map(source) -> Image.Image:
    """A class-map PNG (path, bytes or file object) -> the PIL image (8-bit: ADE20K ids 0..149,
    255 = unlabelled), whole and unresized."""
    name = getattr(source, "name", source if isinstance(source, (str, os.PathLike)) else "the class map")
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    m = Image.open(source)
    if m.mode not in ("L", "P"):
        raise ImageDecodeError("bad_class_map", f"{name}: class maps are 8-bit single-channel PNGs")
    return m


def load_class_map(path, size: int) -> np.ndarray:
    """A class-map PNG (path, bytes or file object) -> int64 (size, size): the centre crop of the
    map's own size (nearest). The reader stage cuts a map with its image's `geometry.CropPlan`
    instead, which is the same crop when the map has the image's aspect."""
    m = open_class_map(path)
    return geometry.centre_crop(*m.size, size).cut_class_map(m)[0].astype(np.int64)
