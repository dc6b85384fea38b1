"""`geosurge bench demo-world`: speed of the demo world generator (photos per minute, one core)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DemoWorldBench:
    n: int = 2000  # photos to render
    size: int = 64  # image side in pixels
    seed: int = 0  # world seed


def run_demo_world_bench(settings: DemoWorldBench) -> dict:
    """Render and write `settings.n` photos in this process; prints and returns photos per minute."""
    import tempfile
    import time

    import numpy as np

    from geosurge_index import demo_world as dw
    from geosurge_index.machine import describe_machine

    cfg = dw.WorldConfig(image_size=settings.size)
    print(f"machine: {describe_machine(libraries=('numpy', 'PIL'))} (this benchmark uses one process)")
    print(f"method: {settings.n} photos of {settings.size}x{settings.size} px, MP-16-dense locations (seed {settings.seed}); "
          "wall-clock time of one run; the machine's other load is not controlled")
    lat, lon = dw.sample_locations(settings.n, settings.seed)
    keys = dw.photo_keys(settings.seed, np.arange(settings.n))
    t0 = time.perf_counter()
    for start in range(0, settings.n, 256):
        dw.render(lat[start:start + 256], lon[start:start + 256], keys[start:start + 256], cfg)
    render_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        dw.generate_split(tmp, settings.n, settings.seed, cfg, progress=False)
        total_s = time.perf_counter() - t0
    figures = {"photos": settings.n, "size": settings.size, "render_per_min": settings.n / render_s * 60,
               "render_and_write_per_min": settings.n / total_s * 60}
    print(f"render only:        {figures['render_per_min']:>10,.0f} photos/min ({render_s:.1f} s)")
    print(f"render + write all: {figures['render_and_write_per_min']:>10,.0f} photos/min ({total_s:.1f} s)")
    return figures
