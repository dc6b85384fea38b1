"""The HTTP service: `create_app(settings, locator=None)` -> a FastAPI app that geolocates
uploaded photos. Its routes and status codes are listed once, in `service/routes.py`
(`geosurge serve --help` prints them); this module registers exactly those.

Request flow: size limit (`requests.BodyLimitMiddleware`) -> API key -> parse (`requests`) ->
`ServiceState.answer`: decode on a thread pool (the decoder applies the pixel cap on the header,
before any pixel is decoded; bad images answer 4xx here, before they take a batch slot) ->
`MicroBatcher` -> one model thread calling `locator.locate(batch)` -> JSON (`prediction_json`).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse

from geosurge_index.service.immich import immich_router
from geosurge_index.service.requests import (
    ApiError,
    BodyLimitMiddleware,
    BodyTooLarge,
    LocatorLike,
    read_locate_request,
)
from geosurge_index.service.state import (
    ServiceState,
    load_in_background,
    manifest_summary,
    open_cells,
    prediction_json,
)
from geosurge_index.settings import ServiceSettings


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

    require_key = api_key_dependency(settings.api_key)

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
            "latency": state.latency_summary(),  # see ServiceState.latencies for what is timed
            "settings": settings.public_dict(),
        }

    @app.post("/v1/locate", dependencies=[Depends(require_key)], tags=["locate"])
    async def locate(
        request: Request,
        top_k: int = Query(settings.default_top_k, ge=1, le=settings.max_top_k,
                           description="how many alternative cells to return per image"),
        include_cells: bool = Query(True, description="include the best cell at every level"),
    ) -> dict:
        uploads = await read_locate_request(request, settings)
        decoded, preds = await state.answer(uploads, top_k, include_cells)
        return {
            "results": [
                prediction_json(p, d, top_k=top_k, include_cells=include_cells)
                for p, d in zip(preds, decoded, strict=True)
            ]
        }

    app.include_router(immich_router(state, require_key))
    return app


def api_key_dependency(api_key: str | None):
    """A FastAPI dependency: 401 unless the request carries `api_key` (none set: every request passes)."""
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
