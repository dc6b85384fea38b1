"""`geosurge bench cpu`: the encoder on the CPU with torch and ONNX Runtime (fp32, int8), the
segmenter settings, and what each costs in agreement with the torch fp32 reference."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

DESCRIPTION = """\
Measure CPU inference options (figures: seconds per image, wall clock, median of --images rounds
at batch 1 after one warm-up call, one round at batch 8; the options are timed in turn, round after round, so that load from other processes spreads
over all of them):

  1. the encoder (CLIP + fusion, class map given) on the full-size architecture (CLIP
     ViT-L/14-336, config-built weights, seed 0; --quick: the tiny config): torch fp32, ONNX
     Runtime fp32 (the shipped plain export, and with the offline transformer fusions), ONNX
     Runtime int8 (dynamic; per channel, shipped, and per tensor), at batch 1 and 8; agreement with torch fp32 on synthetic
     photos: max abs difference and cosine of the embeddings, and top-1 agreement of the
     nearest of 10,000 random unit cells (the finest level's stand-in);
  2. with --demo-index: the trained demo index (export-onnx into a copy), its test photos
     through `Locator` with each runtime: top-1 finest-cell agreement with torch fp32;
  3. the segmenter settings: OneFormer (Swin-L, config-built) at input sizes 512/384/256 and
     SegFormer-b0: seconds per image at batch 1, class-map pixel agreement with OneFormer 512,
     and the effect on the answers (embedding cosine, top-1 agreement) through the fastest encoder;
  4. the whole photo (class map + encoder + search) with the fastest setting whose agreement
     is >= 99%, against the 10 s of the torch path with OneFormer 512.
Prints the machine, the ONNX Runtime execution provider and every figure; --json writes them.
"""

TODAY_S = 10.0  # s per photo before issue 17: OneFormer 512 (~8 s) + torch fp32 encoder (~2.6 s)
N_CELLS = 10_000


@dataclass(frozen=True)
class CpuBench:
    quick: bool = False  # the tiny config only
    images: int = 2  # timing rounds per option (batch 1: one image a round; batch 8: 8 images)
    agreement_images: int = 8
    threads: int | None = None  # None: torch's
    demo_index: str | None = None
    demo_images: str | None = None
    segmenters: bool = True
    full: bool = True
    json: str | None = None


def _photos(n: int, size: int, seed: int = 0):
    """Smooth random RGB squares (uint8) and blocky class maps, like the locate tests' photos."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    px = np.stack([np.asarray(Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
                              .resize((size, size), Image.BICUBIC)) for _ in range(n)])
    maps = np.stack([np.asarray(Image.fromarray(rng.integers(0, 150, (6, 6), dtype=np.uint8))
                                .resize((size, size), Image.NEAREST)) for _ in range(n)]).astype(np.int64)
    return px, maps


def _timed_rounds(options: dict, rounds: int, warm_up: bool = True) -> dict[str, float]:
    """{name: fn()} -> {name: median seconds per call}; one warm-up call each (unless already
    warm), then `rounds` rounds calling every option once in turn."""
    for fn in options.values() if warm_up else ():
        fn()
    times: dict[str, list[float]] = {k: [] for k in options}
    for _ in range(max(1, rounds)):
        for name, fn in options.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def _agreement(emb: np.ndarray, ref: np.ndarray, cells: np.ndarray) -> dict:
    from geosurge_index.model.onnx_export import embedding_agreement

    out = embedding_agreement(emb, ref)
    out["top1_agreement"] = float(np.mean((emb @ cells.T).argmax(1) == (ref @ cells.T).argmax(1)))
    return out


def _encoder_options(encoder, tmp: Path, say) -> dict:
    """Export the variants measured (fp32 plain/optimised, int8 per channel/per tensor)."""
    from geosurge_index.model.onnx_export import OnnxExportSettings, export_encoder_onnx
    from geosurge_index.model.onnx_runtime import OnnxEncoder

    kw = dict(image_size=encoder.image_size, embed_dim=encoder.embed_dim, grid=encoder.grid,
              num_classes=encoder.config.num_classes, fused=encoder.fusion is not None)
    out, seconds = {}, {}
    for label, s in (("onnx-fp32 + int8 per channel", OnnxExportSettings(segmenter=False)),
                     ("onnx-fp32-fused + int8 per tensor", OnnxExportSettings(optimize=True, per_channel=False,
                                                                              segmenter=False))):
        d = tmp / label.split()[0]
        d.mkdir(parents=True)
        say(f"  exporting {label} ...")
        r = export_encoder_onnx(encoder, d, s)
        seconds[label] = r.seconds
        int8_name = "onnx-int8" + ("" if s.per_channel else "-per-tensor")
        out["onnx-fp32-fused" if s.optimize else "onnx-fp32"] = OnnxEncoder(d / r.files["encoder_fp32"], **kw)
        out[int8_name] = OnnxEncoder(d / r.files["encoder_int8"], precision="int8", **kw)
    return out, seconds


