"""`geosurge import geoclip --out INDEX_DIR`: a published model -> an index folder;
`geosurge bench geoclip`: that index against the model's own predict()."""

from __future__ import annotations

import argparse

GEOCLIP_DESCRIPTION = """\
Build INDEX_DIR from GeoCLIP (Vivanco Cepeda et al., NeurIPS 2023; MIT licence), so that every
command that reads an index (locate, search, sql, evaluate, verify, serve) locates real photos.

From the `geoclip` wheel (version 1.3.0; `pip install --no-deps geoclip==1.3.0`): its image head,
its location encoder, its logit scale and its 100 k GPS gallery (MP-16 coordinates). From CLIP
ViT-L/14 (--clip, default openai/clip-vit-large-patch14): the image tower, loaded with
from_pretrained from a local folder or your Hugging Face cache; nothing is downloaded unless you
pass --allow-download (then it lands in the Hugging Face cache, where `geosurge locate` finds it).

The index: 7 levels of cells, by default a partition of GeoCLIP's gallery with the default
thresholds scaled to its size (tau_max 530 .. 11 for 100 k points; or --cells CELLS_DIR); each
cell's embedding is GeoCLIP's location embedding averaged over the cell's gallery points
(--cell-embedding points) or taken at its mean point (mean-point); every level's temperature is
1 / GeoCLIP's logit scale. The encoder (512-d) is recorded in encoder.json with its provenance
and licence (`geosurge model-info INDEX_DIR`). Encoding the gallery takes a few minutes on a CPU.

example:
  geosurge import geoclip --out geoclip-index/ --allow-download    # once: fetches CLIP ViT-L/14
  geosurge locate geoclip-index/ photos/ --out preds/
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("import", help="build an index from a published model (GeoCLIP)",
                              description="Build an INDEX_DIR from a published geolocation model.",
                              epilog="example:\n  geosurge import geoclip --out geoclip-index --clip ~/models/clip-vit-large-patch14",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="model", metavar="MODEL")
    p.set_defaults(func=lambda args: p.print_help() or 2)
    g = sub.add_parser("geoclip", help="GeoCLIP (NeurIPS 2023, MIT): CLIP ViT-L/14 + its location encoder",
                       description=GEOCLIP_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--out", required=True, metavar="INDEX_DIR", help="index folder to write")
    g.add_argument("--cells", default=None, metavar="CELLS_DIR",
                   help="use this partition (`geosurge partition`) instead of partitioning GeoCLIP's gallery")
    g.add_argument("--clip", default="openai/clip-vit-large-patch14", metavar="PATH_OR_ID",
                   help="the CLIP ViT-L/14 tower: a folder saved with save_pretrained, or a hub id in the "
                        "Hugging Face cache (default: %(default)s)")
    g.add_argument("--allow-download", action="store_true",
                   help="let from_pretrained download the CLIP tower into the Hugging Face cache (default: "
                        "local files only)")
    g.add_argument("--cell-embedding", dest="cell_mode", choices=["points", "mean-point"], default="points",
                   help="a cell's embedding: the mean of its gallery points' location embeddings, or the "
                        "embedding at its mean point (default: %(default)s, which agrees better with "
                        "GeoCLIP's own answers: `geosurge bench geoclip`)")
    g.add_argument("--overwrite", action="store_true", help="replace the index files in a non-empty INDEX_DIR")
    g.add_argument("--no-place-names", dest="place_names", action="store_false",
                   help="skip reverse geocoding of the cells (default: fill the place-name columns)")
    g.set_defaults(func=run_geoclip)


def run_geoclip(args) -> int:
    from pathlib import Path

    from geosurge_index.importers.geoclip import ImportSettings, import_geoclip
    from geosurge_index.index import read_manifest

    out = import_geoclip(ImportSettings(
        out=Path(args.out), cells=Path(args.cells) if args.cells else None, clip=args.clip,
        allow_download=args.allow_download, cell_mode=args.cell_mode, overwrite=args.overwrite,
        place_names=args.place_names))
    m = read_manifest(out)
    sizes = ", ".join(str(e["n_cells"]) for e in m["levels"])
    print(f"wrote {out}: GeoCLIP, {len(m['levels'])} levels ({sizes} cells), dim {m['dim']}, "
          f"temperature {m['levels'][0]['temperature']:.5f}; try: geosurge locate {out} PHOTOS --out PRED_DIR")
    return 0


def register_bench(bench_subparsers) -> None:
    from geosurge_index.bench.geoclip import DESCRIPTION

    p = bench_subparsers.add_parser(
        "geoclip", help="an index imported from GeoCLIP vs GeoCLIP's own predict(): agreement and images/s",
        description=DESCRIPTION + "\nexample:\n  geosurge bench geoclip --images 2 --work /tmp/geoclip-bench\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=2000,
                   help="proxy queries for the agreement study, 0 to skip (default: %(default)s)")
    p.add_argument("--cosines", default="1.0,0.7,0.5",
                   help="cosines of the proxy queries to their location embeddings (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=10,
                   help="finest cells per answer: is GeoCLIP's point among them? (refinement's ceiling; "
                        "default: %(default)s)")
    p.add_argument("--images", type=int, default=2,
                   help="JPEGs through both pipelines, 0 to skip (GeoCLIP re-encodes its gallery per image: "
                        "slow on CPU; default: %(default)s)")
    p.add_argument("--size", default="640x480", help="their size WxH (default: %(default)s)")
    p.add_argument("--work", default=None, metavar="DIR",
                   help="keep the CLIP folder (1.7 GB), the gallery embeddings and the index here between runs "
                        "(default: a temporary folder)")
    p.add_argument("--gallery-limit", type=int, default=None,
                   help="use only the first N gallery points (a quick trial; default: all)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON here")
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    from pathlib import Path

    from geosurge_index.bench.geoclip import GeoClipBench, run_geoclip_bench
    from geosurge_index.errors import UserError

    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
        cosines = tuple(float(c) for c in args.cosines.split(","))
    except ValueError:
        raise UserError(f"--size {args.size!r} / --cosines {args.cosines!r}: expected WxH and "
                        "comma-separated numbers") from None
    run_geoclip_bench(GeoClipBench(
        queries=args.queries, cosines=cosines, top_k=args.top_k, images=args.images, width=w, height=h,
        work=Path(args.work) if args.work else None, gallery_limit=args.gallery_limit,
        json_out=Path(args.json) if args.json else None))
    return 0
