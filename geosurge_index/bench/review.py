"""`geosurge bench review`: the review page at archive scale (size, build time, browser load time).

Method: N synthetic located photos (real 96 px JPEG thumbnails of smooth random pictures, random
points, three alternatives each) -> `review.render_page`; then headless Chromium (Debian's
`chromium`, `make install` installs it) loads the file from disk and dumps the DOM once the
script has run (`--dump-dom`: the page's first page of rows must be in it). Load time is the
wall time of that Chromium process, start-up included, minus the same process on an empty page.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROW_RE = re.compile(r'<tr class="row" data-i="\d+"')  # a rendered row (not the script's template)
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-default-apps", "--mute-audio")


def chromium() -> str | None:
    """The headless browser: Debian's `chromium` (or chromium-browser / google-chrome)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def run_chromium(page: Path, *, screenshot: Path | None = None, size=(1280, 1600),
                 timeout: float = 120.0, fragment: str = "") -> tuple[str, float]:
    """Load a local page in headless Chromium -> (the DOM after its scripts ran, wall seconds).
    With `screenshot`, a PNG of the window is written there instead (the DOM is then '')."""
    exe = chromium()
    if exe is None:
        raise RuntimeError("chromium is not installed (`make install` installs Debian's chromium)")
    with tempfile.TemporaryDirectory(prefix="geosurge-chromium-") as profile:
        cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000",
               f"--window-size={size[0]},{size[1]}"]
        cmd += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
        t0 = time.perf_counter()
        out = subprocess.run([*cmd, page.resolve().as_uri() + fragment], capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "HOME": profile})
        secs = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"chromium failed ({out.returncode}): {out.stderr[-2000:]}")
    return ("" if screenshot else out.stdout), secs


@dataclass
class ReviewBench:
    photos: int = 10_000
    json: str | None = None


def synthetic_records(n: int, seed: int = 0) -> tuple[list[list], list[str]]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    thumbs, records = [], []
    for i in range(n):
        small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((96, 72), Image.BICUBIC).save(buf, "JPEG", quality=70, optimize=True)
        thumbs.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        p = float(rng.uniform(0.05, 0.99))
        records.append([f"photos/{i:06d}.jpg", f"{i:06d}.jpg", "Town, Region, Country", round(p, 4),
                        round(float(rng.uniform(-60, 70)), 4), round(float(rng.uniform(-180, 180)), 4),
                        [["Town, Country", round(p, 4)], ["Other, Country", 0.05], ["Far, Away", 0.01]],
                        0 if i % 7 else "48.85660, 2.35220", i])
    return records, thumbs


def run_review_bench(cfg: ReviewBench) -> dict:
    from geosurge_index.machine import describe_machine
    from geosurge_index.review import PAGE_SIZE, render_page

    print(describe_machine(), flush=True)
    t0 = time.perf_counter()
    records, thumbs = synthetic_records(cfg.photos)
    t_thumbs = time.perf_counter() - t0
    t0 = time.perf_counter()
    page = render_page(records, thumbs, title="bench", meta="bench")
    t_render = time.perf_counter() - t0
    figures = {"photos": cfg.photos, "bytes": len(page.encode()), "bytes_per_photo": len(page.encode()) / max(1, cfg.photos),
               "synthetic_thumbnails_s": round(t_thumbs, 2), "render_s": round(t_render, 3)}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "review.html"
        path.write_text(page, encoding="utf-8")
        empty = Path(d) / "empty.html"
        empty.write_text("<!DOCTYPE html><html><body>empty</body></html>")
        if chromium():
            _, base = run_chromium(empty)
            dom, secs = run_chromium(path)
            figures.update(chromium_start_s=round(base, 2), load_s=round(secs - base, 2),
                           rows_in_dom=len(ROW_RE.findall(dom)), ready='data-ready="1"' in dom,
                           expected_rows=min(PAGE_SIZE, cfg.photos))
        else:
            figures["load_s"] = None
    for k, v in figures.items():
        print(f"{k:24s} {v}")
    return figures