def bench_encoder(encoder, say, settings: CpuBench, tmp: Path) -> dict:
    import torch

    from geosurge_index.geometry import clip_normalise

    s = encoder.image_size
    options, export_s = _encoder_options(encoder, tmp, say)
    options = {"torch-fp32": encoder, **options}
    provider = next(o.provider for k, o in options.items() if k != "torch-fp32")
    px, maps = _photos(max(8, settings.agreement_images), s)
    x = clip_normalise(torch.as_tensor(px))
    m = torch.as_tensor(maps)
    rng = np.random.default_rng(1)
    cells = rng.standard_normal((N_CELLS, encoder.embed_dim)).astype(np.float32)
    cells /= np.linalg.norm(cells, axis=1, keepdims=True)
    with torch.inference_mode():
        embs = {k: np.asarray(enc(x[: settings.agreement_images], m[: settings.agreement_images]))
                for k, enc in options.items()}
    ref = embs["torch-fp32"]
    figures = {"provider": provider, "export_s": export_s, "options": {}}
    timings = {}
    for b in (1, 8):
        def call(enc, b=b):
            with torch.inference_mode():
                enc(x[:b], m[:b])
        # batch 8: one round (8 images an option) after the batch-1 rounds have warmed up
        t = _timed_rounds({k: (lambda enc=enc, call=call: call(enc)) for k, enc in options.items()},
                          settings.images if b == 1 else 1, warm_up=b == 1)
        timings[b] = {k: v / b for k, v in t.items()}
    base = timings[1]["torch-fp32"]
    say(f"  {'option':<22} {'s/img b1':>9} {'s/img b8':>9} {'speed-up b1':>11} {'max abs':>9} "
        f"{'cosine min':>10} {'top-1':>6}")
    for k in options:
        a = _agreement(embs[k], ref, cells)
        row = {"s_per_image_b1": timings[1][k], "s_per_image_b8": timings[8][k],
               "speedup_b1": base / timings[1][k], "speedup_b8": timings[8]["torch-fp32"] / timings[8][k], **a}
        figures["options"][k] = row
        say(f"  {k:<22} {row['s_per_image_b1']:>9.3f} {row['s_per_image_b8']:>9.3f} {row['speedup_b1']:>10.2f}x "
            f"{a['max_abs']:>9.2g} {a['cosine_min']:>10.6f} {a['top1_agreement']:>6.0%}")
    return figures


def bench_demo_index(settings: CpuBench, say, tmp: Path) -> dict:
    import shutil

    from geosurge_index.locate import Locator
    from geosurge_index.model.onnx_export import OnnxExportSettings, export_index_onnx
    from geosurge_index.settings import InferenceSettings
    from geosurge_index.sources import image_files

    d = tmp / "demo-index"
    shutil.copytree(settings.demo_index, d)
    export_index_onnx(d, OnnxExportSettings())
    paths = image_files([settings.demo_images or str(Path(settings.demo_index).parent / "world" / "test")])
    out, embs, secs = {}, {}, {}
    for runtime in ("torch", "onnx-fp32", "onnx-int8"):
        loc = Locator.open(d, settings=InferenceSettings(device="cpu", runtime=runtime))
        t = time.perf_counter()
        preds = []
        for i in range(0, len(paths), 32):
            preds += loc.locate(paths[i:i + 32], return_embeddings=True, cell_probabilities=False)
        secs[runtime] = (time.perf_counter() - t) / len(paths)
        ok = [p for p in preds if p.ok]
        out[runtime] = [p.cells[-1].cell_index for p in ok]
        embs[runtime] = np.array([p.embedding for p in ok], np.float32)
    from geosurge_index.model.onnx_export import embedding_agreement

    figures = {"images": len(paths)}
    for runtime in out:
        a = embedding_agreement(embs[runtime], embs["torch"])
        a["top1_agreement"] = float(np.mean(np.array(out[runtime]) == np.array(out["torch"])))
        a["s_per_image_whole"] = secs[runtime]
        figures[runtime] = a
        say(f"  {runtime:<10} top-1 finest cell agrees with torch on {a['top1_agreement']:.1%} of "
            f"{len(paths)} photos; cosine min {a['cosine_min']:.6f}; {secs[runtime] * 1000:.1f} ms/photo "
            f"(decode + class map read + encoder + search)")
    return figures


