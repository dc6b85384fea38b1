"""`geosurge bench serve`: the HTTP service under load. `load_test` is the load generator
(concurrent httpx clients POSTing one image each to /v1/locate); `run_serve_bench` times the
locator called directly, then `geosurge serve` in a subprocess under that load, and prints both."""

from __future__ import annotations

import asyncio
import gc
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from geosurge_index.errors import UserError
from geosurge_index.settings import ServiceSettings
from geosurge_index.sources import CLASS_MAP_SUFFIX, IMAGE_SUFFIXES


@dataclass
class LoadReport:
    latencies_s: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # transport errors and non-200 answers
    transport_errors: int = 0  # requests that got no HTTP answer (not in `statuses`)
    wall_s: float = 0.0

    @property
    def requests(self) -> int:
        return sum(self.statuses.values()) + self.transport_errors

    def percentile(self, q: float) -> float:
        xs = sorted(self.latencies_s)
        if not xs:
            return float("nan")
        return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]  # nearest rank

    def summary(self) -> str:
        rps = self.requests / self.wall_s if self.wall_s else float("nan")
        return (f"{self.requests} requests in {self.wall_s:.2f} s = {rps:.1f} req/s; latency "
                f"p50 {self.percentile(50) * 1000:.0f} ms, p99 {self.percentile(99) * 1000:.0f} ms, "
                f"mean {statistics.fmean(self.latencies_s) * 1000 if self.latencies_s else float('nan'):.0f} ms;"
                f" statuses {dict(sorted(self.statuses.items()))}; transport failures {self.transport_errors}")


async def _load(url: str, images: list[bytes], clients: int, requests: int, headers: dict,
                timeout_s: float) -> LoadReport:
    import httpx

    report = LoadReport()
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in counter:  # clients share the iterator: each request is sent once
            data = images[i % len(images)]
            t0 = time.perf_counter()
            try:
                r = await client.post(url, files={"images": (f"{i}.jpg", data, "image/jpeg")},
                                      headers=headers)
            except httpx.HTTPError as err:
                report.failures.append(f"request {i}: {type(err).__name__}: {err}")
                report.transport_errors += 1
                continue
            report.latencies_s.append(time.perf_counter() - t0)
            report.statuses[r.status_code] = report.statuses.get(r.status_code, 0) + 1
            if r.status_code != 200:
                report.failures.append(f"request {i}: HTTP {r.status_code}: {r.text[:200]}")

    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        report.wall_s = time.perf_counter() - t0
    return report


def load_test(base_url: str, images: list[bytes], *, clients: int = 32, requests: int = 300,
              api_key: str | None = None, timeout_s: float = 300.0) -> LoadReport:
    """`clients` concurrent clients POST one image each to /v1/locate until `requests` are sent."""
    headers = {"X-API-Key": api_key} if api_key else {}
    return asyncio.run(_load(base_url.rstrip("/") + "/v1/locate", images, clients, requests,
                             headers, timeout_s))


def bench_images(folder: Path | None) -> tuple[list[bytes], str]:
    """The photos to send: a folder's images (as `geosurge locate` finds them, without recursion),
    or 16 synthetic 640x480 JPEGs."""
    if folder is None:
        from geosurge_index.synthetic import synthetic_jpegs

        return synthetic_jpegs(16, quality=85), "16 synthetic 640x480 JPEGs"
    files = sorted(p for p in Path(folder).iterdir()
                   if p.name.lower().endswith(IMAGE_SUFFIXES) and not p.name.lower().endswith(CLASS_MAP_SUFFIX))
    if not files:
        raise UserError(f"{folder}: no {'/'.join(IMAGE_SUFFIXES)} files")
    return [p.read_bytes() for p in files], f"{len(files)} photos from {folder}"


def run_serve_bench(settings: ServiceSettings, *, clients: int = 32, requests: int = 300,
                    images_dir: Path | None = None) -> int:
    """Print the direct (in-process) throughput, then the HTTP figures; 1 if any request failed."""
    from geosurge_index.machine import describe_machine
    from geosurge_index.service.requests import decode_upload
    from geosurge_index.service.runner import ServeProcess
    from geosurge_index.service.state import open_locator

    if clients < 1 or requests < 1:
        raise UserError("--clients and --requests must be at least 1")
    images, what = bench_images(images_dir)
    print(f"machine: {describe_machine()}")
    print(f"method: (1) direct: Locator.locate on batches of {settings.max_batch_size} pre-decoded "
          f"images in this process (the model + search bound, no HTTP, no decoding); (2) http: "
          f"`geosurge serve` in a subprocess on 127.0.0.1, {requests} POST /v1/locate requests of "
          f"one image each ({what}) from {clients} concurrent httpx clients, after a warm-up; "
          f"batches <= {settings.max_batch_size}, wait {settings.max_wait_ms} ms")
    locator = open_locator(settings)
    decoded = [decode_upload(locator, b, str(i), max_pixels=settings.max_pixels).decoded
               for i, b in enumerate(images)]
    batch = [decoded[i % len(decoded)] for i in range(settings.max_batch_size)]
    locator.locate(batch)  # warm-up
    n_direct = max(1, min(requests // settings.max_batch_size, 8))
    t0 = time.perf_counter()
    for _ in range(n_direct):
        locator.locate(batch)
    direct_ips = n_direct * len(batch) / (time.perf_counter() - t0)
    print(f"direct: {n_direct} calls of {len(batch)} images: {direct_ips:.1f} images/s")
    del locator, decoded, batch
    gc.collect()

    server = ServeProcess(settings)
    try:
        server.wait_ready()
        load_test(server.url, images, clients=min(clients, 4), requests=min(8, requests),
                  api_key=settings.api_key)  # warm-up
        before = server.stats()
        report = load_test(server.url, images, clients=clients, requests=requests, api_key=settings.api_key)
        after = server.stats()
    finally:
        server.stop()
    print(f"http: {report.summary()}")
    print(f"http / direct throughput: {report.requests / report.wall_s / direct_ips:.2f}")
    print(f"server-side latency (recent requests, incl. warm-up): {after['latency']}")
    before, after = before["batching"], after["batching"]
    sizes = {int(k): v for k, v in after["batch_size_counts"].items()}
    for k, v in before["batch_size_counts"].items():
        sizes[int(k)] -= v
    sizes = {k: v for k, v in sorted(sizes.items()) if v}
    calls = after["batches"] - before["batches"]
    print(f"batching: {calls} model calls for {after['items'] - before['items']} images; "
          f"batch sizes {sizes}")
    for failure in report.failures[:5]:
        print(f"failure: {failure}", file=sys.stderr)
    return 1 if report.failures else 0
