"""The HTTP service: `create_app(settings)` -> a FastAPI app that geolocates uploaded photos.

Routes (see `geosurge serve --help` and the README):
- `POST /v1/locate`: images as multipart files (`images`, repeatable, or `image`) or JSON
  `{"images": [base64 | {"name", "data": base64}]}`; `?top_k=K&include_cells=true|false`.
- `GET /v1/cells/{level}/{cell_index}`, `GET /v1/index`, `GET /v1/stats`.
- `GET /healthz` (process up), `GET /readyz` (index loaded).
- immich's machine-learning shape: `GET /ping` -> `pong`; `POST /predict` with form fields
  `entries` (`{"geolocation": {"visual": {"modelName": "..."}}}`) and `image`.

Request flow: size limits (middleware) -> API key -> parse -> header probe (the pixel cap, before
any decoding) -> decode on a thread pool (bad images answer 4xx here, before they take a batch slot) -> `MicroBatcher` -> one model thread calling
`locator.locate(batch)` -> JSON.

Status codes: 400 malformed request (bad JSON or base64, missing or unknown fields, empty file);
401 missing or wrong API key; 413 body, image count or pixel count over the limits; 415 a
content type or image format the service does not read (text, GIF, TIFF ...); 422 a truncated or
corrupt image, or a query parameter out of range (and, as in immich, a bad `entries` field);
503 index still loading, or queue full (with Retry-After).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import math
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from geosurge_index import images
from geosurge_index.batcher import BatcherClosed, BatcherFull, MicroBatcher
from geosurge_index.errors import UserError
from geosurge_index.settings import ServiceSettings

log = logging.getLogger("geosurge.server")

# The task and model type under which /predict answers, in immich's `entries` vocabulary.
IMMICH_TASK = "geolocation"
IMMICH_MODEL_TYPE = "visual"
UPLOAD_FIELDS = ("images", "image")
PLACE_FIELDS = ("country_code", "country_name", "admin1", "town")  # of the best finest cell

# ImageDecodeError.kind -> HTTP status: the client sent an image we cannot or will not use.
DECODE_STATUS = {
    "zero_bytes": 400,
    "not_an_image": 415,
    "unsupported_format": 415,
    "too_many_pixels": 413,
    "truncated": 422,
    "unreadable": 422,
}


class DecodedLike(Protocol):
    error: str | None  # "kind: message" when the image cannot be used
    width: int  # the photo's size as seen: EXIF rotation applied, before any draft scaling
    height: int


class LocatorLike(Protocol):
    """What the service needs of `geosurge_index.locate.Locator`: its reader stage (`decode`,
    thread-safe, no model) and its model + search (`locate`, called from one thread)."""

    def decode(self, image: bytes) -> DecodedLike: ...

    def locate(self, images: list[Any], *, top_k: int | None = None) -> list[Any]: ...


class ApiError(Exception):
    """A request the service refuses: answered as `{"detail": message, "kind": kind}`."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


class BodyTooLarge(Exception):
    pass


@dataclass(frozen=True)
class DecodedImage:
    name: str
    decoded: Any  # the locator's `Decoded`: model-size pixels, ready for a batch
    width: int  # as the photo is seen: after EXIF orientation, before any draft scaling
    height: int


@dataclass(frozen=True)
class LocateJob:
    decoded: Any
    top_k: int


# -- decoding ----------------------------------------------------------------------------------


def _status_for(error: str) -> tuple[int, str]:
    kind = error.split(":", 1)[0].strip()
    return DECODE_STATUS.get(kind, 422), kind


def refuse_bombs(data: bytes, name: str, *, max_pixels: int) -> None:
    """The pixel cap on the header alone (`images.probe_image`), before the decode threads spend
    memory on it: 413 naming `name`. Other header problems are left to the decoder to name."""
    try:
        images.probe_image(data, max_pixels=max_pixels).close()
    except images.ImageDecodeError as err:
        if err.kind == "too_many_pixels":
            raise ApiError(413, err.kind, f"image {name!r}: {err.message}") from None


