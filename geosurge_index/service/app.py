"""The HTTP service: `create_app(settings, locator=None)` -> a FastAPI app that geolocates
uploaded photos. Its routes and status codes are listed once, in `service/routes.py`
(`geosurge serve --help` prints them); this module registers exactly those. The OpenAPI contract
(request bodies, answers, 4xx) is `service/schema.py`; `/docs` and `/redoc` are served from local
files. Slow clients and the connection cap are uvicorn's side (`service/guard.py`).

Request flow: size limit (`requests.BodyLimitMiddleware`) -> API key -> parse (`requests`) ->
`ServiceState.answer`: decode on a thread pool within the pixel budget (the decoder applies the
pixel cap on the header, before any pixel is decoded; an unusable image gets its own error, or
the request's 4xx when none is usable) -> `MicroBatcher` -> one model thread calling
`locator.locate(batch)` -> JSON (`prediction_json`). A client that leaves is one log line.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import ClientDisconnect

from geosurge_index.privacy import MAX_CAP_KM
from geosurge_index.service.immich import immich_router
from geosurge_index.service.requests import (
    ApiError,
    BodyLimitMiddleware,
    BodyTooLarge,
    LocatorLike,
    read_locate_request,
)
from geosurge_index.service.schema import (
    IndexAnswer,
    LocateResponse,
    error_responses,
    locate_request_body,
)
from geosurge_index.service.state import (
    ClientGone,
    ServiceState,
    cap_json,
    load_in_background,
    log_client_gone,
    manifest_summary,
    open_cells,
    results_json,
)
from geosurge_index.settings import ServiceSettings

DOCS_ASSETS = "/docs-assets"  # Swagger UI's files, served from the fastapi-offline package: no CDN


def create_app(settings: ServiceSettings, locator: LocatorLike | None = None) -> FastAPI:
    """The service. With `locator=None` the index in `settings.index_dir` loads in the background
    after startup (`/readyz` answers 503 until it has); pass an open locator to skip that."""
    state = ServiceState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.batcher.start()
        loader = None
        if locator is not None:
            state.cells = await asyncio.to_thread(open_cells, settings)
            state.attach(locator)
        else:
            loader = asyncio.create_task(load_in_background(state))
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
        docs_url=None,  # served below from local files
        redoc_url=None,
    )
    app.state.service = state
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    add_error_handlers(app)
    add_offline_docs(app)

    require_key = api_key_dependency(settings.api_key)
    keyed = (401,) if settings.api_key else ()

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "not ready, and why"}})
    async def readyz() -> JSONResponse:
        if state.ready:
            return JSONResponse({"ready": True})
        reason = state.load_error or "the index is loading"
        return JSONResponse({"ready": False, "reason": reason}, 503)

    @app.get("/v1/index", dependencies=[Depends(require_key)], tags=["index"], response_model=IndexAnswer,
             responses=error_responses(*keyed))
    async def index_info() -> dict:
        if settings.index_dir is None:
            return {"index_dir": None, "manifest": None, "segmenter": None, "cap": cap_json(settings)}
        return {**await asyncio.to_thread(manifest_summary, settings.index_dir), "cap": cap_json(settings)}

    @app.get("/v1/cells/{level}/{cell_index}", dependencies=[Depends(require_key)], tags=["index"],
             responses=error_responses(*keyed, 404, 422))
    async def cell(level: int, cell_index: int) -> dict:
        row = await asyncio.to_thread(state.cells.cell, level, cell_index) if state.cells else None
        if row is None:
            raise ApiError(404, "unknown_cell", f"no cell {cell_index} at level {level} in this index")
        return row

    @app.get("/v1/stats", dependencies=[Depends(require_key)], tags=["index"], responses=error_responses(*keyed))
    async def stats() -> dict:
        return {
            "ready": state.ready,
            "uptime_s": round(time.time() - state.started, 3),
            "queued": state.batcher.queued,
            "batching": state.batcher.stats.as_dict(),
            "latency": state.latency_summary(),  # see ServiceState.latencies for what is timed
            "connections": {**state.connections.as_dict(), "client_disconnects": state.disconnects},
            "decode_pixels": state.pixels.as_dict(),
            "settings": settings.public_dict(),
        }

    @app.post("/v1/locate", dependencies=[Depends(require_key)], tags=["locate"],
              response_model=LocateResponse, response_model_exclude_unset=True,
              openapi_extra={"requestBody": locate_request_body(settings.max_images_per_request)},
              responses=error_responses(400, *keyed, 413, 415, 422, 503))
    async def locate(
        request: Request,
        top_k: int = Query(settings.default_top_k, ge=1, le=settings.max_top_k,
                           description="how many alternative cells to return per image"),
        include_cells: bool = Query(True, description="include the best cell at every level"),
        cap_km: float | None = Query(None, ge=0, le=MAX_CAP_KM, description=(
            "precision cap in km: answer at a cell at least this wide; the service's own cap "
            "(/v1/index) applies whatever is asked, so only a coarser answer can be had")),
        cap_level: int | None = Query(None, ge=1, description="precision cap by level (1 = coarsest)"),
    ) -> dict:
        uploads = await read_locate_request(request, settings)
        decoded, preds = await state.answer(uploads, top_k, include_cells, receive=request.receive,
                                            cap=state.cap_for(cap_km, cap_level))
        return {"results": results_json(uploads, decoded, preds, top_k=top_k, include_cells=include_cells)}

    open_key = api_key_dependency(None) if settings.immich_no_key else require_key
    app.include_router(immich_router(state, open_key, keyed=() if settings.immich_no_key else keyed))
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every refusal answers `{"detail": ..., "kind": ...}`; a client that left gets one log line."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse({"detail": err.message, "kind": err.kind}, err.status, headers=err.headers)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, err: BodyTooLarge) -> JSONResponse:
        return JSONResponse(
            {"detail": str(err), "kind": "body_too_large"}, 413, headers={"Connection": "close"}
        )

    @app.exception_handler(RequestValidationError)
    async def _bad_parameter(request: Request, err: RequestValidationError) -> JSONResponse:
        parts = []
        for e in err.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "path", "body"))
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return JSONResponse({"detail": "; ".join(parts)[:1000], "kind": "bad_parameter"}, 422)

    @app.exception_handler(ClientDisconnect)
    async def _left_while_sending(request: Request, err: ClientDisconnect) -> Response:
        request.app.state.service.disconnects += 1
        log_client_gone(request.scope, "while sending its request")
        return Response(status_code=400)  # never delivered: the connection is closed

    @app.exception_handler(ClientGone)
    async def _left_while_waiting(request: Request, err: ClientGone) -> Response:
        log_client_gone(request.scope, "before its answer", err.dropped)
        return Response(status_code=400)


def add_offline_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc from files in the `fastapi-offline` package: no CDN, so the
    pages work on a machine without internet access."""
    import fastapi_offline
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    static = Path(fastapi_offline.__file__).parent / "static"
    app.mount(DOCS_ASSETS, StaticFiles(directory=static), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url, title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js", swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=app.openapi_url, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png", with_google_fonts=False)


_API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="ApiKey",
                               description="the service's API key (`--api-key`, GEOSURGE_API_KEY)")
_BEARER = HTTPBearer(auto_error=False, scheme_name="Bearer", description="the same key as a bearer token")


def api_key_dependency(api_key: str | None):
    """A FastAPI dependency: 401 unless the request carries `api_key` (none set: every request
    passes, and the OpenAPI document declares no security)."""
    if not api_key:
        async def open_route() -> None:
            return None

        return open_route
    expected = api_key.encode()

    async def require_key(
        key: str | None = Security(_API_KEY_HEADER),
        bearer: HTTPAuthorizationCredentials | None = Security(_BEARER),
    ) -> None:
        given = key if key is not None else (bearer.credentials.strip() if bearer is not None else None)
        # compare_digest: the time taken does not reveal how much of the key was right
        if given is None or not hmac.compare_digest(given.encode(), expected):
            raise ApiError(
                401, "unauthorized", "missing or wrong API key (send X-API-Key: KEY)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_key
