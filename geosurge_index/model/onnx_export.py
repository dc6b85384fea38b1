"""The visual encoder as ONNX graphs for CPU inference with ONNX Runtime: fp32, int8, segmenter.

Written into INDEX_DIR beside encoder.safetensors and listed, with checksums and the agreement
measured at export, in the manifest's `onnx` section (`index_onnx`):

  encoder.onnx        fp32: (pixel_values (B,3,S,S) float32, histograms (B,grid^2,C) float32)
                      -> embedding (B,D), unit norm. The plain export: ONNX Runtime's own graph
                      optimisations run when a session loads it. (`optimize=True` also applies
                      the offline transformer optimizer: SkipLayerNormalization and QuickGelu
                      fusions, no attention fusion for this graph; it was no faster in
                      `geosurge bench cpu`, so it is off by default.)
  encoder.int8.onnx   CLIP's weight MatMuls in int8 (`model.onnx_quantize`): static QDQ int8
                      calibrated on photos when `calibration` names some, else dynamic int8.
                      With photos, the top-1 finest cell of the index is compared with torch
                      fp32 on held-out ones and recorded (`top1_agreement`): `runtime auto`
                      runs int8 only where that is >= 99%.
  segmenter.onnx      fp32: pixel_values -> class_map (B,S,S) int64, where the segmenter exports.

The graph starts from the class map's patch histograms (`fusion.patch_histograms`, computed in
torch by `OnnxEncoder`): the histogram's scatter-add has no exact ONNX form (ScatterElements
keeps one of the duplicate indices). With fusion off the graph takes pixels alone.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from geosurge_index.errors import UserError
from geosurge_index.model.fusion import patch_histograms

OPSET = 17
ENCODER_ONNX = {"fp32": "encoder.onnx", "int8": "encoder.int8.onnx"}
SEGMENTER_ONNX = "segmenter.onnx"
FP32_MAX_ABS = 1e-4  # an fp32 export further than this from torch on the check inputs is refused
INT8_MIN_COSINE = 0.99  # an int8 export below this is written but `runtime onnx` does not pick it
INT8_MIN_TOP1 = 0.99  # `runtime auto` runs int8 only when its measured top-1 agreement reaches this


def role(kind: str, precision: str) -> str:
    """The manifest key of a file: encoder_fp32, encoder_int8, segmenter_fp32."""
    return f"{kind}_{precision}"


@dataclass(frozen=True)
class OnnxExportSettings:
    int8: bool = True  # also write the int8 encoder
    int8_method: str = "auto"  # static | dynamic | auto: static when `calibration` is given, else dynamic
    calibration: str | None = None  # photos (folder, manifest; class maps beside them or computed)
    calibration_count: int = 64  # photos calibrating static int8 ...
    agreement_count: int = 200  # ... and further ones for its top-1 agreement with torch fp32
    per_channel: bool = True  # int8 scales per output channel (finer than one per tensor)
    optimize: bool = False  # the offline transformer optimizer on the fp32 graph (measured: no faster)
    segmenter: bool = True  # export the segmenter too (when the encoder has one)
    check_images: int = 2  # seeded random inputs compared with torch at export


@dataclass
class OnnxExportResult:
    """What was written: {role: file name}, {role: agreement with torch}, and what was skipped."""

    files: dict[str, str] = field(default_factory=dict)
    checks: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class _EncoderGraph(nn.Module):
    """The traced function: `VisualEncoder.forward_histograms`."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values, histograms=None):
        return self.encoder.forward_histograms(pixel_values, histograms)


class _SegmenterGraph(nn.Module):
    def __init__(self, segmenter):
        super().__init__()
        self.segmenter = segmenter

    def forward(self, pixel_values):
        return self.segmenter(pixel_values)


def graph_feed(pixels: torch.Tensor, class_map: torch.Tensor | None, grid: int,
               num_classes: int) -> dict[str, np.ndarray]:
    """The ONNX encoder's inputs for torch inputs (`histograms` only with a class map: fusion on)."""
    feed = {"pixel_values": np.ascontiguousarray(pixels.detach().cpu().float().numpy())}
    if class_map is not None:
        hist = patch_histograms(class_map.detach().cpu(), grid, num_classes)
        feed["histograms"] = hist.float().numpy()
    return feed


def _check_inputs(encoder, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = encoder.image_size
    pixels = torch.randn(n, 3, s, s, generator=g)
    maps = torch.randint(0, encoder.config.num_classes, (n, s, s), generator=g)
    maps[:, : s // 8] = 255  # unlabelled pixels, as real maps have
    return pixels, maps


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str]) -> None:
    dynamic = {name: {0: "batch"} for name in inputs + outputs}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks turned constant
        # The TorchScript exporter: stable on these modules (transformers' CLIP, our fusion) and
        # as fast at run time as the dynamo one for this graph.
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)


def _optimize(src: Path, dst: Path, encoder) -> None:
    from onnxruntime.transformers import optimizer

    arch = encoder.backbone.clip.config
    model = optimizer.optimize_model(str(src), model_type="clip", num_heads=arch.num_attention_heads,
                                     hidden_size=arch.hidden_size, opt_level=1)
    model.save_model_to_file(str(dst))


