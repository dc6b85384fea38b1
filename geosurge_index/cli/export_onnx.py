"""`geosurge export-onnx INDEX_DIR`: the index's encoder as ONNX graphs for CPU inference, and
`geosurge bench cpu`. Registered by `cli.export` (beside `geosurge export`, whose `--onnx` runs
the same step)."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Convert the visual encoder of INDEX_DIR to ONNX for ONNX Runtime on CPU-only hosts, written into
INDEX_DIR beside encoder.safetensors:

  encoder.onnx        fp32 (ONNX Runtime optimises the graph when it loads it)
  encoder.int8.onnx   CLIP's weight MatMuls in int8, per output channel (--no-int8: skip):
                      static int8 calibrated on --calibration-images, else dynamic int8
  segmenter.onnx      the segmenter, fp32, where it exports (--no-segmenter: skip)

Each file is run once against torch on seeded random inputs: an fp32 graph further than 1e-4
(max abs) from torch is refused. With --calibration-images (photos like those to be located,
e.g. the training photos; class maps beside them are used, else the segmenter's), a random
--calibration-count of them calibrate static int8 and up to --agreement-count others measure its
top-1 finest-cell agreement with torch fp32 through this index; `--runtime auto` runs int8 only
when that agreement is >= 99% (else fp32 ONNX). The files are listed with their sha256 in manifest.json
(section `onnx`); `geosurge locate`, `geosurge serve` and `Locator.open` then run the fastest
one on the CPU (setting `runtime`, see docs/cpu-inference.md). Needs `onnxruntime` and `onnx`:
pip install 'geosurge-index[onnx]'.
"""


def add_export_arguments(p, *, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}no-int8", dest="onnx_int8", action="store_false",
                   help="do not write the int8 encoder (default: write it)")
    p.add_argument(f"--{prefix}calibration-images", dest="onnx_calibration", default=None, metavar="INPUT",
                   help="photos (folder or manifest) to calibrate static int8 on and to measure its "
                        "agreement with; without them int8 is dynamic and `--runtime auto` keeps to fp32")
    p.add_argument(f"--{prefix}calibration-count", dest="onnx_calibration_count", type=int, default=64,
                   help="photos calibrating static int8 (default: %(default)s)")
    p.add_argument(f"--{prefix}agreement-count", dest="onnx_agreement_count", type=int, default=200,
                   help="further photos measuring int8's top-1 agreement (default: %(default)s)")
    p.add_argument(f"--{prefix}int8-method", dest="onnx_int8_method", default="auto",
                   choices=("auto", "static", "dynamic"),
                   help="auto (default): static with --calibration-images, else dynamic")
    p.add_argument(f"--{prefix}per-tensor", dest="onnx_per_channel", action="store_false",
                   help="int8 scales per weight tensor instead of per output channel")
    p.add_argument(f"--{prefix}optimize", dest="onnx_optimize", action="store_true",
                   help="apply ONNX Runtime's offline transformer optimizer to the fp32 graph "
                        "(LayerNorm/QuickGelu fusions; measured no faster here, so off by default)")
    p.add_argument(f"--{prefix}no-segmenter", dest="onnx_segmenter", action="store_false",
                   help="do not export the segmenter (class maps not given are then computed in torch)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export-onnx", help="add ONNX Runtime encoders (fp32, int8) to an INDEX_DIR for fast CPU inference",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  geosurge export-onnx demo-out/index --calibration-images demo-out/world/train\n  geosurge locate demo-out/index photos/ --out preds/ --runtime onnx-fp32")
    p.add_argument("index_dir", metavar="INDEX_DIR", help="index folder written by `geosurge export`")
    add_export_arguments(p)
    p.set_defaults(func=run)


def settings_of(args):
    from geosurge_index.model.onnx_export import OnnxExportSettings

    return OnnxExportSettings(int8=args.onnx_int8, per_channel=args.onnx_per_channel,
                              optimize=args.onnx_optimize, segmenter=args.onnx_segmenter,
                              int8_method=args.onnx_int8_method, calibration=args.onnx_calibration,
                              calibration_count=args.onnx_calibration_count,
                              agreement_count=args.onnx_agreement_count)


def export(index_dir, args) -> None:
    try:
        from geosurge_index.model.onnx_export import export_index_onnx
    except ImportError as err:
        from geosurge_index.errors import UserError

        raise UserError(f"export-onnx needs onnx and onnxruntime ({err}): "
                        "pip install 'geosurge-index[onnx]'") from None
    result = export_index_onnx(index_dir, settings_of(args))
    for key, name in result.files.items():
        check = ", ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in result.checks[key].items())
        print(f"  {name}: {check}")
    for key, why in result.skipped.items():
        print(f"  {key} not exported ({why}); torch computes it")
    took = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    print(f"wrote {len(result.files)} ONNX file(s) into {index_dir} ({took})")


def run(args) -> int:
    export(args.index_dir, args)
    return 0


def register_bench(bench_subparsers) -> None:
    from geosurge_index.bench.cpu import DESCRIPTION as BENCH_DESCRIPTION
    from geosurge_index.bench.cpu import CpuBench

    p = bench_subparsers.add_parser(
        "cpu", help="CPU inference: torch vs ONNX Runtime fp32/int8, segmenter settings, agreement",
        description=BENCH_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  geosurge bench cpu --quick\n  geosurge bench cpu --demo-index demo-out/index")
    d = CpuBench()
    p.add_argument("--quick", action="store_true", help="the tiny config only (seconds, for a smoke test)")
    p.add_argument("--images", type=int, default=d.images, help="images per timing (default: %(default)s)")
    p.add_argument("--agreement-images", type=int, default=d.agreement_images,
                   help="images for the agreement figures (default: %(default)s)")
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads (default: torch's)")
    p.add_argument("--demo-index", default=d.demo_index, metavar="INDEX_DIR",
                   help="a trained index (e.g. demo-out/index) for top-1 agreement on real weights")
    p.add_argument("--demo-images", default=d.demo_images, metavar="FOLDER",
                   help="its test photos (with class maps), e.g. demo-out/world/test")
    p.add_argument("--demo-calibration", default=d.demo_calibration, metavar="FOLDER",
                   help="photos calibrating static int8 (default: world/train beside the demo index)")
    p.add_argument("--no-segmenters", dest="segmenters", action="store_false",
                   help="skip the segmenter table")
    p.add_argument("--no-full", dest="full", action="store_false", help="skip the full-size architecture")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    from geosurge_index.bench.cpu import CpuBench, run_cpu_bench
    from geosurge_index.cli import settings_from_args

    run_cpu_bench(settings_from_args(CpuBench, args))
    return 0