def decode_upload(locator: LocatorLike, data: bytes, name: str, *, max_pixels: int) -> DecodedImage:
    """Uploaded bytes -> the locator's decoded model input and the photo's true size.

    Raises `ApiError` (4xx) naming `name` when the image is unusable. The pixel cap is checked
    on the header before anything is decoded.
    """
    refuse_bombs(data, name, max_pixels=max_pixels)
    try:
        decoded = locator.decode(data)
    except Exception as err:  # noqa: BLE001 - a decoder bug must not become a 500 for the client
        raise ApiError(422, "undecodable", f"image {name!r} could not be decoded: {err}") from err
    if decoded.error is not None:
        status, kind = _status_for(decoded.error)
        raise ApiError(status, kind, f"image {name!r}: {decoded.error}")
    return DecodedImage(name=name, decoded=decoded, width=int(decoded.width), height=int(decoded.height))


# -- results -------------------------------------------------------------------------------------


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def prediction_json(pred: Any, image: DecodedImage, *, top_k: int, include_cells: bool) -> dict:
    """A `locate.Prediction` -> one image's JSON answer (one mapping, shared by all routes)."""
    out: dict[str, Any] = {
        "name": image.name,
        "width": image.width,
        "height": image.height,
        "lat": _num(pred.lat),
        "lon": _num(pred.lon),
        "probability": _num(pred.probability),
        "place": {k: getattr(pred, k) for k in PLACE_FIELDS},
        "error": pred.error,
    }
    if include_cells:
        out["cells"] = [
            {"level": int(c.level), "cell_index": int(c.cell_index), "s2_token": c.s2_token,
             "probability": _num(c.probability)}
            for c in pred.cells
        ]
    out["alternatives"] = [
        {"cell_index": int(a.cell_index), "s2_token": a.s2_token, "probability": _num(a.probability),
         "lat": _num(a.lat), "lon": _num(a.lon)}
        for a in list(pred.alternatives)[:top_k]
    ]
    return out


# -- index metadata ---------------------------------------------------------------------------


class CellStore:
    """Read-only lookups in INDEX_DIR/cells.duckdb (one cursor per call: cursors are not shared)."""

    def __init__(self, index_dir: Path):
        import duckdb

        from geosurge_index.index import CELLS_DB

        path = Path(index_dir) / CELLS_DB
        self._con = duckdb.connect(str(path), read_only=True) if path.exists() else None
        self._lock = threading.Lock()

    def cell(self, level: int, cell_index: int) -> dict | None:
        if self._con is None:
            return None
        with self._lock:
            cur = self._con.cursor()
        try:
            rel = cur.execute(
                "SELECT * FROM cells WHERE level = ? AND cell_index = ?", [level, cell_index]
            )
            row = rel.fetchone()
            if row is None:
                return None
            names = [d[0] for d in rel.description]
        finally:
            cur.close()
        return {k: _jsonable(v) for k, v in zip(names, row, strict=True)}

    def close(self) -> None:
        if self._con is not None:
            self._con.close()


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


def manifest_summary(index_dir: Path) -> dict:
    """manifest.json without its per-file checksums (what a client wants to know about the index)."""
    from geosurge_index.index import read_manifest

    manifest = read_manifest(index_dir)
    return {"index_dir": str(index_dir), "manifest": {k: v for k, v in manifest.items() if k != "files"}}


# -- the app --------------------------------------------------------------------------------


class ServiceState:
    """What the routes share: the locator once loaded, the batcher, the decode pool, the cells."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.locator: LocatorLike | None = None
        self.load_error: str | None = None
        self.cells: CellStore | None = None
        self.decode_pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="decode")
        self.batcher = MicroBatcher(
            self._run_batch,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000.0,
            max_queue=settings.max_queue,
            name="locator",
        )
        self.started = time.time()
        self.latencies: deque[float] = deque(maxlen=2048)  # recent /v1/locate and /predict, seconds

    def latency_summary(self) -> dict:
        xs = sorted(self.latencies)
        if not xs:
            return {"requests": 0}
        pick = lambda q: round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 1)  # noqa: E731
        return {"requests": len(xs), "p50_ms": pick(0.50), "p90_ms": pick(0.90), "p99_ms": pick(0.99),
                "max_ms": round(xs[-1] * 1000, 1)}

    def attach(self, locator: LocatorLike) -> None:
        self.locator = locator

    def _run_batch(self, jobs: list[LocateJob]) -> list[Any]:
        """On the model thread: one `locate` call for the whole batch, with the largest top_k asked."""
        assert self.locator is not None
        return self.locator.locate([job.decoded for job in jobs], top_k=max(job.top_k for job in jobs))

    @property
    def ready(self) -> bool:
        return self.locator is not None and self.batcher.running


def open_locator(settings: ServiceSettings) -> LocatorLike:
    """`Locator.open` with the service's settings (device, default top_k, draft size, pixel cap, ten-crop)."""
    from geosurge_index.locate.locator import Locator

    if settings.index_dir is None or not Path(settings.index_dir).is_dir():
        raise UserError(f"INDEX_DIR {settings.index_dir} is not a folder")
    return Locator.open(settings.index_dir, device=settings.device, top_k=settings.default_top_k,
                        draft_size=settings.draft_size, max_pixels=settings.max_pixels,
                        ten_crop=settings.ten_crop)


