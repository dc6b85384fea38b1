"""The full check of an INDEX_DIR (`geosurge verify`): every check the readers make, each reported.

`check_index` runs, and reports one `Check` per item:
- manifest.json: format name and version, the shape of its entries, every file a reader opens
  covered by a checksum;
- every listed file: present, of the listed size, of the listed sha256;
- cells.duckdb: opens read-only, its `levels` counts equal the manifest's, its `cells` table is
  a tree of those counts (cell_index dense, parents in range);
- every level file: FAISS reads it, a flat index of n_cells x dim unit-norm vectors.

A failed check does not stop the others (a damaged file is reported with everything else that is
wrong), except a manifest that cannot be read: nothing else can be checked without it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from geosurge_index.errors import FormatError, UserError
from geosurge_index.index import (
    CELLS_DB,
    MANIFEST,
    check_file,
    read_checked_tree,
    read_level,
    read_manifest,
    reader_files,
)


@dataclass(frozen=True)
class Check:
    """One item checked: `what` (a file name), `ok`, and what was found (or what is wrong)."""

    what: str
    ok: bool
    detail: str


# what a damaged file can raise from FAISS or DuckDB besides FormatError, reported as a failure
_FAILURES = (UserError, OSError, RuntimeError, ValueError, MemoryError)


def _run(what: str, fn: Callable[[], str]) -> Check:
    try:
        return Check(what, True, fn())
    except _FAILURES as err:
        return Check(what, False, str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)


def check_index(index_dir: str | os.PathLike, *, checksums: bool = True,
                on_check: Callable[[Check], None] | None = None) -> list[Check]:
    """Every check of INDEX_DIR (module doc), in order; `on_check` sees each as it completes.
    UserError if INDEX_DIR is not a folder."""
    d = Path(index_dir)
    if not d.is_dir():
        raise UserError(f"INDEX_DIR {d} is not a folder")
    done: list[Check] = []

    def record(c: Check) -> Check:
        done.append(c)
        if on_check is not None:
            on_check(c)
        return c

    manifest: dict = {}

    def check_manifest() -> str:
        manifest.update(read_manifest(d))
        uncovered = [n for n in reader_files(manifest) if n not in manifest["files"]]
        if uncovered:
            raise FormatError(f"{', '.join(uncovered)} not covered by the manifest's checksums")
        return (f"{manifest['format']} v{manifest['format_version']}, {len(manifest['levels'])} levels, "
                f"dim {manifest['dim']}, {len(manifest['files'])} files listed, "
                f"encoder {'yes' if manifest.get('encoder') else 'no'}")

    if not record(_run(MANIFEST, check_manifest)).ok:
        return done

    files = manifest["files"]
    for name in files:
        def one(name=name) -> str:
            check_file(d, name, files[name], checksums=checksums)
            return f"{files[name]['bytes']:,} bytes" + (", sha256 matches" if checksums else " (no checksum)")

        record(_run(name, one))

    sizes: list[int] = []

    def check_cells() -> str:
        tree = read_checked_tree(d, manifest)
        sizes.extend(tree.sizes)
        return (f"tables cells and levels: {sum(tree.sizes):,} cells in {tree.levels} levels, counts "
                "match the manifest, cell_index dense, parents in range")

    cells_ok = record(_run(f"{CELLS_DB} (tables)", check_cells)).ok
    dim = int(manifest["dim"])
    for e in sorted(manifest["levels"], key=lambda e: e["level"]):
        def level(e=e) -> str:
            n_tree = sizes[e["level"] - 1] if cells_ok else int(e["n_cells"])
            index = read_level(d / e["file"], e, dim, n_tree)
            return f"{index.ntotal:,} x {index.d} unit-norm vectors (flat inner product)"

        record(_run(f"{e['file']} (vectors)", level))
    from geosurge_index.gallery.store import Gallery, manifest_galleries

    n_finest = int(sorted(manifest["levels"], key=lambda e: e["level"])[-1]["n_cells"])
    for g in manifest_galleries(manifest):
        def gallery(g=g) -> str:
            opened = Gallery.read(d, g, n_finest, dim)
            return (f"{len(opened):,} references ({g.storage}) in {g.n_cells:,} finest cells, "
                    f"{sum(g.rejected.values()):,} rows rejected when added")

        record(_run(f"gallery {g.name} ({g.index_file})", gallery))
    return done
