"""The service's OpenAPI contract: response models (pydantic), the request bodies of `/v1/locate`
and `/predict` (multipart and JSON, declared by hand because the routes read their bodies
themselves, to apply the size and count limits while reading), and the documented 4xx answers.
The routes and status codes themselves are listed once, in `service/routes.py`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from geosurge_index.service.routes import STATUS_CODES


class ErrorBody(BaseModel):
    """Every refusal: a sentence and a short machine-readable kind."""

    detail: str = Field(description="what was wrong, naming the image or field")
    kind: str = Field(description="e.g. bad_json, bad_base64, too_many_images, not_an_image, unauthorized")


class Place(BaseModel):
    country_code: str | None = None
    country_name: str | None = None
    admin1: str | None = None
    town: str | None = None


class CellAnswer(BaseModel):
    level: int
    cell_index: int
    s2_token: str
    probability: float | None = Field(None, description="the level's softmax at this cell")
    confidence: float | None = Field(None, description="probability that the true point lies in this cell "
                                     "(calibrated when the answer's `calibrated` is true)")


class AlternativeAnswer(BaseModel):
    cell_index: int
    s2_token: str
    probability: float | None
    lat: float | None
    lon: float | None
    level: int | None = Field(None, description="under a precision cap: the level of this capped cell "
                              "(0: an S2 cell coarser than level 1), its probability summed over the top-k inside it")


class CapAnswer(BaseModel):
    km: float | None = Field(None, description="the cap in force, in km (None: none by distance)")
    level: int | None = Field(None, description="the cap in force, as a level (None: none by level)")
    answered_level: int = Field(description="the level of the cell answered (0: an S2 cell coarser than level 1)")
    s2_token: str = Field(description="the S2 token of the cell answered")
    extent_km: float | None = Field(None, description="its extent: sqrt of its area")


class Point(BaseModel):
    lat: float | None = None
    lon: float | None = None


class Neighbour(BaseModel):
    """A gallery reference (`geosurge gallery`): its gallery, id and cosine with the image."""

    gallery: str | None = None
    id: str
    similarity: float | None = None


class LocateResult(BaseModel):
    """One image's answer. An image that could not be used has `error` and `error_kind` set and
    no location; the other images of the request are answered as usual."""

    model_config = ConfigDict(extra="forbid")

    name: str
    width: int | None = Field(None, description="the photo's width as seen (after EXIF rotation)")
    height: int | None = None
    lat: float | None = None
    lon: float | None = None
    probability: float | None = None
    place: Place = Field(default_factory=Place)
    error: str | None = Field(None, description="why this image has no answer")
    error_kind: str | None = Field(None, description="e.g. zero_bytes, not_an_image, truncated, too_many_pixels")
    cells: list[CellAnswer] | None = Field(None, description="the best cell at every level (include_cells)")
    alternatives: list[AlternativeAnswer] = Field(default_factory=list)
    confidence: float | None = Field(None, description="probability that the true point lies in the reported "
                                     "finest cell (calibrated when `calibrated` is true)")
    r50_km: float | None = Field(None, description="km around lat/lon holding 50% of the posterior")
    r90_km: float | None = Field(None, description="km around lat/lon holding 90% of the posterior")
    calibrated: bool | None = Field(None, description="false: the index has no calibration, the "
                                    "probabilities are the model's own")
    p_within_1km: float | None = Field(None, description="probability that the true point lies within 1 km of "
                                       "lat/lon (calibrated when `calibrated`; absent under a cap)")
    p_within_25km: float | None = Field(None, description="the same within 25 km")
    p_within_200km: float | None = Field(None, description="the same within 200 km")
    p_within_750km: float | None = Field(None, description="the same within 750 km")
    p_within_2500km: float | None = Field(None, description="the same within 2500 km")
    cap: CapAnswer | None = Field(None, description="set when a precision cap cut this answer: lat/lon are the "
                                  "mean point of the cell answered, nothing finer is given")
    point_source: str | None = Field(None, description="how lat/lon were made: cell_mean, or with the index's "
                                     "galleries neighbour / neighbours (absent under a cap)")
    cell_point: Point | None = Field(None, description="the best finest cell's mean point")
    neighbour: Neighbour | None = Field(None, description="the nearest gallery reference inside the best cells")


class LocateResponse(BaseModel):
    results: list[LocateResult] = Field(description="one per image, in the order sent")


class ImmichResponse(BaseModel):
    """immich's machine-learning answer shape: the result under the task name, and the size."""

    geolocation: LocateResult
    imageHeight: int  # noqa: N815 - immich's field names
    imageWidth: int  # noqa: N815


class IndexAnswer(BaseModel):
    index_dir: str | None
    manifest: dict[str, Any] | None
    segmenter: dict[str, Any] | None = Field(
        None, description="`trained` false and a `warning` when the index's segmenter was never trained")
    calibration: dict[str, Any] | None = Field(
        None, description="`calibrated` false when the index has no calibration (its probabilities are the "
                          "model's own); else the methods per level, photos fitted on, radius factors")
    cap: dict[str, Any] | None = Field(None, description="the service-wide precision cap (km, level)")


# -- request bodies -------------------------------------------------------------------------------

_BINARY = {"type": "string", "format": "binary"}
_CLASS_MAP_HELP = ("a PNG of ADE20K class ids (255 unlabelled), the format of <stem>.classmap.png: paired "
                   "with the image of the same stem when named <stem>.classmap.png, else by order")


def locate_request_body(max_images: int) -> dict:
    """`/v1/locate`'s body: multipart files or JSON base64, each image with an optional class map."""
    image_object = {
        "type": "object",
        "required": ["data"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "description": "what answers and errors call the image"},
            "data": {"type": "string", "description": "the image, base64 (line breaks allowed) or a data: URL"},
            "class_map": {"type": "string", "description": "its class map PNG, base64"},
        },
    }
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {"type": "array", "items": _BINARY, "minItems": 1, "maxItems": max_images,
                                   "description": "the photos (JPEG, PNG, WebP); 'image' is also read"},
                        "class_maps": {"type": "array", "items": _BINARY, "maxItems": max_images,
                                       "description": _CLASS_MAP_HELP},
                    },
                },
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "additionalProperties": False,
                    "properties": {
                        "images": {
                            "type": "array", "minItems": 1, "maxItems": max_images,
                            "items": {"anyOf": [{"type": "string", "description": "base64"}, image_object]},
                        },
                    },
                },
            },
        },
    }


def predict_request_body() -> dict:
    """`/predict`'s body, as immich's server sends it."""
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "entries"],
                    "properties": {
                        "image": {**_BINARY, "description": "one photo"},
                        "entries": {"type": "string", "description": 'JSON: {"geolocation": {"visual": '
                                    '{"modelName": "geosurge", "options": {"topK": 5}}}}'},
                        "class_map": {**_BINARY, "description": "its class map PNG (optional)"},
                    },
                },
            },
        },
    }


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each code with its sentence from `routes.STATUS_CODES`."""
    text = dict(STATUS_CODES)
    return {code: {"model": ErrorBody, "description": text[code]} for code in codes}
