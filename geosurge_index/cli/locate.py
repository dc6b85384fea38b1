"""`geosurge locate INDEX_DIR INPUT... --out PRED_DIR`; `geosurge bench locate`."""

from __future__ import annotations

import argparse
import json
import os
import sys

DESCRIPTION = """\
Geolocate images in bulk: every input becomes one row of PRED_DIR/part-*.parquet (the predicted
lat/lon, its probability, the best cell per level, the top-k cells), or one error row when the
image cannot be used (zero bytes, truncated, not an image, too many pixels, unreadable path).

INPUT, one or more of:
  a folder          every .jpg/.jpeg/.png/.webp under it, recursively (id = the file's path)
  a manifest        .csv/.tsv/.parquet with a path column (relative paths are relative to the
                    manifest) and an optional id column
  WebDataset shards uncompressed .tar files as img2dataset writes them (id = the sample key)
Precomputed class maps are used when present (<stem>.classmap.png beside an image, classmap.png
in a tar sample; `geosurge segment` writes them); otherwise the index's segmenter computes them.

Resume: inputs are numbered and cut into chunks; each chunk is written atomically as one shard.
Run the same command again after an interruption (even kill -9) and it continues where it
stopped, with no duplicates and no gaps. PRED_DIR/_run.json records the run; a rerun with other
inputs or settings is refused. PRED_DIR/_summary.json is written at the end.

Examples:
  geosurge locate index/ photos/ --out preds/
  geosurge locate index/ manifest.parquet --id-column key --out preds/ --save-embeddings
  geosurge locate index/ shards/{00000..00099}.tar --out preds/ --ray auto
  geosurge locate index/ im2gps3k/ --out preds-10crop/ --ten-crop   # the paper's test-time setting
  duckdb -c "SELECT count(*), count(error) FROM 'preds/*.parquet'"
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "locate",
        help="geolocate a folder, manifest or WebDataset shards of images into Parquet shards",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("index_dir", metavar="INDEX_DIR", help="index directory written by `geosurge export`")
    p.add_argument("inputs", metavar="INPUT", nargs="+", help="folders, manifests (.csv/.tsv/.parquet) or .tar shards")
    p.add_argument("--out", "-o", required=True, metavar="PRED_DIR", help="output folder (created; resumed if it holds this run)")
    add_run_arguments(p)
    p.set_defaults(func=run_locate)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The job's own flags, and the inference knobs generated from `BulkSettings` (one declaration
    for flags, GEOSURGE_* variables and help; flags > environment > defaults)."""
    from geosurge_index.settings import BulkSettings

    g = p.add_argument_group("inputs")
    g.add_argument("--path-column", default="path", help="manifest column holding image paths (default: %(default)s)")
    g.add_argument("--id-column", default=None,
                   help="manifest column holding ids (default: 'id' when the manifest has one, else the path)")
    BulkSettings.add_arguments(g, ["max_pixels", "draft_size"], switches=True)
    g = p.add_argument_group("search")
    BulkSettings.add_arguments(g, ["top_k", "beam"], switches=True)
    g.add_argument("--save-embeddings", action="store_true",
                   help="also store each image's visual embedding (768 floats) in an `embedding` column")
    BulkSettings.add_arguments(g, ["ten_crop"], switches=True)
    g = p.add_argument_group("execution")
    g.add_argument("--chunk-size", type=int, default=1024,
                   help="inputs per output shard, the unit of resume (default: %(default)s)")
    BulkSettings.add_arguments(g, ["batch_size", "workers", "device"], switches=True)
    g = p.add_argument_group("Ray (more than one machine)")
    g.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="run on Ray Data: 'auto' (the cluster this machine belongs to), HOST:PORT or "
                        "ray://HOST:PORT, or 'local' (start a private instance here). Inputs and "
                        "INDEX_DIR must be readable at the same paths on every node")
    g.add_argument("--ray-actors", type=int, default=None,
                   help="model actors (default: one per GPU in the cluster, else 1)")
    g.add_argument("--ray-gpus-per-actor", type=float, default=None, help="GPUs per model actor (default: 1 when there are GPUs)")
    g.add_argument("--ray-cpus", type=int, default=None, help="with --ray local: CPUs Ray may use (default: all)")


