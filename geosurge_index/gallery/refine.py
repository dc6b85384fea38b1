"""The prediction rule with galleries: retrieval among the references inside the best cells.

For each query, the references inside its `cells` best finest cells (the engine's top-k, best
first) are searched in every selected gallery (`Gallery.search`: FAISS `search_preassigned` on
those cells' inverted lists: a reference in any other cell is never read); the `neighbours`
nearest by cosine are merged over the galleries. Then the point:
- rule "nearest": the best neighbour's coordinates (point_source "neighbour");
- rule "mean": the similarity-weighted spherical mean of the neighbours within `agree_km` of the
  best one (point_source "neighbours" when two or more agree, else "neighbour");
- no reference in those cells: the best cell's mean point, as without galleries ("cell_mean").
`geosurge demo` measures the rules on the demo world (README, Galleries); "nearest" is the default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from geosurge_index.errors import UserError
from geosurge_index.search import POINT_SOURCES, Refinement, SearchResult

RULES = ("nearest", "mean")


@dataclass(frozen=True)
class RefineSettings:
    cells: int = 3  # best finest cells whose references are searched; 0: no refinement
    neighbours: int = 5  # nearest references kept per query (rule "mean" averages those that agree)
    rule: str = "nearest"
    agree_km: float = 1.0  # rule "mean": neighbours within this distance of the best one

    def __post_init__(self):
        if self.cells < 0 or self.neighbours < 1 or self.rule not in RULES or not self.agree_km > 0:
            raise UserError(f"refinement settings {self}: cells >= 0, neighbours >= 1, rule one of "
                            f"{', '.join(RULES)}, agree_km > 0")


def nearest_references(queries: np.ndarray, lists: np.ndarray, galleries: Sequence, k: int):
    """Merged over the galleries: (similarities (n, k) float32, -inf = none; gallery (n, k) int64
    position in `galleries`, -1 = none; rows (n, k) int64 in that gallery), best first."""
    n = queries.shape[0]
    if not galleries:
        return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1), np.full((n, k), -1)
    sims, gal, rows = [], [], []
    for g, gallery in enumerate(galleries):
        s, r = gallery.search(queries, lists, k)
        sims.append(s)
        rows.append(r)
        gal.append(np.where(r >= 0, g, -1))
    sims, gal, rows = (np.concatenate(a, axis=1) for a in (sims, gal, rows))
    if len(galleries) > 1:
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        sims, gal, rows = (np.take_along_axis(a, order, axis=1) for a in (sims, gal, rows))
    return sims, gal, rows


def _unit(lat, lon):
    la, lo = np.radians(lat), np.radians(lon)
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=-1)


def refine(result: SearchResult, queries: np.ndarray, galleries: Sequence, settings: RefineSettings) -> SearchResult:
    """`result` with the point refined by the galleries (see the module doc); `result.refinement`
    says how each point was made. `queries`: the (n, d) embeddings that were searched."""
    from geosurge_index.metrics import haversine_km

    n = len(result)
    q = np.asarray(queries, dtype=np.float32)
    norms = np.linalg.norm(q, axis=1, keepdims=True)
    q = q / np.where(norms > 0, norms, 1)
    lists = result.topk_cells[:, :settings.cells].astype(np.int64)
    k = settings.neighbours if settings.rule == "mean" else 1
    sims, gal, rows = nearest_references(q, lists, galleries, k)
    found = gal[:, 0] >= 0
    lat, lon = result.lat.copy(), result.lon.copy()
    source = np.zeros(n, np.int8)
    nb_lat = np.full(gal.shape, np.nan)
    nb_lon = np.full(gal.shape, np.nan)
    for g, gallery in enumerate(galleries):
        m = gal == g
        nb_lat[m], nb_lon[m] = gallery.lat[rows[m]], gallery.lon[rows[m]]
    if settings.rule == "nearest" or k == 1:
        lat[found], lon[found] = nb_lat[found, 0], nb_lon[found, 0]
        source[found] = POINT_SOURCES.index("neighbour")
    else:
        with np.errstate(invalid="ignore"):
            d = haversine_km(nb_lat, nb_lon, nb_lat[:, :1], nb_lon[:, :1])
        agree = (gal >= 0) & (d <= settings.agree_km)
        w = np.where(agree, np.maximum(sims, 1e-6), 0.0)[..., None]
        v = (np.nan_to_num(_unit(nb_lat, nb_lon)) * w).sum(axis=1)[found]
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        lat[found] = np.degrees(np.arcsin(np.clip(v[:, 2], -1, 1)))
        lon[found] = np.degrees(np.arctan2(v[:, 1], v[:, 0]))
        several = agree.sum(axis=1) >= 2
        source[found] = np.where(several[found], POINT_SOURCES.index("neighbours"), POINT_SOURCES.index("neighbour"))
    names = np.array([None] + [g.name for g in galleries], dtype=object)
    ids = np.full(n, None, dtype=object)
    for g, gallery in enumerate(galleries):
        m = gal[:, 0] == g
        if m.any():
            ids[m] = np.asarray(gallery.ids.take(rows[m, 0]).to_pylist(), dtype=object)
    refinement = Refinement(
        cell_lat=result.lat.copy(), cell_lon=result.lon.copy(), point_source=source,
        gallery=names[gal[:, 0] + 1], neighbour_id=ids,
        similarity=np.where(found, sims[:, 0], np.nan).astype(np.float32),
    )
    return SearchResult(result.topk_cells, result.topk_probs, result.best_cells, lat, lon,
                        result.probability, refinement)
