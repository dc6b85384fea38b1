"""Concurrent decoding bounded by pixels, not by requests: `PixelBudget(total).hold(n)` blocks a
decode thread until `n` more pixels fit under `total`. An image decodes into about 4 bytes a pixel
(Pillow keeps RGB as RGBX), so the decoding memory of the whole service stays near 4 x `total`
bytes whatever the number of requests or decode threads; an image larger than `total` waits for
the budget to empty and then decodes alone."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

# Pillow allocates an image in blocks (16 MB by default). glibc serves a freed-then-reallocated
# block of that size from the decoding thread's malloc arena (its mmap threshold rises to 32 MB at
# most), and arenas keep what they held: four decode threads each kept a 100-MP image's 400 MB
# (a peak of +0.9 GB under a budget of one image). Blocks over 32 MB are always mmap-ed and
# handed back to the kernel when freed, so the budget is what RSS sees.
PILLOW_BLOCK_BYTES = 64 << 20


def return_decoded_memory_to_the_os() -> None:
    """Make Pillow's image blocks large enough to be mmap-ed (process-wide; only ever raised)."""
    from PIL import Image

    core = Image.core
    if hasattr(core, "set_block_size") and core.get_block_size() < PILLOW_BLOCK_BYTES:
        core.set_block_size(PILLOW_BLOCK_BYTES)


class PixelBudget:
    def __init__(self, total: int):
        if total < 1:
            raise ValueError("a pixel budget must be at least 1")
        self.total = total
        self.used = 0
        self.peak = 0  # the most pixels held at once (for tests and /v1/stats)
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        n = max(1, min(int(pixels), self.total))  # a huge image takes the whole budget, alone
        with self._cond:
            self._cond.wait_for(lambda: self.used + n <= self.total)
            self.used += n
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()

    def as_dict(self) -> dict:
        return {"total": self.total, "in_use": self.used, "peak": self.peak}
