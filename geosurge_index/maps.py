"""Pictures and GIS files: world maps (PNG) of cells and predictions, GeoJSON of both.

Maps are equirectangular (lon/lat) with Natural Earth 1:110m country outlines shipped in
`geosurge_index/data` (public domain; no download at run time), drawn with matplotlib's Agg
backend. Cell outlines come from their S2 vertices (`s2.cell_vertices`); S2 edges are
geodesics, so large cells get extra points along each edge, and a cell that crosses the
antimeridian is cut in two at +-180 degrees (also in GeoJSON, as RFC 7946 asks).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from geosurge_index import s2
from geosurge_index.metrics import haversine_km

COUNTRIES_FILE = Path(__file__).parent / "data" / "ne_110m_countries.geojson"
# Error buckets of prediction lines: the evaluation thresholds.
ERROR_BUCKETS = ((25.0, "#1a9850", "<= 25 km"), (200.0, "#91cf60", "25-200 km"), (750.0, "#fee08b", "200-750 km"),
                 (2500.0, "#fc8d59", "750-2500 km"), (np.inf, "#d73027", "> 2500 km"))


# --- geometry ---------------------------------------------------------------------------------

@functools.cache
def country_polygons() -> tuple[np.ndarray, ...]:
    """Exterior and hole rings (k, 2) lon/lat of the Natural Earth 1:110m countries."""
    data = json.loads(COUNTRIES_FILE.read_text())
    rings = []
    for feature in data["features"]:
        for polygon in feature["geometry"]["coordinates"]:
            rings.extend(np.asarray(ring, dtype=np.float64) for ring in polygon)
    return tuple(rings)


def _edge_points(s2_levels: np.ndarray) -> np.ndarray:
    """Points per cell edge: big cells bend visibly in lon/lat, small ones do not."""
    return np.clip(2 ** np.clip(8 - s2_levels.astype(np.int64), 0, 6), 1, 32)


def cell_rings(s2_ids) -> list[list[np.ndarray]]:
    """Per cell, its outline as one or two closed lon/lat rings (k, 2), cut at the antimeridian."""
    ids = np.asarray(s2_ids, dtype=np.uint64).ravel()
    out: list[list[np.ndarray]] = [[] for _ in range(len(ids))]
    if len(ids) == 0:
        return out
    vlat, vlon = s2.cell_vertices(ids)
    xyz = s2.latlon_to_xyz(vlat, vlon)  # (n, 4, 3)
    per_edge = _edge_points(s2.levels(ids))
    for m in np.unique(per_edge):
        sel = np.flatnonzero(per_edge == m)
        a, b = xyz[sel], np.roll(xyz[sel], -1, axis=1)
        t = np.arange(m, dtype=np.float64)[None, None, :, None] / m
        pts = (1 - t) * a[:, :, None, :] + t * b[:, :, None, :]  # along each edge's chord
        lat, lon = s2.xyz_to_latlon(pts.reshape(len(sel), -1, 3))  # projecting back: on the geodesic
        # the common case in bulk: rings that neither cross +-180 nor go round a pole
        simple = (lon.max(axis=1) - lon.min(axis=1)) < 180
        closed = np.concatenate([lon, lon[:, :1]], axis=1), np.concatenate([lat, lat[:, :1]], axis=1)
        for k in np.flatnonzero(simple):
            out[sel[k]] = [np.column_stack([closed[0][k], closed[1][k]])]
        for k in np.flatnonzero(~simple):
            out[sel[k]] = _split_ring(lon[k], lat[k])
    return out


def _split_ring(lon: np.ndarray, lat: np.ndarray) -> list[np.ndarray]:
    """Unwrap a spherical ring's longitudes; close it through a pole it winds around; cut at +-180."""
    lon = np.rad2deg(np.unwrap(np.deg2rad(lon)))
    winding = lon[-1] + _wrap(lon[0] - lon[-1]) - lon[0]
    if abs(winding) > 180:  # the ring goes round a pole: close it along the pole's latitude line
        pole = 90.0 if lat.mean() > 0 else -90.0
        back = lon[0] + winding
        ring = np.column_stack([np.r_[lon, back, back, lon[0]], np.r_[lat, lat[0], pole, pole]])
    else:
        ring = np.column_stack([lon, lat])
    shift = 360.0 * np.floor((ring[:, 0].min() + 180.0) / 360.0)  # bring the west end into [-180, 180)
    ring[:, 0] -= shift
    pieces = []
    for offset in (0.0, -360.0):
        piece = _clip_x(ring + [offset, 0.0], -180.0, keep_greater=True)
        piece = _clip_x(piece, 180.0, keep_greater=False)
        if len(piece) >= 3:
            pieces.append(np.vstack([piece, piece[:1]]))
    return pieces


