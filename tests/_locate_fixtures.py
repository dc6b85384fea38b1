"""Synthetic inputs for the locate tests: good images of every kind, bad files, WebDataset shards."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def photo(w: int = 96, h: int = 72, seed: int = 0) -> Image.Image:
    """A smooth random RGB picture (compresses like a photo, differs by seed)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def bomb_png(w: int = 40000, h: int = 40000) -> bytes:
    """A PNG header declaring w x h pixels (a decompression bomb as far as any reader can tell)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def good_images() -> dict[str, bytes]:
    """name -> bytes: JPEG, PNG, WebP, grayscale, CMYK, alpha, palette, EXIF-rotated."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: a 96x72 file is seen as 72x96
    rgba = photo(64, 64, 5).convert("RGBA")
    rgba.putalpha(128)
    return {
        "a.jpg": encode(photo(seed=1), "JPEG", quality=90),
        "b.png": encode(photo(seed=2), "PNG"),
        "c.webp": encode(photo(seed=3), "WEBP"),
        "gray.jpg": encode(photo(seed=4).convert("L"), "JPEG"),
        "cmyk.jpg": encode(photo(seed=6).convert("CMYK"), "JPEG"),
        "alpha.png": encode(rgba, "PNG"),
        "palette.png": encode(photo(seed=7).convert("P"), "PNG"),
        "rotated.jpg": encode(photo(96, 72, seed=8), "JPEG", exif=exif),
    }


def bad_images() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, the error kind expected)."""
    whole = encode(photo(seed=9), "JPEG")
    return {
        "empty.jpg": (b"", "zero_bytes"),
        "truncated.jpg": (whole[: len(whole) // 2], "truncated"),
        "text.jpg": (b"this is not an image\n" * 10, "not_an_image"),
        "bomb.png": (bomb_png(), "too_many_pixels"),
        "gif.png": (encode(photo(seed=10), "GIF"), "unsupported_format"),
    }


def write_folder(root: Path, n_extra: int = 0, bad: bool = True) -> dict[str, str | None]:
    """Images (in nested folders) + bad files; returns path -> expected error kind (None = fine)."""
    expected: dict[str, str | None] = {}
    (root / "sub" / "deeper").mkdir(parents=True, exist_ok=True)
    for i, (name, data) in enumerate(good_images().items()):
        p = root / ("sub" if i % 2 else "") / name
        p.write_bytes(data)
        expected[str(p)] = None
    for i in range(n_extra):
        p = root / "sub" / "deeper" / f"extra{i:04d}.jpg"
        p.write_bytes(encode(photo(seed=100 + i), "JPEG"))
        expected[str(p)] = None
    if bad:
        for name, (data, kind) in bad_images().items():
            p = root / "sub" / name
            p.write_bytes(data)
            expected[str(p)] = kind
    # Not inputs: hidden files, class maps and other extensions are skipped.
    (root / ".hidden.jpg").write_bytes(good_images()["a.jpg"])
    (root / "notes.txt").write_text("hello")
    (root / "a.json").write_text("{}")
    return expected


def class_map_png(size: int = 32, cls: int = 7) -> bytes:
    arr = np.full((size, size), cls, dtype=np.uint8)
    arr[: size // 2] = 3
    return encode(Image.fromarray(arr, mode="L"), "PNG")


def write_tar(path: Path, n: int, with_class_maps: bool = False, bad_key: int | None = None) -> list[str]:
    """An img2dataset-like shard: key.jpg + key.json + key.txt per sample; returns the keys."""
    keys = []
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            key = f"{path.stem}{i:05d}"
            keys.append(key)
            data = encode(photo(seed=200 + i), "JPEG") if i != bad_key else b"garbage"
            members = [(f"{key}.jpg", data), (f"{key}.json", b'{"caption": "x"}'), (f"{key}.txt", b"x")]
            if with_class_maps:
                members.append((f"{key}.classmap.png", class_map_png()))
            for name, blob in members:
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
        info = tarfile.TarInfo("orphan.json")  # a sample without an image: not an input
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    return keys
