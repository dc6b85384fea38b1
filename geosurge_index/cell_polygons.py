"""S2 cells as planar lon/lat polygons that GIS tools accept (RFC 7946, OGC simple features).

A cell's outline comes from its four S2 vertices (`s2.cell_vertices`). S2 edges are geodesics,
so large cells get extra points along each edge. The outline is then made a valid planar
polygon in lon/lat degrees:

- exterior rings run counter-clockwise (RFC 7946 section 3.1.6);
- a cell that crosses the antimeridian is cut there into two polygons (a MultiPolygon, RFC 7946
  section 3.1.9); a cell that only touches +-180 stays one polygon (no zero-area sliver);
- a cell that contains a pole becomes one polygon that runs from -180 to +180 along its edge and
  back along the pole's latitude line (the usual plate carree picture), not two pieces that
  share an edge;
- a vertex exactly on a pole (where longitude is undefined) becomes a segment of the pole's
  latitude line between the longitudes of the two edges that meet there.

Most cells need none of this: they are handled in bulk; only the few special ones go through
the per-cell path.
"""

from __future__ import annotations

import numpy as np

from geosurge_index import s2

_POLE_EPS = 1e-9  # degrees: a point this close to +-90 is on the pole
_MIN_AREA = 1e-12  # square degrees: pieces smaller than this are clipping slivers


def edge_points(s2_levels: np.ndarray) -> np.ndarray:
    """Points per cell edge: big cells bend visibly in lon/lat, small ones do not."""
    return np.clip(2 ** np.clip(8 - s2_levels.astype(np.int64), 0, 6), 1, 32)


def signed_areas(rings: np.ndarray) -> np.ndarray:
    """Shoelace areas (square degrees) of closed rings (n, k, 2); positive = counter-clockwise."""
    x, y = rings[..., 0], rings[..., 1]
    return 0.5 * np.sum(x[..., :-1] * y[..., 1:] - x[..., 1:] * y[..., :-1], axis=-1)


def cell_polygons(s2_ids) -> list[list[np.ndarray]]:
    """Per cell, its polygons: one closed counter-clockwise exterior ring (k, 2) lon/lat each,
    two when the cell crosses the antimeridian. No ring leaves [-180, 180] x [-90, 90]."""
    ids = np.asarray(s2_ids, dtype=np.uint64).ravel()
    out: list[list[np.ndarray]] = [[] for _ in range(len(ids))]
    if len(ids) == 0:
        return out
    vlat, vlon = s2.cell_vertices(ids)
    xyz = s2.latlon_to_xyz(vlat, vlon)  # (n, 4, 3)
    per_edge = edge_points(s2.levels(ids))
    for m in np.unique(per_edge):
        sel = np.flatnonzero(per_edge == m)
        a, b = xyz[sel], np.roll(xyz[sel], -1, axis=1)
        t = np.arange(m, dtype=np.float64)[None, None, :, None] / m
        pts = (1 - t) * a[:, :, None, :] + t * b[:, :, None, :]  # along each edge's chord
        lat, lon = s2.xyz_to_latlon(pts.reshape(len(sel), -1, 3))  # projected back: on the geodesic
        # the bulk case: rings that neither cross +-180 nor touch or surround a pole
        simple = ((lon.max(axis=1) - lon.min(axis=1)) < 180) & (np.abs(lat).max(axis=1) < 90 - _POLE_EPS)
        k = np.flatnonzero(simple)
        if len(k):
            rings = np.stack([np.concatenate([lon[k], lon[k, :1]], axis=1),
                              np.concatenate([lat[k], lat[k, :1]], axis=1)], axis=-1)
            flip = signed_areas(rings) < 0
            rings[flip] = rings[flip, ::-1]
            for j, r in zip(k, rings, strict=True):
                out[sel[j]] = [r]
        for j in np.flatnonzero(~simple):
            out[sel[j]] = special_polygons(lon[j], lat[j])
    return out


