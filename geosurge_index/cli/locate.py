"""`geosurge locate INDEX_DIR INPUT... --out PRED_DIR`; `geosurge bench locate`."""

from __future__ import annotations

import argparse
import json
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
Each row also carries the photo's own EXIF GPS (exif_lat, exif_lon, exif_gps_present,
exif_gps_valid, exif_gps_note: malformed GPS is treated as untagged, with a note); --skip-tagged
leaves photos with valid GPS out of the model (their row has the error kind skipped_tagged).
--cap-km / --cap-level: the precision cap: nothing finer than the cap is written.

Resume: inputs are numbered and cut into chunks; each chunk is written atomically as one shard.
Run the same command again after an interruption (even kill -9) and it continues where it
stopped, with no duplicates and no gaps. PRED_DIR/_run.json records the run; a rerun with other
inputs or settings is refused. PRED_DIR/_summary.json is written at the end.

Examples:
  geosurge locate index/ photos/ --out preds/
  geosurge locate index/ manifest.parquet --id-column key --out preds/ --save-embeddings
  geosurge locate index/ shards/{00000..00099}.tar --out preds/ --ray auto
  geosurge locate index/ im2gps3k/ --out preds-paper/ --protocol paper   # the paper's test protocol (ten-crop)
  geosurge locate index/ ~/Pictures --out preds/ --cap-km 25 --skip-tagged   # a photo archive, city precision
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
    BulkSettings.add_arguments(g, ["max_pixels", "max_image_bytes", "draft_size"], switches=True)
    g = p.add_argument_group("search")
    BulkSettings.add_arguments(g, ["top_k", "beam"], switches=True)
    g.add_argument("--save-embeddings", action="store_true",
                   help="also store each image's visual embedding (768 floats) in an `embedding` column")
    BulkSettings.add_arguments(g, ["ten_crop", "protocol"], switches=True)
    g = p.add_argument_group("photo archives (README: For photo archives)")
    BulkSettings.add_arguments(g, ["cap_km", "cap_level", "skip_tagged"], switches=True)
    BulkSettings.add_arguments(g, ["galleries", "refine_cells"], switches=True)  # `geosurge gallery`
    g = p.add_argument_group("execution")
    g.add_argument("--chunk-size", type=int, default=1024,
                   help="inputs per output shard, the unit of resume (default: %(default)s)")
    BulkSettings.add_arguments(g, ["batch_size", "workers", "device", "runtime", "max_error_rate"],
                               switches=True)
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
    from geosurge_index.locate.job import too_many_errors
    from geosurge_index.locate.runner import run_job

    job = job_from_args(args)
    _warn_untrained_segmenter(job.index_dir)
    ray_opts = {"actors": args.ray_actors, "gpus_per_actor": args.ray_gpus_per_actor, "num_cpus": args.ray_cpus}
    try:
        summary = run_job(job, ray_address=args.ray, ray_options=ray_opts)
    except KeyboardInterrupt:
        print(f"geosurge locate: interrupted; the finished shards in {args.out} are kept: rerun the same "
              "command to resume", file=sys.stderr)
        return 130
    print(format_summary(summary, args.out), file=sys.stderr)
    if not summary["complete"]:
        return 1
    failed = too_many_errors(summary)
    if failed:
        print(f"geosurge locate: error: {failed}; see the `error` column and the errors by kind above",
              file=sys.stderr)
        return 1
    return 0


def _warn_untrained_segmenter(index_dir) -> None:
    """Say once, before the run, that images without class maps go through a random segmenter."""
    from geosurge_index.errors import FormatError
    from geosurge_index.locate.locator import segmenter_warning

    try:
        note = segmenter_warning(index_dir)
    except (FormatError, OSError):
        return  # the run's own index check names what is wrong
    if note:
        print(f"geosurge locate: warning: {note}", file=sys.stderr)


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
    if s.get("skipped_inputs"):
        lines.append("  input scans (files not taken; damaged shards): "
                     + ", ".join(f"{k} {v}" for k, v in s["skipped_inputs"].items()))
    if not s["complete"]:
        lines.append("  INCOMPLETE: run the same command again to finish")
    return "\n".join(lines)


