"""Request parsing for the service (routes: `service/routes.py`): the body-size limit, multipart
or JSON base64 uploads, image counts, and uploaded bytes -> the locator's decoded model input.

Every refusal is an `ApiError` (answered as `{"detail": ..., "kind": ...}` with its status).
An upload is an `Upload`: a name, the image's bytes and, when the caller sent one, its class map
(a PNG of ADE20K ids, the `<stem>.classmap.png` format).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from geosurge_index.images import PixelHold
from geosurge_index.locate.decode import Decoded, DecodeSpec, decode_any
from geosurge_index.settings import ServiceSettings

UPLOAD_FIELDS = ("images", "image")
CLASS_MAP_FIELDS = ("class_maps", "class_map")
CLASS_MAP_SUFFIX = ".classmap.png"

# ImageDecodeError.kind -> HTTP status: the client sent an image we cannot or will not use.
# too_many_pixels comes from the decoder's header probe, before any pixel is decoded.
DECODE_STATUS = {
    "zero_bytes": 400,
    "not_an_image": 415,
    "unsupported_format": 415,
    "too_many_pixels": 413,
    "truncated": 422,
    "unreadable": 422,
    "bad_class_map": 422,
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


@dataclass(frozen=True)
class Upload:
    """One image of a request: what to call it, its bytes, and its class map's bytes if sent."""

    name: str
    data: bytes
    class_map: bytes | None = None

    @classmethod
    def of(cls, item: Upload | tuple) -> Upload:
        """An `Upload`, or the old `(name, bytes)` pair."""
        return item if isinstance(item, Upload) else cls(*item)


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


def decode_upload(locator: LocatorLike, data: bytes, name: str, *, max_pixels: int | None = None,
                  class_map: bytes | None = None, hold: PixelHold | None = None) -> DecodedImage:
    """Uploaded bytes (and its class map's, when sent) -> the locator's decoded model input and
    the photo's true size.

    The locator's reader stage (`decode_any` with its `DecodeSpec`), with the service's pixel cap
    `max_pixels` when given. That decoder checks the cap on the header before any pixel is
    decoded, so a decompression bomb is a 413 without a second probe here; `hold` is the
    service's pixel budget. Raises `ApiError` (4xx) naming `name` when the image is unusable.
    """
    spec = locator.spec if max_pixels in (None, locator.spec.max_pixels) else replace(
        locator.spec, max_pixels=max_pixels)
    try:
        decoded = decode_any(data, spec, class_map=class_map, name=repr(name), hold=hold)
    except Exception as err:  # noqa: BLE001 - a decoder bug must not become a 500 for the client
        raise ApiError(422, "undecodable", f"image {name!r} could not be decoded: {err}") from err
    if decoded.error is not None:
        status, kind = _status_for(decoded.error)
        message = decoded.error.split(":", 1)[-1].strip()
        if repr(name) not in message:
            message = f"{name!r}: {message}"
        raise ApiError(status, kind, f"image {message}")
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
        # any other refusal of the parser (too many fields, a malformed body) in our error shape
        raise ApiError(400, "bad_form", f"the multipart form could not be read: {err.detail}") from None
    try:
        yield form
    finally:
        await form.close()


