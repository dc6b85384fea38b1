"""`geosurge bench locate`: bulk locate throughput against the decode-only bound, the full-size
model on the CPU, and on CUDA images/s per GPU and the fraction of the bf16 peak."""

from __future__ import annotations

import os
from dataclasses import dataclass

DESCRIPTION = """\
Measure bulk locate throughput on synthetic JPEGs (generated, nothing downloaded):
  1. decode + resize only (the CPU's bound for any model), in 1 process and in --workers processes;
  2. end to end with a small config-built model and index (the whole `geosurge locate` pipeline:
     DataLoader workers, model, search, Parquet shards);
  3. the full-size architecture (CLIP ViT-L/14-336 + fusion, random weights) on a few images, with
     precomputed class maps (the segmenter skipped) and, with --with-segmenter, OneFormer Swin-L;
  4. on CUDA: images/s per GPU with the full-size model under autocast (bf16 where the GPU has it,
     else fp16), with class maps given and, with --with-segmenter, computed; FLOPs per image
     counted once on the CPU for both (torch.utils.flop_counter, with the math attention backend
     so that scaled_dot_product_attention is counted) and the fraction of the GPU's bf16 peak.
Prints the machine, the method and every figure; --json writes them too.
"""



@dataclass(frozen=True)
class LocateBench:
    images: int = 256  # synthetic images for steps 1-2
    width: int = 1024
    height: int = 768
    workers: int | None = None  # decoding processes (None: as `geosurge locate`)
    batch_size: int | None = None
    full_images: int = 2  # images through the full-size model on the CPU, 0 to skip
    with_segmenter: bool = False
    gpu_images: int = 2048
    gpu_batch_size: int = 256
    peak_tflops: float | None = None  # None: looked up from the GPU's name
    device: str = "auto"


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by GPU name, most specific first.
BF16_PEAK_TFLOPS = [
    ("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4), ("GH200", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L40", 181.0),
    ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0),
    ("A6000", 154.8),
]


def _decode_slice(args):
    from geosurge_index.locate.decode import decode_input_row

    paths, spec = args
    for p in paths:
        decode_input_row(str(p), -1, -1, -1, -1, spec)
    return len(paths)


def decode_rate(paths, spec, workers: int) -> float:
    """Images/s of read + decode + resize/crop alone (the reader stage), in `workers` processes."""
    import multiprocessing as mp
    import time

    import numpy as np

    if workers <= 1:
        t = time.perf_counter()
        _decode_slice((paths, spec))
        return len(paths) / (time.perf_counter() - t)
    parts = [list(p) for p in np.array_split(np.array(paths, dtype=object), workers * 4)]
    with mp.get_context("fork").Pool(workers) as pool:
        pool.map(_decode_slice, [(parts[0][:1], spec)] * workers)  # start the workers first
        t = time.perf_counter()
        pool.map(_decode_slice, [(p, spec) for p in parts])
        return len(paths) / (time.perf_counter() - t)


