"""`geosurge serve INDEX_DIR`: the HTTP service; `geosurge bench serve INDEX_DIR`: its load test.
Flags only: the service is `geosurge_index.service`, the load test `geosurge_index.bench.serve`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from geosurge_index.errors import UserError
from geosurge_index.service.routes import routes_help
from geosurge_index.settings import ServiceSettings

DESCRIPTION = f"""\
Serve an index over HTTP (FastAPI under uvicorn), for photo archives and scripts.

{routes_help()}

Concurrent requests are micro-batched into one model call (--max-batch-size, --max-wait-ms);
the model runs on one worker thread. Every setting can also come from an environment variable
GEOSURGE_<NAME> (flags win).

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


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from geosurge_index.service.app import create_app
    from geosurge_index.service.guard import uvicorn_config
    from geosurge_index.service.state import open_locator

    settings = _settings(args)
    # Open the index before binding: a bad INDEX_DIR is a clear error now, not a 503 later.
    print(f"geosurge serve: loading {settings.index_dir} on {settings.device} ...", file=sys.stderr)
    locator = open_locator(settings, warn_untrained=False)  # said here, once, in our own words
    if locator.segmenter_note:
        print(f"geosurge serve: warning: {locator.segmenter_note}", file=sys.stderr)
    app = create_app(settings, locator)
    key = "on" if settings.api_key else "off"
    if settings.api_key and settings.immich_no_key:
        key += ", except /predict and /ping (--immich-no-key)"
    print(f"geosurge serve: http://{settings.host}:{settings.port} (API key {key}, batches of up to "
          f"{settings.max_batch_size}, wait {settings.max_wait_ms} ms)", file=sys.stderr)
    uvicorn.Server(uvicorn_config(app, settings)).run()
    return 0


def register_bench(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "serve",
        help="load-test the HTTP service: latency percentiles, requests/s, batch sizes",
        description="Times the locator called directly in batches of --max-batch-size (the in-process bound), then "
        "starts `geosurge serve` in a subprocess on 127.0.0.1 (a free port) and sends --requests single-image POST /v1/locate requests from --clients concurrent clients "
        "(httpx) and prints p50/p99 latency, requests/s, the ratio to the direct figure and the "
        "micro-batch sizes the server used.",
        epilog="Example: geosurge bench serve --clients 8 --requests 200",
    )
    p.add_argument("index_dir", metavar="INDEX_DIR", help="index directory written by `geosurge export`")
    p.add_argument("--clients", type=int, default=32, help="concurrent HTTP clients (default: %(default)s)")
    p.add_argument("--requests", type=int, default=300,
                   help="requests in all, one image each (default: %(default)s)")
    p.add_argument("--images", type=Path, default=None,
                   help="folder of JPEG/PNG/WebP photos to send (cycled); default: synthetic 640x480 JPEGs")
    ServiceSettings.add_arguments(p)
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from geosurge_index.bench.serve import run_serve_bench

    settings = _settings(args).with_(log_level="warning")
    return run_serve_bench(settings, clients=args.clients, requests=args.requests, images_dir=args.images)
