"""Coarse-to-fine search of visual embeddings over the 7-level geocell hierarchy.

Scores (GeoSURGE's inference rule, arXiv 2510.01448). At level l the model's distribution over
the level's cells is softmax(cosine(x, cell) / T_l). A finest cell c is scored by the product of
the probabilities of the cells on its path (c and its ancestors), i.e. the sum of their
log-probabilities. Every finest cell has exactly one ancestor per level, so the per-level
normalisers are common to all paths: ranking by the product equals ranking by the sum of the
path's logits.

Reported probabilities. `topk_probs` and `probability` are the path products renormalised over
the finest cells that were scored:  P(c) = exp(s(c)) / sum_{c' in C} exp(s(c')),  s = sum of the
path's logits (equivalently of its log-probabilities).
- Exhaustive mode: C = every finest cell, so P is exact: the model's posterior over the
  prediction space (it sums to 1 over all finest cells).
- Beam mode: C = the finest cells explored by the beam (children of the kept cells), so P sums
  to 1 over the explored candidates and over-estimates the exhaustive value for the same cell
  (its denominator misses the unexplored cells). With a beam wide enough to keep every cell,
  both modes are identical.

Per-level probabilities. `SearchEngine.level_probabilities(emb, paths)` gives, for each query
and level, softmax(cosine / T_l) over all the level's cells at the path's cell: what `Locator`
reports per level. The numerator needs only the path's cell; the normaliser needs every cell of
the level (a GEMM per level, chunked), so callers ask for it only when they report it.

Beam search. Level 1 is scored in full; at each finer level only the children of the best B
paths kept at the level above are scored (B: one value, or one per level 1..L-1; default
DEFAULT_BEAM, wide at the small coarse levels; see `parse_beam`). Paths that cannot reach the
finest level (a cell whose descendants were all discarded by tau_min) are never kept. Children
are not scored by a FAISS search restricted to an id subset (an IDSelector): on a flat index
FAISS then takes its sequential kernel over every stored vector, testing each id, instead of a
BLAS GEMM, which is slower than the full search it would replace. They are scored on the CPU by
FAISS's fvec_inner_products_by_idx, which reads the rows in place, else by a gather + bmm in
torch; a level small compared with the candidates is scored by one dense GEMM.

Training's validation ranks the finest cells with the same exhaustive code
(`exhaustive_topk`, on the training device's tensors).

The engine is torch and device-generic: the same code runs on CPU tensors (zero-copy views of
the FAISS storage) and on CUDA tensors (`backend="torch"` runs the GPU code path on the CPU for
tests). Level 1 may be scored through a FAISS GPU index (GeoIndex, backend "faiss" on CUDA).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from geosurge_index.errors import UserError

# Memory budget for one chunk of work, in float32 elements (256 MiB): bounds the (queries x
# cells) score matrices of the exhaustive mode and the (queries x candidates x dim) gathers.
CHUNK_ELEMENTS = 64 * 1024 * 1024
# A level with at most DENSE_RATIO x (candidates per query) cells is scored by one dense GEMM
# instead of gathered rows (torch gather + bmm, measured on the 2-core CPU: 32-64 is the flat
# optimum); FAISS's by-id kernel makes a gathered pair ~10x cheaper, hence a lower ratio.
DENSE_RATIO = 32
DENSE_RATIO_FAISS = 8
# Default beam: wide at the coarse levels, which are small (cheap to expand) and where a path
# that wins on its finer levels can still rank low. `geosurge bench search` (2-core CPU): 100%
# top-1 agreement with exhaustive at 25k finest cells, 99.8% at 1M at ~63x the exhaustive rate
# (256,128,64,32,32,32: 99.3% at ~89x); searching costs little next to encoding an image.
DEFAULT_BEAM = (512, 256, 128, 64, 32, 16)
# Gathered candidate rows per step on CPU, in float32 elements (4 MiB): small enough that the
# batched GEMV reads them back from cache, not from memory.
CPU_GATHER_ELEMENTS = 1 << 20


# How a prediction's point was made (PRED_DIR `point_source`): the best cell's mean point, the
# nearest gallery reference inside the best cells, or the weighted mean of several that agree.
POINT_SOURCES = ("cell_mean", "neighbour", "neighbours")


@dataclass
class Refinement:
    """What the gallery refinement did, per query (`gallery.refine`).

    cell_lat, cell_lon (n,) float64: the best finest cell's mean point (the answer without
    galleries); point_source (n,) int8: index into POINT_SOURCES; gallery, neighbour_id (n,)
    object: the nearest reference's gallery name and id (None when no reference was found);
    similarity (n,) float32: its cosine with the query (NaN when none).
    """

    cell_lat: np.ndarray
    cell_lon: np.ndarray
    point_source: np.ndarray
    gallery: np.ndarray
    neighbour_id: np.ndarray
    similarity: np.ndarray

    @classmethod
    def concat(cls, parts: Sequence[Refinement]) -> Refinement:
        return cls(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__})


@dataclass
class SearchResult:
    """Search answers for n queries (numpy arrays).

    topk_cells (n, k) int32: the k best finest cells (finest-level cell_index), -1 padding when
        fewer than k candidates were explored; topk_probs (n, k) float32 their probabilities
        (0 for padding; normalisation: see the module docstring);
    best_cells (n, L) int32: the path of the best finest cell, its ancestor at every level
        (column l-1 = level l), so that the levels are consistent with each other;
    lat, lon (n,) float64: the predicted point: the mean lat/lon of the training samples of the
        best finest cell, or, when the index's galleries refined it, the point `refinement` says;
    probability (n,) float64: topk_probs[:, 0];
    refinement: None without galleries, else how each point was made (`Refinement`).
    """

    topk_cells: np.ndarray
    topk_probs: np.ndarray
    best_cells: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    probability: np.ndarray
    refinement: Refinement | None = None

    def __post_init__(self) -> None:
        n = self.topk_cells.shape[0]
        if self.topk_probs.shape != self.topk_cells.shape or self.best_cells.shape[0] != n:
            raise ValueError("SearchResult arrays disagree in shape")
        if not (self.lat.shape == self.lon.shape == self.probability.shape == (n,)):
            raise ValueError("SearchResult arrays disagree in shape")
        if self.refinement is not None and self.refinement.point_source.shape != (n,):
            raise ValueError("SearchResult refinement disagrees in shape")

    def __len__(self) -> int:
        return int(self.topk_cells.shape[0])

    def head(self, top_k: int) -> SearchResult:
        """The same answers with only the first top_k alternatives (probabilities unchanged)."""
        return SearchResult(self.topk_cells[:, :top_k], self.topk_probs[:, :top_k], self.best_cells,
                            self.lat, self.lon, self.probability, self.refinement)

    @classmethod
    def concat(cls, parts: Sequence[SearchResult]) -> SearchResult:
        if not parts:
            raise ValueError("nothing to concatenate")
        refined = [p.refinement for p in parts]
        if any(r is None for r in refined) and not all(r is None for r in refined):
            raise ValueError("cannot concatenate refined and unrefined results")
        return cls(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS},
                   refinement=None if refined[0] is None else Refinement.concat(refined))


_FIELDS = ("topk_cells", "topk_probs", "best_cells", "lat", "lon", "probability")


@dataclass
class CellTree:
    """The cells of one index as numpy arrays, per level (index 0 = level 1).

    parents[l] (n_l,) int32: parent cell_index at level l (-1 at level 1);
    child_ptr[l], child_idx[l]: CSR of the children at level l+2 of each level-(l+1) cell
        (defined for the L-1 non-finest levels), children listed in cell_index order;
    live[l] (n_l,) bool: the cell has at least one finest-level descendant;
    mean_lat, mean_lon (n_l,) float64; tokens[l]: pyarrow string array of S2 tokens.
    """

    parents: list[np.ndarray]
    child_ptr: list[np.ndarray]
    child_idx: list[np.ndarray]
    live: list[np.ndarray]
    mean_lat: list[np.ndarray]
    mean_lon: list[np.ndarray]
    tokens: list[pa.Array]

    @property
    def levels(self) -> int:
        return len(self.parents)

    @property
    def sizes(self) -> list[int]:
        return [len(p) for p in self.parents]

    @classmethod
    def from_parents(
        cls,
        parents: Sequence[np.ndarray | None],
        mean_lat: Sequence[np.ndarray],
        mean_lon: Sequence[np.ndarray],
        tokens: Sequence,
    ) -> CellTree:
        """Build the tree from per-level parent_index arrays (level 1: None or all -1)."""
        levels = len(parents)
        if not (levels == len(mean_lat) == len(mean_lon) == len(tokens)) or levels < 1:
            raise ValueError("per-level arrays disagree in number of levels")
        sizes = [len(lat) for lat in mean_lat]
        par: list[np.ndarray] = []
        for lv in range(levels):
            if lv == 0:
                par.append(np.full(sizes[0], -1, dtype=np.int32))
                continue
            p = np.asarray(parents[lv], dtype=np.int64)
            if p.shape != (sizes[lv],):
                raise UserError(f"level {lv + 1}: {p.shape[0]} parent indexes for {sizes[lv]} cells")
            if sizes[lv] and (p.min() < 0 or p.max() >= sizes[lv - 1]):
                raise UserError(
                    f"level {lv + 1}: parent_index out of range 0..{sizes[lv - 1] - 1} (or null)"
                )
            par.append(p.astype(np.int32))
        ptrs, idxs = [], []
        for lv in range(levels - 1):
            child_parent = par[lv + 1]
            order = np.argsort(child_parent, kind="stable").astype(np.int32)
            counts = np.bincount(child_parent, minlength=sizes[lv])
            ptr = np.zeros(sizes[lv] + 1, dtype=np.int64)
            np.cumsum(counts, out=ptr[1:])
            ptrs.append(ptr)
            idxs.append(order)
        live = [np.zeros(s, dtype=bool) for s in sizes]
        live[-1][:] = True
        for lv in range(levels - 2, -1, -1):
            live[lv][par[lv + 1][live[lv + 1]]] = True
        toks = [t if isinstance(t, pa.Array) else pa.array(np.asarray(t, dtype=object), pa.string())
                for t in tokens]
        for lv in range(levels):
            if len(toks[lv]) != sizes[lv] or len(mean_lon[lv]) != sizes[lv]:
                raise UserError(f"level {lv + 1}: cell columns disagree in length")
        return cls(
            parents=par,
            child_ptr=ptrs,
            child_idx=idxs,
            live=live,
            mean_lat=[np.asarray(a, dtype=np.float64) for a in mean_lat],
            mean_lon=[np.asarray(a, dtype=np.float64) for a in mean_lon],
            tokens=toks,
        )

    def children_padded(self) -> list[np.ndarray]:
        """Per non-finest level, (n_l, max children) int32 children, -1 padded."""
        out = []
        for ptr, idx in zip(self.child_ptr, self.child_idx, strict=True):
            counts = np.diff(ptr)
            width = max(1, int(counts.max(initial=0)))
            pad = np.full((len(counts), width), -1, dtype=np.int32)
            slot = np.arange(len(idx)) - np.repeat(ptr[:-1], counts)
            pad[np.repeat(np.arange(len(counts)), counts), slot] = idx
            out.append(pad)
        return out

    def ancestors(self, finest: np.ndarray) -> np.ndarray:
        """(n,) finest cell_index -> (n, L) path, column l-1 = ancestor at level l."""
        out = np.empty((finest.shape[0], self.levels), dtype=np.int32)
        out[:, -1] = finest
        for lv in range(self.levels - 1, 0, -1):
            out[:, lv - 1] = self.parents[lv][out[:, lv]]
        return out


def default_beam(levels: int) -> tuple[int, ...]:
    """DEFAULT_BEAM fitted to a tree of `levels` levels: its first L-1 values (the last value
    repeated for a tree deeper than 7 levels)."""
    n = max(0, levels - 1)
    return DEFAULT_BEAM[:n] + (DEFAULT_BEAM[-1],) * max(0, n - len(DEFAULT_BEAM))


def parse_beam(beam: int | Sequence[int] | str | None, levels: int) -> tuple[int, ...]:
    """Cells kept at levels 1..L-1 of an L-level tree. The rule:

    - None (or the DEFAULT_BEAM object itself, a default argument): no beam was given, so the
      default applies, fitted to the tree (`default_beam`: cut to L-1 values);
    - one value (an int, "8" or [8]): that many cells kept at every level 1..L-1;
    - a schedule ("4,4,8,8,8,8", a sequence): exactly one value per level 1..L-1, else a UserError
      naming the levels. Until the next release, a schedule equal to DEFAULT_BEAM but longer than
      L-1 (the value `geosurge search --beam` used to default to) is still cut, with a
      DeprecationWarning.
    """
    import warnings

    if beam is None or beam is DEFAULT_BEAM:
        return default_beam(levels)
    if isinstance(beam, str):
        try:
            beam = [int(v) for v in beam.replace(" ", "").split(",") if v]
        except ValueError as err:
            raise UserError(f"beam {beam!r}: expected an integer or comma-separated integers") from err
    if isinstance(beam, (int, np.integer)):
        values = (int(beam),) * (levels - 1)
    else:
        values = tuple(int(v) for v in beam)
        if len(values) == 1:
            values = values * (levels - 1)
        elif values == DEFAULT_BEAM[:len(values)] and len(values) > levels - 1:
            warnings.warn(f"beam {','.join(map(str, values))}: the default schedule given explicitly for a "
                          f"{levels}-level tree is cut to {levels - 1} values; omit the beam to get the "
                          "default, the cut goes in the next release", DeprecationWarning, stacklevel=3)
            values = values[:levels - 1]
    if len(values) != levels - 1:
        which = f"levels 1..{levels - 1}" if levels > 2 else ("level 1" if levels == 2 else "no level")
        raise UserError(
            f"beam: give one value or one per level expanded ({which} of this {levels}-level tree: "
            f"{levels - 1} values), got {len(values)}"
        )
    if values and min(values) < 1:  # a 1-level tree expands no level: no values
        raise UserError("beam: every value must be >= 1")
    return values


def level_logits(q, table, temperature):
    """(n, d) unit queries x (n_l, d) unit cell vectors -> (n, n_l) cosine / T_l (a new tensor)."""
    import torch

    return torch.mm(q, table.T).div_(temperature)


def exhaustive_topk(q, tables: Sequence, temperatures, parents: Sequence, top_k: int, *, level1=None):
    """Every cell of every level, on torch tensors where they are (the engine's exhaustive mode,
    and training's validation on the training device). Call it without autograd (inference_mode).

    q (n, d) unit queries; tables[l] (n_l, d) unit cell vectors; temperatures[l] a float or
    0-d tensor; parents[l] (n_l,) int64 tensors of parent cell_index (parents[0] unused);
    level1: optional callable(start, stop) -> (stop - start, n_1) level-1 cosines of those query
    rows (a FAISS GPU index). Path scores s_l = logits_l + s_{l-1}[parent], chunked over queries
    so that no (rows x cells) matrix exceeds CHUNK_ELEMENTS. Returns ((n, k) finest cell_index
    int64, (n, k) log-probabilities renormalised over every finest cell), best first.
    """
    import torch

    widest = max(int(t.shape[0]) for t in tables)
    step = max(1, CHUNK_ELEMENTS // widest)  # 3 live (step x widest) matrices at most
    cells, logps = [], []
    for a in range(0, q.shape[0], step):
        qc = q[a:a + step]
        if level1 is None:
            s = level_logits(qc, tables[0], temperatures[0])
        else:
            s = level1(a, a + qc.shape[0]).div_(temperatures[0])
        for lv in range(1, len(tables)):
            nxt = level_logits(qc, tables[lv], temperatures[lv])
            nxt.add_(s.index_select(1, parents[lv]))
            s = nxt
        k = min(top_k, s.shape[1])
        logz = torch.logsumexp(s, dim=1, keepdim=True)
        top, idx = torch.topk(s, k, dim=1)
        cells.append(idx)
        logps.append(top - logz)
    if not cells:
        k = min(top_k, int(tables[-1].shape[0]))
        return (torch.zeros((0, k), dtype=torch.int64, device=q.device),
                torch.zeros((0, k), dtype=q.dtype, device=q.device))
    return torch.cat(cells), torch.cat(logps)


class SearchEngine:
    """Torch scoring over one hierarchy. Vectors: L2-normalised (n_l, d) float32 tensors on `device`.

    level1_scorer: optional callable(np.ndarray (n, d) float32) -> np.ndarray (n, n_1) of cosines,
    used for the full level-1 pass (a FAISS index on a GPU); None = torch matmul.
    faiss_kernels (CPU only): score the candidate children with faiss.fvec_inner_products_by_idx,
    in place in the tables, instead of a torch gather + bmm (about 10x faster on this CPU).
    """

    def __init__(self, tree: CellTree, vectors: Sequence, temperatures: np.ndarray, *,
                 device: str = "cpu", level1_scorer=None, faiss_kernels: bool = False):
        import torch

        self.torch = torch
        self.tree = tree
        self.device = torch.device(device)
        # float32 on the device: no copy when they are already
        self.vectors = [torch.as_tensor(v, dtype=torch.float32, device=self.device) for v in vectors]
        temps = np.asarray(temperatures, dtype=np.float64).reshape(-1)
        if len(self.vectors) != tree.levels or temps.shape[0] != tree.levels:
            raise UserError(f"{len(self.vectors)} vector tables / {temps.shape[0]} temperatures "
                            f"for a {tree.levels}-level tree")
        if not np.all(temps > 0):
            raise UserError("temperatures must be positive")
        self.temperatures = temps
        self.dim = int(self.vectors[0].shape[1])
        for lv, v in enumerate(self.vectors):
            if tuple(v.shape) != (tree.sizes[lv], self.dim):
                raise UserError(f"level {lv + 1}: embedding table {tuple(v.shape)} does not match "
                                f"{tree.sizes[lv]} cells x {self.dim}")
        self.level1_scorer = level1_scorer
        t = lambda a, dt: torch.as_tensor(a, dtype=dt, device=self.device)  # noqa: E731
        self._parents = [t(p.astype(np.int64), torch.int64) for p in tree.parents]
        self._kids = [t(k, torch.int32) for k in tree.children_padded()]
        cpu = self.device.type == "cpu"
        self._numpy_vectors = [v.numpy() for v in self.vectors] if cpu else None
        self.gather_elements = CPU_GATHER_ELEMENTS if cpu else CHUNK_ELEMENTS
        if faiss_kernels and not cpu:
            raise UserError("FAISS's by-id kernels run on the CPU only")
        self.faiss_kernels = faiss_kernels
        self.dense_ratio = DENSE_RATIO_FAISS if faiss_kernels else DENSE_RATIO
        self._live = [t(m, torch.bool) for m in tree.live]

    # -- public -----------------------------------------------------------------------------
    def search(self, emb, top_k: int = 5, beam: int | Sequence[int] | str | None = None,
               exhaustive: bool = False, batch_size: int = 1024) -> SearchResult:
        """Search n embeddings (n, d); they are L2-normalised here. See the module docstring.
        `beam`: see `parse_beam` (None: DEFAULT_BEAM fitted to the tree); unused when exhaustive."""
        torch = self.torch
        x = self._unit_queries(emb)
        if top_k < 1:
            raise UserError("top_k must be >= 1")
        beams = parse_beam(beam, self.tree.levels)
        parts = []
        with torch.inference_mode():
            for start in range(0, x.shape[0], batch_size):
                xb = x[start:start + batch_size]
                q = torch.from_numpy(xb).to(self.device)
                if exhaustive:
                    cells, logp = self._exhaustive(q, xb, top_k)
                else:
                    cells, logp = self._beam(q, xb, top_k, beams)
                parts.append(self._finish(cells, logp, top_k))
        if not parts:
            return self._finish(torch.zeros((0, top_k), dtype=torch.int64),
                                torch.zeros((0, top_k)), top_k)
        return SearchResult.concat(parts)

    def level_probabilities(self, emb, paths, batch_size: int = 1024) -> np.ndarray:
        """(n, d) embeddings (L2-normalised here) and (n, L) paths (cell_index per level, e.g.
        `SearchResult.best_cells`) -> (n, L) float64: at each level, the level's softmax over all
        its cells (cosine / T_l) at the path's cell. The numerator is computed for the path's cell
        only; the log-normaliser of each level from chunks of at most CHUNK_ELEMENTS scores, the
        same per-level logits as the exhaustive mode."""
        torch = self.torch
        x = self._unit_queries(emb)
        p = np.asarray(paths)
        levels = self.tree.levels
        if p.shape != (x.shape[0], levels) or not np.issubdtype(p.dtype, np.integer):
            raise UserError(f"paths must be integers of shape ({x.shape[0]}, {levels}), got {p.dtype} {p.shape}")
        sizes = np.asarray(self.tree.sizes)
        if p.size and ((p < 0).any() or (p >= sizes[None, :]).any()):
            raise UserError(f"paths hold a cell_index out of range (cells per level: {sizes.tolist()})")
        out = np.empty(p.shape, dtype=np.float64)
        with torch.inference_mode():
            for start in range(0, x.shape[0], batch_size):
                xb = x[start:start + batch_size]
                q = torch.from_numpy(xb).to(self.device)
                idx = torch.as_tensor(p[start:start + batch_size].astype(np.int64), device=self.device)
                for lv in range(levels):
                    rows = self.vectors[lv].index_select(0, idx[:, lv])
                    num = (rows * q).sum(1).double() / float(self.temperatures[lv])
                    logz = self._level_logsumexp(q, xb, lv)
                    out[start:start + len(xb), lv] = (num - logz).exp().cpu().numpy()
        return out

    # -- internals --------------------------------------------------------------------------
    def _unit_queries(self, emb) -> np.ndarray:
        """Checked (n, d) float32 embeddings, L2-normalised (a new contiguous array)."""
        x = np.asarray(emb, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise UserError(f"embeddings must have shape (n, {self.dim}), got {x.shape}")
        if not np.isfinite(x).all():
            raise UserError("embeddings contain NaN or infinite values")
        norms = np.linalg.norm(x, axis=1)
        if x.shape[0] and norms.min() == 0:
            raise UserError("embeddings contain an all-zero row")
        return np.ascontiguousarray(x / norms[:, None])

    def _level1_cosines(self, q, xb: np.ndarray):
        if self.level1_scorer is not None:
            return self.torch.from_numpy(self.level1_scorer(xb)).to(self.device)
        return q @ self.vectors[0].T

    def _level_logits(self, q, xb: np.ndarray, lv: int):
        """(m, n_l) cosine / T_l of m queries with every cell of level lv+1 (level 1 through the
        level-1 scorer when there is one, as in the searches)."""
        if lv == 0 and self.level1_scorer is not None:
            return self._level1_cosines(q, xb).div_(self.temperatures[0])
        return level_logits(q, self.vectors[lv], self.temperatures[lv])

    def _level_logsumexp(self, q, xb: np.ndarray, lv: int):
        """(n,) float64 log of the softmax normaliser of level lv+1, chunked over queries so that
        no (queries x cells) matrix exceeds CHUNK_ELEMENTS."""
        torch = self.torch
        step = max(1, CHUNK_ELEMENTS // max(1, self.tree.sizes[lv]))
        parts = [torch.logsumexp(self._level_logits(q[a:a + step], xb[a:a + step], lv), dim=1).double()
                 for a in range(0, q.shape[0], step)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=q.device)

    def _exhaustive(self, q, xb, top_k):
        """Every cell of every level (`exhaustive_topk`), level 1 through the level-1 scorer."""
        level1 = None
        if self.level1_scorer is not None:
            level1 = lambda a, b: self._level1_cosines(q[a:b], xb[a:b])  # noqa: E731
        return exhaustive_topk(q, self.vectors, self.temperatures, self._parents, top_k, level1=level1)

    def _beam(self, q, xb, top_k, beams):
        torch = self.torch
        neg_inf = float("-inf")
        s1 = self._level1_cosines(q, xb).div_(self.temperatures[0])
        if self.tree.levels == 1:
            logz = torch.logsumexp(s1, dim=1, keepdim=True)
            top, idx = torch.topk(s1, min(top_k, s1.shape[1]), dim=1)
            return idx, top - logz
        # never keep a path that cannot reach the finest level
        kept_s, kept = torch.topk(s1.masked_fill(~self._live[0], neg_inf),
                                  min(beams[0], s1.shape[1]), dim=1)
        kept = kept.masked_fill(torch.isinf(kept_s), -1)
        for lv in range(1, self.tree.levels):
            cand, prev = self._expand(kept, kept_s, lv - 1)
            s = self._cosines(q, cand, lv).div_(self.temperatures[lv]).add_(prev)
            s.masked_fill_(cand < 0, neg_inf)
            if lv < self.tree.levels - 1:
                sel = s.masked_fill(~self._live[lv][cand.clamp(min=0)], neg_inf)
                kept_s, pos = torch.topk(sel, min(beams[lv], sel.shape[1]), dim=1)
                kept = cand.gather(1, pos).masked_fill(torch.isinf(kept_s), -1)
        logz = torch.logsumexp(s, dim=1, keepdim=True)
        top, pos = torch.topk(s, min(top_k, s.shape[1]), dim=1)
        return cand.gather(1, pos), top - logz

    def _expand(self, kept, kept_s, lv):
        """Children (level lv+2) of the kept level-(lv+1) cells -> (n, C) cell ids padded with -1
        (valid ones first, C = the most any query has), and (n, C) their parents' path scores."""
        torch = self.torch
        n = kept.shape[0]
        kids = self._kids[lv][kept.clamp(min=0)].long()  # (n, B, max_children)
        kids.masked_fill_((kept < 0)[:, :, None], -1)
        prev = kept_s[:, :, None].expand(kids.shape).reshape(n, -1)
        kids = kids.reshape(n, -1)
        valid = kids >= 0
        width = max(1, int(valid.sum(1).max())) if n else 1
        if width < kids.shape[1]:  # compact: valid candidates first, then cut the padding
            order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :width]
            kids, prev = kids.gather(1, order), prev.gather(1, order)
        return kids, prev

    def _cosines(self, q, cand, lv):
        """(n, C) cosines of each query with its candidate cells of level lv+1 (-1 = anything).

        Small levels: one dense GEMM against the whole level, then a gather of the scores (a
        GEMM pair costs far less than a random 3 KB row read). Large levels: FAISS's
        inner_products_by_idx on the CPU (reads the rows in place), else a gather of the rows
        and a batched GEMV in torch, chunked to bound memory."""
        torch = self.torch
        n, width = cand.shape
        table = self.vectors[lv]
        if table.shape[0] <= self.dense_ratio * width:
            safe = cand.clamp(min=0)
            step = max(1, CHUNK_ELEMENTS // max(1, table.shape[0]))
            out = torch.empty(cand.shape, dtype=q.dtype, device=q.device)
            for a in range(0, n, step):
                out[a:a + step] = torch.mm(q[a:a + step], table.T).gather(1, safe[a:a + step])
            return out
        if self.faiss_kernels:
            import faiss

            ids = np.ascontiguousarray(cand.numpy(), dtype=np.int64)
            xq = np.ascontiguousarray(q.numpy())
            out = np.empty(ids.shape, dtype=np.float32)
            faiss.fvec_inner_products_by_idx(faiss.swig_ptr(out), faiss.swig_ptr(xq),
                                             faiss.swig_ptr(self._numpy_vectors[lv]),
                                             faiss.swig_ptr(ids), self.dim, n, width)
            return torch.from_numpy(out)  # -1 ids give -inf, masked by the caller anyway
        safe = cand.clamp(min=0)
        step = max(1, self.gather_elements // max(1, width * self.dim))
        out = torch.empty(cand.shape, dtype=q.dtype, device=q.device)
        for a in range(0, n, step):
            rows = self._gather_rows(lv, safe[a:a + step].reshape(-1)).view(-1, width, self.dim)
            out[a:a + step] = torch.bmm(rows, q[a:a + step, :, None])[:, :, 0]
        return out

    def _gather_rows(self, lv, idx):
        if self.device.type == "cpu":
            # numpy's take is about 3x faster than torch's CPU index_select for 3 KB rows
            return self.torch.from_numpy(np.take(self._numpy_vectors[lv], idx.numpy(), axis=0))
        return self.vectors[lv].index_select(0, idx)

    def _finish(self, cells, logp, top_k) -> SearchResult:
        cells = cells.cpu().numpy().astype(np.int64)
        logp = logp.double().cpu().numpy()
        n = cells.shape[0]
        if cells.shape[1] < top_k:  # fewer candidates than k
            pad = top_k - cells.shape[1]
            cells = np.pad(cells, ((0, 0), (0, pad)), constant_values=-1)
            logp = np.pad(logp, ((0, 0), (0, pad)), constant_values=-np.inf)
        cells[np.isneginf(logp)] = -1  # padded candidate slots
        probs = np.exp(logp)
        best = cells[:, 0] if n else np.zeros(0, dtype=np.int64)
        finest = self.tree.levels - 1
        return SearchResult(
            topk_cells=cells.astype(np.int32),
            topk_probs=probs.astype(np.float32),
            best_cells=self.tree.ancestors(best),
            lat=self.tree.mean_lat[finest][best],
            lon=self.tree.mean_lon[finest][best],
            probability=probs[:, 0] if n else np.zeros(0),
        )


def result_to_arrow(result: SearchResult | None, tree: CellTree, ids: Sequence[str],
                    paths: Sequence[str | None] | None = None,
                    errors: Sequence[str | None] | None = None,
                    embeddings: np.ndarray | None = None,
                    widths: Sequence[int | None] | None = None,
                    heights: Sequence[int | None] | None = None,
                    gps: Sequence | None = None,
                    confidence=None) -> pa.Table:
    """Prediction rows in the PRED_DIR schema (`pred_store.pred_schema`), one per input.

    `ids` (and `paths`, `errors`, `widths`, `heights` when given) have one entry per input.
    `result` holds one row per input whose error is None, in input order (None when every input
    failed); error rows get null predictions. `embeddings`, when given, has one row per result
    row and fills the `embedding` column (the schema then includes it). `tree` is the index's
    CellTree (`GeoIndex.tree`), for the S2 tokens (`token_l*`, and `topk_tokens` of the finest
    level's `topk_cells`). `geometry` is the predicted point as WKB (null for error rows).
    `confidence`: a `confidence.Confidence` of the result rows (None: those columns are null).
    """
    from geosurge_index.calibration import WITHIN_COLUMNS
    from geosurge_index.geoparquet import points_wkb
    from geosurge_index.pred_store import CONFIDENCE_FIELDS, pred_schema

    n = len(ids)
    errors = list(errors) if errors is not None else [None] * n
    paths = list(paths) if paths is not None else [None] * n
    if len(errors) != n or len(paths) != n:
        raise ValueError("ids, paths and errors must have one entry per input")
    ok = np.array([e is None for e in errors], dtype=bool)
    n_ok = int(ok.sum())
    if (len(result) if result is not None else 0) != n_ok:
        raise ValueError(f"{n_ok} inputs without error but {0 if result is None else len(result)} result rows")
    if embeddings is not None and embeddings.shape[0] != n_ok:
        raise ValueError("embeddings must have one row per result row")
    schema = pred_schema(save_embeddings=embeddings is not None)
    rows = np.flatnonzero(ok)
    mask = ~ok  # pyarrow mask: True = null

    def spread(values: np.ndarray, dtype) -> pa.Array:
        full = np.zeros(n, dtype=values.dtype)
        full[rows] = values
        return pa.array(full, type=dtype, mask=mask)

    def spread_list(values: np.ndarray, dtype) -> pa.Array:
        k = values.shape[1] if values.ndim == 2 else 0
        lengths = np.where(ok, k, 0)
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        flat = pa.array(values.reshape(-1), type=dtype)
        arr = pa.ListArray.from_arrays(pa.array(offsets), flat, mask=pa.array(mask))
        return arr.cast(pa.list_(dtype))

    levels = tree.levels
    if result is None:
        result = SearchResult(np.zeros((0, 1), np.int32), np.zeros((0, 1), np.float32),
                              np.zeros((0, levels), np.int32), np.zeros(0), np.zeros(0), np.zeros(0))
    cols: dict[str, pa.Array] = {
        "id": pa.array([str(i) for i in ids], pa.string()),
        "path": pa.array(paths, pa.string()),
        "lat": spread(result.lat, pa.float64()),
        "lon": spread(result.lon, pa.float64()),
        "probability": spread(result.probability.astype(np.float64), pa.float64()),
    }
    for lv in range(levels):
        cols[f"cell_l{lv + 1}"] = spread(result.best_cells[:, lv], pa.int32())
    for lv in range(levels):
        take = np.zeros(n, dtype=np.int64)
        take[rows] = result.best_cells[:, lv]
        tok = tree.tokens[lv].take(pa.array(take)) if len(tree.tokens[lv]) else pa.nulls(n, pa.string())
        cols[f"token_l{lv + 1}"] = pa.array(tok.to_numpy(zero_copy_only=False), pa.string(), mask=mask)
    cols["topk_cells"] = spread_list(result.topk_cells.astype(np.int32), pa.int32())
    cols["topk_probs"] = spread_list(result.topk_probs.astype(np.float32), pa.float32())
    if embeddings is not None:
        cols["embedding"] = spread_list(np.asarray(embeddings, dtype=np.float32), pa.float32())
    cols["width"] = pa.array(list(widths) if widths is not None else [None] * n, pa.int32())
    cols["height"] = pa.array(list(heights) if heights is not None else [None] * n, pa.int32())
    cols["error"] = pa.array(errors, pa.string())
    finest = tree.tokens[levels - 1]
    topk = result.topk_cells.astype(np.int64)
    if len(finest) and topk.size:  # -1 pads a top-k shorter than k: a null token
        flat = finest.take(pa.array(np.maximum(topk.reshape(-1), 0), mask=topk.reshape(-1) < 0))
        flat = flat.to_numpy(zero_copy_only=False)
    else:
        flat = np.full(topk.size, None, dtype=object)
    cols["topk_tokens"] = spread_list(flat.reshape(topk.shape), pa.string())
    cols["geometry"] = points_wkb(cols["lon"].to_numpy(zero_copy_only=False),
                                  cols["lat"].to_numpy(zero_copy_only=False))
    cols.update(exif_columns(gps, n))  # the photo's own GPS; cap_* stay null (`privacy.apply_cap` sets them)
    for name in ("cap_km", "cap_level", "cap_token"):
        cols[name] = pa.nulls(n, schema.field(name).type)
    cols.update(_refinement_columns(result, rows, mask, n, spread))
    if confidence is not None:
        cols["confidence"] = spread(confidence.probability.astype(np.float64), pa.float64())
        cols["level_confidence"] = spread_list(confidence.level_probability.astype(np.float32), pa.float32())
        cols["r50_km"] = spread(confidence.r50_km.astype(np.float64), pa.float64())
        cols["r90_km"] = spread(confidence.r90_km.astype(np.float64), pa.float64())
        cols["calibrated"] = spread(np.full(n_ok, confidence.calibrated), pa.bool_())
        for j, name in enumerate(WITHIN_COLUMNS):
            cols[name] = spread(confidence.within[:, j].astype(np.float64), pa.float64())
    else:
        for name, _ in CONFIDENCE_FIELDS:
            cols[name] = pa.nulls(n, schema.field(name).type)
    return pa.table([cols[f.name] for f in schema], schema=schema)


def exif_columns(gps: Sequence | None, n: int) -> dict[str, pa.Array]:
    """`exif_*` prediction columns from one `exif_gps.GpsTag` (or None: unknown) per input."""
    tags = list(gps) if gps is not None else [None] * n
    get = lambda attr: [None if t is None else getattr(t, attr) for t in tags]  # noqa: E731
    return {"exif_lat": pa.array(get("lat"), pa.float64()), "exif_lon": pa.array(get("lon"), pa.float64()),
            "exif_gps_present": pa.array(get("present"), pa.bool_()),
            "exif_gps_valid": pa.array(get("valid"), pa.bool_()),
            "exif_gps_note": pa.array(get("note"), pa.string())}


def _refinement_columns(result: SearchResult, rows: np.ndarray, mask: np.ndarray, n: int, spread) -> dict:
    """point_source .. cell_lon (PRED_DIR, `pred_schema`): how the point was made. Without a
    refinement every point is its cell's mean: point_source "cell_mean", no neighbour."""
    ref = result.refinement
    if ref is None:
        source = np.zeros(len(result), np.int8)
        cell_lat, cell_lon = result.lat, result.lon
        gallery = neighbour = np.full(len(result), None, dtype=object)
        sim = np.full(len(result), np.nan, np.float32)
    else:
        source, cell_lat, cell_lon = ref.point_source, ref.cell_lat, ref.cell_lon
        gallery, neighbour, sim = ref.gallery, ref.neighbour_id, ref.similarity

    def spread_obj(values) -> pa.Array:
        full = np.full(n, None, dtype=object)
        full[rows] = values
        return pa.array(full, pa.string())

    names = np.asarray(POINT_SOURCES, dtype=object)
    sim_full = np.full(n, np.nan, np.float32)
    sim_full[rows] = sim
    return {
        "point_source": spread_obj(names[source.astype(np.int64)] if len(source) else source.astype(object)),
        "neighbour_gallery": spread_obj(gallery),
        "neighbour_id": spread_obj(neighbour),
        "neighbour_similarity": pa.array(sim_full, pa.float32(), mask=np.isnan(sim_full)),
        "cell_lat": spread(np.asarray(cell_lat, np.float64), pa.float64()),
        "cell_lon": spread(np.asarray(cell_lon, np.float64), pa.float64()),
    }
