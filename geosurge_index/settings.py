"""One settings vocabulary: every knob declared once (type, default, limits, help text), from which
the flags, the `GEOSURGE_*` environment variables and the help are generated.

- `InferenceSettings`: the knobs every way of running the model shares (device, batch size, beam,
  top-k, draft size, pixel cap, runtime, ten-crop): `geosurge locate`, the bulk `LocateJob`,
  `Locator.open(settings=...)` and the service.
- `BulkSettings`: those plus the bulk runner's decoding processes (`geosurge locate`).
- `ServiceSettings`: those plus the HTTP service's (`geosurge serve`).

Precedence is flag > environment > default. The environment layer is pydantic-settings'
`EnvSettingsSource` (prefix `GEOSURGE_`, case-insensitive); conversion and limits are pydantic's.
A bad value is a `UserError` naming the setting and where it came from (`--port`,
`GEOSURGE_PORT`). Constructing a class directly (`ServiceSettings(port=9000)`) takes the given
values and the defaults only: a library call must not change with the caller's shell; `from_env`
and `from_args` are the entry points that read the environment.

A subclass may call a shared field by another public name (`public_names`): the service's
`top_k` is `--default-top-k` (a request's `top_k` overrides it) and its `batch_size` is
`--max-batch-size` (the micro-batch cap). The public name is used for the flag, the variable,
the constructor keyword and `public_dict`; the field name stays the vocabulary's.
"""

from __future__ import annotations

import argparse
import contextvars
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from geosurge_index.errors import UserError
from geosurge_index.images import DEFAULT_MAX_PIXELS
from geosurge_index.sources import DEFAULT_MAX_BYTES

ENV_PREFIX = "GEOSURGE_"


class _Unset:
    """A keyword not given (where None is a meaningful value, e.g. `draft_size=None`)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()

# field -> where its value came from ("--port", "GEOSURGE_PORT"), while one `resolve` validates
_SOURCES: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("settings_sources", default=None)


def setting(default: Any = None, help: str = "", *, metavar: str = "N", flag: bool = True,
            secret: bool = False, default_help: str | None = None, default_factory=None, **limits: Any) -> Any:
    """A field of the vocabulary: its default, its help text and how its flag looks.
    `default_help` describes a default that is computed later (e.g. 'per device'); `limits` are
    pydantic's (ge, le, ...), checked wherever the value comes from."""
    extra = {"metavar": metavar, "flag": flag, "secret": secret, "default_help": default_help}
    if default_factory is not None:
        return Field(default_factory=default_factory, description=help, json_schema_extra=extra, **limits)
    return Field(default, description=help, json_schema_extra=extra, **limits)


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping instead of `os.environ`."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]):
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._environ.items()}  # case-insensitive, as the default