def create_app(settings: ServiceSettings, locator: LocatorLike | None = None) -> FastAPI:
    """The service. With `locator=None` the index in `settings.index_dir` loads in the background
    after startup (`/readyz` answers 503 until it has); pass an open locator to skip that."""
    state = ServiceState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.batcher.start()
        loader = None
        if locator is not None:
            state.cells = await asyncio.to_thread(_open_cells, settings)
            state.attach(locator)
        else:
            loader = asyncio.create_task(_load_in_background(state))
        try:
            yield
        finally:
            if loader is not None:
                loader.cancel()
            await state.batcher.stop()
            state.decode_pool.shutdown(wait=False, cancel_futures=True)
            if state.cells is not None:
                state.cells.close()

    app = FastAPI(
        title="geosurge-index",
        summary="Worldwide image geo-localization (GeoSURGE) over HTTP",
        lifespan=lifespan,
    )
    app.state.service = state
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse({"detail": err.message, "kind": err.kind}, err.status, headers=err.headers)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, err: BodyTooLarge) -> JSONResponse:
        return JSONResponse(
            {"detail": str(err), "kind": "body_too_large"}, 413, headers={"Connection": "close"}
        )

    require_key = _api_key_dependency(settings.api_key)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> JSONResponse:
        if state.ready:
            return JSONResponse({"ready": True})
        reason = state.load_error or "the index is loading"
        return JSONResponse({"ready": False, "reason": reason}, 503)

    @app.get("/v1/index", dependencies=[Depends(require_key)], tags=["index"])
    async def index_info() -> dict:
        if settings.index_dir is None:
            return {"index_dir": None, "manifest": None}
        return await asyncio.to_thread(manifest_summary, settings.index_dir)

    @app.get("/v1/cells/{level}/{cell_index}", dependencies=[Depends(require_key)], tags=["index"])
    async def cell(level: int, cell_index: int) -> dict:
        row = await asyncio.to_thread(state.cells.cell, level, cell_index) if state.cells else None
        if row is None:
            raise ApiError(404, "unknown_cell", f"no cell {cell_index} at level {level} in this index")
        return row

    @app.get("/v1/stats", dependencies=[Depends(require_key)], tags=["index"])
    async def stats() -> dict:
        return {
            "ready": state.ready,
            "uptime_s": round(time.time() - state.started, 3),
            "queued": state.batcher.queued,
            "batching": state.batcher.stats.as_dict(),
            # server-side time of recent successful requests, from the body read to the answer
            "latency": state.latency_summary(),
            "settings": settings.public_dict(),
        }

    @app.post("/v1/locate", dependencies=[Depends(require_key)], tags=["locate"])
    async def locate(
        request: Request,
        top_k: int = Query(settings.default_top_k, ge=1, le=settings.max_top_k,
                           description="how many alternative cells to return per image"),
        include_cells: bool = Query(True, description="include the best cell at every level"),
    ) -> dict:
        t0 = time.perf_counter()
        uploads = await _read_locate_request(request, settings)
        decoded = await _decode_all(state, uploads)
        preds = await _predict(state, [LocateJob(d.decoded, top_k) for d in decoded])
        state.latencies.append(time.perf_counter() - t0)
        return {
            "results": [
                prediction_json(p, d, top_k=top_k, include_cells=include_cells)
                for p, d in zip(preds, decoded, strict=True)
            ]
        }

    # immich machine-learning shape ----------------------------------------------------------
    @app.get("/ping", response_class=PlainTextResponse, tags=["immich"])
    async def ping() -> str:
        return "pong"

    @app.post("/predict", dependencies=[Depends(require_key)], tags=["immich"])
    async def predict(request: Request) -> dict:
        async with _read_form(request, settings) as form:
            options = _immich_options(form.get("entries"), settings)
            image = form.get("image")
            if not isinstance(image, UploadFile):
                raise ApiError(400, "missing_image", "send the photo as the multipart file field 'image'")
            upload = (image.filename or "image", await image.read())
        t0 = time.perf_counter()
        top_k = options["top_k"]
        decoded = await _decode_all(state, [upload])
        (pred,) = await _predict(state, [LocateJob(decoded[0].decoded, top_k)])
        state.latencies.append(time.perf_counter() - t0)
        result = prediction_json(pred, decoded[0], top_k=top_k, include_cells=options["include_cells"])
        return {IMMICH_TASK: result, "imageHeight": decoded[0].height, "imageWidth": decoded[0].width}

    return app


