"""`geosurge export CHECKPOINT --out INDEX_DIR`: a checkpoint -> the index folder."""

from __future__ import annotations


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
            "version, dim, levels, sha256 of every file, library versions), written last."
        ),
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
    p.add_argument("--segmenter", metavar="SEG_DIR", default=None,
                   help="ship this segmenter in the index instead of the checkpoint's: a folder "
                        "written by the segmenter training (segmenter.json + segmenter.safetensors; "
                        "`geosurge demo` trains one on its world). It segments photos located without "
                        "a class map (default: the checkpoint's segmenter)")
    p.set_defaults(func=run)


def run(args) -> int:
    from geosurge_index.index import export_checkpoint, read_manifest

    out = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite,
                            place_names=args.place_names, segmenter=args.segmenter)
    m = read_manifest(out)
    sizes = ", ".join(str(e["n_cells"]) for e in m["levels"])
    print(f"wrote {out}: {len(m['levels'])} levels ({sizes} cells), dim {m['dim']}, "
          f"encoder {'included' if m['encoder'] else 'absent'}")
    return 0
