"""Error radii: r50 and r90, the distances around the predicted point that hold 50% / 90% of the
posterior mass of the true location (pure numpy).

The posterior is a mixture built from the (calibrated) probabilities that the true point lies in
the reported cell of each level, P_1 >= .. >= P_L, and the geometry of the cells:
- mass P_L in the reported finest cell, spread uniformly over it (a spherical cap of the cell's
  area around the predicted point);
- mass P_l - P_{l+1} in the reported level-l cell outside its level-(l+1) child: first on the
  top-k alternatives that lie there (each a cap of its own area at its mean point, at most the mass
  the search gave them, shared in proportion to it), the rest uniform over the ring between the
  two reported cells' caps;
- mass 1 - P_1 outside the reported level-1 cell: alternatives there likewise, the rest uniform
  over the remainder of the sphere.
The mixture's distance CDF F(r) is evaluated on a log grid of radii (2 m .. half the Earth's
circumference, 3.4% apart) and r_q is where F reaches q (interpolated in log r). A fitted factor per quantile
(`calibration.fit_radius_scale`) then scales r_q so that it covers q of held-out photos.

Caps on a sphere of radius R = 6371.0088 km: a cap of angular radius rho has area
2 pi R^2 (1 - cos(rho / R)); a cell of area A is the cap of that area. The mass of an alternative's
cap within r of the predicted point uses the planar circle-intersection (lens) area, which is exact
for cells small against the Earth and a close approximation otherwise.
"""

from __future__ import annotations

import numpy as np

from geosurge_index.s2 import EARTH_RADIUS_KM

HALF_CIRCUMFERENCE_KM = np.pi * EARTH_RADIUS_KM
SPHERE_KM2 = 4 * np.pi * EARTH_RADIUS_KM**2
GRID = np.geomspace(2e-3, HALF_CIRCUMFERENCE_KM, 480)  # radii evaluated, km (3.4% apart)


def cap_area_km2(radius_km) -> np.ndarray:
    r = np.clip(np.asarray(radius_km, dtype=np.float64), 0.0, HALF_CIRCUMFERENCE_KM)
    return 2 * np.pi * EARTH_RADIUS_KM**2 * (1 - np.cos(r / EARTH_RADIUS_KM))


def cap_radius_km(area_km2) -> np.ndarray:
    """The great-circle radius of the spherical cap of this area (NaN area -> 0: a point)."""
    a = np.nan_to_num(np.asarray(area_km2, dtype=np.float64), nan=0.0)
    c = np.clip(1 - a / (2 * np.pi * EARTH_RADIUS_KM**2), -1.0, 1.0)
    return EARTH_RADIUS_KM * np.arccos(c)


def _annulus_cdf(grid_area: np.ndarray, inner: np.ndarray, outer: np.ndarray) -> np.ndarray:
    """(n, G): share of a uniform ring between caps of radius inner..outer (n,) within each grid radius.
    A ring of zero width (a cell not split at the next level) is its outer disk."""
    a_in, a_out = cap_area_km2(inner)[:, None], cap_area_km2(outer)[:, None]
    width = a_out - a_in
    disk = a_out <= a_in * (1 + 1e-9)
    frac_ring = (grid_area[None, :] - a_in) / np.where(disk, 1.0, width)
    frac_disk = grid_area[None, :] / np.maximum(a_out, 1e-12)
    return np.clip(np.where(disk, frac_disk, frac_ring), 0.0, 1.0)