async def read_locate_request(request: Request, settings: ServiceSettings) -> list[Upload]:
    """A `/v1/locate` body, multipart files or JSON base64 -> [Upload], checked for count and
    field names, each image paired with its class map when one was sent."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        images: list[tuple[str, bytes]] = []
        maps: list[tuple[str, bytes]] = []
        async with read_form(request, settings) as form:
            unknown = sorted({k for k in form.keys() if k not in UPLOAD_FIELDS + CLASS_MAP_FIELDS})
            if unknown:
                raise ApiError(400, "unknown_field", f"unknown form field(s) "
                               f"{', '.join(map(repr, unknown))}: send files as 'images'")
            for fields, into in ((UPLOAD_FIELDS, images), (CLASS_MAP_FIELDS, maps)):
                for key in fields:
                    for value in form.getlist(key):
                        if not isinstance(value, UploadFile):
                            raise ApiError(400, "not_a_file", f"form field {key!r} must be a file upload")
                        check_count(len(into) + 1, settings)
                        into.append((value.filename or f"{key}[{len(into)}]", await value.read()))
        uploads = pair_class_maps(images, maps)
    elif ctype == "application/json":
        uploads = json_images(parse_json(await request.body()), settings)
    else:
        raise ApiError(415, "unsupported_content_type",
                       f"content type {ctype or 'none'!r}: send multipart/form-data or application/json")
    if not uploads:
        raise ApiError(400, "no_images", "no images in the request: send files as 'images'")
    return uploads


def parse_json(body: bytes) -> Any:
    """A JSON body -> its value; 400 for anything Python's parser refuses (including nesting too
    deep for it and integers too long to convert)."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # JSONDecodeError is a ValueError
        why = "nested too deeply" if isinstance(err, RecursionError) else str(err)[:200]
        raise ApiError(400, "bad_json", f"request body is not valid JSON: {why}") from None


def pair_class_maps(images: Sequence[tuple[str, bytes]], maps: Sequence[tuple[str, bytes]]) -> list[Upload]:
    """Images and class-map files -> uploads. A map named `<stem>.classmap.png` goes with the image
    of that stem (as on disk); otherwise there must be one map per image, paired in order."""
    if not maps:
        return [Upload(name, data) for name, data in images]
    stems: dict[str, int] = {}
    for i, (name, _) in enumerate(images):
        stem = os.path.splitext(os.path.basename(name))[0]
        stems[stem] = -1 if stem in stems else i  # -1: two images share the stem, no pairing by name
    by_name: dict[int, bytes] = {}
    for name, data in maps:
        base = os.path.basename(name)
        i = stems.get(base[: -len(CLASS_MAP_SUFFIX)], -1) if base.endswith(CLASS_MAP_SUFFIX) else -1
        if i < 0 or i in by_name:
            break
        by_name[i] = data
    else:
        return [Upload(name, data, by_name.get(i)) for i, (name, data) in enumerate(images)]
    if len(maps) != len(images):
        raise ApiError(400, "unpaired_class_map",
                       f"{len(maps)} class maps for {len(images)} images: name each <stem>.classmap.png "
                       "after its image, or send one per image in the images' order")
    return [Upload(name, data, cmap) for (name, data), (_, cmap) in zip(images, maps, strict=True)]


def b64(text: str, what: str) -> bytes:
    """Base64 as people paste it: line breaks and spaces (the `base64` command's 76-column
    lines) are ignored, anything else not base64 is a 400."""
    if text.startswith("data:"):  # a data URL: data:image/jpeg;base64,....
        text = text.partition(",")[2]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(400, "bad_base64", f"{what}: not valid base64: {err}") from None


def json_images(payload: Any, settings: ServiceSettings) -> list[Upload]:
    """`{"images": ["<base64>" | {"name": ..., "data": "<base64>", "class_map": "<base64>"}, ...]}`
    -> [Upload]."""
    if not isinstance(payload, dict) or set(payload) - {"images"} or not isinstance(payload.get("images"), list):
        raise ApiError(400, "bad_json",
                       'send {"images": ["<base64>", ...]} or {"images": [{"name": ..., "data": "<base64>"}]}')
    items = payload["images"]
    check_count(len(items), settings)
    out = []
    for i, item in enumerate(items):
        name, cmap = f"images[{i}]", None
        if isinstance(item, dict):
            if (set(item) - {"name", "data", "class_map"} or not isinstance(item.get("data"), str)
                    or not isinstance(item.get("name", ""), (str, type(None)))
                    or not isinstance(item.get("class_map", ""), (str, type(None)))):
                raise ApiError(400, "bad_json", f"{name}: an object needs 'data' (base64) and may have "
                               "'name' (a string) and 'class_map' (base64)")
            name = item.get("name") or name
            if item.get("class_map") is not None:
                cmap = b64(item["class_map"], f"{name} class_map")
            item = item["data"]
        if not isinstance(item, str):
            raise ApiError(400, "bad_json", f"{name}: expected a base64 string")
        out.append(Upload(name, b64(item, name), cmap))
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
