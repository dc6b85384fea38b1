"""`geosurge import geoclip`: GeoCLIP (Vivanco Cepeda, Nayak & Shah, NeurIPS 2023; MIT) as an index.

What comes from where:
- the `geoclip` wheel (version `SUPPORTED_VERSION`; found on disk, never imported): its image
  head, its location encoder, its logit scale and its 100 k GPS gallery (coordinates sampled
  from MP-16);
- the CLIP tower (`openai/clip-vit-large-patch14`, or a folder): named in encoder.json, loaded
  with `from_pretrained` from local files; downloaded only with `allow_download`.

The index: cells default to a partition of the gallery's coordinates with the default thresholds
scaled to its size (`scaled_partition_settings`); a cell's embedding is GeoCLIP's location
encoder at the cell's gallery points, averaged (`cell_mode="points"`, the default: it agrees
better with GeoCLIP's own answers than the embedding of the cell's mean point, `"mean-point"`;
`geosurge bench geoclip` measures both); every level's temperature is 1 / GeoCLIP's logit scale,
so a level's softmax is GeoCLIP's own over those embeddings.

`geoclip_gallery` is the one producer of the GPS gallery (coordinates + location embeddings):
the index's cells use it, and so does the gallery of locations written into the index
(`GALLERY_NAME`, references "locations": no images; `gallery.build.add_references`). With it,
`GeoIndex.search` answers with the gallery point most similar to the image among the best
`refine_cells` finest cells: GeoCLIP's own rule (its predict's top-1) restricted to those cells,
and exactly GeoCLIP's answer when they hold that point (every cell scored and refinement over
enough cells: `geosurge bench geoclip` measures the agreement at the default and the widest
settings). The refinement rule is the default, "nearest" (the best neighbour), which is
GeoCLIP's; nothing per gallery needs recording.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geosurge_index.errors import FormatError, UserError

SUPPORTED_VERSION = "1.3.0"
INSTALL_HINT = f"pip install --no-deps geoclip=={SUPPORTED_VERSION}"
# MP-16's size, for which the default thresholds (cells.DEFAULT_TAU_*) were set
MP16_SIZE = 4_720_000
WEIGHT_FILES = {
    "image_head": "model/weights/image_encoder_mlp_weights.pth",
    "location_encoder": "model/weights/location_encoder_weights.pth",
    "logit_scale": "model/weights/logit_scale_weights.pth",
}
GALLERY_FILE = "model/gps_gallery/coordinates_100K.csv"
CELL_MODES = ("points", "mean-point")
GALLERY_NAME = "geoclip-gps"  # the gallery of GeoCLIP's GPS gallery inside the imported index
# The imported index's own default search (`index.set_search_defaults`): with the GPS gallery its
# answers equal GeoCLIP's own only when far more cells are searched and refined than the project's
# default (beam 512..16, 3 cells): `geosurge bench geoclip` measured 83.7% agreement at that
# default and 100 / 99.1 / 94.4% (cosines 0.5 / 0.3 / 0.2) with every cell scored and 200 refined.
SEARCH_DEFAULTS = {"beam": 4096, "refine_cells": 200}
PAPER = "Vivanco Cepeda, Nayak, Shah: GeoCLIP, NeurIPS 2023 (arXiv 2309.16020)"
HOMEPAGE = "https://github.com/VicenteVivan/geo-clip"


@dataclass(frozen=True)
class GeoClipPackage:
    """The installed `geoclip` wheel: its version and the files this importer reads."""

    version: str
    root: Path

    def file(self, relative: str) -> Path:
        path = self.root / relative
        if not path.is_file():
            raise FormatError(f"the geoclip {self.version} package at {self.root} has no {relative}: "
                              f"reinstall it ({INSTALL_HINT})")
        return path

    def sha256(self, relative: str) -> str:
        h = hashlib.sha256()
        with open(self.file(relative), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()


def package_version() -> str | None:
    try:
        return importlib.metadata.version("geoclip")
    except importlib.metadata.PackageNotFoundError:
        return None


def find_geoclip_package() -> GeoClipPackage:
    """The installed `geoclip` wheel, refused unless it is version `SUPPORTED_VERSION` (another
    version may ship other weights or another gallery format). Nothing is imported from it."""
    version = package_version()
    if version is None:
        raise UserError(f"the `geoclip` package is not installed; this importer reads GeoCLIP's weights "
                        f"from geoclip {SUPPORTED_VERSION}: {INSTALL_HINT} (--no-deps: its torchvision "
                        "dependency is not needed)")
    if version != SUPPORTED_VERSION:
        raise UserError(f"found geoclip {version}, but this importer supports geoclip {SUPPORTED_VERSION} "
                        f"only (its weight and gallery files are what it reads): {INSTALL_HINT}")
    spec = importlib.util.find_spec("geoclip")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"geoclip {version} is registered but its files are missing: {INSTALL_HINT}")
    return GeoClipPackage(version, Path(list(spec.submodule_search_locations)[0]))


def _load_state(pkg: GeoClipPackage, key: str):
    import torch

    path = pkg.file(WEIGHT_FILES[key])
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle / zip errors
        raise FormatError(f"{path}: not a readable weight file ({type(err).__name__}: {err})") from err


def load_location_encoder(pkg: GeoClipPackage):
    from geosurge_index.model.geoclip_encoder import GeoClipLocationEncoder

    return GeoClipLocationEncoder.from_state_dict(_load_state(pkg, "location_encoder"),
                                                  pkg.root / WEIGHT_FILES["location_encoder"])


def load_image_head(pkg: GeoClipPackage):
    from geosurge_index.model.geoclip_encoder import image_head

    head = image_head()
    try:
        head.load_state_dict(_load_state(pkg, "image_head"), strict=True)
    except RuntimeError as err:
        raise FormatError(f"{pkg.root / WEIGHT_FILES['image_head']}: not GeoCLIP's image head "
                          f"({str(err).splitlines()[0]})") from err
    return head.eval()


def logit_scale(pkg: GeoClipPackage) -> float:
    """GeoCLIP's logit scale, exp of its stored parameter: logits = scale * cosine."""
    value = _load_state(pkg, "logit_scale")
    if getattr(value, "numel", lambda: 0)() != 1:
        raise FormatError(f"{pkg.root / WEIGHT_FILES['logit_scale']}: expected a scalar")
    return float(np.exp(float(value)))