def _lens_fraction(r: np.ndarray, dist: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """Share of a uniform disk of radius rho centred `dist` away that lies within r of the origin
    (planar). Broadcasts r (1, G) with dist, rho (n, 1)."""
    rho = np.maximum(rho, 1e-6)
    d = np.maximum(dist, 1e-9)
    with np.errstate(invalid="ignore", divide="ignore"):
        a1 = np.clip((d**2 + r**2 - rho**2) / (2 * d * r), -1.0, 1.0)
        a2 = np.clip((d**2 + rho**2 - r**2) / (2 * d * rho), -1.0, 1.0)
        k = np.clip((-d + r + rho) * (d + r - rho) * (d - r + rho) * (d + r + rho), 0.0, None)
        lens = r**2 * np.arccos(a1) + rho**2 * np.arccos(a2) - 0.5 * np.sqrt(k)
    frac = lens / (np.pi * rho**2)
    frac = np.where(r + d <= rho, r**2 / rho**2, frac)  # the r-circle inside the disk
    frac = np.where(r >= d + rho, 1.0, frac)
    frac = np.where(r + rho <= d, 0.0, frac)
    return np.clip(np.nan_to_num(frac, nan=0.0), 0.0, 1.0)


def posterior_cdf(level_p, path_radius, alt_dist, alt_radius, alt_mass, alt_ring, grid=GRID) -> np.ndarray:
    """(n, G) posterior mass within each grid radius of the predicted point.

    level_p (n, L): P(truth in the reported level-l cell), non-increasing in l;
    path_radius (n, L): cap radius (km) of the reported cell at each level;
    alt_dist (n, k) km from the predicted point to each alternative's mean point; alt_radius (n, k)
    its cap radius; alt_mass (n, k) its search probability (0 = ignore: padding or the reported
    cell itself); alt_ring (n, k) int: l-1 when it lies in the reported level-l cell but not in its
    level-(l+1) child (0..L-2), -1 when outside the reported level-1 cell.
    """
    p = np.asarray(level_p, dtype=np.float64)
    n, levels = p.shape
    rad = np.asarray(path_radius, dtype=np.float64)
    grid = np.asarray(grid, dtype=np.float64)
    garea = cap_area_km2(grid)
    cdf = p[:, -1:] * _annulus_cdf(garea, np.zeros(n), rad[:, -1])
    alt_mass = np.asarray(alt_mass, dtype=np.float64)
    alt_ring = np.asarray(alt_ring)
    alt_dist = np.asarray(alt_dist, dtype=np.float64)
    alt_radius = np.asarray(alt_radius, dtype=np.float64)
    rings = [(j, p[:, j] - p[:, j + 1], rad[:, j + 1], rad[:, j]) for j in range(levels - 1)]
    rings.append((-1, 1.0 - p[:, 0], rad[:, 0], np.full(n, HALF_CIRCUMFERENCE_KM)))
    for ring, mass, inner, outer in rings:
        mass = np.clip(mass, 0.0, 1.0)
        in_ring = np.where(alt_ring == ring, alt_mass, 0.0)  # (n, k)
        raw = in_ring.sum(1)
        on_alts = np.minimum(raw, mass)  # the alternatives get at most what the search gave them
        share = np.where(raw > 0, on_alts / np.where(raw > 0, raw, 1.0), 0.0)
        for j in np.flatnonzero(in_ring.any(0)):
            w = in_ring[:, j] * share
            cdf += w[:, None] * _lens_fraction(grid[None, :], alt_dist[:, j:j + 1], alt_radius[:, j:j + 1])
        cdf += (mass - on_alts)[:, None] * _annulus_cdf(garea, inner, outer)
    return np.clip(cdf, 0.0, 1.0)


def quantile_radii(cdf: np.ndarray, quantiles=(0.5, 0.9), grid=GRID) -> np.ndarray:
    """(n, G) CDF -> (n, len(quantiles)) radii in km where the CDF first reaches each quantile
    (log-linear interpolation between grid radii; the largest radius when it never does)."""
    cdf = np.maximum.accumulate(np.asarray(cdf, dtype=np.float64), axis=1)
    logg = np.log(np.asarray(grid, dtype=np.float64))
    n, g = cdf.shape
    out = np.empty((n, len(quantiles)))
    rows = np.arange(n)
    for qi, q in enumerate(quantiles):
        above = cdf >= q - 1e-12
        k = np.where(above.any(1), above.argmax(1), g - 1)
        k0 = np.maximum(k - 1, 0)
        c0, c1 = cdf[rows, k0], cdf[rows, k]
        t = np.where((c1 > c0) & (k > 0), (q - c0) / np.where(c1 > c0, c1 - c0, 1.0), 1.0)
        out[:, qi] = np.exp(logg[k0] + np.clip(t, 0.0, 1.0) * (logg[k] - logg[k0]))
    return out