def session(path: str | os.PathLike, threads: int | None = None, providers=None):
    """An ONNX Runtime session with every graph optimisation on, `threads` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def embedding_agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """Max abs difference and the smallest row cosine of two (n, D) embedding arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {"max_abs": float(np.abs(a - b).max()), "cosine_min": float(cos.min()),
            "cosine_mean": float(cos.mean())}


def int8_method(settings: OnnxExportSettings, calibrated: bool) -> str:
    from geosurge_index.model.onnx_quantize import INT8_METHODS

    method = settings.int8_method
    if method == "auto":
        return "static" if calibrated else "dynamic"
    if method not in INT8_METHODS:
        raise UserError(f"int8 method {method!r}: choose auto, {', '.join(INT8_METHODS)}")
    if method == "static" and not calibrated:
        raise UserError("static int8 needs calibration photos (--calibration-images FOLDER)")
    return method


def export_encoder_onnx(encoder, directory: str | os.PathLike,
                        settings: OnnxExportSettings = OnnxExportSettings(),
                        calibration: dict[str, np.ndarray] | None = None) -> OnnxExportResult:
    """Write the ONNX files of a torch `VisualEncoder` into `directory` (files replaced atomically);
    each is run once on seeded random inputs and compared with torch. UserError when the fp32
    graph disagrees with torch beyond FP32_MAX_ABS (nothing is written then). `calibration`: the
    graph's inputs (`graph_feed`) of representative photos, for static int8."""
    directory = Path(directory)
    method = int8_method(settings, bool(calibration)) if settings.int8 else None  # bad settings: refused first
    encoder = encoder.float().eval().cpu()
    result = OnnxExportResult()
    fused = encoder.fusion is not None
    pixels, maps = _check_inputs(encoder, max(1, settings.check_images))
    with torch.inference_mode():
        ref = encoder(pixels, maps if fused else None).numpy()
    feed = graph_feed(pixels, maps if fused else None, encoder.grid, encoder.config.num_classes)
    inputs = list(feed)
    args = tuple(torch.from_numpy(feed[k][:1]) for k in inputs)  # batch 1 traced; batch is dynamic
    with tempfile.TemporaryDirectory(dir=directory, prefix=".onnx-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        _export(_EncoderGraph(encoder), args, tmp / "plain.onnx", inputs, ["embedding"])
        result.seconds["export"] = time.perf_counter() - t
        staged = {}
        fp32 = tmp / "plain.onnx"
        if settings.optimize:
            t = time.perf_counter()
            _optimize(fp32, tmp / "opt.onnx", encoder)
            result.seconds["optimize"] = time.perf_counter() - t
            fp32 = tmp / "opt.onnx"
        check = embedding_agreement(session(fp32).run(None, feed)[0], ref)
        if check["max_abs"] > FP32_MAX_ABS:
            raise UserError(f"the fp32 ONNX encoder differs from torch by {check['max_abs']:.2g} (max abs) "
                            f"on the check inputs, more than {FP32_MAX_ABS:g}: not written")
        staged[role("encoder", "fp32")] = (fp32, check)
        if settings.int8:
            from geosurge_index.model.onnx_quantize import quantize_int8

            t = time.perf_counter()
            recipe = quantize_int8(tmp / "plain.onnx", tmp / "int8.onnx", method, calibration=calibration,
                                   per_channel=settings.per_channel)
            result.seconds["quantize"] = time.perf_counter() - t
            check = embedding_agreement(session(tmp / "int8.onnx").run(None, feed)[0], ref)
            check.update(recipe)
            staged[role("encoder", "int8")] = (tmp / "int8.onnx", check)
        if settings.segmenter and encoder.segmenter is not None:
            try:
                t = time.perf_counter()
                _export(_SegmenterGraph(encoder.segmenter), (pixels[:1],), tmp / "seg.onnx",
                        ["pixel_values"], ["class_map"])
                got = session(tmp / "seg.onnx").run(None, {"pixel_values": pixels.numpy()})[0]
                with torch.inference_mode():
                    want = encoder.segment(pixels).numpy()
                staged[role("segmenter", "fp32")] = (tmp / "seg.onnx",
                                                     {"pixel_agreement": float((got == want).mean())})
                result.seconds["segmenter"] = time.perf_counter() - t
            except Exception as err:  # noqa: BLE001 - an exporter or runtime limit: torch segments then
                result.skipped[role("segmenter", "fp32")] = f"{type(err).__name__}: {str(err)[:200]}"
        for key, (path, check) in staged.items():
            name = SEGMENTER_ONNX if key.startswith("segmenter") else ENCODER_ONNX[key.split("_")[1]]
            os.replace(path, directory / name)
            result.files[key] = name
            result.checks[key] = check
    return result


BATCH = 16  # photos per call when calibrating and measuring agreement


def photo_inputs(encoder, sources: list[str], progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Photo files -> (CLIP-normalised pixels (n,3,S,S), class maps (n,S,S) int64), decoded as
    `locate` decodes them; a photo without a stored class map gets the encoder's segmenter's.
    Photos that do not decode are left out (UserError when none does)."""
    from geosurge_index.geometry import clip_normalise
    from geosurge_index.locate.decode import DecodeSpec, collate, decode_any
    from geosurge_index.progress import bar

    spec = DecodeSpec(image_size=encoder.image_size)
    decoded = [decode_any(p, spec) for p in (bar(sources, desc=progress, unit="photo") if progress else sources)]
    batch = collate(range(len(decoded)), decoded, encoder.image_size)
    if not batch.ok.any():
        raise UserError(f"none of the {len(sources)} photos decodes (first: {batch.errors[0]})")
    x = clip_normalise(batch.pixels)
    maps = batch.class_maps.long()
    missing = torch.nonzero(~torch.as_tensor(batch.has_map)).flatten()
    if len(missing) and encoder.fusion is not None:
        with torch.inference_mode():
            for i in range(0, len(missing), BATCH):
                idx = missing[i:i + BATCH]
                maps[idx] = encoder.segment(x[idx]).long()
    return x, maps


def calibration_photos(folder: str, calibration: int, agreement: int, seed: int = 0) -> tuple[list, list]:
    """The photos of `folder` (an INPUT: folder, manifest, image) in a seeded random order: the
    first `calibration` calibrate, the next `agreement` measure the top-1 agreement."""
    from geosurge_index.sources import image_files

    paths = [p for p in image_files([folder]) if not str(p).endswith(".classmap.png")]
    if not paths:
        raise UserError(f"--calibration-images {folder}: no photos there")
    order = np.random.default_rng(seed).permutation(len(paths))
    paths = [paths[i] for i in order]
    return paths[:calibration], paths[calibration:calibration + agreement]


def top1_agreement(index, encoder, onnx_path: str | os.PathLike, x: torch.Tensor, maps: torch.Tensor) -> dict:
    """The finest cell that `index` (a GeoIndex) finds first for each photo, with the ONNX graph
    against the torch encoder: {top1_agreement, top1_photos, cosine_min}."""
    fused = encoder.fusion is not None
    sess = session(onnx_path)
    ref, got = [], []
    with torch.inference_mode():
        for i in range(0, len(x), BATCH):
            xb, mb = x[i:i + BATCH], maps[i:i + BATCH] if fused else None
            ref.append(encoder(xb, mb).float().numpy())
            got.append(sess.run(None, graph_feed(xb, mb, encoder.grid, encoder.config.num_classes))[0])
    ref, got = np.concatenate(ref), np.concatenate(got)
    a = index.search(ref, top_k=1).best_cells[:, -1]
    b = index.search(got, top_k=1).best_cells[:, -1]
    return {"top1_agreement": float(np.mean(a == b)), "top1_photos": len(a),
            "top1_cosine_min": embedding_agreement(got, ref)["cosine_min"]}


def export_index_onnx(index_dir: str | os.PathLike, settings: OnnxExportSettings = OnnxExportSettings()
                      ) -> OnnxExportResult:
    """`geosurge export-onnx INDEX_DIR`: the index's encoder -> ONNX files in INDEX_DIR, listed with
    their checksums in manifest.json (`index_onnx.record_onnx`). A pretrained backbone or
    segmenter must be loadable here (local folder or Hugging Face cache), as for `locate`.
    With `settings.calibration` photos: static int8 calibrated on some, and the int8 encoder's
    top-1 finest-cell agreement with torch fp32 measured on others through this index."""
    import onnxruntime

    from geosurge_index.index import GeoIndex, read_manifest
    from geosurge_index.index_onnx import file_entry, record_onnx
    from geosurge_index.model.encoder_io import load_encoder

    d = Path(index_dir)
    if not read_manifest(d).get("encoder"):
        raise UserError(f"INDEX_DIR {d} was exported without a visual encoder: nothing to convert")
    encoder = load_encoder(d, "cpu").float().eval()
    feed = check = None
    if settings.int8 and settings.calibration:
        cal, check = calibration_photos(settings.calibration, settings.calibration_count, settings.agreement_count)
        x, maps = photo_inputs(encoder, cal, progress="calibration photos")
        feed = graph_feed(x, maps if encoder.fusion is not None else None, encoder.grid, encoder.config.num_classes)
    result = export_encoder_onnx(encoder, d, settings, calibration=feed)
    key = role("encoder", "int8")
    if check and key in result.files:
        t = time.perf_counter()
        x, maps = photo_inputs(encoder, check, progress="agreement photos")
        result.checks[key].update(top1_agreement(GeoIndex.open(d, device="cpu"), encoder, d / result.files[key],
                                                 x, maps))
        result.seconds["agreement"] = time.perf_counter() - t
    files = {k: file_entry(d, name, result.checks[k]) for k, name in result.files.items()}
    record_onnx(d, files, opset=OPSET, onnxruntime=onnxruntime.__version__, skipped=result.skipped)
    for name in set(ENCODER_ONNX.values()) | {SEGMENTER_ONNX}:
        if name not in result.files.values():  # a stale file of an earlier export, no longer listed
            (d / name).unlink(missing_ok=True)
    return result
