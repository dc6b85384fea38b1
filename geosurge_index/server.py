"""Deprecated: the service is the package `geosurge_index.service` (routes in
`geosurge_index.service.routes`). This module re-exports its old public names for one release."""

from __future__ import annotations

import warnings

from geosurge_index import images
from geosurge_index.index import IndexCells
from geosurge_index.service.app import api_key_dependency, create_app
from geosurge_index.service.immich import IMMICH_MODEL_TYPE, IMMICH_TASK, immich_options
from geosurge_index.service.requests import (
    DECODE_STATUS,
    UPLOAD_FIELDS,
    ApiError,
    BodyLimitMiddleware,
    BodyTooLarge,
    DecodedImage,
    LocatorLike,
    decode_upload,
)
from geosurge_index.service.runner import ServerThread, free_port
from geosurge_index.service.state import (
    PLACE_FIELDS,
    ModelJob,
    ServiceState,
    manifest_summary,
    open_locator,
    prediction_json,
)

warnings.warn(
    "geosurge_index.server is deprecated: import from geosurge_index.service.app (create_app), "
    ".runner (ServerThread, free_port), .requests (decode_upload, ApiError) or .state",
    DeprecationWarning,
    stacklevel=2,
)

CellStore = IndexCells.open  # one reader of cells.duckdb now: `index.IndexCells`
LocateJob = ModelJob  # the service's model job, renamed: `LocateJob` is the bulk job's name


def refuse_bombs(data: bytes, name: str, *, max_pixels: int) -> None:
    """Deprecated: `decode_upload` refuses too many pixels on the header already (413)."""
    try:
        images.probe_image(data, max_pixels=max_pixels).close()
    except images.ImageDecodeError as err:
        if err.kind == "too_many_pixels":
            raise ApiError(413, err.kind, f"image {name!r}: {err.message}") from None


__all__ = [
    "DECODE_STATUS", "IMMICH_MODEL_TYPE", "IMMICH_TASK", "PLACE_FIELDS", "UPLOAD_FIELDS", "ApiError",
    "BodyLimitMiddleware", "BodyTooLarge", "CellStore", "DecodedImage", "LocateJob", "LocatorLike",
    "ModelJob", "ServerThread", "ServiceState", "api_key_dependency", "create_app", "decode_upload",
    "free_port", "immich_options", "manifest_summary", "open_locator", "prediction_json", "refuse_bombs",
]