def count_flops(encoder_fn, *inputs) -> int:
    """FLOPs of `encoder_fn(*inputs)`. torch's flop counter sees no FLOPs in the fused
    scaled_dot_product_attention kernels (CPU flash attention, ~33 of 380 GFLOP per image of the
    full model): the math backend computes the same attention from counted matmuls."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        encoder_fn(*inputs)
    return int(counter.get_total_flops())


def run_locate_bench(settings: LocateBench) -> dict:
    """Run the benchmark, printing the machine, the method and the figures; returns the figures."""
    import tempfile
    import time
    from pathlib import Path

    import numpy as np
    import torch

    from geosurge_index.devices import resolve_device
    from geosurge_index.locate.decode import DecodeSpec
    from geosurge_index.locate.job import LocateJob, default_workers
    from geosurge_index.locate.predictor import Predictor
    from geosurge_index.locate.runner import run_job
    from geosurge_index.model import VisualEncoder, full_config, tiny_config
    from geosurge_index.synthetic import random_index, write_synthetic_jpegs

    w, h = settings.width, settings.height
    device = resolve_device(settings.device)
    workers = default_workers(device.type == "cuda") if settings.workers is None else settings.workers
    cores = os.cpu_count() or 1
    from geosurge_index.machine import describe_machine, machine_info

    info = machine_info()
    figures: dict = {"machine": info, "images": settings.images, "size": [w, h], "workers": workers}
    say = lambda s: print(s, flush=True)  # noqa: E731
    say(f"machine: {describe_machine(info)}")
    say(f"method: {settings.images} synthetic {w}x{h} JPEGs (q90); decode with DCT draft to the model's "
        f"input size, bicubic resize + centre crop; wall-clock rates after worker start-up")
    with tempfile.TemporaryDirectory(prefix="geosurge-bench-") as tmp:
        tmp = Path(tmp)
        paths = write_synthetic_jpegs(tmp / "imgs", settings.images, w, h)
        small = tiny_config()
        for size, label in ((small.image_size, "small model"), (336, "full-size model")):
            spec = DecodeSpec(size, size)
            r1 = decode_rate(paths, spec, 1)
            rn = decode_rate(paths, spec, cores) if cores > 1 else r1
            figures[f"decode_{size}px"] = {"1_process": r1, "all_cores": rn}
            say(f"decode-only bound at {size} px ({label}): {r1:.1f} images/s in 1 process, "
                f"{rn:.1f} in {cores} (all cores)")
        full_decode = DecodeSpec(336, 0)
        r_full = decode_rate(paths[: max(8, settings.images // 8)], full_decode, 1)
        figures["decode_336px_no_draft_1_process"] = r_full
        say(f"  (without draft mode, 1 process: {r_full:.1f} images/s)")

        # End to end with the small model: the real `geosurge locate` pipeline.
        index_dir = random_index(tmp / "index", small)
        t = time.perf_counter()
        summary = run_job(LocateJob(index_dir=str(index_dir), inputs=[str(tmp / "imgs")], out_dir=str(tmp / "out"),
                                    workers=workers, batch_size=settings.batch_size, device=str(device)))
        e2e = summary["this_run"]["images_per_s"]
        figures["end_to_end_small_model"] = {"images_per_s": e2e, "wall_s": time.perf_counter() - t,
                                              "device": str(device), "image_size": small.image_size}
        say(f"end to end, small model ({small.image_size} px, {device}, {workers} decoding processes): "
            f"{e2e:.1f} images/s (decode-only bound: {figures[f'decode_{small.image_size}px']['all_cores']:.1f})")

        if settings.full_images > 0 or device.type == "cuda":
            torch.manual_seed(0)
            say("building the full-size architecture (random weights) ...")
            full = VisualEncoder(full_config(), weights=False).eval()
            n_params = sum(p.numel() for p in full.parameters())
            figures["full_model_parameters"] = n_params
            cpu_pred = Predictor(full, None, torch.device("cpu"))
            rng = np.random.default_rng(0)
            one_px = torch.from_numpy(rng.integers(0, 256, (1, 336, 336, 3), dtype=np.uint8))
            one_map = torch.from_numpy(rng.integers(0, 150, (1, 336, 336), dtype=np.uint8))
            flops_map = count_flops(cpu_pred.encode, one_px, one_map, np.array([True]))
            figures["full_flops_per_image_given_class_map"] = flops_map
            say(f"full-size model: {n_params / 1e6:.1f} M parameters; {flops_map / 1e9:.1f} GFLOP per image "
                "with a precomputed class map (torch.utils.flop_counter, math attention, on the CPU)")
            if settings.with_segmenter:
                flops_seg = count_flops(cpu_pred.encode, one_px, one_map, np.array([False]))
                figures["full_flops_per_image_with_segmenter"] = flops_seg
                say(f"  with the OneFormer Swin-L segmenter: {flops_seg / 1e9:.1f} GFLOP per image")
            if settings.full_images > 0 and device.type == "cpu":
                n = settings.full_images
                px = torch.from_numpy(rng.integers(0, 256, (n, 336, 336, 3), dtype=np.uint8))
                maps = torch.from_numpy(rng.integers(0, 150, (n, 336, 336), dtype=np.uint8))
                for with_map in (True, False) if settings.with_segmenter else (True,):
                    t = time.perf_counter()
                    cpu_pred.encode(px, maps, np.full(n, with_map))
                    dt = (time.perf_counter() - t) / n
                    key = "full_cpu_s_per_image" + ("" if with_map else "_with_segmenter")
                    figures[key] = dt
                    say(f"full-size model on this CPU, fp32, {torch.get_num_threads()} threads, "
                        f"{'class maps given' if with_map else 'segmenter run'}: {dt:.2f} s/image "
                        f"({1 / dt:.3f} images/s; {flops_map / dt / 1e9:.1f} GFLOP/s)")
            if device.type == "cuda":
                flops = {True: flops_map, False: figures.get("full_flops_per_image_with_segmenter")}
                figures["gpu"] = _bench_gpu(full, device, settings, flops, say)
    return figures


def _bench_gpu(encoder, device, settings: LocateBench, flops_per_image: dict, say) -> dict:
    """Images/s on `device` with class maps given and, with `settings.with_segmenter`, computed;
    `flops_per_image`: {class map given: FLOPs} as counted on the CPU (the same way for both)."""
    import time

    import numpy as np
    import torch

    from geosurge_index.devices import dtype_name, on_device, synchronize
    from geosurge_index.locate.predictor import Predictor

    name = torch.cuda.get_device_name(device)
    peak = settings.peak_tflops or peak_bf16_tflops(name)
    pred = Predictor(encoder.to(device), None, device)
    b, s = settings.gpu_batch_size, pred.image_size
    rng = np.random.default_rng(0)
    with on_device(device):  # pinned on the GPU measured, not in a new context on GPU 0
        px = torch.from_numpy(rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8)).pin_memory()
        maps = torch.from_numpy(rng.integers(0, 150, (b, s, s), dtype=np.uint8)).pin_memory()
    amp = dtype_name(pred.amp_dtype)
    out = {"name": name, "bf16_peak_tflops": peak, "batch_size": b, "autocast": amp}
    for with_map in (True, False) if settings.with_segmenter else (True,):
        has = np.full(b, with_map)
        for _ in range(2):  # warm-up: kernels, autotuning, allocator
            pred.encode(px, maps, has)
        synchronize(device)
        n_batches = max(1, settings.gpu_images // b)
        t = time.perf_counter()
        for _ in range(n_batches):
            pred.encode(px, maps, has)  # host->device copy of uint8 pixels included
        synchronize(device)
        rate = n_batches * b / (time.perf_counter() - t)
        key = "class_map_given" if with_map else "with_segmenter"
        flops = flops_per_image.get(with_map)
        frac = flops * rate / (peak * 1e12) if peak and flops else None
        out[key] = {"images_per_s": rate, "flops_per_image": flops, "fraction_of_bf16_peak": frac}
        say(f"GPU {name}, {amp} autocast, batch {b}, {key.replace('_', ' ')}: {rate:.1f} images/s"
            + (f"; {flops / 1e9:.1f} GFLOP/image -> {flops * rate / 1e12:.1f} TFLOP/s" if flops else "")
            + (f" = {100 * frac:.1f}% of the {peak:.0f} TFLOP/s bf16 peak" if frac else ""))
    return out


def peak_bf16_tflops(gpu_name: str) -> float | None:
    """The dense bf16 peak of a GPU from its name (`BF16_PEAK_TFLOPS`), None when unknown."""
    return next((v for k, v in BF16_PEAK_TFLOPS if k.lower() in gpu_name.lower()), None)