def job_from_args(args: argparse.Namespace):
    from geosurge_index.locate.job import LocateJob
    from geosurge_index.settings import BulkSettings
    from geosurge_index.sources import ManifestColumns

    return LocateJob.from_settings(
        args.index_dir, list(args.inputs), args.out, BulkSettings.from_args(args),
        columns=ManifestColumns(path=args.path_column, id=args.id_column),
        save_embeddings=args.save_embeddings,
        chunk_size=args.chunk_size,
    )


def run_locate(args: argparse.Namespace) -> int:
    from geosurge_index.locate.runner import run_job

    job = job_from_args(args)
    ray_opts = {"actors": args.ray_actors, "gpus_per_actor": args.ray_gpus_per_actor, "num_cpus": args.ray_cpus}
    summary = run_job(job, ray_address=args.ray, ray_options=ray_opts)
    print(format_summary(summary, args.out), file=sys.stderr)
    return 0 if summary["complete"] else 1


def format_summary(s: dict, out: str) -> str:
    run = s["this_run"]
    lines = [
        f"locate: {s['images']} images in {out} ({s['ok']} predicted, {s['errors']} errors, {s['shards']} shards)",
        f"  this run: {run['images']} images in {run['wall_s']:.1f} s"
        + (f" = {run['images_per_s']:.1f} images/s" if run["images_per_s"] else "")
        + (f"; {run['resumed_chunks']} chunks were already done" if run["resumed_chunks"] else "")
        + f" ({run['strategy']})",
    ]
    if s["errors_by_kind"]:
        lines.append("  errors by kind: " + ", ".join(f"{k} {v}" for k, v in s["errors_by_kind"].items()))
    if not s["complete"]:
        lines.append("  INCOMPLETE: run the same command again to finish")
    return "\n".join(lines)


# -- bench -------------------------------------------------------------------------------------

BENCH_DESCRIPTION = """\
Measure bulk locate throughput on synthetic JPEGs (generated, nothing downloaded):
  1. decode + resize only (the CPU's bound for any model), in 1 process and in --workers processes;
  2. end to end with a small config-built model and index (the whole `geosurge locate` pipeline:
     DataLoader workers, model, search, Parquet shards);
  3. the full-size architecture (CLIP ViT-L/14-336 + fusion, random weights) on a few images, with
     precomputed class maps (the segmenter skipped) and, with --with-segmenter, OneFormer Swin-L;
  4. on CUDA: images/s per GPU with the full-size model in bf16, its FLOPs per image (counted with
     torch.utils.flop_counter) and the fraction of the GPU's bf16 peak that reaches.
Prints the machine, the method and every figure; --json writes them too.
"""


