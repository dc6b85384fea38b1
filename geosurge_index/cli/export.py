"""`geosurge export CHECKPOINT --out INDEX_DIR`: a checkpoint -> the index folder (`--onnx`: with the
ONNX Runtime encoders). Also registers `geosurge export-onnx` and `geosurge bench cpu`
(`cli.export_onnx`)."""

from __future__ import annotations

import argparse

from geosurge_index.cli import export_onnx
from geosurge_index.cli.export_onnx import add_export_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a training checkpoint to an INDEX_DIR (FAISS per level, cells.duckdb, encoder)",
        description=(
            "Write INDEX_DIR from a checkpoint folder: level_{1..7}.faiss (one inner-product FAISS "
            "index per level over the L2-normalised geocell embeddings, row = cell_index), "
            "cells.duckdb (table `cells`: the partition's cells with place names of each cell's "
            "mean point, from the offline reverse_geocoder + pycountry; table `levels`: level, "
            "tau_max, n_cells, temperature), encoder.safetensors + encoder.json (the visual "
            "encoder; a pretrained backbone is named, not copied), and manifest.json (format "
            "version, dim, levels, sha256 of every file, library versions), written last.\n\n"
            "Example:\n  geosurge export runs/demo/epoch-0010 --out index/"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="checkpoint folder written by `geosurge train` (config.json, model.safetensors, "
                        "cells.parquet, partition.json)")
    p.add_argument("--out", required=True, metavar="INDEX_DIR", help="index folder to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the index files in a non-empty INDEX_DIR (default: refuse)")
    p.add_argument("--no-place-names", dest="place_names", action="store_false",
                   help="skip reverse geocoding; the place-name columns are then absent "
                        "(default: fill them)")
    p.add_argument("--onnx", action="store_true",
                   help="also write the ONNX Runtime encoders for fast CPU inference, as "
                        "`geosurge export-onnx INDEX_DIR` does (needs geosurge-index[onnx])")
    add_export_arguments(p, prefix="onnx-")
    g = p.add_argument_group("a gallery of the training set (`geosurge gallery add`)")
    g.add_argument("--gallery", nargs="+", default=None, metavar="SOURCE",
                   help="also store these geotagged images as a gallery, e.g. the training manifest (or a "
                        "PRED_DIR of their embeddings with --gallery-truth): answers then come from the nearest "
                        "training photo inside the best cells")
    g.add_argument("--gallery-name", default="train", help="its name (default: %(default)s)")
    g.add_argument("--gallery-storage", default=None, choices=["flat", "fp16", "pq"],
                   help="flat, fp16 or pq (default: flat)")
    g.add_argument("--gallery-truth", default=None, metavar="FILE", help="coordinates for the gallery's ids")
    p.add_argument("--segmenter", metavar="SEG_DIR", default=None,
                   help="ship this segmenter in the index instead of the checkpoint's: a folder "
                        "written by the segmenter training (segmenter.json + segmenter.safetensors; "
                        "`geosurge demo` trains one on its world). It segments photos located without "
                        "a class map (default: the checkpoint's segmenter)")
    p.set_defaults(func=run)
    export_onnx.register(subparsers)


def register_bench(bench_subparsers) -> None:
    export_onnx.register_bench(bench_subparsers)


def run(args) -> int:
    from pathlib import Path

    from geosurge_index.errors import UserError
    from geosurge_index.index import export_checkpoint, read_manifest

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a file; give a folder to write the index into")
    out = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite,
                            place_names=args.place_names, segmenter=args.segmenter)
    m = read_manifest(out)
    sizes = ", ".join(str(e["n_cells"]) for e in m["levels"])
    print(f"wrote {out}: {len(m['levels'])} levels ({sizes} cells), dim {m['dim']}, "
          f"encoder {'included' if m['encoder'] else 'absent'}")
    if args.onnx:
        export_onnx.export(out, args)
    if getattr(args, "gallery", None):
        import sys

        from geosurge_index.gallery.build import add_gallery

        report = add_gallery(out, list(args.gallery), args.gallery_name, truth=args.gallery_truth,
                             storage=args.gallery_storage)
        print("\n".join(report.lines()), file=sys.stderr)
    return 0
