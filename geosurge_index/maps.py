"""Pictures and GIS files: world maps (PNG) of cells and predictions, GeoJSON of both.

Maps are equirectangular (lon/lat) with Natural Earth 1:110m country outlines shipped in
`geosurge_index/data` (public domain; no download at run time), drawn with matplotlib's Agg
backend. Cell outlines are `cell_polygons.cell_polygons`: S2 edges followed as geodesics, valid
planar polygons with counter-clockwise exteriors, cut in two where a cell crosses the
antimeridian, polar cells as one polygon up to the pole (also in GeoJSON, as RFC 7946 asks).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from geosurge_index import s2
from geosurge_index.cell_polygons import cell_polygons
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


def cell_rings(s2_ids) -> list[list[np.ndarray]]:
    """Per cell, its outline as one or two closed counter-clockwise lon/lat rings (k, 2), cut at
    the antimeridian, valid as planar polygons (`cell_polygons.cell_polygons`)."""
    return cell_polygons(s2_ids)


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


def _geometry(rings: list[np.ndarray]) -> dict | None:
    if not rings:
        return None
    if len(rings) == 1:
        return {"type": "Polygon", "coordinates": [_round(rings[0])]}
    return {"type": "MultiPolygon", "coordinates": [[_round(r)] for r in rings]}


def _write_features(path: Path, features) -> Path:
    """A FeatureCollection, one feature per line (streamed: no list of every feature in memory)."""
    with open(path, "w") as f:
        f.write('{"type":"FeatureCollection","features":[\n')
        for i, feature in enumerate(features):
            f.write(("," if i else "") + json.dumps(feature, separators=(",", ":"), default=str) + "\n")
        f.write("]}\n")
    return path


def cells_geojson(cells: pa.Table, path: str | os.PathLike) -> Path:
    """GeoJSON FeatureCollection (RFC 7946): one valid Polygon per cell, a MultiPolygon for a cell
    across the antimeridian (`cell_polygons`), with every column as a property (s2_id as a string:
    JavaScript numbers cannot hold 64-bit ids) and `density_per_km2`. The feature id is s2_id."""
    ids = cells.column("s2_id").to_numpy()
    props = {c: cells.column(c).to_pylist() for c in cells.column_names if c != "s2_id"}
    props["s2_id"] = [str(int(i)) for i in ids]
    if "n_samples" in props and "area_km2" in props:
        props["density_per_km2"] = [n / a if a else None for n, a in zip(props["n_samples"], props["area_km2"], strict=True)]
    features = ({"type": "Feature", "id": props["s2_id"][i], "geometry": _geometry(rings),
                 "properties": {k: _jsonable(v[i]) for k, v in props.items()}}
                for i, rings in enumerate(cell_rings(ids)))
    return _write_features(Path(path), features)


def predictions_geojson(table: pa.Table, path: str | os.PathLike, *, place_names: bool = True) -> Path:
    """GeoJSON FeatureCollection: one feature per prediction row, its id the row's id, a Point
    at the predicted location, or a null geometry for an error row (RFC 7946 section 3.2), so
    that no row goes missing. Properties: every scalar column (the S2 tokens of every level
    among them, `s2_token` the finest), and with `place_names` the country, region and town of
    the predicted point (offline reverse geocoding, `placenames.reverse_geocode`)."""
    keep = [c for c in table.column_names
            if c not in ("lat", "lon") and not _nested_or_binary(table.schema.field(c).type)]
    lat = table.column("lat").to_numpy(zero_copy_only=False).astype(np.float64)
    lon = table.column("lon").to_numpy(zero_copy_only=False).astype(np.float64)
    props = {c: table.column(c).to_pylist() for c in keep}
    tokens = sorted((c for c in keep if c.startswith("token_l")), key=lambda c: int(c[len("token_l"):]))
    if tokens:
        finest = [next((props[c][i] for c in reversed(tokens) if props[c][i] is not None), None)
                  for i in range(len(lat))]
        props["s2_token"] = finest
    if place_names:
        from geosurge_index.placenames import reverse_geocode

        names = reverse_geocode(lat, lon)  # NaN (error rows) -> None
        props.update(country_code=names.country_code, country_name=names.country_name,
                     admin1=names.admin1, town=names.town)
    ids = props.get("id", [None] * len(lat))
    has_point = np.isfinite(lat) & np.isfinite(lon)

    def geometry(i):
        if not has_point[i]:
            return None
        return {"type": "Point", "coordinates": [round(float(lon[i]), 6), round(float(lat[i]), 6)]}

    features = ({"type": "Feature", **({"id": ids[i]} if ids[i] is not None else {}), "geometry": geometry(i),
                 "properties": {k: _jsonable(v[i]) for k, v in props.items()}}
                for i in range(len(lat)))
    return _write_features(Path(path), features)


def _nested_or_binary(t: pa.DataType) -> bool:
    return pa.types.is_nested(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)


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
    """Every prediction row (error rows included, with null points), its scalar columns (id,
    path, lat, lon, probability, cell_l*, token_l*, width, height, error, ...); with a truth
    (`benchmarks.read_truth`), also true_lat, true_lon and error_km of the matched ones."""
    from geosurge_index import sql

    con = sql.connect(predictions=pred_dir, truth=truth)
    try:
        schema = con.sql("SELECT * FROM predictions LIMIT 0").to_arrow_table().schema
        cols = ", ".join(f"p.{_quote(f.name)}" for f in schema if not _nested_or_binary(f.type))
        if truth is None:
            q = f"SELECT {cols} FROM predictions p"
        else:
            q = f"""SELECT {cols}, t.lat AS true_lat, t.lon AS true_lon,
                          haversine_km(p.lat, p.lon, t.lat, t.lon) AS error_km
                   FROM predictions p LEFT JOIN truth t USING (id)"""
        return con.sql(q).to_arrow_table()
    finally:
        con.close()


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
