"""`geosurge gallery add / list / remove`: building galleries from geotagged sources.

Sources (`add_gallery`):
- images with coordinates in the source: manifests with lat/lon columns, WebDataset shards whose
  samples carry lat/lon in their JSON, folders (or single images) whose photos carry EXIF GPS
  (only the tagged photos are encoded; the others are counted as not geotagged);
- any of those, or folders without GPS, with `truth` (a CSV/Parquet/tar truth file, matched on id
  as `geosurge eval` matches it), which then gives every coordinate;
- PRED_DIRs written with `geosurge locate --save-embeddings` plus `truth`: no re-encoding.

Images are encoded by the bulk locate pipeline into INDEX_DIR/.staging/gallery-NAME/pred (a
PRED_DIR with embeddings), which resumes after a kill like any `locate` run. Each input row then
ends as one reference or one counted rejected row (kinds: the decode errors of `locate`,
no_coordinates, bad_coordinates, bad_embedding, no_cell (outside every finest cell),
duplicate_id). The references are added to the gallery's IVF index in a new generation of its
files, and the manifest is switched to it atomically (`store`). An addition is fingerprinted
(ids and coordinates of its references): running the same `gallery add` again after it
completed adds nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from geosurge_index.errors import UserError
from geosurge_index.gallery.store import (
    META_SCHEMA,
    STAGING_DIR,
    GalleryEntry,
    add_to_ivf,
    check_name,
    file_names,
    gallery_lock,
    manifest_galleries,
    new_ivf,
    normalise_rows,
    now_utc,
    remove_stray_files,
    write_atomic,
)

EXAMPLES = 5  # rejected rows shown per kind
STAGING_CHUNK = 256  # images per staged shard: the unit of resume of an interrupted add


@dataclass
class AddReport:
    name: str
    n_inputs: int = 0  # rows read from the sources (photos, manifest rows, samples, PRED_DIR rows)
    n_added: int = 0
    n_refs: int = 0  # references in the gallery afterwards
    not_geotagged: int = 0  # folder photos without EXIF GPS (not encoded, not errors)
    rejected: Counter = field(default_factory=Counter)  # kind -> rows
    examples: dict[str, list[str]] = field(default_factory=dict)  # kind -> a few "id: message"
    already_added: bool = False
    storage: str = "flat"

    def lines(self) -> list[str]:
        out = []
        if self.already_added:
            out.append(f"gallery {self.name!r}: these references were already added (nothing to do); "
                       f"{self.n_refs} references")
            return out
        out.append(f"gallery {self.name!r}: {self.n_added} references added from {self.n_inputs} input rows "
                   f"({self.n_refs} in the gallery, storage {self.storage})")
        if self.not_geotagged:
            out.append(f"  {self.not_geotagged} photos without EXIF GPS were left out (not geotagged)")
        for kind, n in sorted(self.rejected.items()):
            shown = "; ".join(self.examples.get(kind, []))
            out.append(f"  rejected {n} row(s) {kind}" + (f", e.g. {shown}" if shown else ""))
        return out


# --- collecting rows -----------------------------------------------------------------------------


@dataclass
class Rows:
    """One row per input row: id, path, coordinates (NaN = none), error (None = fine), embeddings of
    the rows without error (in order)."""

    ids: list[str]
    lat: np.ndarray
    lon: np.ndarray
    errors: list[str | None]
    emb: np.ndarray
    not_geotagged: int = 0
    has_emb: np.ndarray | None = None  # rows `emb` holds (errors may be added to them later)

    def __post_init__(self):
        if self.has_emb is None:
            self.has_emb = np.array([e is None for e in self.errors], dtype=bool)


def is_pred_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and any(p.glob("part-*.parquet"))


def _read_embeddings(pred_dirs: list[Path], dim: int):
    """ids, paths, errors and the embeddings of the error-free rows of PRED_DIRs."""
    from geosurge_index.embeddings import read_embedding_batches

    ids, paths, errors, embs = [], [], [], []
    for d in pred_dirs:
        try:
            batches, _ = read_embedding_batches(d, dim, 8192)
            for b in batches:
                ids += b.ids
                paths += b.paths
                errors += b.errors
                embs.append(b.embeddings)
        except UserError as err:
            raise UserError(f"gallery source {d}: {err}") from None
    emb = np.concatenate(embs) if embs else np.zeros((0, dim), np.float32)
    return ids, paths, errors, emb


def _coordinates_from_truth(truth: str, ids: list[str], paths: list[str | None], rejected_truth: Counter):
    from geosurge_index.benchmarks import match_ids, read_truth

    t = read_truth(truth, skip_invalid=True)
    if t.n_skipped_invalid:
        rejected_truth["truth rows with invalid coordinates (not used)"] += t.n_skipped_invalid
    rows = match_ids(t.ids, ids, paths)
    lat = np.full(len(ids), np.nan)
    lon = np.full(len(ids), np.nan)
    hit = rows >= 0
    lat[rows[hit]] = t.lat[hit]
    lon[rows[hit]] = t.lon[hit]
    return lat, lon


def _source_coordinates(source: str, table: pa.Table, staging: Path, k: int):
    """-> (locate input replacing `source`, or None when nothing to encode; lat, lon aligned with
    that input's rows; photos left out as not geotagged)."""
    from geosurge_index import sources as src
    from geosurge_index.coords import read_coordinates

    kind = src.input_kind(source)
    n = table.num_rows
    if kind == "manifest":
        try:
            c = read_coordinates(source, skip_invalid=True)
        except UserError as err:
            raise UserError(f"gallery source {source}: {err} (or give --truth)") from None
        lat, lon = np.full(n, np.nan), np.full(n, np.nan)
        lat[c.rows], lon[c.rows] = c.lat, c.lon
        bad = np.ones(n, bool)
        bad[c.rows] = False
        return source, lat, lon, bad, 0
    if kind == "tar":
        c = src.read_tar_coordinates(source)
        pos = {i: j for j, i in enumerate(c["id"].to_pylist())}
        clat, clon = c["lat"].to_numpy(), c["lon"].to_numpy()
        take = np.array([pos.get(i, -1) for i in table["id"].to_pylist()], dtype=np.int64)
        lat = np.where(take >= 0, clat[np.maximum(take, 0)] if len(clat) else np.nan, np.nan)
        lon = np.where(take >= 0, clon[np.maximum(take, 0)] if len(clon) else np.nan, np.nan)
        return source, lat, lon, np.zeros(n, bool), 0
    # a folder or an image: EXIF GPS; only the tagged photos are encoded
    files = table["file"].to_pylist()
    from geosurge_index.exif_gps import read_gps  # the one EXIF GPS reader (malformed GPS = untagged)

    tags = [read_gps(f) for f in files]
    gps = [(g.lat, g.lon) if g.valid else None for g in tags]
    tagged = [i for i, g in enumerate(gps) if g is not None]
    if not tagged:
        return None, np.zeros(0), np.zeros(0), np.zeros(0, bool), n
    manifest = staging / f"exif-{k}.csv"
    # absolute: a manifest's relative paths are read from the manifest's own folder (staging)
    tmp = pa.table({"path": pa.array([os.path.abspath(files[i]) for i in tagged]),
                    "id": pa.array([table["id"][i].as_py() for i in tagged]),
                    "lat": pa.array([gps[i][0] for i in tagged], pa.float64()),
                    "lon": pa.array([gps[i][1] for i in tagged], pa.float64())})
    import pyarrow.csv as pacsv

    write_atomic(manifest, lambda p: pacsv.write_csv(tmp, p))
    lat = tmp["lat"].to_numpy()
    lon = tmp["lon"].to_numpy()
    return str(manifest), lat, lon, np.zeros(len(tagged), bool), n - len(tagged)


def collect_rows(index_dir: Path, sources: list[str], staging: Path, dim: int, *, truth: str | None,
                 settings=None, progress: bool = True, rejected: Counter) -> Rows:
    from geosurge_index import sources as src

    missing = [s for s in sources if not Path(s).exists()]
    if missing:
        raise UserError(f"gallery source {missing[0]} does not exist")
    preds = [s for s in sources if is_pred_dir(s)]
    if preds:
        if len(preds) != len(sources):
            raise UserError("give either PRED_DIRs (with --truth) or image sources, not both")
        if truth is None:
            raise UserError(f"{preds[0]} is a PRED_DIR: its lat/lon are predictions, not coordinates; give the "
                            "true coordinates with --truth FILE")
        ids, paths, errors, emb = _read_embeddings([Path(p) for p in preds], dim)
        lat, lon = _coordinates_from_truth(truth, ids, paths, rejected)
        return Rows(ids, lat, lon, errors, emb)

    staging.mkdir(parents=True, exist_ok=True)
    inputs, lats, lons, bads, untagged = [], [], [], [], 0
    for k, s in enumerate(sources):
        if truth is not None:
            inputs.append(s)
            continue
        table = src.read_input(s)
        new, lat, lon, bad, skipped = _source_coordinates(s, table, staging, k)
        untagged += skipped
        if new is not None:
            inputs.append(new)
            lats.append(lat)
            lons.append(lon)
            bads.append(bad)
    if not inputs:
        return Rows([], np.zeros(0), np.zeros(0), [], np.zeros((0, dim), np.float32), untagged)
    _encode(index_dir, inputs, staging / "pred", settings, progress)
    ids, paths, errors, emb = _read_embeddings([staging / "pred"], dim)
    if truth is not None:
        lat, lon = _coordinates_from_truth(truth, ids, paths, rejected)
        return Rows(ids, lat, lon, errors, emb)
    # align the coordinates (input order) with the PRED_DIR's rows by id
    order = src.enumerate_inputs(inputs)["id"].to_pylist()
    pos = {i: j for j, i in enumerate(order)}
    take = np.array([pos[i] for i in ids], dtype=np.int64)
    lat, lon, bad = (np.concatenate(a)[take] for a in (lats, lons, bads))
    rows = Rows(ids, lat, lon, errors, emb, untagged)
    for r in np.flatnonzero(bad):
        if errors[r] is None:
            errors[r] = "bad_coordinates: missing, non-numeric or out of range in the manifest"
    return rows


def _encode(index_dir: Path, inputs: list[str], out: Path, settings, progress: bool) -> None:
    """The locate pipeline over the sources, embeddings kept (resumable: a PRED_DIR)."""
    from geosurge_index.locate import LocateJob, run_job
    from geosurge_index.settings import BulkSettings

    s = settings or BulkSettings()
    job = LocateJob.from_settings(str(index_dir), inputs, str(out), s.with_(galleries="none", top_k=1),
                                  save_embeddings=True, chunk_size=STAGING_CHUNK)
    try:
        summary = run_job(job)
    except UserError as err:
        raise UserError(f"encoding the gallery's images (staged in {out}): {err}; `--restart` discards "
                        "the staged work") from None
    if not summary.get("complete"):
        raise UserError(f"encoding the gallery's images did not finish ({out}); run the command again")


# --- adding, removing, listing -------------------------------------------------------------------


def _fingerprint(ids: list[str], lat: np.ndarray, lon: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update("\n".join(ids).encode())
    h.update(np.ascontiguousarray(lat, np.float64).tobytes())
    h.update(np.ascontiguousarray(lon, np.float64).tobytes())
    return h.hexdigest()[:24]


def _reject(report: AddReport, errors: list[str | None], ids: list[str], mask: np.ndarray, message: str) -> None:
    for r in np.flatnonzero(mask):
        if errors[r] is None:
            errors[r] = message


def add_gallery(index_dir: str | os.PathLike, sources: list[str], name: str, *, truth: str | None = None,
                storage: str | None = None, pq_m: int | None = None, settings=None, restart: bool = False,
                progress: bool = True, rejected_out: str | os.PathLike | None = None) -> AddReport:
    """Add the geotagged rows of `sources` to gallery `name` of INDEX_DIR (created if absent). See
    the module doc. storage: flat | fp16 | pq for a new gallery (default flat; an existing gallery
    keeps its own); settings: `BulkSettings` for the encoding (device, batch size, workers)."""
    import faiss

    from geosurge_index.cells import assign_points
    from geosurge_index.coords import invalid_reasons
    from geosurge_index.index import IndexCells, file_entry, read_manifest, update_manifest, verify_index

    d = Path(index_dir)
    check_name(name)
    if not sources:
        raise UserError("no gallery sources given")
    with gallery_lock(d):
        manifest = verify_index(d, checksums=False)
        existing = {e.name: e for e in manifest_galleries(manifest)}.get(name)
        if existing is not None and storage is not None and storage != existing.storage:
            raise UserError(f"gallery {name!r} stores {existing.storage}; it cannot take {storage} references "
                            "(remove it first, or add to a new gallery)")
        storage = existing.storage if existing is not None else (storage or "flat")
        dim = int(manifest["dim"])
        staging = d / STAGING_DIR / f"gallery-{name}"
        if restart and staging.exists():
            shutil.rmtree(staging)
        report = AddReport(name, storage=storage)
        rows = collect_rows(d, [os.fspath(s) for s in sources], staging, dim, truth=truth, settings=settings,
                            progress=progress, rejected=report.rejected)
        n = len(rows.ids)
        report.n_inputs = n + rows.not_geotagged
        report.not_geotagged = rows.not_geotagged
        errors = list(rows.errors)
        emb = np.zeros((n, dim), np.float32)
        emb[rows.has_emb] = rows.emb
        no_coords = np.isnan(rows.lat) & np.isnan(rows.lon)
        _reject(report, errors, rows.ids, no_coords, "no_coordinates: the source gives none for this row")
        why = invalid_reasons(rows.lat, rows.lon)
        for r in np.flatnonzero((why != "") & ~no_coords):
            if errors[r] is None:
                errors[r] = f"bad_coordinates: {why[r]}"
        fine = np.array([e is None for e in errors], dtype=bool)
        cells = np.full(n, -1, np.int64)
        with IndexCells.open(d) as ic:
            part = ic.partition()
        if fine.any():
            cells[fine] = assign_points(part, rows.lat[fine], rows.lon[fine])[:, -1]
        _reject(report, errors, rows.ids, fine & (cells < 0), "no_cell: the point lies in no finest cell of the index")
        # the fingerprint of this addition: its rows with coordinates in a cell (before duplicates
        # are checked, so that the same command run again after it completed is recognised)
        fine = np.array([e is None for e in errors], dtype=bool)
        fp = _fingerprint([rows.ids[r] for r in np.flatnonzero(fine)], rows.lat[fine], rows.lon[fine])
        if existing is not None and fp in {a.get("fingerprint") for a in existing.additions}:
            report.already_added = True
            report.n_refs = existing.n_refs
            _cleanup(d, staging, manifest)
            return report
        old_meta = None
        if existing is not None:
            old_meta = pq.read_table(d / existing.meta_file, schema=META_SCHEMA)
            dup = np.asarray(pc.is_in(pa.array(rows.ids, pa.string()), old_meta["id"]).to_numpy(
                zero_copy_only=False), bool) if n else np.zeros(0, bool)
            _reject(report, errors, rows.ids, dup, "duplicate_id: already in the gallery")
        seen: set[str] = set()
        for r in range(n):  # an id twice in the sources: the first is kept
            if errors[r] is None:
                if rows.ids[r] in seen:
                    errors[r] = "duplicate_id: given twice in the sources"
                seen.add(rows.ids[r])
        keep = np.array([e is None for e in errors], dtype=bool)
        for r in np.flatnonzero(~keep):
            kind, _, msg = errors[r].partition(":")
            report.rejected[kind] += 1
            ex = report.examples.setdefault(kind, [])
            if len(ex) < EXAMPLES:
                ex.append(f"{rows.ids[r]}:{msg}")
        if rejected_out is not None:
            bad = np.flatnonzero(~keep)
            pq.write_table(pa.table({"id": pa.array([rows.ids[r] for r in bad], pa.string()),
                                     "error": pa.array([errors[r] for r in bad], pa.string())}), rejected_out)
        ids = [rows.ids[r] for r in np.flatnonzero(keep)]
        lat, lon = rows.lat[keep], rows.lon[keep]
        if not ids:
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(report.rejected.items())) or "no input rows"
            raise UserError(f"no references to add to gallery {name!r} from {', '.join(map(str, sources))} "
                            f"({kinds}{f'; {rows.not_geotagged} photos not geotagged' if rows.not_geotagged else ''})")

        # the new generation of the gallery's files
        n_finest = int(sorted(manifest["levels"], key=lambda e: e["level"])[-1]["n_cells"])
        gen = existing.generation + 1 if existing is not None else 1
        if existing is not None:
            index = faiss.read_index(str(d / existing.index_file))
            first = existing.n_refs
        else:
            index = new_ivf(n_finest, dim, storage, pq_m)
            first = 0
        add_to_ivf(index, normalise_rows(emb[keep]), cells[keep], first, progress=progress)
        meta = pa.table({"id": pa.array(ids, pa.string()), "lat": pa.array(lat, pa.float64()),
                         "lon": pa.array(lon, pa.float64()), "cell": pa.array(cells[keep], pa.int32()),
                         "source": pa.array([",".join(map(str, sources))[:1000]] * len(ids), pa.string())},
                        schema=META_SCHEMA)
        if old_meta is not None:
            meta = pa.concat_tables([old_meta, meta])
        index_file, meta_file = file_names(name, gen)
        write_atomic(d / index_file, lambda p: faiss.write_index(index, str(p)))
        write_atomic(d / meta_file, lambda p: pq.write_table(meta, p))
        n_cells = int(np.unique(meta["cell"].to_numpy()).size)
        rejected = Counter(existing.rejected if existing is not None else {})
        rejected.update(report.rejected)
        entry = GalleryEntry(
            name=name, index_file=index_file, meta_file=meta_file, generation=gen, n_refs=int(index.ntotal),
            storage=storage, dim=dim, pq_m=int(index.pq.M) if storage == "pq" else None, n_cells=n_cells,
            rejected=dict(rejected),
            additions=[*(existing.additions if existing is not None else []),
                       {"fingerprint": fp, "sources": [os.path.abspath(s) for s in sources],
                        "truth": os.path.abspath(truth) if truth else None, "n_added": len(ids),
                        "rejected": dict(report.rejected), "created_utc": now_utc()}],
        )
        new_files = {index_file: file_entry(d, index_file), meta_file: file_entry(d, meta_file)}

        def change(m: dict) -> dict:
            files = {k: v for k, v in m["files"].items()
                     if existing is None or k not in existing.files}
            files.update(new_files)
            m["files"] = files
            m["galleries"] = [g for g in m.get("galleries", []) if g.get("name") != name] + [entry.to_json()]
            return m

        manifest = update_manifest(d, change)
        report.n_added = len(ids)
        report.n_refs = entry.n_refs
        _cleanup(d, staging, manifest)
        read_manifest(d)
        return report


def _cleanup(index_dir: Path, staging: Path, manifest: dict) -> None:
    remove_stray_files(index_dir, manifest)
    if staging.exists():
        shutil.rmtree(staging)
    root = index_dir / STAGING_DIR
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def remove_gallery(index_dir: str | os.PathLike, name: str) -> GalleryEntry:
    """Drop gallery `name` from the manifest (atomically), then delete its files."""
    from geosurge_index.index import read_manifest, update_manifest

    d = Path(index_dir)
    with gallery_lock(d):
        entries = {e.name: e for e in manifest_galleries(read_manifest(d))}
        if name not in entries:
            raise UserError(f"{d} has no gallery {name!r} (galleries: {', '.join(entries) or 'none'})")
        entry = entries[name]

        def change(m: dict) -> dict:
            m["files"] = {k: v for k, v in m["files"].items() if k not in entry.files}
            m["galleries"] = [g for g in m.get("galleries", []) if g.get("name") != name]
            return m

        manifest = update_manifest(d, change)
        _cleanup(d, d / STAGING_DIR / f"gallery-{name}", manifest)
        return entry


def list_galleries(index_dir: str | os.PathLike) -> list[GalleryEntry]:
    from geosurge_index.index import read_manifest

    return manifest_galleries(read_manifest(index_dir))


def describe(entries: list[GalleryEntry], index_dir) -> str:
    if not entries:
        return f"{index_dir}: no galleries (add one with `geosurge gallery add`)"
    lines = [f"{'name':<20}{'references':>12}{'cells':>9}  {'storage':<8}{'MiB':>9}  rejected"]
    for e in entries:
        size = sum((Path(index_dir) / f).stat().st_size for f in e.files if (Path(index_dir) / f).exists())
        rej = ", ".join(f"{k} {v}" for k, v in sorted(e.rejected.items())) or "-"
        lines.append(f"{e.name:<20}{e.n_refs:>12}{e.n_cells:>9}  {e.storage:<8}{size / 2**20:>9.1f}  {rej}")
    return "\n".join(lines)


def entry_json(e: GalleryEntry) -> str:
    return json.dumps(e.to_json(), indent=1)
