"""The ONNX files of an INDEX_DIR in its manifest: `manifest["onnx"]`, written by `geosurge export-onnx`.

    "onnx": {"opset": 17, "onnxruntime": "1.32.0", "created_utc": ...,
             "files": {"encoder_fp32": {"file": "encoder.onnx", "sha256": ..., "bytes": ...,
                                        "check": {"cosine_min": ..., "max_abs": ...}},
                       "encoder_int8": {...}, "segmenter_fp32": {...}}}

They are kept out of the manifest's `files` on purpose: `index.verify_index` refuses an index
whose listed files are missing or corrupt, while a missing or corrupt ONNX file only means the
torch encoder runs instead (`model.onnx_runtime.choose_runtime`). An index exported before this
existed has no `onnx` key and keeps working as it did.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path

from geosurge_index.index import MANIFEST, read_manifest

ONNX_KEY = "onnx"


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def onnx_entries(manifest: dict) -> dict[str, dict]:
    """{role: entry} of the ONNX files the manifest lists (empty for an index without them)."""
    section = manifest.get(ONNX_KEY)
    if not isinstance(section, dict) or not isinstance(section.get("files"), dict):
        return {}
    return {k: v for k, v in section["files"].items()
            if isinstance(v, dict) and {"file", "sha256", "bytes"} <= v.keys()}


def file_entry(index_dir: str | os.PathLike, name: str, check: dict | None = None) -> dict:
    """The manifest entry of INDEX_DIR/name: its checksum and size (+ the agreement measured at export)."""
    path = Path(index_dir) / name
    return {"file": name, "sha256": file_sha256(path), "bytes": path.stat().st_size, "check": check or {}}


def record_onnx(index_dir: str | os.PathLike, files: dict[str, dict], **meta) -> dict:
    """Replace the manifest's ONNX section with `files` ({role: `file_entry`}) and `meta`; written
    to a temporary and renamed, as `export_index` writes the manifest. -> the new manifest."""
    d = Path(index_dir)
    manifest = read_manifest(d)
    manifest[ONNX_KEY] = {**meta, "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
                          "files": files}
    tmp = d / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, d / MANIFEST)
    return manifest


def onnx_file_problem(index_dir: str | os.PathLike, entry: dict, *, checksums: bool = True) -> str | None:
    """None when INDEX_DIR/entry's file is present with its recorded size and sha256, else why not."""
    path = Path(index_dir) / entry["file"]
    if not path.is_file():
        return f"{entry['file']} is missing"
    if path.stat().st_size != entry["bytes"]:
        return f"{entry['file']} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}"
    if checksums and file_sha256(path) != entry["sha256"]:
        return f"{entry['file']} does not match its sha256 in {MANIFEST}"
    return None
