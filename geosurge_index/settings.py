"""The HTTP service's settings: one typed class, filled from flags, then GEOSURGE_* variables, then defaults.

Each field is declared once, with its help text; `add_arguments` turns the fields into flags of
`geosurge serve`, `from_env` reads `GEOSURGE_<FIELD>` variables, and `resolve` applies the order
flag > environment > default. Values are checked on construction and a bad one is a `UserError`
that names the setting and where it came from.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from geosurge_index.errors import UserError
from geosurge_index.images import DEFAULT_MAX_PIXELS

ENV_PREFIX = "GEOSURGE_"


def _setting(default: Any, help: str, *, metavar: str = "N", flag: bool = True, secret: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "metavar": metavar, "flag": flag, "secret": secret})


@dataclass(frozen=True)
class ServiceSettings:
    """Everything `geosurge serve` can be told. Field name `x_y` <-> flag `--x-y` <-> `GEOSURGE_X_Y`."""

    index_dir: Path | None = _setting(
        None, "the INDEX_DIR written by `geosurge export`", flag=False
    )
    host: str = _setting(
        "127.0.0.1", "address to bind; 0.0.0.0 exposes the service to the network", metavar="HOST"
    )
    port: int = _setting(8000, "TCP port to listen on", metavar="PORT")
    device: str = _setting(
        "auto", "where the model runs: auto (cuda when available), cpu, cuda, cuda:N", metavar="DEVICE"
    )
    api_key: str | None = _setting(
        None,
        "require this key in `X-API-Key: KEY` or `Authorization: Bearer KEY` on /v1/* and /predict "
        "(401 otherwise). Prefer the environment variable: a flag shows up in `ps`",
        metavar="KEY",
        secret=True,
    )
    max_batch_size: int = _setting(16, "most images in one model call (micro-batch)")
    max_wait_ms: float = _setting(
        10.0,
        "how long the first image of a batch waits for others before the model call starts; "
        "under load batches fill while the model is busy, so this only matters when traffic is light",
        metavar="MS",
    )
    max_queue: int = _setting(
        512, "most images waiting for the model; beyond it requests get 503 with Retry-After"
    )
    max_body_bytes: int = _setting(
        64 * 1024 * 1024, "largest request body accepted (413 beyond)", metavar="BYTES"
    )
    max_images_per_request: int = _setting(32, "most images in one request (413 beyond)")
    max_pixels: int = _setting(
        DEFAULT_MAX_PIXELS, "largest image, width x height, accepted (413 beyond): a decompression-bomb cap"
    )
    default_top_k: int = _setting(5, "top-k alternatives returned when a request does not say")
    max_top_k: int = _setting(100, "largest top_k a request may ask for (422 beyond)")
    decode_workers: int = _setting(
        min(8, os.cpu_count() or 1),
        "threads decoding uploaded images (the model has its own single worker thread); "
        "the default is this machine's CPU count, at most 8",
    )
    draft_size: int | None = _setting(
        None,
        "decode JPEGs by DCT scaling to at least this many pixels on the short side (2-6x faster; "
        "the model resizes to its input size anyway); unset: the encoder's input size, as bulk "
        "`geosurge locate` does; 0 decodes at full size",
    )
    ten_crop: bool = _setting(
        False, "test-time ten-crop averaging (the paper's; about 10x the model work per image): "
        "true or false", metavar="BOOL",
    )
    log_level: str = _setting(
        "info", "uvicorn log level: critical, error, warning, info, debug", metavar="LEVEL"
    )

    def __post_init__(self) -> None:
        positive = ("port", "max_batch_size", "max_queue", "max_body_bytes", "max_images_per_request",
                    "max_pixels", "default_top_k", "max_top_k", "decode_workers")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"setting {name} must be at least 1, got {getattr(self, name)}")
        if self.port > 65535:
            raise UserError(f"setting port must be at most 65535, got {self.port}")
        if self.max_wait_ms < 0:
            raise UserError(f"setting max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.draft_size is not None and self.draft_size < 0:
            raise UserError(f"setting draft_size must be >= 0, got {self.draft_size}")
        if self.default_top_k > self.max_top_k:
            raise UserError(
                f"setting default_top_k ({self.default_top_k}) exceeds max_top_k ({self.max_top_k})"
            )
        if self.max_queue < self.max_images_per_request:
            raise UserError(f"setting max_queue ({self.max_queue}) is below max_images_per_request "
                            f"({self.max_images_per_request}): such requests could never be queued")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("setting api_key is empty; unset it to run without a key")
        levels = ("critical", "error", "warning", "info", "debug", "trace")
        if self.log_level not in levels:
            raise UserError(f"setting log_level must be one of {', '.join(levels)}, got {self.log_level!r}")

    # -- sources -----------------------------------------------------------------------------

    @classmethod
    def env_name(cls, name: str) -> str:
        return ENV_PREFIX + name.upper()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServiceSettings:
        """Defaults, then GEOSURGE_* variables, then `overrides` (values that are not None)."""
        return cls.resolve(overrides, os.environ if environ is None else environ)

    @classmethod
    def resolve(cls, given: Mapping[str, Any], environ: Mapping[str, str]) -> ServiceSettings:
        values: dict[str, Any] = {}
        for f in fields(cls):
            if given.get(f.name) is not None:
                values[f.name] = _convert(f.name, given[f.name], f.type, f"--{f.name.replace('_', '-')}")
            elif cls.env_name(f.name) in environ:
                raw = environ[cls.env_name(f.name)]
                values[f.name] = _convert(f.name, raw, f.type, cls.env_name(f.name))
        return cls(**values)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field (default None, so that `resolve` can tell 'not given' from a value)."""
        for f in fields(cls):
            if not f.metadata.get("flag", True):
                continue
            default = f.default if f.default is not MISSING else None
            shown = "unset" if default is None else default
            if f.metadata.get("secret"):
                shown = "unset"
            parser.add_argument(
                f"--{f.name.replace('_', '-')}",
                dest=f.name,
                default=None,
                metavar=f.metadata["metavar"],
                help=f"{f.metadata['help']} (default: {shown}; env {cls.env_name(f.name)})",
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServiceSettings:
        given = {f.name: getattr(args, f.name, None) for f in fields(cls)}
        return cls.resolve(given, os.environ if environ is None else environ)

    def with_(self, **changes: Any) -> ServiceSettings:
        return replace(self, **changes)

    def public_dict(self) -> dict[str, Any]:
        """The settings as JSON-able values, the API key redacted."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret"):
                value = None if value is None else "***"
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out


def _convert(name: str, raw: Any, annotation: Any, source: str) -> Any:
    """Strings from flags or the environment -> the field's type; a bad value names its source."""
    kind = str(annotation)
    if not isinstance(raw, str):
        return raw
    try:
        if kind.startswith("Path"):
            return Path(raw).expanduser()
        if kind in ("int", "int | None"):
            return int(raw.replace("_", ""))
        if kind == "float":
            return float(raw)
        if kind == "bool":
            value = raw.strip().lower()
            if value in ("1", "true", "yes", "on"):
                return True
            if value in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
    except ValueError:
        raise UserError(f"{source}: {raw!r} is not a valid {kind} for setting {name}") from None
    return raw
