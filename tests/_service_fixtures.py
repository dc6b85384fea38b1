"""Shared by the service tests: a tiny real index and its Locator, photos, a running service."""

from __future__ import annotations

import io

from _locate_fixtures import encode, photo
from PIL import Image


def tiny_locator(root):
    """A real exported index (config-built model, random weights: its segmenter is untrained)."""
    from geosurge_index.locate import Locator
    from geosurge_index.synthetic import random_index

    index_dir = random_index(root / "index", n_points=1500, place_names=True)
    return index_dir, Locator.open(index_dir, device="cpu")


def jpeg(seed: int = 1, w: int = 96, h: int = 72) -> bytes:
    return encode(photo(w, h, seed=seed), "JPEG", quality=90)


def class_map_png(w: int = 96, h: int = 72, seed: int = 0) -> bytes:
    """A class-map PNG (mode L, ADE20K ids in blocks), the `<stem>.classmap.png` format."""
    import numpy as np

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 150, size=(4, 6), dtype=np.uint8)
    img = Image.fromarray(small, "L").resize((w, h), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()