def _wrap(d):
    return (d + 180.0) % 360.0 - 180.0


def _clip_x(ring: np.ndarray, x0: float, keep_greater: bool) -> np.ndarray:
    """Sutherland-Hodgman clipping of a ring (k, 2) by the half-plane x >= x0 (or x <= x0)."""
    if len(ring) == 0:
        return ring
    inside = ring[:, 0] >= x0 if keep_greater else ring[:, 0] <= x0
    if inside.all():
        return ring
    if not inside.any():
        return ring[:0]
    out = []
    prev, prev_in = ring[-1], inside[-1]
    for cur, cur_in in zip(ring, inside, strict=True):
        if cur_in != prev_in:
            t = (x0 - prev[0]) / (cur[0] - prev[0])
            out.append([x0, prev[1] + t * (cur[1] - prev[1])])
        if cur_in:
            out.append(cur)
        prev, prev_in = cur, cur_in
    return np.asarray(out, dtype=np.float64)


def geodesic_paths(lat1, lon1, lat2, lon2, n: int = 24) -> list[np.ndarray]:
    """Great-circle paths (k, 2) lon/lat from point 1 to point 2, cut where they cross +-180."""
    a = s2.latlon_to_xyz(lat1, lon1)
    b = s2.latlon_to_xyz(lat2, lon2)
    t = np.linspace(0.0, 1.0, n)[None, :, None]
    pts = (1 - t) * a[:, None, :] + t * b[:, None, :]
    # antipodal pairs have no unique path; the chord through the centre would be degenerate
    pts[np.linalg.norm(pts, axis=-1) < 1e-9] = [0.0, 0.0, 1.0]
    lat, lon = s2.xyz_to_latlon(pts)
    paths = []
    jumps = np.abs(np.diff(lon, axis=1)) > 180
    for k in range(len(lat)):
        cut = np.flatnonzero(jumps[k]) + 1
        for seg_lon, seg_lat in zip(np.split(lon[k], cut), np.split(lat[k], cut), strict=True):
            if len(seg_lon) >= 2:
                paths.append(np.column_stack([seg_lon, seg_lat]))
    return paths


# --- PNG --------------------------------------------------------------------------------------