def _open_cells(settings: ServiceSettings) -> CellStore | None:
    """The cells table for /v1/cells; a damaged one costs that route only (404s), not the service."""
    if settings.index_dir is None:
        return None
    try:
        return CellStore(settings.index_dir)
    except Exception as err:  # noqa: BLE001
        log.error("cannot open %s/cells.duckdb: %s", settings.index_dir, err)
        return None


async def _load_in_background(state: ServiceState) -> None:
    try:
        locator = await asyncio.to_thread(open_locator, state.settings)
        state.cells = await asyncio.to_thread(_open_cells, state.settings)
        state.attach(locator)
        log.info("index %s loaded", state.settings.index_dir)
    except Exception as err:  # noqa: BLE001 - reported by /readyz, the process stays up
        state.load_error = f"{type(err).__name__}: {err}"
        log.error("cannot load index %s: %s", state.settings.index_dir, state.load_error)


def _api_key_dependency(api_key: str | None):
    expected = api_key.encode() if api_key else None

    async def require_key(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("x-api-key")
        if given is None:
            auth = request.headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else None
        # compare_digest: the time taken does not reveal how much of the key was right
        if given is None or not hmac.compare_digest(given.encode(), expected):
            raise ApiError(
                401, "unauthorized", "missing or wrong API key (send X-API-Key: KEY)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_key


# -- request parsing --------------------------------------------------------------------------


@asynccontextmanager
async def _read_form(request: Request, settings: ServiceSettings):
    """The parsed form; its spooled upload files are closed when the block ends."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise ApiError(415, "unsupported_content_type",
                       f"content type {ctype or 'none'!r}: send multipart/form-data")
    limit = settings.max_images_per_request + 16  # the real count check names the limit below
    try:
        form = await request.form(max_files=limit, max_fields=limit)
    except HTTPException as err:  # starlette answers its own caps with 400: over ours is a 413
        if "Too many files" in str(err.detail):
            raise ApiError(413, "too_many_images",
                           f"more than {settings.max_images_per_request} images in one request") from None
        raise
    try:
        yield form
    finally:
        await form.close()


async def _read_locate_request(request: Request, settings: ServiceSettings) -> list[tuple[str, bytes]]:
    """multipart files or JSON base64 -> [(name, bytes)], checked for count and field names."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    uploads: list[tuple[str, bytes]] = []
    if ctype == "multipart/form-data":
        async with _read_form(request, settings) as form:
            unknown = sorted({k for k in form.keys() if k not in UPLOAD_FIELDS})
            if unknown:
                raise ApiError(400, "unknown_field", f"unknown form field(s) "
                               f"{', '.join(map(repr, unknown))}: send files as 'images'")
            for key in UPLOAD_FIELDS:
                for value in form.getlist(key):
                    if not isinstance(value, UploadFile):
                        raise ApiError(400, "not_a_file", f"form field {key!r} must be a file upload")
                    _check_count(len(uploads) + 1, settings)
                    uploads.append((value.filename or f"{key}[{len(uploads)}]", await value.read()))
    elif ctype == "application/json":
        try:
            payload = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, "bad_json", f"request body is not valid JSON: {err}") from None
        uploads = _json_images(payload, settings)
    else:
        raise ApiError(415, "unsupported_content_type",
                       f"content type {ctype or 'none'!r}: send multipart/form-data or application/json")
    if not uploads:
        raise ApiError(400, "no_images", "no images in the request: send files as 'images'")
    return uploads


def _json_images(payload: Any, settings: ServiceSettings) -> list[tuple[str, bytes]]:
    if not isinstance(payload, dict) or set(payload) - {"images"} or not isinstance(payload.get("images"), list):
        raise ApiError(400, "bad_json",
                       'send {"images": ["<base64>", ...]} or {"images": [{"name": ..., "data": "<base64>"}]}')
    items = payload["images"]
    _check_count(len(items), settings)
    out = []
    for i, item in enumerate(items):
        name = f"images[{i}]"
        if isinstance(item, dict):
            if set(item) - {"name", "data"} or not isinstance(item.get("data"), str):
                raise ApiError(400, "bad_json", f"{name}: an object needs 'data' (base64) and may have 'name'")
            name = str(item.get("name") or name)
            item = item["data"]
        if not isinstance(item, str):
            raise ApiError(400, "bad_json", f"{name}: expected a base64 string")
        if item.startswith("data:"):  # a data URL: data:image/jpeg;base64,....
            item = item.partition(",")[2]
        try:
            out.append((name, base64.b64decode(item, validate=True)))
        except (binascii.Error, ValueError) as err:
            raise ApiError(400, "bad_base64", f"{name}: not valid base64: {err}") from None
    return out


def _check_count(n: int, settings: ServiceSettings) -> None:
    if n > settings.max_images_per_request:
        raise ApiError(413, "too_many_images",
                       f"more than {settings.max_images_per_request} images in one request")


def _immich_options(entries: Any, settings: ServiceSettings) -> dict:
    """immich's `entries` JSON -> our options; 422 for a bad one, as immich answers."""
    if not isinstance(entries, str):
        raise ApiError(422, "bad_entries", "form field 'entries' (JSON) is required")
    try:
        request = json.loads(entries)
        entry = request[IMMICH_TASK][IMMICH_MODEL_TYPE]
        entry["modelName"]  # noqa: B018 - required by immich's schema, not used: one model here
        opts = entry.get("options", {}) or {}
        top_k = int(opts.get("topK", settings.default_top_k))
        include_cells = bool(opts.get("includeCells", True))
        others = set(request) - {IMMICH_TASK}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError):
        raise ApiError(
            422, "bad_entries",
            'entries must look like {"geolocation": {"visual": {"modelName": "...", '
            '"options": {"topK": 5}}}}',
        ) from None
    if others:
        raise ApiError(422, "unsupported_task",
                       f"this service answers only the {IMMICH_TASK!r} task, not {sorted(others)}")
    if not 1 <= top_k <= settings.max_top_k:
        raise ApiError(422, "bad_entries", f"topK must be between 1 and {settings.max_top_k}")
    return {"top_k": top_k, "include_cells": include_cells}