def register_bench(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "locate",
        help="images/s of bulk locate vs. the decode-only bound; full-size model; GPU FLOP utilisation",
        description=BENCH_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", type=int, default=256, help="synthetic images for steps 1-2 (default: %(default)s)")
    p.add_argument("--size", default="1024x768", help="their size WxH (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: as `geosurge locate`)")
    p.add_argument("--batch-size", type=int, default=None, help="images per model call (default: 256 on CUDA, 32 on CPU)")
    p.add_argument("--full-images", type=int, default=2,
                   help="images through the full-size model on the CPU, 0 to skip (default: %(default)s)")
    p.add_argument("--with-segmenter", action="store_true",
                   help="also time the full-size model computing class maps with OneFormer Swin-L (slow on CPU)")
    p.add_argument("--gpu-images", type=int, default=2048, help="images for the GPU measurement (default: %(default)s)")
    p.add_argument("--gpu-batch-size", type=int, default=256, help="batch for the GPU measurement (default: %(default)s)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak in TFLOP/s (default: looked up from the GPU's name)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON here")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    figures = run_locate_bench(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by GPU name, most specific first.
BF16_PEAK_TFLOPS = [
    ("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4), ("GH200", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L40", 181.0),
    ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0),
    ("A6000", 154.8),
]


def synthetic_jpegs(folder, n: int, width: int, height: int, seed: int = 0) -> list:
    """`synthetic.synthetic_jpegs` written to `folder` as img000000.jpg, ..."""
    from pathlib import Path

    from geosurge_index.synthetic import synthetic_jpegs as jpeg_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(jpeg_bytes(n, (width, height), seed)):
        paths.append(folder / f"img{i:06d}.jpg")
        paths[-1].write_bytes(data)
    return paths


def random_index(out_dir, config=None, *, n_points: int = 4000, seed: int = 0, place_names: bool = False):
    """A real INDEX_DIR from a config-built model with random weights: random points clustered
    around a few centres -> partition -> checkpoint -> `geosurge export`. For benches and tests."""
    from pathlib import Path

    import numpy as np

    from geosurge_index import cells as cells_mod
    from geosurge_index.index import export_checkpoint
    from geosurge_index.model import GeoSurgeModel, save_checkpoint, tiny_config

    out_dir = Path(out_dir)
    work = out_dir.with_name(out_dir.name + ".build")
    rng = np.random.default_rng(seed)
    centres = rng.uniform([-50, -170], [60, 170], size=(12, 2))
    pick = rng.integers(0, len(centres), n_points)
    lat = np.clip(centres[pick, 0] + rng.normal(0, 2, n_points), -89, 89)
    lon = (centres[pick, 1] + rng.normal(0, 2, n_points) + 180) % 360 - 180
    settings = cells_mod.PartitionSettings(tau_min=5, tau_max=(800, 400, 200, 100, 50, 25, 12))
    part = cells_mod.partition(lat, lon, settings, source="random")
    cells_mod.write_cells_dir(work / "cells", part.cells, part.assignments)
    import torch

    torch.manual_seed(seed)
    config = config or tiny_config()
    model = GeoSurgeModel(config, [len(lc) for lc in part.cells.levels])
    save_checkpoint(work / "ckpt", model, epoch=0, cells_dir=work / "cells")
    export_checkpoint(work / "ckpt", out_dir, place_names=place_names)
    return out_dir


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
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        encoder_fn(*inputs)
    return int(counter.get_total_flops())


def run_locate_bench(args: argparse.Namespace) -> dict:
    import tempfile
    import time
    from pathlib import Path

    import numpy as np
    import torch

    from geosurge_index.locate.decode import DecodeSpec
    from geosurge_index.locate.job import LocateJob, default_workers
    from geosurge_index.locate.predictor import Predictor, resolve_device
    from geosurge_index.locate.runner import run_job
    from geosurge_index.model import VisualEncoder, full_config, tiny_config

    w, h = (int(v) for v in args.size.lower().split("x"))
    device = resolve_device(args.device)
    workers = default_workers(device.type == "cuda") if args.workers is None else args.workers
    cores = os.cpu_count() or 1
    from geosurge_index.machine import describe_machine, machine_info

    info = machine_info()
    figures: dict = {"machine": info, "images": args.images, "size": [w, h], "workers": workers}
    say = lambda s: print(s, flush=True)  # noqa: E731
    say(f"machine: {describe_machine(info)}")
    say(f"method: {args.images} synthetic {w}x{h} JPEGs (q90); decode with DCT draft to the model's "
        f"input size, bicubic resize + centre crop; wall-clock rates after worker start-up")
    with tempfile.TemporaryDirectory(prefix="geosurge-bench-") as tmp:
        tmp = Path(tmp)
        paths = synthetic_jpegs(tmp / "imgs", args.images, w, h)
        small = tiny_config()
        for size, label in ((small.image_size, "small model"), (336, "full-size model")):
            spec = DecodeSpec(size, size)
            r1 = decode_rate(paths, spec, 1)
            rn = decode_rate(paths, spec, cores) if cores > 1 else r1
            figures[f"decode_{size}px"] = {"1_process": r1, "all_cores": rn}
            say(f"decode-only bound at {size} px ({label}): {r1:.1f} images/s in 1 process, "
                f"{rn:.1f} in {cores} (all cores)")
        full_decode = DecodeSpec(336, 0)
        r_full = decode_rate(paths[: max(8, args.images // 8)], full_decode, 1)
        figures["decode_336px_no_draft_1_process"] = r_full
        say(f"  (without draft mode, 1 process: {r_full:.1f} images/s)")

        # End to end with the small model: the real `geosurge locate` pipeline.
        index_dir = random_index(tmp / "index", small)
        t = time.perf_counter()
        summary = run_job(LocateJob(index_dir=str(index_dir), inputs=[str(tmp / "imgs")], out_dir=str(tmp / "out"),
                                    workers=workers, batch_size=args.batch_size, device=str(device)))
        e2e = summary["this_run"]["images_per_s"]
        figures["end_to_end_small_model"] = {"images_per_s": e2e, "wall_s": time.perf_counter() - t,
                                              "device": str(device), "image_size": small.image_size}
        say(f"end to end, small model ({small.image_size} px, {device}, {workers} decoding processes): "
            f"{e2e:.1f} images/s (decode-only bound: {figures[f'decode_{small.image_size}px']['all_cores']:.1f})")

        if args.full_images > 0 or device.type == "cuda":
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
                "with a precomputed class map (torch.utils.flop_counter)")
            if args.with_segmenter:
                flops_seg = count_flops(cpu_pred.encode, one_px, one_map, np.array([False]))
                figures["full_flops_per_image_with_segmenter"] = flops_seg
                say(f"  with the OneFormer Swin-L segmenter: {flops_seg / 1e9:.1f} GFLOP per image")
            if args.full_images > 0 and device.type == "cpu":
                n = args.full_images
                px = torch.from_numpy(rng.integers(0, 256, (n, 336, 336, 3), dtype=np.uint8))
                maps = torch.from_numpy(rng.integers(0, 150, (n, 336, 336), dtype=np.uint8))
                for with_map in (True, False) if args.with_segmenter else (True,):
                    t = time.perf_counter()
                    cpu_pred.encode(px, maps, np.full(n, with_map))
                    dt = (time.perf_counter() - t) / n
                    key = "full_cpu_s_per_image" + ("" if with_map else "_with_segmenter")
                    figures[key] = dt
                    say(f"full-size model on this CPU, fp32, {torch.get_num_threads()} threads, "
                        f"{'class maps given' if with_map else 'segmenter run'}: {dt:.2f} s/image "
                        f"({1 / dt:.3f} images/s; {flops_map / dt / 1e9:.1f} GFLOP/s)")
            if device.type == "cuda":
                figures["gpu"] = _bench_gpu(full, device, args, flops_map, figures, say)
    return figures


def _bench_gpu(encoder, device, args, flops_per_image: int, figures: dict, say) -> dict:
    import time

    import numpy as np
    import torch

    from geosurge_index.locate.predictor import Predictor

    name = torch.cuda.get_device_name(device)
    peak = args.peak_tflops or next((v for k, v in BF16_PEAK_TFLOPS if k.lower() in name.lower()), None)
    pred = Predictor(encoder.to(device), None, device)
    b = args.gpu_batch_size
    rng = np.random.default_rng(0)
    px = torch.from_numpy(rng.integers(0, 256, (b, 336, 336, 3), dtype=np.uint8)).pin_memory()
    maps = torch.from_numpy(rng.integers(0, 150, (b, 336, 336), dtype=np.uint8)).pin_memory()
    out = {"name": name, "bf16_peak_tflops": peak, "batch_size": b}
    for with_map in (True, False):
        has = np.full(b, with_map)
        for _ in range(2):  # warm-up: kernels, autotuning, allocator
            pred.encode(px, maps, has)
        torch.cuda.synchronize(device)
        n_batches = max(1, args.gpu_images // b)
        t = time.perf_counter()
        for _ in range(n_batches):
            pred.encode(px, maps, has)  # host->device copy of uint8 pixels included
        torch.cuda.synchronize(device)
        rate = n_batches * b / (time.perf_counter() - t)
        key = "class_map_given" if with_map else "with_segmenter"
        flops = flops_per_image if with_map else count_flops(pred.encode, px[:1], maps[:1], np.array([False]))
        frac = flops * rate / (peak * 1e12) if peak else None
        out[key] = {"images_per_s": rate, "flops_per_image": flops, "fraction_of_bf16_peak": frac}
        say(f"GPU {name}, bf16 autocast, batch {b}, {key.replace('_', ' ')}: {rate:.1f} images/s; "
            f"{flops / 1e9:.1f} GFLOP/image -> {flops * rate / 1e12:.1f} TFLOP/s"
            + (f" = {100 * frac:.1f}% of the {peak:.0f} TFLOP/s bf16 peak" if frac else ""))
    return out