@dataclass(frozen=True)
class GeoClipGallery:
    """GeoCLIP's GPS gallery: coordinates (degrees, float64 as in its CSV) and their location
    embeddings (float32 (n, 512), unit norm). GeoCLIP's answer for an image is the gallery
    point whose embedding is most similar to the image's."""

    lat: np.ndarray
    lon: np.ndarray
    embeddings: np.ndarray
    source: str


def gallery_coordinates(pkg: GeoClipPackage) -> tuple[np.ndarray, np.ndarray]:
    from geosurge_index.coords import read_coordinates

    coords = read_coordinates(pkg.file(GALLERY_FILE), lat_column="LAT", lon_column="LON")
    return coords.lat, coords.lon


def geoclip_gallery(pkg: GeoClipPackage | None = None, *, location_encoder=None, limit: int | None = None,
                    progress: bool = False) -> GeoClipGallery:
    """The GPS gallery of the `geoclip` wheel with GeoCLIP's location embeddings. `limit`: only
    the first `limit` points (trials and tests; the whole gallery takes minutes on a CPU)."""
    pkg = pkg or find_geoclip_package()
    lat, lon = gallery_coordinates(pkg)
    if limit is not None:
        lat, lon = lat[:limit], lon[:limit]
    enc = location_encoder or load_location_encoder(pkg)
    emb = enc.embed(lat, lon, progress=progress)
    return GeoClipGallery(lat, lon, emb, f"geoclip {pkg.version} {GALLERY_FILE}")