async def _decode_all(state: ServiceState, uploads: Sequence[tuple[str, bytes]]) -> list[DecodedImage]:
    """Decode every upload on the decode threads (in parallel, off the event loop and off the
    model thread); the first unusable one fails the request, naming it."""
    if state.locator is None:
        reason = state.load_error or "the index is still loading"
        raise ApiError(503, "not_ready", f"not ready: {reason}", headers={"Retry-After": "5"})
    loop = asyncio.get_running_loop()
    cap = state.settings.max_pixels
    tasks = [
        loop.run_in_executor(state.decode_pool,
                             lambda d=data, n=name: decode_upload(state.locator, d, n, max_pixels=cap))
        for name, data in uploads
    ]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)


async def _predict(state: ServiceState, jobs: list[LocateJob]) -> list[Any]:
    if not state.ready:
        reason = state.load_error or "the index is still loading"
        raise ApiError(503, "not_ready", f"not ready: {reason}", headers={"Retry-After": "5"})
    try:
        return await state.batcher.submit_many(jobs)
    except BatcherFull as err:
        raise ApiError(503, "overloaded", str(err), headers={"Retry-After": "1"}) from None
    except BatcherClosed as err:
        raise ApiError(503, "shutting_down", str(err)) from None


# -- body size limit ---------------------------------------------------------------------------


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`: at once when Content-Length says so, else while reading."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse(
                {"detail": f"request body of {int(declared)} bytes exceeds the limit of {self.max_bytes}",
                 "kind": "body_too_large"},
                413,
                headers={"Connection": "close"},
            )
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(f"request body exceeds the limit of {self.max_bytes} bytes")
            return message

        return await self.app(scope, limited_receive, send)


# -- running it ------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` from a background thread (tests, benchmarks, the demo).

    `with ServerThread(app) as server: httpx.get(server.url + "/healthz")`.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int | None = None,
                 log_level: str = "warning"):
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level=log_level,
                                access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
