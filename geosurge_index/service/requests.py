"""Request parsing for the service (routes: `service/routes.py`): the body-size limit, multipart
or JSON base64 uploads, image counts, and uploaded bytes -> the locator's decoded model input.

Every refusal is an `ApiError` (answered as `{"detail": ..., "kind": ...}` with its status).
"""

from __future__ import annotations

import base64
import binascii
import json
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from geosurge_index.locate.decode import Decoded, DecodeSpec, decode_any
from geosurge_index.settings import ServiceSettings

UPLOAD_FIELDS = ("images", "image")

# ImageDecodeError.kind -> HTTP status: the client sent an image we cannot or will not use.
# too_many_pixels comes from the decoder's header probe, before any pixel is decoded.
DECODE_STATUS = {
    "zero_bytes": 400,
    "not_an_image": 415,
    "unsupported_format": 415,
    "too_many_pixels": 413,
    "truncated": 422,
    "unreadable": 422,
}


class ApiError(Exception):
    """A request the service refuses: answered as `{"detail": message, "kind": kind}`."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


class BodyTooLarge(Exception):
    pass


class LocatorLike(Protocol):
    """What the service needs of `geosurge_index.locate.Locator`: its reader stage's settings
    (`spec`, for decoding on the service's threads) and its model + search (`locate`, called
    from one thread)."""

    spec: DecodeSpec

    def locate(self, images: list[Any], *, top_k: int | None = None,
               cell_probabilities: bool = True) -> list[Any]: ...


# -- decoding ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodedImage:
    name: str
    decoded: Decoded  # model-size pixels, ready for a batch
    width: int  # as the photo is seen: after EXIF orientation, before any draft scaling
    height: int


def _status_for(error: str) -> tuple[int, str]:
    kind = error.split(":", 1)[0].strip()
    return DECODE_STATUS.get(kind, 422), kind


def decode_upload(locator: LocatorLike, data: bytes, name: str, *, max_pixels: int | None = None) -> DecodedImage:
    """Uploaded bytes -> the locator's decoded model input and the photo's true size.

    The locator's reader stage (`decode_any` with its `DecodeSpec`), with the service's pixel cap
    `max_pixels` when given. That decoder checks the cap on the header before any pixel is
    decoded, so a decompression bomb is a 413 without a second probe here. Raises `ApiError`
    (4xx) naming `name` when the image is unusable.
    """
    spec = locator.spec if max_pixels in (None, locator.spec.max_pixels) else replace(
        locator.spec, max_pixels=max_pixels)
    try:
        decoded = decode_any(data, spec)
    except Exception as err:  # noqa: BLE001 - a decoder bug must not become a 500 for the client
        raise ApiError(422, "undecodable", f"image {name!r} could not be decoded: {err}") from err
    if decoded.error is not None:
        status, kind = _status_for(decoded.error)
        raise ApiError(status, kind, f"image {name!r}: {decoded.error}")
    return DecodedImage(name=name, decoded=decoded, width=int(decoded.width), height=int(decoded.height))


# -- request bodies ----------------------------------------------------------------------------


@asynccontextmanager
async def read_form(request: Request, settings: ServiceSettings):
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


async def read_locate_request(request: Request, settings: ServiceSettings) -> list[tuple[str, bytes]]:
    """A `/v1/locate` body, multipart files or JSON base64 -> [(name, bytes)], checked for count
    and field names."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    uploads: list[tuple[str, bytes]] = []
    if ctype == "multipart/form-data":
        async with read_form(request, settings) as form:
            unknown = sorted({k for k in form.keys() if k not in UPLOAD_FIELDS})
            if unknown:
                raise ApiError(400, "unknown_field", f"unknown form field(s) "
                               f"{', '.join(map(repr, unknown))}: send files as 'images'")
            for key in UPLOAD_FIELDS:
                for value in form.getlist(key):
                    if not isinstance(value, UploadFile):
                        raise ApiError(400, "not_a_file", f"form field {key!r} must be a file upload")
                    check_count(len(uploads) + 1, settings)
                    uploads.append((value.filename or f"{key}[{len(uploads)}]", await value.read()))
    elif ctype == "application/json":
        try:
            payload = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, "bad_json", f"request body is not valid JSON: {err}") from None
        uploads = json_images(payload, settings)
    else:
        raise ApiError(415, "unsupported_content_type",
                       f"content type {ctype or 'none'!r}: send multipart/form-data or application/json")
    if not uploads:
        raise ApiError(400, "no_images", "no images in the request: send files as 'images'")
    return uploads


def json_images(payload: Any, settings: ServiceSettings) -> list[tuple[str, bytes]]:
    """`{"images": ["<base64>" | {"name": ..., "data": "<base64>"}, ...]}` -> [(name, bytes)]."""
    if not isinstance(payload, dict) or set(payload) - {"images"} or not isinstance(payload.get("images"), list):
        raise ApiError(400, "bad_json",
                       'send {"images": ["<base64>", ...]} or {"images": [{"name": ..., "data": "<base64>"}]}')
    items = payload["images"]
    check_count(len(items), settings)
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


def check_count(n: int, settings: ServiceSettings) -> None:
    if n > settings.max_images_per_request:
        raise ApiError(413, "too_many_images",
                       f"more than {settings.max_images_per_request} images in one request")


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