def scaled_partition_settings(n_points: int):
    """The default partition thresholds (tau_min 50, tau_max 25000 .. 500 for MP-16's 4.72 M
    photos) in proportion to `n_points` (100 k: tau_max 530 .. 11, tau_min 1)."""
    from geosurge_index.cells import DEFAULT_TAU_MAX, DEFAULT_TAU_MIN, PartitionSettings

    f = n_points / MP16_SIZE
    tau_max = tuple(max(1, round(t * f)) for t in DEFAULT_TAU_MAX)
    return PartitionSettings(tau_min=max(1, min(round(DEFAULT_TAU_MIN * f), tau_max[-1])), tau_max=tau_max)


def cell_tables(cells, gallery: GeoClipGallery, location_encoder, mode: str = "points") -> list[np.ndarray]:
    """One (n_cells, 512) table per level. "points": the mean of the location embeddings of the
    gallery points inside each cell (cells without any: the embedding at the cell's mean point);
    "mean-point": the embedding at each cell's mean point. Rows are normalised by the export."""
    from scipy import sparse

    from geosurge_index.cells import assign_points

    if mode not in CELL_MODES:
        raise UserError(f"cell embedding mode {mode!r}: expected one of {', '.join(CELL_MODES)}")
    assigned = assign_points(cells, gallery.lat, gallery.lon) if mode == "points" else None
    tables = []
    for li, level in enumerate(cells.levels):
        n_cells = len(level.s2_id)
        if mode == "mean-point":
            tables.append(location_encoder.embed(level.mean_lat, level.mean_lon))
            continue
        a = assigned[:, li]
        inside = np.flatnonzero(a >= 0)
        member = sparse.csr_matrix((np.ones(len(inside), np.float32), (a[inside], inside)),
                                   shape=(n_cells, len(a)))
        table = np.asarray(member @ gallery.embeddings, dtype=np.float32)
        empty = np.flatnonzero(np.asarray(member.sum(axis=1)).ravel() == 0)
        if len(empty):
            table[empty] = location_encoder.embed(level.mean_lat[empty], level.mean_lon[empty])
        tables.append(table)
    return tables


@dataclass(frozen=True)
class ImportSettings:
    out: Path
    cells: Path | None = None  # None: partition GeoCLIP's gallery
    clip: str = "openai/clip-vit-large-patch14"
    allow_download: bool = False
    cell_mode: str = "points"
    overwrite: bool = False
    place_names: bool = True
    gallery_limit: int | None = None  # None: the whole gallery (trials/tests: fewer points)
    progress: bool = True
    gps_gallery: bool = True  # write GeoCLIP's GPS gallery as the index's gallery GALLERY_NAME
    gallery_storage: str = "flat"  # flat (exact cosines: GeoCLIP's answers), fp16 or pq


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and is not empty (use --overwrite to replace its index)")


