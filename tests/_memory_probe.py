"""Run alone in a fresh process (malloc's arenas make a shared test process's RSS meaningless):
`python _memory_probe.py INDEX_DIR PIXEL_BUDGET DECODE_WORKERS` serves INDEX_DIR, posts four
9999x9999 PNGs at once, and prints {"peak_mb": peak RSS above the idle server, "statuses": [...]}."""

from __future__ import annotations

import json
import os
import struct
import sys
import threading
import time
import zlib


def big_png(side: int = 9999) -> bytes:
    """A side x side RGB PNG of a few hundred KB (rows of one colour compress to nothing)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + bytes([90, 140, 200]) * side
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(index_dir: str, budget: int, workers: int) -> dict:
    import warnings

    import httpx

    from geosurge_index.locate import Locator
    from geosurge_index.service.app import create_app
    from geosurge_index.service.runner import ServerThread
    from geosurge_index.settings import ServiceSettings

    warnings.simplefilter("ignore")
    logging_off = __import__("logging")
    logging_off.disable(logging_off.WARNING)
    png = big_png()
    locator = Locator.open(index_dir, device="cpu")
    settings = ServiceSettings(index_dir=index_dir, decode_workers=workers, decode_pixel_budget=budget)
    with ServerThread(create_app(settings, locator)) as srv, httpx.Client(base_url=srv.url, timeout=300) as c:
        c.post("/v1/locate", files={"images": ("warm.jpg", b"", "image/jpeg")})  # warm the routes up
        base, peak, done = rss_bytes(), [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss_bytes())
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out = [None] * 4
        posts = [threading.Thread(target=lambda i=i: out.__setitem__(i, c.post(
            "/v1/locate", files={"images": (f"big{i}.png", png, "image/png")}))) for i in range(4)]
        for t in posts:
            t.start()
        for t in posts:
            t.join()
        done.set()
        sampler.join()
        pixels = c.get("/v1/stats").json()["decode_pixels"]
    return {"peak_mb": round((peak[0] - base) / 2**20), "statuses": [r.status_code for r in out],
            "widths": [r.json()["results"][0]["width"] for r in out if r.status_code == 200],
            "png_kb": len(png) // 1024, "decode_pixels": pixels}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