def _figure(title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    fig, ax = plt.subplots(figsize=(14, 7.6), dpi=150)
    ax.set_facecolor("#dbe9f4")  # sea
    ax.add_collection(PolyCollection(list(country_polygons()), facecolors="#f2efe6", edgecolors="#8c8c8c",
                                     linewidths=0.3, zorder=1))
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_aspect("equal")
    ax.set_xticks(range(-180, 181, 60))
    ax.set_yticks(range(-90, 91, 30))
    ax.tick_params(labelsize=7)
    ax.grid(color="white", linewidth=0.4, zorder=0)
    ax.set_title(title, fontsize=11)
    return fig, ax


def plot_cells(cells: pa.Table, path: str | os.PathLike, *, title: str = "") -> Path:
    """PNG of cells coloured by training density, n_samples / area_km2 (log scale)."""
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import LogNorm

    ids = cells.column("s2_id").to_numpy()
    density = cells.column("n_samples").to_numpy().astype(np.float64) / cells.column("area_km2").to_numpy()
    polys, values = [], []
    for rings, d in zip(cell_rings(ids), density, strict=True):
        polys.extend(rings)
        values.extend([d] * len(rings))
    fig, ax = _figure(title or f"{len(ids):,} cells, coloured by training density")
    positive = density[density > 0]
    # 1st-99th percentile: a few cells of one landmark's duplicates (tiny S2 cells) would
    # otherwise stretch the scale over ten decades
    lo, hi = (np.percentile(positive, [1, 99]) if len(positive) else (1e-6, 1.0))
    norm = LogNorm(vmin=lo, vmax=max(hi, lo * 10))
    many = len(polys) > 3000  # outlines of thousands of small cells would paint them black
    coll = PolyCollection(polys, array=np.maximum(np.asarray(values), 1e-12), cmap="magma_r", norm=norm,
                          edgecolors="#333333", linewidths=0.0 if many else 0.15, alpha=0.85, zorder=2)
    ax.add_collection(coll)
    # borders again on top, unfilled, so that they show through dense cells
    ax.add_collection(PolyCollection(list(country_polygons()), facecolors="none", edgecolors="#555555",
                                     linewidths=0.25, alpha=0.6, zorder=3))
    fig.colorbar(coll, ax=ax, shrink=0.7, pad=0.01, extend="both",
                 label="training samples per km$^2$ (log scale)")
    return _save(fig, path)


def plot_predictions(
    lat, lon, path: str | os.PathLike, *, true_lat=None, true_lon=None, title: str = "",
    max_points: int = 100_000, seed: int = 0,
) -> Path:
    """PNG of predicted points, or of lines from each true point to its prediction coloured by error.

    More than `max_points` points: a uniform random sample of them is drawn (the title says so).
    """
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    lat, lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
    with_truth = true_lat is not None
    ok = np.isfinite(lat) & np.isfinite(lon)
    if with_truth:
        true_lat, true_lon = np.asarray(true_lat, dtype=np.float64), np.asarray(true_lon, dtype=np.float64)
        ok &= np.isfinite(true_lat) & np.isfinite(true_lon)
    rows = np.flatnonzero(ok)
    n_all = len(rows)
    if n_all > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_points, replace=False))
    shown = f"{len(rows):,} of {n_all:,}" if len(rows) < n_all else f"{n_all:,}"
    fig, ax = _figure(title or (f"{shown} predictions: lines from the true point, coloured by error"
                                if with_truth else f"{shown} predicted points"))
    if not with_truth:
        ax.scatter(lon[rows], lat[rows], s=4 if len(rows) < 5000 else 1, c="#c51b7d", alpha=0.6,
                   linewidths=0, zorder=3)
        return _save(fig, path)
    d = haversine_km(lat[rows], lon[rows], true_lat[rows], true_lon[rows])
    bucket = np.searchsorted([hi for hi, _, _ in ERROR_BUCKETS], d, side="left")  # d <= hi
    handles = []
    # worst first, so that the short lines of good predictions stay visible on top
    for b in range(len(ERROR_BUCKETS) - 1, -1, -1):
        sel = rows[bucket == b]
        if len(sel):
            paths = geodesic_paths(true_lat[sel], true_lon[sel], lat[sel], lon[sel], n=64)
            ax.add_collection(LineCollection(paths, colors=ERROR_BUCKETS[b][1], linewidths=0.5,
                                             alpha=0.6, zorder=3 + (len(ERROR_BUCKETS) - b) / 10))
    ax.scatter(true_lon[rows], true_lat[rows], s=3, c="black", linewidths=0, zorder=4)
    ax.scatter(lon[rows], lat[rows], s=5, c=[ERROR_BUCKETS[b][1] for b in bucket], edgecolors="#333333",
               linewidths=0.2, zorder=5)
    for b, (_, colour, label) in enumerate(ERROR_BUCKETS):
        pct = 100.0 * float((bucket == b).mean()) if len(rows) else 0.0
        handles.append(Line2D([], [], color=colour, lw=2, marker="o", markersize=4, label=f"{label}: {pct:.1f}%"))
    handles.append(Line2D([], [], color="black", marker=".", lw=0, label="true point"))
    ax.legend(handles=handles, loc="lower left", fontsize=8, title="error (dot: prediction)", title_fontsize=8)
    return _save(fig, path)