def special_polygons(lon: np.ndarray, lat: np.ndarray) -> list[np.ndarray]:
    """The polygons of one open ring (k,) that touches a pole, surrounds one or crosses +-180."""
    lon, lat = _open_pole_vertices(np.asarray(lon, np.float64), np.asarray(lat, np.float64))
    lon = np.unwrap(lon, period=360.0)
    winding = lon[-1] + _wrap(lon[0] - lon[-1]) - lon[0]
    if abs(winding) > 180:  # the ring goes round a pole
        return [_ccw(_around_pole(lon, lat, winding))]
    ring = np.column_stack([np.r_[lon, lon[0]], np.r_[lat, lat[0]]])
    ring[:, 0] -= 360.0 * np.floor((ring[:, 0].min() + 180.0) / 360.0)  # west end in [-180, 180)
    pieces = []
    for offset in (0.0, -360.0):
        piece = _clip_x(ring + [offset, 0.0], -180.0, keep_greater=True)
        piece = _clip_x(piece, 180.0, keep_greater=False)
        if len(piece) >= 3:
            piece = np.vstack([piece, piece[:1]])
            if abs(signed_areas(piece)) > _MIN_AREA:
                pieces.append(_ccw(piece))
    return pieces


def _wrap(d):
    return (d + 180.0) % 360.0 - 180.0


def _ccw(ring: np.ndarray) -> np.ndarray:
    """Counter-clockwise, closed, without repeated consecutive points (clipping leaves some)."""
    keep = np.r_[True, np.any(np.diff(ring, axis=0) != 0, axis=1)]
    ring = ring[keep]
    if not np.array_equal(ring[0], ring[-1]):
        ring = np.vstack([ring, ring[:1]])
    return ring if signed_areas(ring) >= 0 else ring[::-1].copy()


def _open_pole_vertices(lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A point on a pole has no longitude: replace it by two points on the pole's latitude line,
    at the longitudes of the edges that arrive and leave (meridians through the pole)."""
    on_pole = np.abs(lat) >= 90 - _POLE_EPS
    if not on_pole.any():
        return lon, lat
    n = len(lon)
    new_lon, new_lat = [], []
    for i in range(n):
        if not on_pole[i]:
            new_lon.append(lon[i])
            new_lat.append(lat[i])
            continue
        pole = 90.0 if lat[i] > 0 else -90.0
        before, after = lon[(i - 1) % n], lon[(i + 1) % n]
        new_lon += [before, after]
        new_lat += [pole, pole]
    return np.asarray(new_lon), np.asarray(new_lat)


def _around_pole(lon: np.ndarray, lat: np.ndarray, winding: float) -> np.ndarray:
    """A ring (unwrapped longitudes) that goes once round a pole -> one closed ring from -180 to
    +180 (or back), then along the pole's latitude line: the seam is the antimeridian."""
    pole = 90.0 if lat.mean() > 0 else -90.0
    n = len(lon)
    ext_lon = np.r_[lon, lon[0] + winding]  # the closing edge too
    ext_lat = np.r_[lat, lat[0]]
    # the first edge that reaches the antimeridian (lon = 180 + 360 j)
    j = np.floor((ext_lon - 180.0) / 360.0)
    cross = np.flatnonzero(j[1:] != j[:-1])
    i = int(cross[0]) if len(cross) else 0
    seam = 180.0 + 360.0 * max(j[i], j[i + 1])
    d = ext_lon[i + 1] - ext_lon[i]
    t = (seam - ext_lon[i]) / d if d else 0.0
    seam_lat = ext_lat[i] + t * (ext_lat[i + 1] - ext_lat[i])
    order = (np.arange(i + 1, i + 1 + n) % n)  # the points after the crossing, once round
    pts_lon = lon[order] + np.where(order <= i, winding, 0.0)  # continue past the wrap
    start = -180.0 if winding > 0 else 180.0
    shift = start - seam
    ring_lon = np.r_[seam, pts_lon, seam + winding] + shift
    ring_lat = np.r_[seam_lat, lat[order], seam_lat]
    ring_lon = np.r_[ring_lon, start + winding, start, start]
    ring_lat = np.r_[ring_lat, pole, pole, seam_lat]
    return np.column_stack([np.clip(ring_lon, -180.0, 180.0), ring_lat])


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
