"""`geosurge gallery add | list | remove`: geotagged reference images inside an index; and
`geosurge bench gallery`."""

from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """\
Galleries are sets of geotagged reference images stored inside INDEX_DIR, organised by finest
cell (a FAISS inverted-file index whose lists are the finest cells). When an index has galleries,
`locate`, `search`, the Locator API and the service search the references inside the best cells
of each query and answer with the nearest one's coordinates (PRED_DIR `point_source` =
neighbour), or the best cell's mean point when those cells hold no reference (cell_mean).
`--galleries NAMES|none` and `--refine-cells N` choose which galleries and how many cells.

  geosurge gallery add INDEX_DIR SOURCE... --name NAME    add references (creates or appends)
  geosurge gallery list INDEX_DIR                         the galleries, sizes, rejected rows
  geosurge gallery remove INDEX_DIR NAME                  drop one

SOURCE, one or more of:
  a folder of photos      the photos with EXIF GPS become references (the others are counted
                          as not geotagged): e.g. the tagged part of a personal archive
  a manifest              .csv/.parquet with a path column and lat/lon columns
  WebDataset shards       .tar whose samples carry lat/lon in their JSON member
  a PRED_DIR              written by `geosurge locate --save-embeddings`, with --truth FILE:
                          the stored embeddings are used, nothing is re-encoded
--truth FILE (CSV/Parquet/tar with id, lat, lon; matched on id as `geosurge eval` does) gives
the coordinates of any source instead.

Every input row ends as one reference or one counted rejected row (decode errors, no_coordinates,
bad_coordinates, bad_embedding, no_cell: outside every finest cell, duplicate_id); --rejected FILE
writes them. Images are encoded into INDEX_DIR/.staging/ with the bulk locate pipeline, which
resumes after an interruption (kill -9 included): run the same command again. The gallery's files
are written under a new name and the manifest switches to them atomically, so a half-written
gallery is never used; running a completed `add` again adds nothing.

Examples:
  geosurge gallery add index/ archive/ --name my-archive           # EXIF-tagged photos
  geosurge gallery add index/ train/manifest.csv --name train --storage fp16
  geosurge gallery add index/ preds/ --truth train.csv --name train   # no re-encoding
  geosurge locate index/ untagged/ --out preds/                     # uses every gallery
  geosurge locate index/ untagged/ --out preds-cells/ --galleries none
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("gallery", help="geotagged reference images inside an index (add, list, remove)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="gallery_command", metavar="ACTION")
    a = sub.add_parser("add", help="add geotagged references to a gallery (created if absent)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("index_dir", metavar="INDEX_DIR")
    a.add_argument("sources", metavar="SOURCE", nargs="+",
                   help="folders of photos with EXIF GPS, manifests or .tar shards with lat/lon, or PRED_DIRs with --truth")
    a.add_argument("--name", required=True, help="the gallery's name (letters, digits, _ - .)")
    a.add_argument("--truth", default=None, metavar="FILE",
                   help="coordinates for the sources' ids (CSV/Parquet/tar), instead of the sources' own")
    a.add_argument("--storage", default=None, choices=["flat", "fp16", "pq"],
                   help="how references are stored, for a new gallery: flat (float32, exact), fp16 (half the "
                        "bytes, cosines within ~1e-3), pq (dim/8 bytes per reference, approximate) (default: flat; "
                        "an existing gallery keeps its own)")
    a.add_argument("--pq-m", type=int, default=None, help="pq sub-quantizers (default: dim/8)")
    a.add_argument("--rejected", default=None, metavar="FILE", help="write the rejected rows (id, error) as Parquet")
    a.add_argument("--restart", action="store_true", help="discard staged encoding work of an interrupted add")
    from geosurge_index.settings import BulkSettings

    BulkSettings.add_arguments(a, ["device", "batch_size", "workers"], switches=True)
    a.set_defaults(func=run_add)
    ls = sub.add_parser("list", help="the index's galleries", epilog="example:\n  geosurge gallery list index/ --json",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ls.add_argument("index_dir", metavar="INDEX_DIR")
    ls.add_argument("--json", action="store_true", help="print the manifest entries as JSON")
    ls.set_defaults(func=run_list)
    rm = sub.add_parser("remove", help="remove a gallery from the index",
                        epilog="example:\n  geosurge gallery remove index/ my-archive",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    rm.add_argument("index_dir", metavar="INDEX_DIR")
    rm.add_argument("name", metavar="NAME")
    rm.set_defaults(func=run_remove)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def run_add(args) -> int:
    from geosurge_index.gallery.build import add_gallery
    from geosurge_index.settings import BulkSettings

    report = add_gallery(args.index_dir, list(args.sources), args.name, truth=args.truth, storage=args.storage,
                         pq_m=args.pq_m, settings=BulkSettings.from_args(args), restart=args.restart,
                         rejected_out=args.rejected)
    print("\n".join(report.lines()), file=sys.stderr)
    return 0


def run_list(args) -> int:
    from geosurge_index.gallery.build import describe, list_galleries

    entries = list_galleries(args.index_dir)
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=1))
    else:
        print(describe(entries, args.index_dir))
    return 0


def run_remove(args) -> int:
    from geosurge_index.gallery.build import remove_gallery

    e = remove_gallery(args.index_dir, args.name)
    print(f"removed gallery {e.name!r} ({e.n_refs} references) from {args.index_dir}", file=sys.stderr)
    return 0


# --- bench (geosurge_index.bench.gallery) --------------------------------------------------------


def register_bench(bench_subparsers) -> None:
    from geosurge_index.bench.gallery import DESCRIPTION as BENCH

    p = bench_subparsers.add_parser(
        "gallery", help="galleries at MP-16 scale (4.72 M references) and 20 M: build, bytes/ref, recall, queries/s",
        description=BENCH + "\nExample:\n  geosurge bench gallery --scale mp16 --storages fp16,pq --json gallery.json\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="mp16", choices=["mp16", "20m", "both"],
                   help="mp16: 4.72 M references; 20m: 20 M (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1/20 of the references, 256 queries")
    p.add_argument("--storages", default="flat,fp16,pq", help="storages to measure (default: %(default)s)")
    p.add_argument("--queries", type=int, default=1024, help="queries in the batch (default: %(default)s)")
    p.add_argument("--refine-cells", type=int, default=3, help="best cells searched (default: %(default)s)")
    p.add_argument("--n-finest", type=int, default=25_000, help="finest cells (default: %(default)s)")
    p.add_argument("--dim", type=int, default=768, help="embedding width (default: %(default)s)")
    p.add_argument("--ref-noise", type=float, default=1.0, help="reference noise, relative norm (default: %(default)s)")
    p.add_argument("--query-noise", type=float, default=1.0, help="query noise, relative norm (default: %(default)s)")
    p.add_argument("--max-gib", type=float, default=None,
                   help="skip a storage whose lists would exceed this (default: half the memory available now)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs, best kept (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON here")
    p.set_defaults(func=run_bench)
    from geosurge_index.bench.gallery_choices import DESCRIPTION as CHOICES

    c = bench_subparsers.add_parser(
        "gallery-choices", help="on a finished demo: which embedding, rule and number of cells refine best",
        description=CHOICES + "\nExample:\n  geosurge demo && geosurge bench gallery-choices demo-out\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("demo_out", metavar="DEMO_OUT", help="a folder written by `geosurge demo`")
    c.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON here")
    c.set_defaults(func=run_choices)


def run_choices(args) -> int:
    from geosurge_index.bench.gallery_choices import run_choices as run

    figures = run(args.demo_out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


def run_bench(args) -> int:
    from geosurge_index.bench.gallery import GalleryBench, run_gallery_bench
    from geosurge_index.cli import settings_from_args

    figures = run_gallery_bench(settings_from_args(GalleryBench, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1, default=str)
    return 0