# -- bench (geosurge_index.bench.locate) ---------------------------------------------------------


def register_bench(bench_subparsers) -> None:
    from geosurge_index.bench.locate import DESCRIPTION

    p = bench_subparsers.add_parser(
        "locate",
        help="images/s of bulk locate vs. the decode-only bound; full-size model; GPU FLOP utilisation",
        description=DESCRIPTION,
        epilog="Example:\n  geosurge bench locate --images 64 --full-images 0 --json locate.json",
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
    register_gpu_check(bench_subparsers)
    register_faults(bench_subparsers)


def register_faults(bench_subparsers) -> None:
    from geosurge_index.bench.faults import DESCRIPTION

    p = bench_subparsers.add_parser(
        "faults",
        help="bulk locate against hostile inputs and faults: rows lost or doubled, hangs, peak RSS per case",
        description=DESCRIPTION,
        epilog="Example:\n  geosurge bench faults --json faults.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", type=int, default=8, help="good images per case (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds after which a case counts as a hang (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="decoding processes (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON here")
    p.set_defaults(func=run_faults_cli)


def run_faults_cli(args: argparse.Namespace) -> int:
    from geosurge_index.bench.faults import FaultsBench, run_faults_bench
    from geosurge_index.cli import settings_from_args

    results = run_faults_bench(settings_from_args(FaultsBench, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    bad = [r for r in results if r["hang"] or r.get("lost") or r.get("doubled")]
    return 1 if bad else 0


def register_gpu_check(bench_subparsers) -> None:
    from geosurge_index.bench.gpu import DESCRIPTION

    p = bench_subparsers.add_parser(
        "gpu",
        help="run every GPU path once on small sizes and say what passed (`make gpu-check`)",
        description=DESCRIPTION,
        epilog="Example:\n  geosurge bench gpu --device cuda:0 --json gpu.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--images", type=int, default=48, help="images per bulk locate run (default: %(default)s)")
    p.add_argument("--full", action=argparse.BooleanOptionalAction, default=None,
                   help="the full-size model step (default: on CUDA only)")
    p.add_argument("--full-batch", type=int, default=32, help="its batch on CUDA (default: %(default)s)")
    p.add_argument("--segmenter", choices=("oneformer", "segformer"), default="oneformer",
                   help="the small locate model's segmenter (default: %(default)s)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak in TFLOP/s (default: looked up from the GPU's name)")
    p.add_argument("--time-budget", dest="time_budget_s", type=float, default=540.0,
                   help="seconds after which steps not yet started are skipped (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON here")
    p.set_defaults(func=run_gpu_check_cli)


def run_gpu_check_cli(args: argparse.Namespace) -> int:
    from geosurge_index.bench.gpu import GpuCheck, run_gpu_check
    from geosurge_index.cli import settings_from_args

    print("geosurge bench gpu", flush=True)
    result = run_gpu_check(settings_from_args(GpuCheck, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0 if result["ok"] else 1


def run_bench(args: argparse.Namespace) -> int:
    from geosurge_index.bench.locate import LocateBench, run_locate_bench
    from geosurge_index.cli import settings_from_args
    from geosurge_index.errors import UserError

    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {args.size!r}: expected WxH, e.g. 1024x768") from None
    figures = run_locate_bench(settings_from_args(LocateBench, argparse.Namespace(**vars(args), width=width,
                                                                                    height=height)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


def __getattr__(name: str):
    # `random_index` lived here; tests and benchmarks now take it from `geosurge_index.synthetic`.
    if name == "random_index":
        import warnings

        from geosurge_index.synthetic import random_index

        warnings.warn("geosurge_index.cli.locate.random_index moved to geosurge_index.synthetic.random_index",
                      DeprecationWarning, stacklevel=2)
        return random_index
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
