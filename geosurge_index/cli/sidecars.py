"""`geosurge sidecars PRED_DIR`: XMP sidecars with the estimated GPS, for photo managers."""

from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """\
Write one XMP sidecar per untagged, confidently located photo of PRED_DIR: the estimate in
exif:GPSLatitude / exif:GPSLongitude (the XMP EXIF form "DD,MM.mmmmmmN", which digiKam,
darktable, Lightroom, immich and PhotoPrism read), marked as an estimate in this project's
namespace (geosurge:Estimated, Probability, CellToken, CellLevel, CapKm, IndexId, Date).

Originals are never modified. Photos with valid EXIF GPS are skipped. An existing sidecar (either
naming) is merged into, keeping everything else it holds; one that already has GPS is left alone
unless --force; one that is not valid XMP is left untouched and reported. Writes are atomic
(a killed run leaves whole sidecars or none; rerun it). The summary counts what was written and
what was skipped, and why.

Naming: photo.jpg.xmp (default: digiKam, darktable, and immich's first choice) or photo.xmp
(Lightroom; immich reads it too). --cap-km applies the precision cap (README: For photo archives)
on top of any cap the run had: the sidecar gets the mean point of the capped cell.

Examples:
  geosurge sidecars preds/ --dry-run
  geosurge sidecars preds/ --min-probability 0.6 --cap-km 25
  geosurge sidecars preds/ --within-km 25 --min-probability 0.5
  geosurge sidecars preds/ --only selected.txt          # the list `geosurge review` exports
  geosurge sidecars preds/ --dest sidecars/ --naming photo.xmp
"""


def register(subparsers) -> None:
    from geosurge_index.sidecars import DEFAULT_MIN_PROBABILITY, NAMINGS

    p = subparsers.add_parser(
        "sidecars", help="write XMP sidecars with the estimated GPS of untagged photos (photo managers read them)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pred_dir", metavar="PRED_DIR", help="the output of `geosurge locate`")
    p.add_argument("--dest", metavar="DIR", default=None,
                   help="write sidecars under DIR, mirroring the photos' folders below the run's inputs "
                        "(default: beside each photo)")
    p.add_argument("--min-probability", type=float, default=DEFAULT_MIN_PROBABILITY, metavar="P",
                   help="write only estimates at least this probable (default: %(default)s)")
    p.add_argument("--within-km", type=float, default=None, metavar="KM",
                   help="apply --min-probability to the probability that the true point lies within KM "
                        "(1, 25, 200, 750 or 2500) of the estimate instead of the cell's: e.g. "
                        "--within-km 25 --min-probability 0.5 keeps estimates likely right to a city")
    p.add_argument("--cap-km", type=float, default=None, metavar="KM",
                   help="precision cap: 1 street, 25 city, 200 region, 750 country (default: the run's own)")
    p.add_argument("--cap-level", type=int, default=None, metavar="LEVEL", help="precision cap by level")
    p.add_argument("--naming", choices=NAMINGS, default=NAMINGS[0], help="sidecar file name (default: %(default)s)")
    p.add_argument("--only", metavar="FILE", default=None,
                   help="only the photos listed in FILE (one id or path per line, as `geosurge review` exports)")
    p.add_argument("--force", action="store_true", help="replace GPS already present in an existing sidecar")
    p.add_argument("--dry-run", action="store_true", help="say what would be written, write nothing")
    p.add_argument("--index", metavar="INDEX_DIR", default=None,
                   help="the run's index, for --cap-km (default: the one the run recorded)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from geosurge_index.privacy import Cap
    from geosurge_index.sidecars import read_only_list, write_sidecars

    only = read_only_list(args.only) if args.only else None
    report = write_sidecars(args.pred_dir, dest=args.dest, min_probability=args.min_probability,
                            cap=Cap.of(args.cap_km, args.cap_level), naming=args.naming, dry_run=args.dry_run,
                            only=only, force=args.force, index_dir=args.index, within_km=args.within_km)
    print(report.summary(), file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=1)
    return 0
