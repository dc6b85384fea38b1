"""Offline reverse geocoding of points to place names (reverse_geocoder's GeoNames cities1000 and
pycountry's ISO 3166 names), for the cells table of an index.

The nearest populated place (>= 1000 inhabitants) is returned whatever its distance, so a cell in
the middle of an ocean gets a far-away town: `town_distance_km` says how far it is.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from functools import cache

import numpy as np

from geosurge_index.progress import bar

_CHUNK = 100_000


@dataclass
class PlaceNames:
    """Per point (None where the point is missing): ISO 3166-1 alpha-2 code, English country
    name, first-level administrative division, nearest town, and the distance to that town."""

    country_code: list[str | None]
    country_name: list[str | None]
    admin1: list[str | None]
    town: list[str | None]
    town_distance_km: np.ndarray


@cache
def country_name(code: str) -> str:
    """English short name of an alpha-2 code; codes pycountry lacks (e.g. XK) are returned as is."""
    import pycountry

    country = pycountry.countries.get(alpha_2=code)
    if country is None:
        return {"XK": "Kosovo"}.get(code, code)
    return getattr(country, "common_name", None) or country.name


def _geocoder():
    import reverse_geocoder as rg

    # mode=1: single process (the default mode forks a multiprocessing pool)
    with contextlib.redirect_stdout(io.StringIO()):
        return rg.RGeocoder(mode=1, verbose=False)


def reverse_geocode(lat: np.ndarray, lon: np.ndarray) -> PlaceNames:
    """Place names of n points (float arrays; NaN = missing point -> None names)."""
    from geosurge_index.metrics import haversine_km

    lat = np.asarray(lat, dtype=np.float64).reshape(-1)
    lon = np.asarray(lon, dtype=np.float64).reshape(-1)
    n = lat.shape[0]
    cc: list[str | None] = [None] * n
    admin1: list[str | None] = [None] * n
    town: list[str | None] = [None] * n
    dist = np.full(n, np.nan)
    valid = np.flatnonzero(np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90))
    if valid.size:
        geocoder = _geocoder()
        for a in bar(range(0, valid.size, _CHUNK), desc="place names", unit="chunk"):
            rows = valid[a:a + _CHUNK]
            hits = geocoder.query(list(zip(lat[rows].tolist(), lon[rows].tolist(), strict=True)))
            hit_lat = np.array([float(h["lat"]) for h in hits])
            hit_lon = np.array([float(h["lon"]) for h in hits])
            dist[rows] = haversine_km(lat[rows], lon[rows], hit_lat, hit_lon)
            for r, h in zip(rows.tolist(), hits, strict=True):
                cc[r] = h["cc"] or None
                admin1[r] = h["admin1"] or None
                town[r] = h["name"] or None
    names = [country_name(c) if c else None for c in cc]
    return PlaceNames(cc, names, admin1, town, dist)
