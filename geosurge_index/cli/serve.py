"""`geosurge serve INDEX_DIR`: the HTTP service; `geosurge bench serve INDEX_DIR`: its load test."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from geosurge_index.errors import UserError
from geosurge_index.machine import describe_machine
from geosurge_index.settings import ServiceSettings

DESCRIPTION = """\
Serve an index over HTTP (FastAPI under uvicorn), for photo archives and scripts.

Routes:
  POST /v1/locate                  images as multipart files ('images', repeatable) or JSON
                                   {"images": ["<base64>", ...]}; ?top_k=5&include_cells=true
  GET  /v1/cells/{level}/{index}   a cell's row from cells.duckdb (404 if unknown)
  GET  /v1/index                   the index manifest;  GET /v1/stats: batching figures
  GET  /healthz, /readyz           process up; index loaded
  GET  /ping, POST /predict        immich machine-learning shape: form fields 'entries'
                                   ({"geolocation": {"visual": {"modelName": "geosurge"}}}) and 'image'

Concurrent requests are micro-batched into one model call (--max-batch-size, --max-wait-ms);
the model runs on one worker thread. Every setting can also come from an environment variable
GEOSURGE_<NAME> (flags win). Errors: 400 malformed, 401 API key, 413 too large (body, image
count, pixels), 415 unsupported type, 422 corrupt image or bad parameter, 503 loading/overloaded.

Example:
  GEOSURGE_API_KEY=secret geosurge serve index/ --host 0.0.0.0 --port 8000
  curl -H 'X-API-Key: secret' -F images=@photo.jpg 'http://HOST:8000/v1/locate?top_k=3'
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve an index over HTTP (REST API and immich's machine-learning shape)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("index_dir", metavar="INDEX_DIR", help="index directory written by `geosurge export`")
    ServiceSettings.add_arguments(p)
    p.set_defaults(func=run_serve)


def _settings(args: argparse.Namespace) -> ServiceSettings:
    settings = ServiceSettings.from_args(args).with_(index_dir=Path(args.index_dir))
    if not settings.index_dir.is_dir():
        raise UserError(f"{settings.index_dir}: no such index directory")
    return settings


def _open(settings: ServiceSettings):
    from geosurge_index.server import open_locator

    return open_locator(settings)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from geosurge_index.server import create_app

    settings = _settings(args)
    # Open the index before binding: a bad INDEX_DIR is a clear error now, not a 503 later.
    print(f"geosurge serve: loading {settings.index_dir} on {settings.device} ...", file=sys.stderr)
    locator = _open(settings)
    app = create_app(settings, locator)
    key = "on" if settings.api_key else "off"
    print(f"geosurge serve: http://{settings.host}:{settings.port} (API key {key}, batches of up to "
          f"{settings.max_batch_size}, wait {settings.max_wait_ms} ms)", file=sys.stderr)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0


# -- load test (shared by `geosurge bench serve` and tests/test_server.py) -------------------


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


def register_bench(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "serve",
        help="load-test the HTTP service: latency percentiles, requests/s, batch sizes",
        description="Starts the service on 127.0.0.1 (a free port) in this process, first times "
        "the locator called directly in batches of --max-batch-size (the in-process bound), then "
        "sends --requests single-image POST /v1/locate requests from --clients concurrent clients "
        "(httpx) and prints p50/p99 latency, requests/s, the ratio to the direct figure and the "
        "micro-batch sizes the server used.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("index_dir", metavar="INDEX_DIR", help="index directory written by `geosurge export`")
    p.add_argument("--clients", type=int, default=32, help="concurrent HTTP clients")
    p.add_argument("--requests", type=int, default=300, help="requests in all (one image each)")
    p.add_argument("--images", type=Path, default=None,
                   help="folder of JPEG/PNG photos to send (cycled); default: synthetic 640x480 JPEGs")
    ServiceSettings.add_arguments(p)
    p.set_defaults(func=run_bench)


def settings_env(settings: ServiceSettings) -> dict[str, str]:
    """The settings as GEOSURGE_* variables (to hand them to a `geosurge serve` subprocess)."""
    from dataclasses import fields

    return {ServiceSettings.env_name(f.name): str(getattr(settings, f.name)) for f in fields(settings)
            if getattr(settings, f.name) is not None}


class ServeProcess:
    """`geosurge serve` in a subprocess on 127.0.0.1 (a free port): the load generator then does
    not share a GIL with the server, as it would not in production."""

    def __init__(self, settings: ServiceSettings):
        import subprocess

        from geosurge_index.server import free_port

        self.settings = settings.with_(host="127.0.0.1", port=free_port())
        env = {**os.environ, **settings_env(self.settings), "GEOSURGE_NO_PROGRESS": "1"}
        code = "import sys; from geosurge_index.cli import main; sys.exit(main(sys.argv[1:]))"
        self.proc = subprocess.Popen([sys.executable, "-c", code, "serve", str(self.settings.index_dir)],
                                     env=env)
        self.url = f"http://127.0.0.1:{self.settings.port}"

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(f"geosurge serve exited with code {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise UserError(f"geosurge serve was not ready after {timeout_s:.0f} s")

    def stats(self) -> dict:
        import httpx

        headers = {"X-API-Key": self.settings.api_key} if self.settings.api_key else {}
        return httpx.get(self.url + "/v1/stats", headers=headers, timeout=30).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except Exception:  # noqa: BLE001
            self.proc.kill()


def run_bench(args: argparse.Namespace) -> int:
    import gc

    from geosurge_index.server import decode_upload

    if args.clients < 1 or args.requests < 1:
        raise UserError("--clients and --requests must be at least 1")
    settings = _settings(args).with_(log_level="warning")
    if args.images is not None:
        files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not files:
            raise UserError(f"{args.images}: no .jpg/.jpeg/.png files")
        images = [p.read_bytes() for p in files]
        what = f"{len(images)} photos from {args.images}"
    else:
        from geosurge_index.synthetic import synthetic_jpegs

        images = synthetic_jpegs(16, quality=85)
        what = "16 synthetic 640x480 JPEGs"
    print(f"machine: {describe_machine()}")
    print(f"method: (1) direct: Locator.locate on batches of {settings.max_batch_size} pre-decoded "
          f"images in this process (the model + search bound, no HTTP, no decoding); (2) http: "
          f"`geosurge serve` in a subprocess on 127.0.0.1, {args.requests} POST /v1/locate requests of "
          f"one image each ({what}) from {args.clients} concurrent httpx clients, after a warm-up; "
          f"batches <= {settings.max_batch_size}, wait {settings.max_wait_ms} ms")
    locator = _open(settings)
    decoded = [decode_upload(locator, b, str(i), max_pixels=settings.max_pixels).decoded
               for i, b in enumerate(images)]
    batch = [decoded[i % len(decoded)] for i in range(settings.max_batch_size)]
    locator.locate(batch)  # warm-up
    n_direct = max(1, min(args.requests // settings.max_batch_size, 8))
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
        load_test(server.url, images, clients=min(args.clients, 4), requests=min(8, args.requests),
                  api_key=settings.api_key)  # warm-up
        before = server.stats()
        report = load_test(server.url, images, clients=args.clients, requests=args.requests,
                           api_key=settings.api_key)
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
