"""Which encoder runs (`runtime`), and `OnnxEncoder`: the exported graphs behind `VisualEncoder`'s call.

Runtimes (the `runtime` setting; `--runtime`, `GEOSURGE_RUNTIME`):
  auto       on the CPU the fastest encoder the index carries whose answers agree with torch:
             int8 ONNX when its top-1 finest-cell agreement with torch fp32, measured through the
             index at export (`export-onnx --calibration-images`), is >= 99% (and its cosine >=
             0.99), else fp32 ONNX, else torch; on CUDA torch
             (bf16 autocast on the GPU is the fast path there). A listed ONNX file that is missing,
             fails its checksum or does not load falls back to the next, with an `OnnxFallbackWarning`.
  torch      the reference: `VisualEncoder` in torch.
  onnx       the fastest ONNX encoder the index carries; refuses (UserError) when there is none.
  onnx-fp32, onnx-int8   that file exactly; refuses when it is missing or damaged.
An index exported before ONNX existed has no ONNX files: auto runs torch there, silently.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from geosurge_index.errors import UserError

RUNTIMES = ("auto", "torch", "onnx", "onnx-fp32", "onnx-int8")
INSTALL_HINT = "pip install 'geosurge-index[onnx]'"


class OnnxFallbackWarning(UserWarning):
    """An ONNX encoder the index lists could not be used; another one (or torch) runs instead."""


@dataclass(frozen=True)
class RuntimeChoice:
    runtime: str  # torch | onnx
    precision: str = "fp32"  # fp32 | int8 (onnx); torch is fp32 on the CPU, bf16 autocast on CUDA
    file: str | None = None  # the ONNX encoder's file in INDEX_DIR
    notes: tuple[str, ...] = ()  # why faster options were passed over

    @property
    def name(self) -> str:
        return "torch" if self.runtime == "torch" else f"onnx-{self.precision}"


def _cuda(device) -> bool:
    return str(device).startswith("cuda")


def choose_runtime(index_dir: str | os.PathLike, manifest: dict, runtime: str = "auto", device="cpu", *,
                   checksums: bool = True) -> RuntimeChoice:
    """The encoder to run for `runtime` (see the module doc). Checks the chosen ONNX file's size and
    sha256 against the manifest; warns on an auto fallback, raises UserError on an explicit one."""
    from geosurge_index.index_onnx import onnx_entries, onnx_file_problem
    from geosurge_index.model.onnx_export import INT8_MIN_COSINE, INT8_MIN_TOP1, role

    if runtime not in RUNTIMES:
        raise UserError(f"runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return RuntimeChoice("torch")
    entries = onnx_entries(manifest)
    if runtime == "auto" and (_cuda(device) or not entries):
        return RuntimeChoice("torch")
    int8 = (entries.get(role("encoder", "int8")) or {}).get("check") or {}
    if runtime == "auto":
        # int8 only where its top-1 finest-cell agreement with torch fp32, measured on photos
        # through this index at export (`export-onnx --calibration-images`), is >= 99%
        good = int8.get("top1_agreement", 0.0) >= INT8_MIN_TOP1 and int8.get("cosine_min", 0.0) >= INT8_MIN_COSINE
        wanted = ["int8", "fp32"] if good else ["fp32"]
    elif runtime == "onnx":
        wanted = ["int8", "fp32"] if int8.get("cosine_min", 0.0) >= INT8_MIN_COSINE else ["fp32"]
    else:
        wanted = [runtime.split("-", 1)[1]]
    problems: list[str] = []
    damaged: list[str] = []
    try:
        import onnxruntime as ort
    except ImportError:
        problems.append(f"onnxruntime is not installed ({INSTALL_HINT})")
        wanted = []
    else:
        if _cuda(device) and "CUDAExecutionProvider" not in ort.get_available_providers():
            problems.append(f"device {device}: this onnxruntime has no CUDA provider")
            wanted = []
    for precision in wanted:
        entry = entries.get(role("encoder", precision))
        if entry is None:
            problems.append(f"no {precision} ONNX encoder in the index (`geosurge export-onnx`)")
            continue
        why = onnx_file_problem(index_dir, entry, checksums=checksums)
        if why is None:
            if damaged:
                warnings.warn(f"{index_dir}: {'; '.join(damaged)}: the {precision} ONNX encoder runs instead",
                              OnnxFallbackWarning, stacklevel=2)
            return RuntimeChoice("onnx", precision, entry["file"], tuple(problems))
        problems.append(why)
        damaged.append(why)  # listed but unusable: worth a warning even when another one runs
    return _fallback(index_dir, runtime, problems)


def _fallback(index_dir, runtime: str, problems: list[str]) -> RuntimeChoice:
    if runtime != "auto":
        raise UserError(f"runtime {runtime}: {'; '.join(problems)} in {index_dir}")
    warnings.warn(f"{index_dir}: {'; '.join(problems)}: the torch encoder runs instead",
                  OnnxFallbackWarning, stacklevel=3)
    return RuntimeChoice("torch", notes=tuple(problems))


def open_encoder(index_dir: str | os.PathLike, device, runtime: str = "auto", manifest: dict | None = None,
                 *, checksums: bool = True):
    """The index's encoder for `runtime` on `device`: `load_encoder`'s VisualEncoder, or an
    `OnnxEncoder` (a drop-in for its call). Its `runtime` attribute names what runs."""
    from geosurge_index.index import read_manifest
    from geosurge_index.model.encoder_io import load_encoder

    manifest = read_manifest(index_dir) if manifest is None else manifest
    choice = choose_runtime(index_dir, manifest, runtime, device, checksums=checksums)
    if choice.runtime == "onnx":
        try:
            return OnnxEncoder.open(index_dir, choice, manifest, device=device, checksums=checksums)
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - onnxruntime's load errors have no common type
            choice = _fallback(index_dir, runtime, [f"{choice.file} does not load ({type(err).__name__}: "
                                                    f"{str(err).splitlines()[0][:200]})"])
    encoder = load_encoder(index_dir, device)
    encoder.runtime = choice.name
    return encoder


class OnnxEncoder:
    """`encoder(pixel_values (B,3,S,S) CLIP-normalised, class_map (B,S,S) int64 | None) -> (B, D)`
    unit-norm float32 torch tensor, as `VisualEncoder`, through ONNX Runtime. Class maps become
    patch histograms in torch (`fusion.patch_histograms`, the reference code); without a map the
    exported segmenter runs, or the torch one (loaded on first use) where none was exported.

    The session uses torch's thread count (`torch.get_num_threads()`, which the bulk runner sets
    beside its decoding processes); it is rebuilt when that count changes."""

    def __init__(self, path: str | os.PathLike, *, image_size: int, embed_dim: int, grid: int,
                 num_classes: int, fused: bool, precision: str = "fp32",
                 segmenter_path: str | os.PathLike | None = None, torch_segmenter=None,
                 providers: list[str] | None = None):
        self.path = Path(path)
        self.segmenter_path = None if segmenter_path is None else Path(segmenter_path)
        self.image_size, self.embed_dim, self.grid = int(image_size), int(embed_dim), int(grid)
        self.num_classes, self.fused, self.precision = int(num_classes), bool(fused), precision
        self.runtime = f"onnx-{precision}"
        self.providers = providers or ["CPUExecutionProvider"]
        self._torch_segmenter = torch_segmenter  # () -> a module with .segment, for maps not given
        self._threads = None
        self._sessions()

    @classmethod
    def open(cls, index_dir, choice: RuntimeChoice, manifest: dict, *, device="cpu",
             checksums: bool = True) -> OnnxEncoder:
        from geosurge_index.index_onnx import onnx_entries, onnx_file_problem
        from geosurge_index.model.encoder_io import load_encoder, read_encoder_config
        from geosurge_index.model.onnx_export import role

        d = Path(index_dir)
        config = read_encoder_config(d)
        seg_path = None
        if config.fusion.enabled and config.segmenter.kind != "none":
            entry = onnx_entries(manifest).get(role("segmenter", "fp32"))
            why = None if entry is None else onnx_file_problem(d, entry, checksums=checksums)
            if why is not None:
                warnings.warn(f"{d}: {why}: the torch segmenter computes class maps not given",
                              OnnxFallbackWarning, stacklevel=2)
            elif entry is not None:
                seg_path = d / entry["file"]
        cuda = _cuda(device)
        providers = (["CUDAExecutionProvider"] if cuda else []) + ["CPUExecutionProvider"]
        return cls(d / choice.file, image_size=config.image_size, embed_dim=config.embed_dim, grid=config.grid,
                   num_classes=config.num_classes, fused=config.fusion.enabled, precision=choice.precision,
                   segmenter_path=seg_path, torch_segmenter=lambda: load_encoder(d, "cpu"), providers=providers)

    def _sessions(self) -> None:
        from geosurge_index.model.onnx_export import session

        self._threads = torch.get_num_threads()
        self.session = session(self.path, self._threads, self.providers)
        self.segmenter_session = (None if self.segmenter_path is None
                                  else session(self.segmenter_path, self._threads, self.providers))
        self.provider = self.session.get_providers()[0]

    # -- the VisualEncoder surface the predictor uses --------------------------------------------

    def eval(self) -> OnnxEncoder:
        return self

    def to(self, *args, **kwargs) -> OnnxEncoder:
        return self

    def segment(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self._threads != torch.get_num_threads():
            self._sessions()
        if self.segmenter_session is not None:
            x = np.ascontiguousarray(pixel_values.detach().cpu().float().numpy())
            return torch.from_numpy(self.segmenter_session.run(None, {"pixel_values": x})[0])
        if self._torch_segmenter is None:
            raise UserError("this ONNX encoder has no segmenter: give precomputed class maps")
        if callable(self._torch_segmenter) and not hasattr(self._torch_segmenter, "segment"):
            self._torch_segmenter = self._torch_segmenter()  # loaded on first use
        with torch.inference_mode():
            return self._torch_segmenter.segment(pixel_values.detach().cpu().float())

    def __call__(self, pixel_values: torch.Tensor, class_map: torch.Tensor | None = None) -> torch.Tensor:
        from geosurge_index.model.onnx_export import graph_feed

        b, c, h, w = pixel_values.shape
        s = self.image_size
        if c != 3 or h != s or w != s:
            raise ValueError(f"pixel_values must be (B, 3, {s}, {s}), got {tuple(pixel_values.shape)}")
        if self._threads != torch.get_num_threads():
            self._sessions()
        if not self.fused:
            class_map = None
        elif class_map is None:
            class_map = self.segment(pixel_values)
        if class_map is not None and tuple(class_map.shape) != (b, h, w):
            raise ValueError(f"class_map must be (B, {h}, {w}), got {tuple(class_map.shape)}")
        feed = graph_feed(pixel_values, class_map, self.grid, self.num_classes)
        out = torch.from_numpy(self.session.run(None, feed)[0])
        return out.to(pixel_values.device)

    forward = __call__