class InferenceSettings(BaseSettings):
    """The inference knobs shared by `geosurge locate`, `LocateJob`, `Locator.open` and the service."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")
    public_names: ClassVar[dict[str, str]] = {}  # field -> the name this class shows for it

    device: str = setting(
        "auto", "where the model runs: auto (CUDA when available), cpu, cuda, cuda:N", metavar="DEVICE")
    batch_size: int | None = setting(
        None, "images per model call", ge=1, default_help="256 on CUDA, 32 on CPU; with --ten-crop 32 and 4")
    beam: int | str | None = setting(
        None, "beam width: cells kept at levels 1..6, one value or six comma-separated", metavar="BEAM",
        default_help="the index's default")
    top_k: int = setting(
        5, "finest cells kept per image, best first (Parquet `topk_cells`; HTTP `alternatives`)", ge=1)
    draft_size: int | None = setting(
        None, "decode JPEGs by DCT scaling to at least this many pixels on the short side (2-6x faster; "
        "the model resizes to its input size anyway); 0 decodes at full size", ge=0,
        default_help="the encoder's input size")
    max_pixels: int = setting(
        DEFAULT_MAX_PIXELS, "largest image, width x height, accepted: a decompression-bomb cap, checked on "
        "the header before any pixel is decoded (bulk: a too_many_pixels error row; HTTP: 413)", ge=1)
    runtime: Literal["auto", "torch", "onnx", "onnx-fp32", "onnx-int8"] = setting(
        "auto", "how the encoder runs: torch (the reference), onnx (the fastest ONNX Runtime encoder the "
        "index carries: `geosurge export-onnx`), onnx-fp32, onnx-int8; an explicit ONNX choice refuses "
        "when its file is missing or fails its checksum", metavar="RUNTIME",
        default_help="auto: on the CPU int8 ONNX where its top-1 agreement with torch, measured at export "
        "(export-onnx --calibration-images), is >= 99%, else fp32 ONNX, else torch, with a warning when a "
        "listed file is unusable; "
        "on CUDA torch")
    ten_crop: bool = setting(
        False, "test-time ten-crop averaging (the paper's evaluation setting): embed the 4 corner crops and "
        "the centre crop of a 1.143x resize and their mirror images, and search with the L2-normalised "
        "mean; 10x the encoder work", metavar="BOOL", default_help="off: one centre crop")
    protocol: Literal["fast", "paper"] | None = setting(
        None, "test protocol: 'paper' is the paper's benchmark protocol, ten-crop averaging (sets "
        "ten_crop; 8x the time of one crop on the demo index, see README); 'fast' is one centre crop", metavar="PROTOCOL",
        default_help="fast (one centre crop) unless ten_crop is on")
    cap_km: float | None = setting(
        None, "precision cap (privacy): answer with the mean point of the deepest cell on the predicted path "
        "whose extent (sqrt of its area) is at least this many km; nothing finer leaves (no finer cells, "
        "top-k, neighbours or embeddings). Typical: 1 street, 25 city, 200 region, 750 country",
        metavar="KM", ge=0, le=5000, default_help="no cap")
    cap_level: int | None = setting(
        None, "precision cap by hierarchy level: answer at this level (1 = coarsest) or coarser; with "
        "--cap-km the coarser of the two applies", metavar="LEVEL", ge=1, default_help="no cap")
    galleries: str | None = setting(
        None, "the index's galleries (`geosurge gallery`) whose geotagged references refine the point: "
        "names, comma-separated, or all, or none", metavar="NAMES", default_help="all of the index's")
    refine_cells: int | None = setting(
        None, "with galleries: the best finest cells whose references are searched for the nearest one "
        "(0: no refinement, the cell's mean point)", ge=0,
        default_help="the index's default: 3, unless the index records its own (an imported GeoCLIP index: 200)")

    # -- construction --------------------------------------------------------------------------

    def __init__(self, **values: Any):
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise UserError(_describe(type(self), err)) from None

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        # The constructor takes values and defaults only; `resolve` adds the environment layer.
        return (init_settings,)

    @model_validator(mode="before")
    @classmethod
    def _public_to_field_names(cls, values: Any) -> Any:
        if not isinstance(values, dict) or not cls.public_names:
            return values
        values = dict(values)
        for name, public in cls.public_names.items():
            if public in values:
                if name in values:
                    raise UserError(f"setting {public} given twice (also as {name})")
                values[name] = values.pop(public)
        return values

    @model_validator(mode="before")
    @classmethod
    def _protocol_sets_ten_crop(cls, values: Any) -> Any:
        """protocol 'paper' turns ten-crop on; 'fast' refuses it (one centre crop)."""
        if not isinstance(values, dict) or values.get("protocol") is None:
            return values
        protocol = str(values["protocol"]).strip().lower()
        values = dict(values, protocol=protocol)
        if protocol == "paper":
            values["ten_crop"] = True
        elif protocol == "fast" and str(values.get("ten_crop", False)).strip().lower() in ("true", "1", "yes", "on"):
            raise UserError("protocol 'fast' is one centre crop, but ten_crop is on: drop one of them "
                            "(protocol 'paper' is ten-crop)")
        return values

    @field_validator("beam", mode="before")
    @classmethod
    def _beam_number(cls, value: Any) -> Any:
        """'8' -> 8 (one width for every level); '8,8,4,4,2,2' stays a schedule string."""
        if isinstance(value, str) and "," not in value and value.strip().lstrip("-").isdigit():
            return int(value)
        return value

    # -- names ----------------------------------------------------------------------------------

    @classmethod
    def public_name(cls, name: str) -> str:
        return cls.public_names.get(name, name)

    @classmethod
    def env_name(cls, name: str) -> str:
        """`GEOSURGE_<PUBLIC NAME>` of a field (given by its field or its public name)."""
        return ENV_PREFIX + cls.public_name(cls._field_name(name)).upper()

    @classmethod
    def flag_name(cls, name: str) -> str:
        return "--" + cls.public_name(cls._field_name(name)).replace("_", "-")

    @classmethod
    def _field_name(cls, name: str) -> str:
        for field, public in cls.public_names.items():
            if public == name:
                return field
        return name

    # -- sources -------------------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any):
        """Defaults, then GEOSURGE_* variables, then `overrides` (values that are not None)."""
        return cls.resolve(overrides, os.environ if environ is None else environ)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None):
        """The flags `add_arguments` declared (None: not given), over the environment, over defaults."""
        given = {cls.public_name(f): getattr(args, cls.public_name(f), None) for f in cls.model_fields}
        return cls.resolve(given, os.environ if environ is None else environ)

    @classmethod
    def resolve(cls, given: Mapping[str, Any], environ: Mapping[str, str]):
        """`given` (by public name; None: not given) over `environ` over the defaults."""
        given = {cls._field_name(k): v for k, v in given.items() if v is not None}
        env = cls._env_values(environ)
        sources = {name: cls.env_name(name) for name in env}
        sources.update({name: cls.flag_name(name) for name in given})
        token = _SOURCES.set(sources)
        try:
            return cls(**{**env, **given})
        finally:
            _SOURCES.reset(token)

    @classmethod
    def _env_values(cls, environ: Mapping[str, str]) -> dict[str, Any]:
        """GEOSURGE_* variables -> {field: raw value}. A renamed field is read under its public name
        only (the service's GEOSURGE_MAX_BATCH_SIZE, not bulk locate's GEOSURGE_BATCH_SIZE)."""
        renamed = {ENV_PREFIX + name.upper(): ENV_PREFIX + public.upper()
                   for name, public in cls.public_names.items()}
        by_public = {v: k for k, v in renamed.items()}
        view: dict[str, str] = {}
        for key, value in environ.items():
            upper = key.upper()
            if upper in renamed:
                continue
            view[by_public.get(upper, key)] = value
        return _MappingEnvSource(cls, view)()

    # -- flags ---------------------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                      names: Iterable[str] | None = None, *, switches: bool = False) -> None:
        """One flag per field (or per field in `names`), default None so that `resolve` can tell
        'not given' from a value. `switches`: a bool is a bare switch (`--ten-crop`, as
        `geosurge locate` has it) rather than a value (`--ten-crop true`, as `geosurge serve`)."""
        chosen = list(cls.model_fields) if names is None else [cls._field_name(n) for n in names]
        for name in chosen:
            info = cls.model_fields[name]
            extra = info.json_schema_extra or {}
            if not extra.get("flag", True):
                continue
            default = info.get_default(call_default_factory=True)
            shown = extra.get("default_help") or ("unset" if default is None else default)
            if extra.get("secret"):
                shown = "unset"
            help_text = f"{info.description} (default: {shown}; env {cls.env_name(name)})".replace("%", "%%")
            kwargs: dict[str, Any] = {"dest": cls.public_name(name), "default": None, "help": help_text}
            if switches and info.annotation is bool:
                kwargs.update(action="store_const", const=True)
            else:
                kwargs["metavar"] = extra.get("metavar", "N")
                if info.annotation is bool:
                    kwargs["help"] = help_text.replace(" (default:", ": true or false (default:", 1)
            parser.add_argument(cls.flag_name(name), **kwargs)

    # -- values --------------------------------------------------------------------------------

    def values(self) -> dict[str, Any]:
        """{field: value} (field names, not public names)."""
        return {name: getattr(self, name) for name in type(self).model_fields}

    def with_(self, **changes: Any):
        """A copy with `changes` (field or public names), checked like any other value."""
        changes = {type(self)._field_name(k): v for k, v in changes.items()}
        return type(self)(**{**self.values(), **changes})

    def inference(self) -> InferenceSettings:
        """Only the shared inference knobs (e.g. to record or hand to `Locator.open`)."""
        return InferenceSettings(**{k: getattr(self, k) for k in InferenceSettings.model_fields})

    def public_dict(self) -> dict[str, Any]:
        """The settings as JSON-able values under their public names, secrets redacted."""
        out: dict[str, Any] = {}
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if (info.json_schema_extra or {}).get("secret"):
                value = None if value is None else "***"
            out[type(self).public_name(name)] = str(value) if isinstance(value, Path) else value
        return out

    def to_env(self) -> dict[str, str]:
        """The settings as GEOSURGE_* variables (e.g. for a subprocess); unset ones left out."""
        return {type(self).env_name(k): str(v).lower() if isinstance(v, bool) else str(v)
                for k, v in self.values().items() if v is not None}


class BulkSettings(InferenceSettings):
    """`geosurge locate`'s knobs: the shared ones and the bulk runner's decoding processes."""

    workers: int | None = setting(
        None, "decoding processes; 0 decodes in the main process", ge=0,
        default_help="on CUDA all cores but one, at most 16; on the CPU a quarter of the cores, at least 1, "
        "and the model gets the remaining cores as torch threads")
    max_image_bytes: int = setting(
        DEFAULT_MAX_BYTES, "largest input file (or tar member) read, in bytes; a larger one is a too_large "
        "error row, refused on its size before a byte is read", metavar="BYTES", ge=1,
        default_help=f"{DEFAULT_MAX_BYTES >> 20} MiB: a 100-MP JPEG is ~50 MB")
    max_error_rate: float | None = setting(
        None, "exit with status 1 when more than this fraction (0..1) of the rows are errors (the rows "
        "are written either way)", metavar="RATE", ge=0, le=1,
        default_help="fail only when every row is an error")
    skip_tagged: bool = setting(
        False, "leave photos whose EXIF already holds valid GPS out of the model: they get a row with "
        "their EXIF coordinates and the error kind skipped_tagged", metavar="BOOL",
        default_help="off: every photo is located; its EXIF GPS is reported beside the estimate")


LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


class ServiceSettings(InferenceSettings):
    """Everything `geosurge serve` can be told: the shared knobs (its `top_k` is the default for
    requests, its `batch_size` the micro-batch cap) and the service's own.
    Field name `x_y` <-> flag `--x-y` <-> `GEOSURGE_X_Y`."""

    public_names: ClassVar[dict[str, str]] = {"top_k": "default_top_k", "batch_size": "max_batch_size"}

    # the micro-batch cap: small batches keep latency low when traffic is light
    batch_size: int = setting(16, "most images in one model call (micro-batch)", ge=1)
    index_dir: Path | None = setting(None, "the INDEX_DIR written by `geosurge export`", flag=False)
    host: str = setting(
        "127.0.0.1", "address to bind; 0.0.0.0 exposes the service to the network", metavar="HOST")
    port: int = setting(8000, "TCP port to listen on", metavar="PORT", ge=1, le=65535)
    api_key: str | None = setting(
        None,
        "require this key in `X-API-Key: KEY` or `Authorization: Bearer KEY` on /v1/* and /predict "
        "(401 otherwise). Prefer the environment variable: a flag shows up in `ps`",
        metavar="KEY", secret=True,
    )
    max_wait_ms: float = setting(
        10.0,
        "how long the first image of a batch waits for others before the model call starts; "
        "under load batches fill while the model is busy, so this only matters when traffic is light",
        metavar="MS", ge=0,
    )
    max_queue: int = setting(
        512, "most images waiting for the model; beyond it requests get 503 with Retry-After", ge=1)
    max_body_bytes: int = setting(
        64 * 1024 * 1024, "largest request body accepted (413 beyond)", metavar="BYTES", ge=1)
    max_images_per_request: int = setting(32, "most images in one request (413 beyond)", ge=1)
    max_top_k: int = setting(100, "largest top_k a request may ask for (422 beyond)", ge=1)
    decode_workers: int = setting(
        help="threads decoding uploaded images (the model has its own single worker thread); "
        "the default is this machine's CPU count, at most 8",
        default_factory=lambda: min(8, os.cpu_count() or 1), ge=1,
    )
    log_level: LogLevel = setting(
        "info", "uvicorn log level: critical, error, warning, info, debug", metavar="LEVEL")
    immich_no_key: bool = setting(
        False, "leave /predict (and /ping) open without the API key, for immich's server, which cannot "
        "send one: only on a trusted network, the /v1/* routes keep the key", metavar="BOOL")
    decode_pixel_budget: int = setting(
        DEFAULT_MAX_PIXELS, "pixels decoded at once across all requests (an image holds width x height, "
        "after JPEG draft scaling, while it decodes; a larger one decodes alone): bounds the decoding "
        "memory to about 4 bytes x this", ge=1)
    header_timeout_s: float = setting(
        10.0, "seconds a connection may take to send a request's head (idle connections included); "
        "then it is closed with 408", metavar="S", gt=0)
    idle_timeout_s: float = setting(
        30.0, "seconds a request body may pause before the connection is closed", metavar="S", gt=0)
    min_upload_rate: float = setting(
        1024.0, "bytes/s a request body must average once it has taken --idle-timeout-s "
        "(a 1-byte/s trickle is closed)", metavar="BYTES", ge=0)
    keep_alive_s: float = setting(
        5.0, "seconds an idle kept-alive connection stays open between requests", metavar="S", gt=0)
    max_connections: int = setting(
        512, "most open connections; a new one beyond it gets 503 and is closed at once", ge=1)

    @field_validator("index_dir", mode="after")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    @model_validator(mode="after")
    def _consistent(self) -> ServiceSettings:
        if self.top_k > self.max_top_k:
            raise UserError(f"setting default_top_k ({self.top_k}) exceeds max_top_k ({self.max_top_k})")
        if self.max_queue < self.max_images_per_request:
            raise UserError(f"setting max_queue ({self.max_queue}) is below max_images_per_request "
                            f"({self.max_images_per_request}): such requests could never be queued")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("setting api_key is empty; unset it to run without a key")
        return self

    @property
    def default_top_k(self) -> int:
        return self.top_k

    @property
    def max_batch_size(self) -> int:
        return self.batch_size


def _type_name(annotation: Any) -> str:
    name = getattr(annotation, "__name__", None)
    return name if name and "|" not in str(annotation) else str(annotation).replace("pathlib.", "")


def _describe(cls: type[InferenceSettings], err: ValidationError) -> str:
    """pydantic's errors -> one line per bad setting, naming the setting and its source."""
    sources = _SOURCES.get() or {}
    lines = []
    for e in err.errors():
        field = str(e["loc"][0]) if e["loc"] else ""
        public = cls.public_name(field)
        where = f"{sources[field]}: " if field in sources else ""
        ctx, value = e.get("ctx") or {}, e.get("input")
        kind = e["type"]
        if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
            bound = {"greater_than_equal": ("at least", "ge"), "greater_than": ("above", "gt"),
                     "less_than_equal": ("at most", "le"), "less_than": ("below", "lt")}[kind]
            lines.append(f"{where}setting {public} must be {bound[0]} {ctx.get(bound[1])}, got {value}")
        elif kind == "literal_error":
            lines.append(f"{where}setting {public} must be one of {ctx.get('expected')}, got {value!r}")
        elif kind == "extra_forbidden":
            lines.append(f"unknown setting {field!r}")
        elif field in cls.model_fields:
            kind_name = _type_name(cls.model_fields[field].annotation)
            lines.append(f"{where}{value!r} is not a valid {kind_name} for setting {public}")
        else:
            lines.append(f"{where}{e['msg']}")
    return "; ".join(lines)
