"""The immich machine-learning adapter: `GET /ping` and `POST /predict` (see `service/routes.py`),
and the parsing of immich's `entries` form field. The answer is the same JSON as `/v1/locate`'s
for one image, under the task name, with the photo's size as immich expects it."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from starlette.datastructures import UploadFile

from geosurge_index.privacy import MAX_CAP_KM
from geosurge_index.service.requests import ApiError, Upload, read_form
from geosurge_index.service.schema import ImmichResponse, error_responses, predict_request_body
from geosurge_index.service.state import ServiceState, prediction_json
from geosurge_index.settings import ServiceSettings

# The task and model type under which /predict answers, in immich's `entries` vocabulary.
IMMICH_TASK = "geolocation"
IMMICH_MODEL_TYPE = "visual"

ENTRIES_HELP = ('entries must look like {"geolocation": {"visual": {"modelName": "...", '
                '"options": {"topK": 5}}}}')


def immich_options(entries: Any, settings: ServiceSettings) -> dict:
    """immich's `entries` JSON -> our options; 422 for a bad one, as immich answers: `bad_entries`,
    or `unsupported_task` for a task other than geolocation (e.g. immich's `clip`)."""
    if not isinstance(entries, str):
        raise ApiError(422, "bad_entries", "form field 'entries' (JSON) is required")
    try:
        request = json.loads(entries)
    except (ValueError, RecursionError):  # bad JSON, an integer too long, nesting too deep
        raise ApiError(422, "bad_entries", ENTRIES_HELP) from None
    if not isinstance(request, dict) or not request:
        raise ApiError(422, "bad_entries", ENTRIES_HELP)
    others = sorted(set(request) - {IMMICH_TASK})
    if others:
        raise ApiError(422, "unsupported_task",
                       f"this service answers only the {IMMICH_TASK!r} task, not {', '.join(map(repr, others))}")
    try:
        entry = request[IMMICH_TASK][IMMICH_MODEL_TYPE]
        entry["modelName"]  # noqa: B018 - required by immich's schema, not used: one model here
        opts = entry.get("options", {}) or {}
        top_k = int(opts.get("topK", settings.default_top_k))
        include_cells = bool(opts.get("includeCells", True))
        cap_km = None if opts.get("capKm") is None else float(opts["capKm"])
        cap_level = None if opts.get("capLevel") is None else int(opts["capLevel"])
    except (KeyError, TypeError, AttributeError, ValueError, OverflowError):
        raise ApiError(422, "bad_entries", ENTRIES_HELP) from None
    if not 1 <= top_k <= settings.max_top_k:
        raise ApiError(422, "bad_entries", f"topK must be between 1 and {settings.max_top_k}")
    if cap_km is not None and not 0 <= cap_km <= MAX_CAP_KM or cap_level is not None and cap_level < 1:
        raise ApiError(422, "bad_entries", f"capKm must lie in 0..{MAX_CAP_KM:g} and capLevel be at least 1")
    return {"top_k": top_k, "include_cells": include_cells, "cap_km": cap_km, "cap_level": cap_level}


def immich_router(state: ServiceState, require_key, keyed: tuple[int, ...] = ()) -> APIRouter:
    """/ping and /predict over the shared state; `require_key` is the app's API-key dependency
    (an open one with `--immich-no-key true`), `keyed` the 401 to document when it asks for one."""
    router = APIRouter(tags=["immich"])
    settings = state.settings

    @router.get("/ping", response_class=PlainTextResponse)
    async def ping() -> str:
        return "pong"

    @router.post("/predict", dependencies=[Depends(require_key)], response_model=ImmichResponse,
                 response_model_exclude_unset=True, openapi_extra={"requestBody": predict_request_body()},
                 responses=error_responses(400, *keyed, 413, 415, 422, 503))
    async def predict(request: Request) -> dict:
        async with read_form(request, settings) as form:
            options = immich_options(form.get("entries"), settings)
            images = form.getlist("image")
            if len(images) > 1:
                raise ApiError(400, "one_image_only",
                               f"/predict takes one image, got {len(images)}: send several to /v1/locate")
            image = images[0] if images else None
            if not isinstance(image, UploadFile):
                raise ApiError(400, "missing_image", "send the photo as the multipart file field 'image'")
            cmap = form.get("class_map")
            if cmap is not None and not isinstance(cmap, UploadFile):
                raise ApiError(400, "not_a_file", "form field 'class_map' must be a file upload")
            upload = Upload(image.filename or "image", await image.read(),
                            None if cmap is None else await cmap.read())
        top_k = options["top_k"]
        (decoded,), (pred,) = await state.answer([upload], top_k, options["include_cells"],
                                                 receive=request.receive,
                                                 cap=state.cap_for(options["cap_km"], options["cap_level"]))
        result = prediction_json(pred, decoded, top_k=top_k, include_cells=options["include_cells"])
        return {IMMICH_TASK: result, "imageHeight": decoded.height, "imageWidth": decoded.width}

    return router
