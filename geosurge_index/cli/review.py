"""`geosurge review PRED_DIR --out review.html`; `geosurge bench review`."""

from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """\
Write one self-contained HTML page to review the estimates of a PRED_DIR before applying them:
each located photo with its thumbnail, place name, probability and top alternatives (and its
EXIF GPS when it has some), a world map of the points (Natural Earth countries, shipped), sorting
by confidence, filters (text, minimum probability, untagged only), paging (100 rows a page:
usable at 10,000 photos and more), and a selection exported as a list, one id per line, that
`geosurge sidecars PRED_DIR --only FILE` takes. The page needs no network (thumbnails and map
inline, a Content-Security-Policy forbids fetching anything). Estimates pass the precision cap
(--cap-km, on top of the run's own) before they are written into the page.

Examples:
  geosurge review preds/ --out review.html
  geosurge review preds/ --out review.html --cap-km 25
  geosurge sidecars preds/ --only selection.txt      # the list exported from the page
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("review", help="one self-contained HTML page to review estimates before applying them",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pred_dir", metavar="PRED_DIR", help="the output of `geosurge locate`")
    p.add_argument("--out", "-o", required=True, metavar="FILE", help="the HTML file to write")
    p.add_argument("--index", metavar="INDEX_DIR", default=None,
                   help="the run's index, for place names (default: the one the run recorded)")
    p.add_argument("--cap-km", type=float, default=None, metavar="KM", help="precision cap in km")
    p.add_argument("--cap-level", type=int, default=None, metavar="LEVEL", help="precision cap by level")
    p.add_argument("--no-thumbnails", dest="thumbs", action="store_false", help="leave thumbnails out")
    p.set_defaults(func=run)


def register_bench(bench_subparsers) -> None:
    from geosurge_index.bench.review import __doc__ as doc

    p = bench_subparsers.add_parser("review", help="size and browser load time of the review page at N photos",
                                    description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                    epilog="example:\n  geosurge bench review --photos 10000 --json review.json")
    p.add_argument("--photos", type=int, default=10_000, help="photos on the page (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON here")
    p.set_defaults(func=run_bench)


def run(args: argparse.Namespace) -> int:
    from geosurge_index.privacy import Cap
    from geosurge_index.review import build_review

    report = build_review(args.pred_dir, args.out, index_dir=args.index, cap=Cap.of(args.cap_km, args.cap_level),
                          thumbs=args.thumbs)
    print(f"review: wrote {report.out} ({report.photos} photos, {report.thumbnails} thumbnails, "
          f"{report.bytes / 1e6:.1f} MB)", file=sys.stderr)
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from geosurge_index.bench.review import ReviewBench, run_review_bench

    figures = run_review_bench(ReviewBench(args.photos, args.json))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0
