"""Versioned artefact headers: every on-disk artefact names its format and version, and readers
refuse another format or a newer version (ARCHITECTURE.md) with one wording."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from geosurge_index.errors import FormatError


def check_format(meta: Any, where: str | Path, fmt: str, version: int) -> int:
    """The `format_version` of `meta` after checking `{"format": fmt, "format_version": 1..version}`;
    FormatError naming `where` otherwise."""
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise FormatError(f"{where}: not a {fmt} file (format = {found!r})")
    v = meta.get("format_version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise FormatError(f"{where}: bad format_version {v!r}")
    if v > version:
        raise FormatError(f"{where}: format_version {v} is newer than this geosurge-index reads "
                          f"({version}); upgrade geosurge-index")
    return v


def read_json(path: str | Path, fmt: str, version: int) -> dict[str, Any]:
    """A versioned JSON file; FormatError when missing, unreadable, another format or newer."""
    try:
        meta = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise FormatError(f"{path} is missing") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FormatError(f"{path} is not valid JSON ({err})") from err
    check_format(meta, path, fmt, version)
    return meta
