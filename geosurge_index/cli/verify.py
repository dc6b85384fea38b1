"""`geosurge verify INDEX_DIR`: every check of an index folder, each printed; exit 1 on any failure."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Check an index folder written by `geosurge export`, fully: the manifest (format and version,
every file a reader opens covered by a checksum), every listed file (present, its size, its
sha256), cells.duckdb (opens, its level counts equal the manifest's, the cells form a tree:
cell_index dense, parents in range) and every level file (FAISS reads it: n_cells x dim
unit-norm vectors). Prints one line per check; a failed check does not stop the others.
Reads only: nothing in INDEX_DIR changes.

Exit status: 0 when every check passes, 1 when one fails, 2 when INDEX_DIR is not a folder.

Commands that open an index make the same checks, less the sha256 pass with --no-verify;
run this after copying an index, or when a --no-verify command refuses one.

Example:
  geosurge verify index/
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "verify",
        help="check an index folder fully (manifest, checksums, structure); exit 1 on any failure",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("index_dir", metavar="INDEX_DIR", help="index folder written by `geosurge export`")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from geosurge_index.index_check import check_index

    width = 28

    def show(c) -> None:
        print(f"{'ok  ' if c.ok else 'FAIL'}  {c.what:<{width}} {c.detail}", flush=True)

    checks = check_index(args.index_dir, on_check=show)
    failed = sum(not c.ok for c in checks)
    if failed:
        print(f"geosurge verify: {args.index_dir}: {failed} of {len(checks)} checks failed", file=sys.stderr)
        return 1
    print(f"{args.index_dir}: all {len(checks)} checks passed")
    return 0