def import_geoclip(settings: ImportSettings, *, gallery: GeoClipGallery | None = None) -> Path:
    """Build INDEX_DIR from GeoCLIP (see the module docstring). Every input is checked (package
    version, weight files, the CLIP tower's architecture and presence, the output folder, the
    partition) before anything is written. `gallery`: `geoclip_gallery`'s result when the caller
    has it already (it takes minutes to compute)."""
    import torch

    from geosurge_index.cells import partition, read_cells
    from geosurge_index.gallery.store import STORAGES
    from geosurge_index.index import export_index
    from geosurge_index.model.encoder_io import save_encoder
    from geosurge_index.model.geoclip_encoder import LICENCE, GeoClipImageEncoder, load_clip_vision

    out = Path(settings.out)
    if settings.cell_mode not in CELL_MODES:
        raise UserError(f"--cell-embedding {settings.cell_mode!r}: expected one of {', '.join(CELL_MODES)}")
    if settings.gallery_storage not in STORAGES:
        raise UserError(f"--gallery-storage {settings.gallery_storage!r}: expected one of {', '.join(STORAGES)}")
    pkg = find_geoclip_package()
    head = load_image_head(pkg)
    loc = load_location_encoder(pkg)
    scale = logit_scale(pkg)
    clip_source = settings.clip
    if Path(clip_source).expanduser().is_dir():
        clip_source = str(Path(clip_source).expanduser().resolve())
    # loads the tower (from local files unless allow_download): proves a query host will find it
    clip = load_clip_vision(clip_source, allow_download=settings.allow_download)
    revision = getattr(clip.config, "_commit_hash", None)
    _check_out(out, settings.overwrite)
    given_cells = read_cells(settings.cells) if settings.cells is not None else None

    say = print if settings.progress else (lambda *a, **k: None)
    say(f"geoclip {pkg.version}: location encoder, image head, logit scale {scale:.3f} "
        f"(temperature {1 / scale:.5f}); CLIP tower {clip_source}")
    if gallery is None:
        with torch.inference_mode():
            gallery = geoclip_gallery(pkg, location_encoder=loc, limit=settings.gallery_limit,
                                      progress=settings.progress)
    if given_cells is None:
        part = partition(gallery.lat, gallery.lon, scaled_partition_settings(len(gallery.lat)),
                         source=gallery.source)
        cells = part.cells
    else:
        cells = given_cells
    with torch.inference_mode():
        tables = cell_tables(cells, gallery, loc, settings.cell_mode)
    n_levels = cells.n_levels
    clip_info = {"source": clip_source, "revision": revision,
                 "licence": "see the model card (OpenAI CLIP; its code is MIT)"}
    provenance = {
        "model": "GeoCLIP", "paper": PAPER, "homepage": HOMEPAGE, "package": f"geoclip {pkg.version}",
        "weights_sha256": {k: pkg.sha256(v) for k, v in WEIGHT_FILES.items()},
        "gallery": {"file": GALLERY_FILE, "sha256": pkg.sha256(GALLERY_FILE), "points": len(gallery.lat)},
        "clip": clip_info, "logit_scale": scale,
        "cells": str(Path(settings.cells).resolve()) if settings.cells is not None
        else f"partition of the GPS gallery, thresholds x {len(gallery.lat)}/{MP16_SIZE}",
        "cell_embedding": settings.cell_mode,
    }
    encoder = GeoClipImageEncoder(clip, head, clip_source=clip_source, clip_revision=revision,
                                  provenance={"licence": LICENCE, **provenance})
    out = export_index(
        tables, [1.0 / scale] * n_levels, cells, out,
        encoder_writer=lambda d: save_encoder(encoder, d),
        tau_max=list(cells.tau_max) if len(cells.tau_max) == n_levels else None,
        source=f"geoclip {pkg.version} + {clip_source}", place_names=settings.place_names,
        overwrite=settings.overwrite,
        model={"kind": "geoclip", "licence": LICENCE, "provenance": provenance},
    )
    if settings.gps_gallery:
        report = add_gps_gallery(out, gallery, storage=settings.gallery_storage, progress=settings.progress)
        for line in report.lines():
            say(line)
        from geosurge_index.index import set_search_defaults

        set_search_defaults(out, **SEARCH_DEFAULTS)  # searches default to GeoCLIP's own answers
        say(f"default search of this index: beam {SEARCH_DEFAULTS['beam']}, refine "
            f"{SEARCH_DEFAULTS['refine_cells']} cells (--beam / --refine-cells override it)")
    return out


def gallery_ids(n: int) -> list[str]:
    """The references' ids: `gps-` and the row of the point in GeoCLIP's coordinates file."""
    return [f"gps-{i:06d}" for i in range(n)]


def add_gps_gallery(index_dir, gallery: GeoClipGallery, *, name: str = GALLERY_NAME, storage: str = "flat",
                    progress: bool = False):
    """GeoCLIP's GPS gallery as gallery `name` of INDEX_DIR: one reference per point (id
    `gps-ROW`), its coordinates and its location embedding -> `gallery.build.AddReport`."""
    from geosurge_index.gallery.build import add_references

    return add_references(index_dir, name, gallery_ids(len(gallery.lat)), gallery.lat, gallery.lon,
                          gallery.embeddings, source=gallery.source, references="locations", storage=storage,
                          progress=progress)
