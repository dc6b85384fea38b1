"""The service's routes and status codes, written once. `geosurge serve --help` prints them,
`service.app` registers exactly these (a test checks it) and other docstrings point here.

Pure data: importing it costs nothing (the CLI builds its help from it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    summary: str
    api_key: bool  # needs the API key when one is set


ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/locate",
          "images as multipart files ('images', repeatable, or 'image'; a 'class_maps' file\n"
          "per image optional), or JSON {\"images\": [\"<base64>\" | {\"name\": ..., \"data\": \"<base64>\",\n"
          '"class_map": "<base64 PNG>"}, ...]}; ?top_k=5&include_cells=true&cap_km=25 (a cap\n'
          "coarser than the service's only). An unusable\n"
          "image among good ones gets its own error; all unusable: the request's 4xx", True),
    Route("GET", "/v1/cells/{level}/{cell_index}", "a cell's row from cells.duckdb (404 if unknown)", True),
    Route("GET", "/v1/index", "the index manifest (without its checksums); says if its segmenter is untrained;\n"
          "the precision cap in force", True),
    Route("GET", "/v1/stats", "batching figures, recent latencies, connections, the settings (API key redacted)",
          True),
    Route("GET", "/healthz", "the process is up", False),
    Route("GET", "/readyz", "the index is loaded (503 and the reason until then)", False),
    Route("GET", "/ping", "immich machine-learning shape: answers 'pong'", False),
    Route("POST", "/predict",
          "immich machine-learning shape: form fields 'image' (one), 'entries' and\n"
          "optionally 'class_map' ({\"geolocation\": {\"visual\": {\"modelName\": \"geosurge\",\n"
          '"options": {"topK": 5}}}}); --immich-no-key true opens it on a trusted network',
          True),
)

STATUS_CODES: tuple[tuple[int, str], ...] = (
    (400, "malformed request (bad JSON or base64, missing or unknown fields, empty file, two images "
          "to /predict)"),
    (401, "missing or wrong API key"),
    (404, "no such cell in this index"),
    (413, "body, image count or pixel count over the limits"),
    (415, "a content type or image format the service does not read (text, GIF, TIFF ...)"),
    (422, "a truncated or corrupt image or class map, or a query parameter out of range (and, as in "
          "immich, a bad 'entries' field or a task other than geolocation)"),
    (503, "index still loading, queue or connections full (with Retry-After)"),
)

# Pages that are not API routes (not in the OpenAPI document): the docs work offline.
DOC_PAGES = ("/docs", "/redoc", "/openapi.json")


def routes_help(indent: str = "  ") -> str:
    """The routes and status codes as plain text (for `--help`)."""
    width = max(len(f"{r.method} {r.path}") for r in ROUTES) + 2
    lines = ["Routes (* needs the API key when one is set):"]
    for r in ROUTES:
        head = f"{r.method} {r.path}{' *' if r.api_key else ''}"
        first, *rest = r.summary.split("\n")
        lines.append(f"{indent}{head:<{width + 2}}{first}")
        lines.extend(f"{indent}{'':<{width + 2}}{more}" for more in rest)
    lines.append("Status codes:")
    lines.extend(f"{indent}{code} {text}" for code, text in STATUS_CODES)
    return "\n".join(lines)