def _save(fig, path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


# --- GeoJSON ----------------------------------------------------------------------------------

def _jsonable(v):
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


def _round(ring: np.ndarray) -> list:
    return np.round(ring, 6).tolist()


def cells_geojson(cells: pa.Table, path: str | os.PathLike) -> Path:
    """GeoJSON FeatureCollection: one (Multi)Polygon per cell, with every column as a property
    (s2_id as a string: JavaScript numbers cannot hold 64-bit ids) and `density_per_km2`."""
    ids = cells.column("s2_id").to_numpy()
    props = {c: cells.column(c).to_pylist() for c in cells.column_names if c != "s2_id"}
    props["s2_id"] = [str(int(i)) for i in ids]
    if "n_samples" in props and "area_km2" in props:
        props["density_per_km2"] = [n / a if a else None for n, a in zip(props["n_samples"], props["area_km2"], strict=True)]
    path = Path(path)
    with open(path, "w") as f:
        f.write('{"type":"FeatureCollection","features":[\n')
        for i, rings in enumerate(cell_rings(ids)):
            if len(rings) == 1:
                geom = {"type": "Polygon", "coordinates": [_round(rings[0])]}
            else:
                geom = {"type": "MultiPolygon", "coordinates": [[_round(r)] for r in rings]}
            feature = {"type": "Feature", "geometry": geom,
                       "properties": {k: _jsonable(v[i]) for k, v in props.items()}}
            f.write(("," if i else "") + json.dumps(feature, separators=(",", ":")) + "\n")
        f.write("]}\n")
    return path


def predictions_geojson(table: pa.Table, path: str | os.PathLike) -> Path:
    """GeoJSON FeatureCollection: one Point per prediction with a point (error rows have none),
    every scalar column as a property."""
    keep = [c for c in table.column_names
            if c not in ("lat", "lon") and not pa.types.is_list(table.schema.field(c).type)]
    lat = table.column("lat").to_numpy(zero_copy_only=False).astype(np.float64)
    lon = table.column("lon").to_numpy(zero_copy_only=False).astype(np.float64)
    props = {c: table.column(c).to_pylist() for c in keep}
    path = Path(path)
    with open(path, "w") as f:
        f.write('{"type":"FeatureCollection","features":[\n')
        first = True
        for i in np.flatnonzero(np.isfinite(lat) & np.isfinite(lon)):
            feature = {"type": "Feature",
                       "geometry": {"type": "Point", "coordinates": [round(float(lon[i]), 6), round(float(lat[i]), 6)]},
                       "properties": {k: _jsonable(v[i]) for k, v in props.items()}}
            f.write(("" if first else ",") + json.dumps(feature, separators=(",", ":"), default=str) + "\n")
            first = False
        f.write("]}\n")
    return path


# --- reading what to draw ---------------------------------------------------------------------

def read_cells_table(src: str | os.PathLike, level: int | None = None) -> pa.Table:
    """Cells of an INDEX_DIR (with place names) or a CELLS_DIR / checkpoint (cells.parquet),
    one level (default: the finest)."""
    import pyarrow.compute as pc

    from geosurge_index.errors import UserError
    from geosurge_index.index import CELLS_DB, IndexCells

    d = Path(src)
    if (d / CELLS_DB).is_file():
        with IndexCells.open(d) as cells:  # FormatError naming a damaged cells.duckdb
            table = cells.table()
    else:
        from geosurge_index.cells import cells_to_arrow, read_cells

        table = cells_to_arrow(read_cells(d))  # FormatError names what is missing
    levels = sorted(set(table.column("level").to_pylist()))
    if not levels:
        raise UserError(f"{d}: the partition has no cells")
    level = levels[-1] if level is None else level
    if level not in levels:
        raise UserError(f"--level {level}: {d} has levels {levels[0]}..{levels[-1]}")
    return table.filter(pc.equal(table.column("level"), level))


def read_prediction_points(pred_dir, truth=None) -> pa.Table:
    """id, path, lat, lon, probability, error of every prediction row; with a truth
    (`benchmarks.read_truth`), also true_lat, true_lon and error_km of the matched ones."""
    from geosurge_index import sql

    con = sql.connect(predictions=pred_dir, truth=truth)
    try:
        if truth is None:
            q = "SELECT id, path, lat, lon, probability, error FROM predictions"
        else:
            q = """SELECT p.id, p.path, p.lat, p.lon, p.probability, p.error,
                          t.lat AS true_lat, t.lon AS true_lon,
                          haversine_km(p.lat, p.lon, t.lat, t.lon) AS error_km
                   FROM predictions p LEFT JOIN truth t USING (id)"""
        return con.sql(q).to_arrow_table()
    finally:
        con.close()
