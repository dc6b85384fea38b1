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
at batch 1 after one warm-up call, one round at batch 8 after one warm-up call at batch 8; the
options are timed in turn, round after round, so that load from other processes spreads over
all of them):

  1. the encoder (CLIP + fusion, class map given) on the full-size architecture (CLIP
     ViT-L/14-336, config-built weights, seed 0; --quick: the tiny config): torch fp32, ONNX
     Runtime fp32, and int8: dynamic of every MatMul/Gemm/Conv (the plain recipe), dynamic of
     CLIP's weight MatMuls, static (calibrated) of those (the shipped recipe), at batch 1 and 8;
     agreement with torch fp32 on synthetic photos: max abs difference and cosine of the
     embeddings, and top-1 agreement of the nearest of 10,000 random unit cells;
  2. with --demo-index: the trained demo index (export-onnx into a copy, int8 calibrated on
     --demo-calibration photos, by default the demo's world/train), its test photos (never
     calibrated on) through `Locator` with each runtime: top-1 finest-cell agreement with torch
     fp32; also dynamic int8 (no photos), and what `--runtime auto` picks;
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
    demo_calibration: str | None = None  # default: world/train beside the demo index
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


def _encoder_options(encoder, tmp: Path, say) -> tuple[dict, dict]:
    """Export the fp32 graph and the int8 recipes measured: dynamic int8 of every MatMul/Gemm/Conv
    (the plain recipe), dynamic int8 of CLIP's weight MatMuls, and static int8 of those,
    calibrated on synthetic photos (seed 3, not those the agreement is measured on)."""
    import torch

    from geosurge_index.geometry import clip_normalise
    from geosurge_index.model.onnx_export import OnnxExportSettings, export_encoder_onnx, graph_feed
    from geosurge_index.model.onnx_quantize import quantize_int8
    from geosurge_index.model.onnx_runtime import OnnxEncoder

    kw = dict(image_size=encoder.image_size, embed_dim=encoder.embed_dim, grid=encoder.grid,
              num_classes=encoder.config.num_classes, fused=encoder.fusion is not None)
    tmp.mkdir(parents=True, exist_ok=True)
    say("  exporting fp32 ...")
    r = export_encoder_onnx(encoder, tmp, OnnxExportSettings(int8=False, segmenter=False))
    seconds = dict(r.seconds)
    src = tmp / r.files["encoder_fp32"]
    px, maps = _photos(16, encoder.image_size, seed=3)
    cal = graph_feed(clip_normalise(torch.as_tensor(px)), torch.as_tensor(maps) if kw["fused"] else None,
                     encoder.grid, encoder.config.num_classes)
    out = {"onnx-fp32": OnnxEncoder(src, **kw)}
    for name, method, nodes in (("onnx-int8-dynamic-all", "dynamic", "all"),
                                ("onnx-int8-dynamic", "dynamic", None),
                                ("onnx-int8-static", "static", None)):
        say(f"  quantising {name} ...")
        t = time.perf_counter()
        quantize_int8(src, tmp / f"{name}.onnx", method, calibration=cal, nodes=_all_nodes(src) if nodes else None)
        seconds[name] = time.perf_counter() - t
        out[name] = OnnxEncoder(tmp / f"{name}.onnx", precision="int8", **kw)
    return out, seconds


def _all_nodes(path: Path) -> list[str]:
    """Every MatMul, Gemm and Conv node: the plain dynamic recipe (before the backbone-only one)."""
    import onnx

    return [n.name for n in onnx.load(str(path), load_external_data=False).graph.node
            if n.op_type in ("MatMul", "Gemm", "Conv")]


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
        # batch 8: one round (8 images an option) after a warm-up call at batch 8 (ORT grows its arena)
        t = _timed_rounds({k: (lambda enc=enc, call=call: call(enc)) for k, enc in options.items()},
                          settings.images if b == 1 else 1)
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
    from geosurge_index.model.onnx_export import OnnxExportSettings, embedding_agreement, export_index_onnx
    from geosurge_index.settings import InferenceSettings
    from geosurge_index.sources import image_files

    world = Path(settings.demo_index).parent / "world"
    calibration = settings.demo_calibration or str(world / "train")
    figures: dict = {"calibration": calibration}
    dirs = {}
    for method in ("static", "dynamic"):
        d = dirs[method] = tmp / f"demo-index-{method}"
        shutil.copytree(settings.demo_index, d)
        r = export_index_onnx(d, OnnxExportSettings(int8_method=method, segmenter=False,
                                                    calibration=calibration if method == "static" else None))
        figures[f"export_check_{method}"] = r.checks.get("encoder_int8")
    paths = [p for p in image_files([settings.demo_images or str(world / "test")])
             if not str(p).endswith(".classmap.png")]
    out, embs, secs = {}, {}, {}
    runs = (("torch", "static", "torch"), ("onnx-fp32", "static", "onnx-fp32"),
            ("onnx-int8-static", "static", "onnx-int8"), ("onnx-int8-dynamic", "dynamic", "onnx-int8"),
            ("auto", "static", "auto"))
    for label, method, runtime in runs:
        loc = Locator.open(dirs[method], settings=InferenceSettings(device="cpu", runtime=runtime))
        if label == "auto":
            figures["auto_picks"] = loc.predictor.encoder.runtime
            say(f"  --runtime auto picks {figures['auto_picks']} on this index (int8 export check: "
                f"top-1 {figures['export_check_static'].get('top1_agreement', float('nan')):.1%} of "
                f"{figures['export_check_static'].get('top1_photos', 0)} held-out calibration-folder photos)")
            continue
        t = time.perf_counter()
        preds = []
        for i in range(0, len(paths), 32):
            preds += loc.locate(paths[i:i + 32], return_embeddings=True, cell_probabilities=False)
        secs[label] = (time.perf_counter() - t) / len(paths)
        ok = [p for p in preds if p.ok]
        out[label] = np.array([p.cells[-1].cell_index for p in ok])
        embs[label] = np.array([p.embedding for p in ok], np.float32)
    figures["images"] = len(paths)
    for label in out:
        a = embedding_agreement(embs[label], embs["torch"])
        same = out[label] == out["torch"]
        a.update(top1_agreement=float(np.mean(same)), top1_differ=int((~same).sum()), s_per_image_whole=secs[label])
        figures[label] = a
        say(f"  {label:<18} top-1 finest cell agrees with torch on {a['top1_agreement']:.1%} of {len(same)} "
            f"test photos ({a['top1_differ']} differ); cosine min {a['cosine_min']:.6f}; "
            f"{secs[label] * 1000:.1f} ms/photo (decode + class map read + encoder + search)")
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
            demo = figures.get("demo_index")
            if demo:  # the trained index's top-1 agreement decides where it was measured
                ok = {k: v for k, v in ok.items()
                      if k == "torch-fp32" or (demo.get(k) or {}).get("top1_agreement", 0.0) >= 0.99}
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
                f"({before / whole:.2f}x)" + ("" if label == "tiny" else
                                               f"; vs the 10 s of the issue: {TODAY_S / whole:.2f}x"))
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
    name = "encoder.onnx" if option == "onnx-fp32" else f"{option}.onnx"
    return OnnxEncoder(directory / name, precision="int8" if "int8" in option else "fp32", **kw)
