"""`geosurge bench geoclip`: an index imported from GeoCLIP against GeoCLIP's own `predict`.

1. Agreement (no images): how often the index's point is GeoCLIP's own answer (the gallery point
   most similar to the image: its predict's top-1), for both ways of embedding a cell (`points`:
   the mean of its gallery points' location embeddings; `mean-point`: the embedding at its mean
   point), at four settings: the cell's mean point (no gallery; with how often GeoCLIP's point
   lies in the best cell and in the top-k), the default (beam search, the GPS gallery refining
   inside the best --refine-cells cells), the widest (every cell scored, refinement inside the
   best --wide-cells cells) and every finest cell (GeoCLIP's rule over its whole gallery: 100 %
   up to ties, a check). Real image embeddings need the real CLIP weights, which this machine
   cannot download, so the queries are proxies: the location embeddings of MP-16-like points
   (independent of the gallery) mixed with a random unit vector to a given cosine (1.0 = the
   location embedding itself).
2. Speed on images: images/s of `geosurge locate` on an imported index (with its GPS gallery,
   default settings) against GeoCLIP's `predict` as shipped (one image per call, re-encoding its
   100 k gallery each time), on the same synthetic JPEGs, with a config-built full-size CLIP
   ViT-L/14 (random weights) shared by both; the share of locate's time spent in the search and
   the refinement (re-timed on the same embeddings); and how many of locate's points are
   GeoCLIP's at the default and the widest settings (random weights: every image looks alike, so
   few distinct answers; the proxies above are the agreement study).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DESCRIPTION = __doc__.split("\n", 2)[2]
LOCATE_BEAM = 4096  # `geosurge locate --beam 4096`: the widest setting a locate run can ask for
SAME_POINT_KM = 0.01  # GeoCLIP's point: its gallery holds float32 degrees (about 1 m), ours float64


@dataclass(frozen=True)
class GeoClipBench:
    queries: int = 1000  # proxy queries for the agreement study, 0 to skip it
    cosines: tuple[float, ...] = (0.5, 0.3, 0.2)
    images: int = 2  # JPEGs through both pipelines (GeoCLIP: ~1 gallery encoding each), 0 to skip
    width: int = 640
    height: int = 480
    top_k: int = 10
    refine_cells: int = 3  # the default setting's refinement (InferenceSettings.refine_cells)
    wide_cells: tuple[int, ...] = (50, 200)  # widest settings: every cell scored, refinement inside this many
    work: Path | None = None  # keeps the CLIP folder, gallery embeddings, index between runs
    gallery_limit: int | None = None  # None: the whole gallery (fewer: a quick trial)
    seed: int = 0
    json_out: Path | None = None
    modes: tuple[str, ...] = field(default=("points", "mean-point"))


def proxy_queries(location_encoder, n: int, cosine: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lat, lon, queries): MP-16-like points and unit vectors at `cosine` to their location
    embeddings (the rest a random direction orthogonal to it)."""
    from geosurge_index.sampler import sample_mp16_like

    lat, lon = sample_mp16_like(n, seed=seed + 1)
    u = location_encoder.embed(lat, lon)
    r = np.random.default_rng(seed).standard_normal(u.shape).astype(np.float32)
    r -= np.sum(r * u, axis=1, keepdims=True) * u
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    q = cosine * u + np.sqrt(max(0.0, 1 - cosine**2)) * r
    return lat, lon, (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def geoclip_top1(queries: np.ndarray, gallery_emb: np.ndarray, chunk: int = 256) -> np.ndarray:
    """GeoCLIP's answer: the index of the gallery point most similar to each query."""
    return np.concatenate([np.argmax(queries[i:i + chunk] @ gallery_emb.T, axis=1)
                           for i in range(0, len(queries), chunk)])


def agreement(result, finest_of_gallery: np.ndarray, gallery, top1: np.ndarray) -> dict:
    """How the index's answers compare with GeoCLIP's top-1 gallery points."""
    from geosurge_index.metrics import haversine_km

    d = haversine_km(result.lat, result.lon, gallery.lat[top1], gallery.lon[top1])
    cell = finest_of_gallery[top1]
    return {
        "same_point": float(np.mean(d <= SAME_POINT_KM)),
        "same_cell": float(np.mean(result.topk_cells[:, 0] == cell)),
        "in_topk_cells": float(np.mean(np.any(result.topk_cells == cell[:, None], axis=1))),
        "distance_km": {"median": float(np.median(d)), "p75": float(np.percentile(d, 75)),
                        "p90": float(np.percentile(d, 90)), "mean": float(d.mean())},
        "within_km": {str(t): float(np.mean(d <= t)) for t in (1, 25, 200, 750, 2500)},
    }


def _index_for(cells, tables, temperature: float):
    from geosurge_index.index import GeoIndex
    from geosurge_index.search import CellTree

    tree = CellTree.from_parents([lv.parent_index for lv in cells.levels], [lv.mean_lat for lv in cells.levels],
                                 [lv.mean_lon for lv in cells.levels], [lv.s2_token for lv in cells.levels])
    return GeoIndex.from_arrays(tables, [temperature] * len(tables), tree)


def _gallery(pkg, loc, work: Path | None, limit: int | None):
    """The gallery with its embeddings, cached in `work` (keyed by the package's files)."""
    from geosurge_index.importers.geoclip import GALLERY_FILE, WEIGHT_FILES, GeoClipGallery, geoclip_gallery

    key = (pkg.sha256(GALLERY_FILE)[:12] + pkg.sha256(WEIGHT_FILES["location_encoder"])[:12] + f"-{limit}")
    cache = None if work is None else work / f"gallery-{key}.npz"
    if cache is not None and cache.is_file():
        z = np.load(cache)
        return GeoClipGallery(z["lat"], z["lon"], z["emb"], str(z["source"]))
    g = geoclip_gallery(pkg, location_encoder=loc, limit=limit, progress=True)
    if cache is not None:
        work.mkdir(parents=True, exist_ok=True)
        np.savez(cache, lat=g.lat, lon=g.lon, emb=g.embeddings, source=g.source)
    return g


def settings_for(settings: GeoClipBench, n_finest: int, full: bool = True) -> list[tuple[str, dict, int]]:
    """(label, search kwargs, refine cells) of the settings compared: the cell's mean point, the
    default, then (`full`) `geosurge locate`'s widest (--beam LOCATE_BEAM: every cell at this
    gallery's size), the widest (every cell scored, exactly) and every finest cell refined."""
    from geosurge_index.search import DEFAULT_BEAM

    # the project's default search, named explicitly: the imported index's own default is the wide one
    rows = [("cell mean point", {"beam": DEFAULT_BEAM}, 0),
            (f"project default (beam, refine {settings.refine_cells})", {"beam": DEFAULT_BEAM}, settings.refine_cells)]
    if full:
        rows.append((f"beam {LOCATE_BEAM}, refine {settings.wide_cells[-1]}", {"beam": LOCATE_BEAM},
                     settings.wide_cells[-1]))
    rows += [(f"widest (exhaustive, refine {w})", {"exhaustive": True}, w) for w in settings.wide_cells]
    if full:
        rows.append(("every cell (GeoCLIP's rule)", {"exhaustive": True}, n_finest))
    return rows


def run_agreement(settings: GeoClipBench, pkg, loc, gallery, say) -> dict:
    import torch

    from geosurge_index.cells import assign_points, partition
    from geosurge_index.gallery.refine import RefineSettings
    from geosurge_index.gallery.store import Gallery
    from geosurge_index.importers.geoclip import (
        GALLERY_NAME,
        cell_tables,
        gallery_ids,
        logit_scale,
        scaled_partition_settings,
    )

    scale = logit_scale(pkg)
    cells = partition(gallery.lat, gallery.lon, scaled_partition_settings(len(gallery.lat))).cells
    finest = assign_points(cells, gallery.lat, gallery.lon)[:, -1]
    n_finest = len(cells.levels[-1].s2_id)
    say(f"cells: partition of {len(gallery.lat):,} gallery points, tau_max {list(cells.tau_max)}, "
        f"tau_min {cells.tau_min}: {[len(lv.s2_id) for lv in cells.levels]} cells per level; "
        f"temperature 1/{scale:.3f}")
    out: dict = {"cells_per_level": [len(lv.s2_id) for lv in cells.levels]}
    gps = Gallery.from_arrays(GALLERY_NAME, gallery_ids(len(gallery.lat)), gallery.lat, gallery.lon,
                              gallery.embeddings, finest, n_finest, references="locations")
    say(f"  {'cosine':<7}{'cells by':<11}{'setting':<38}{'point':>7}{'cell':>7}{'top-' + str(settings.top_k):>8}"
        f"{'median km':>11}{'queries/s':>11}")
    with torch.inference_mode():
        indexes = {m: _index_for(cells, cell_tables(cells, gallery, loc, m), 1 / scale) for m in settings.modes}
        for index in indexes.values():
            index.add_gallery(gps)
        for cos in settings.cosines:
            _, _, q = proxy_queries(loc, settings.queries, cos, settings.seed)
            top1 = geoclip_top1(q, gallery.embeddings)
            for mode, index in indexes.items():
                for label, kwargs, refine_cells in settings_for(settings, n_finest, mode == settings.modes[0]):
                    index.use_galleries(None, RefineSettings(cells=refine_cells))
                    t = time.perf_counter()
                    res = index.search(q, top_k=settings.top_k, **kwargs)
                    qps = len(q) / (time.perf_counter() - t)
                    a = agreement(res, finest, gallery, top1)
                    a["queries_per_s"] = qps
                    out[f"cos={cos} {mode} {label}"] = a
                    say(f"  {cos:<7.1f}{mode:<11}{label:<38}{a['same_point']:>7.1%}{a['same_cell']:>7.1%}"
                        f"{a['in_topk_cells']:>8.1%}{a['distance_km']['median']:>11.1f}{qps:>11,.0f}")
    return out


def run_speed(settings: GeoClipBench, pkg, gallery, work: Path, say) -> dict:
    import pyarrow.parquet as pq
    import torch
    from geoclip import GeoCLIP

    from geosurge_index.gallery.refine import RefineSettings
    from geosurge_index.importers.geoclip import ImportSettings, add_gps_gallery, import_geoclip
    from geosurge_index.index import GeoIndex, read_manifest
    from geosurge_index.locate.job import LocateJob
    from geosurge_index.locate.runner import run_job
    from geosurge_index.metrics import haversine_km
    from geosurge_index.synthetic import write_synthetic_jpegs

    torch.manual_seed(settings.seed)
    say("building GeoCLIP as shipped with a config-built full-size CLIP ViT-L/14 (random weights) ...")
    geo = GeoCLIP(from_pretrained=True, clip_pretrained=False).eval()
    if settings.gallery_limit is not None:
        geo.gps_gallery = geo.gps_gallery[: settings.gallery_limit]
    clip_dir = work / f"clip-vit-large-patch14-random-seed{settings.seed}"
    if not (clip_dir / "config.json").is_file():
        geo.image_encoder.CLIP.save_pretrained(clip_dir)
    index_dir = work / f"index-seed{settings.seed}-{settings.gallery_limit}"
    t = time.perf_counter()
    if not (index_dir / "manifest.json").is_file():
        import_geoclip(ImportSettings(out=index_dir, clip=str(clip_dir), place_names=False, overwrite=True,
                                      gallery_limit=settings.gallery_limit), gallery=gallery)
    elif not read_manifest(index_dir).get("galleries"):  # an index kept from before the GPS gallery
        add_gps_gallery(index_dir, gallery, progress=True)
    import_s = time.perf_counter() - t
    paths = write_synthetic_jpegs(work / "images", settings.images, settings.width, settings.height)

    say(f"geosurge locate on {settings.images} images (GPS gallery, refine {settings.refine_cells} cells) ...")
    out_dir = work / f"preds-{time.time_ns()}"
    t = time.perf_counter()
    # workers=0: decoding in this process, so torch keeps every core (as GeoCLIP's predict has
    # them); draft 0: full decodes, as GeoCLIP reads images
    summary = run_job(LocateJob(index_dir=str(index_dir), inputs=[str(work / "images")], out_dir=str(out_dir),
                                device="cpu", save_embeddings=True, draft_size=0, workers=0,
                                refine_cells=settings.refine_cells))
    ours_s = time.perf_counter() - t
    table = pq.read_table(out_dir).sort_by("id")
    emb = np.asarray(table["embedding"].to_pylist(), np.float32)
    index = GeoIndex.open(index_dir, device="cpu", encoder=False)
    index.use_galleries("none")
    index.search(emb[:1], top_k=5)  # warm-up
    t = time.perf_counter()
    index.search(emb, top_k=5)
    search_s = time.perf_counter() - t
    index.use_galleries(None, RefineSettings(cells=settings.refine_cells))
    index.search(emb[:1], top_k=5)
    t = time.perf_counter()
    index.search(emb, top_k=5)
    search_refine_s = time.perf_counter() - t
    index.use_galleries(None, RefineSettings(cells=settings.wide_cells[-1]))
    wide = index.search(emb, top_k=5, exhaustive=True)

    say(f"GeoCLIP predict() on the same {settings.images} images ...")
    theirs = []
    t = time.perf_counter()
    for p in sorted(paths):
        gps, _ = geo.predict(str(p), top_k=1)
        theirs.append(gps[0].numpy())
    geo_s = time.perf_counter() - t
    theirs = np.asarray(theirs, np.float64)
    d = haversine_km(table["lat"].to_numpy(), table["lon"].to_numpy(), theirs[:, 0], theirs[:, 1])
    d_wide = haversine_km(wide.lat, wide.lon, theirs[:, 0], theirs[:, 1])
    return {"import_s": import_s, "locate_wall_s": ours_s, "locate_images_per_s": settings.images / ours_s,
            "locate_summary_images_per_s": summary["this_run"]["images_per_s"],
            "search_s": search_s, "search_refine_s": search_refine_s, "search_share": search_s / ours_s,
            "search_refine_share": search_refine_s / ours_s,
            "geoclip_predict_s": geo_s, "geoclip_images_per_s": settings.images / geo_s,
            "speedup": geo_s / ours_s, "distance_to_geoclip_km": d.tolist(),
            "same_point_default": float(np.mean(d <= SAME_POINT_KM)),
            "same_point_widest": float(np.mean(d_wide <= SAME_POINT_KM)),
            "distinct_geoclip_points": int(len({tuple(r) for r in theirs.round(5).tolist()}))}


def run_geoclip_bench(settings: GeoClipBench) -> dict:
    import json
    import tempfile

    from geosurge_index.importers.geoclip import find_geoclip_package, load_location_encoder
    from geosurge_index.machine import describe_machine, machine_info

    say = lambda s: print(s, flush=True)  # noqa: E731
    info = machine_info()
    say(f"machine: {describe_machine(info)}")
    pkg = find_geoclip_package()
    loc = load_location_encoder(pkg)
    figures: dict = {"machine": info, "geoclip": pkg.version}
    with tempfile.TemporaryDirectory(prefix="geosurge-bench-geoclip-") as tmp:
        work = Path(settings.work) if settings.work is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        gallery = _gallery(pkg, loc, work, settings.gallery_limit)
        if settings.queries > 0:
            say(f"agreement with GeoCLIP's own answer on {settings.queries} proxy queries: point = the "
                "index's point is GeoCLIP's; cell / top-k = GeoCLIP's point lies in the best cell / in the "
                f"top-{settings.top_k}:")
            figures["agreement"] = run_agreement(settings, pkg, loc, gallery, say)
        if settings.images > 0:
            s = run_speed(settings, pkg, gallery, work, say)
            figures["speed"] = s
            say(f"geosurge locate: {s['locate_images_per_s']:.3f} images/s ({s['locate_wall_s']:.1f} s for "
                f"{settings.images}, model load included; {s['locate_summary_images_per_s']:.3f} images/s after "
                f"load); search + refinement {s['search_refine_share']:.2%} of it (search alone "
                f"{s['search_share']:.2%})")
            say(f"GeoCLIP predict(): {s['geoclip_images_per_s']:.4f} images/s -> geosurge locate is "
                f"{s['speedup']:.1f}x faster; import took {s['import_s']:.0f} s (once per index)")
            say(f"GeoCLIP's own point: {s['same_point_default']:.0%} of the images at the default setting, "
                f"{s['same_point_widest']:.0%} at the widest (random CLIP weights: "
                f"{s['distinct_geoclip_points']} distinct GeoCLIP answers over {settings.images} images)")
    if settings.json_out:
        Path(settings.json_out).write_text(json.dumps(figures, indent=2, default=str) + "\n")
    return figures