def bench_segmenters(settings: CpuBench, encoder, say) -> dict:
    """OneFormer at 512/384/256 and SegFormer-b0 (config-built, seeded): s/image at batch 1, pixel
    agreement with OneFormer 512, and answers through `encoder` (the fastest ONNX one)."""
    import torch

    from geosurge_index.geometry import clip_normalise
    from geosurge_index.model.config import (
        DEFAULT_ONEFORMER,
        DEFAULT_SEGFORMER,
        KNOWN_ARCHS,
        TINY_ONEFORMER_ARCH,
        SegmenterConfig,
        tiny_config,
    )
    from geosurge_index.model.segmenter import build_segmenter

    s = encoder.image_size
    if settings.quick:
        seg_tiny = tiny_config("segformer").segmenter
        specs = {f"oneformer-{n}": SegmenterConfig("oneformer", None, TINY_ONEFORMER_ARCH, n) for n in (128, 96, 64)}
        specs["segformer-64"] = SegmenterConfig("segformer", None, seg_tiny.arch, 64)
    else:
        specs = {f"oneformer-{n}": SegmenterConfig("oneformer", None, KNOWN_ARCHS[DEFAULT_ONEFORMER], n)
                 for n in (512, 384, 256)}
        specs["segformer-512"] = SegmenterConfig("segformer", None, KNOWN_ARCHS[DEFAULT_SEGFORMER], 512)
    n = max(1, settings.agreement_images // 2)
    px, _ = _photos(n, s, seed=2)
    x = clip_normalise(torch.as_tensor(px))
    rng = np.random.default_rng(1)
    cells = rng.standard_normal((N_CELLS, encoder.embed_dim)).astype(np.float32)
    cells /= np.linalg.norm(cells, axis=1, keepdims=True)
    maps, secs = {}, {}
    torch.manual_seed(0)
    shared = None
    for name, cfg in specs.items():
        if name.startswith("oneformer") and shared is not None:
            seg = shared  # one set of weights, three input sizes
            seg.input_size = cfg.input_size
        else:
            torch.manual_seed(0)
            seg = build_segmenter(cfg, cfg.arch, weights=False).eval()
            if name.startswith("oneformer"):
                shared = seg
        with torch.inference_mode():
            seg(x[:1])  # warm-up
            t = time.perf_counter()
            for i in range(min(n, max(1, settings.images))):
                seg(x[i:i + 1])
            secs[name] = (time.perf_counter() - t) / min(n, max(1, settings.images))
            maps[name] = seg(x)
    ref_name = next(iter(specs))
    with torch.inference_mode():
        embs = {k: np.asarray(encoder(x, v)) for k, v in maps.items()}
    figures = {}
    for name in specs:
        a = _agreement(embs[name], embs[ref_name], cells)
        a["pixel_agreement"] = float((maps[name] == maps[ref_name]).float().mean())
        a["s_per_image"] = secs[name]
        a["speedup"] = secs[ref_name] / secs[name]
        figures[name] = a
        say(f"  {name:<15} {secs[name]:>7.2f} s/img ({a['speedup']:.2f}x)  class maps agree on "
            f"{a['pixel_agreement']:.1%} of pixels; answers: cosine min {a['cosine_min']:.4f}, "
            f"top-1 {a['top1_agreement']:.0%}")
    return figures


def run_cpu_bench(settings: CpuBench) -> dict:
    import torch

    from geosurge_index.machine import describe_machine, machine_info
    from geosurge_index.model import VisualEncoder, full_config, tiny_config

    if settings.threads:
        torch.set_num_threads(settings.threads)
    say = lambda s: print(s, flush=True)  # noqa: E731
    info = machine_info(("torch", "onnxruntime", "onnx", "transformers", "numpy"))
    try:
        with open("/proc/loadavg") as f:
            info["loadavg_at_start"] = f.read().split()[:3]
    except OSError:
        pass
    figures: dict = {"machine": info, "settings": asdict(settings), "threads": torch.get_num_threads()}
    say(f"machine: {describe_machine(info)}; load average {info.get('loadavg_at_start')}")
    say(f"method: {torch.get_num_threads()} threads for torch and ONNX Runtime; median of "
        f"{settings.images} rounds after a warm-up, options interleaved; agreement on "
        f"{settings.agreement_images} synthetic photos with class maps")
    with tempfile.TemporaryDirectory(prefix="geosurge-bench-cpu-") as tmp:
        tmp = Path(tmp)
        sizes = [("tiny", tiny_config())] + ([] if settings.quick or not settings.full else [("full", full_config())])
        fastest = None
        for label, config in sizes:
            torch.manual_seed(0)
            config.segmenter.kind = "none"  # the encoder alone here; the segmenters have section 3
            encoder = VisualEncoder(config, weights=False).eval()
            say(f"[1] encoder, {label} architecture ({config.image_size} px, "
                f"{sum(p.numel() for p in encoder.parameters()) / 1e6:.1f} M parameters), class map given:")
            f = bench_encoder(encoder, say, settings, tmp / label)
            say(f"  ONNX Runtime execution provider: {f['provider']}")
            figures[f"encoder_{label}"] = f
            fastest = (label, f)
        if settings.demo_index:
            say(f"[2] trained demo index {settings.demo_index}:")
            figures["demo_index"] = bench_demo_index(settings, say, tmp)
        if settings.segmenters:
            label, f = fastest
            ok = {k: v for k, v in f["options"].items() if v["top1_agreement"] >= 0.99 and v["cosine_min"] >= 0.99}
            best = min(ok, key=lambda k: ok[k]["s_per_image_b1"])

            say(f"[3] segmenter settings (config-built weights; answers through the {label} {best} encoder):")
            encoder = _reload(best, tmp / label, label)
            segs = bench_segmenters(settings, encoder, say)
            figures["segmenters"] = segs
            good = {k: v for k, v in segs.items() if v["top1_agreement"] >= 0.99}
            seg_best = min(good, key=lambda k: good[k]["s_per_image"])
            whole = segs[seg_best]["s_per_image"] + f["options"][best]["s_per_image_b1"]
            ref = next(iter(segs))
            before = segs[ref]["s_per_image"] + f["options"]["torch-fp32"]["s_per_image_b1"]
            figures["whole_photo"] = {"segmenter": seg_best, "encoder": best, "s_per_image": whole,
                                      "torch_oneformer512_s_per_image": before,
                                      "ratio_to_measured_torch": before / whole,
                                      "ratio_to_10s": TODAY_S / whole}
            say(f"[4] whole photo, fastest setting with >= 99% agreement ({seg_best} + {best}, search "
                f"excluded: ~1 ms): {whole:.2f} s/img; torch + {ref} measured now: {before:.2f} s/img "
                f"({before / whole:.2f}x); vs the 10 s of the issue: {TODAY_S / whole:.2f}x")
    if settings.json:
        Path(settings.json).write_text(json.dumps(figures, indent=2, default=str) + "\n")
    return figures


def _reload(option: str, directory: Path, label: str):
    """The encoder option measured in [1] (for the segmenter answers)."""
    import torch

    from geosurge_index.model import VisualEncoder, full_config, tiny_config
    from geosurge_index.model.onnx_runtime import OnnxEncoder

    config = tiny_config() if label == "tiny" else full_config()
    config.segmenter.kind = "none"
    torch.manual_seed(0)
    if option == "torch-fp32":
        return VisualEncoder(config, weights=False).eval()
    kw = dict(image_size=config.image_size, embed_dim=config.embed_dim, grid=config.grid,
              num_classes=config.num_classes, fused=True)
    sub = "onnx-fp32-fused" if option in ("onnx-fp32-fused", "onnx-int8-per-tensor") else "onnx-fp32"
    name = "encoder.int8.onnx" if "int8" in option else "encoder.onnx"
    return OnnxEncoder(directory / sub / name, precision="int8" if "int8" in option else "fp32", **kw)
