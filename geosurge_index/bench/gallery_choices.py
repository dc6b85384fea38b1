"""`geosurge bench gallery-choices DEMO_OUT`: the measured choices of the gallery refinement, on a
finished `geosurge demo` folder: which embedding compares images (the model's visual embedding
vs the image encoder's own feature, PIGEON's choice), which rule makes the point (the nearest
reference vs the similarity-weighted mean of those that agree), how many cells are searched."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DESCRIPTION = """\
Measured choices of the gallery refinement on a finished `geosurge demo` folder (its index,
training photos, test photos and personal archive).

Method. Every photo is encoded once by the demo's encoder, keeping two embeddings: the model's
visual embedding (what is searched against the cells; `embedding = geo`) and the image encoder's
own feature (the CLIP backbone's CLS token after its final LayerNorm, L2-normalised; PIGEON
compares images with it). The cells are searched with the visual embedding (the index's default
beam). Then, for each setting, the references inside the best N cells (references and queries
placed in the index's finest cells by their true coordinates) are compared with numpy, and the
point is the nearest reference's (rule nearest) or the similarity-weighted spherical mean of the
5 nearest within `agree` km of it (rule mean). Two scenarios: test photos against the training
photos, and the archive's untagged photos against its tagged ones. Figures: % within 1 / 25 /
200 km, against the cell mean point; and, to judge the embeddings apart from the cell search, the
nearest reference inside each query's true finest cell (over the queries whose cell holds one).
"""


def _encode_all(index_dir: Path, paths: list[str], batch: int = 64):
    """(geo embeddings, backbone features, SearchResult over the geo embeddings) of image files."""
    import torch
    import torch.nn.functional as F

    from geosurge_index.locate import Locator
    from geosurge_index.progress import bar
    from geosurge_index.search import SearchResult
    from geosurge_index.settings import InferenceSettings

    loc = Locator.open(index_dir, settings=InferenceSettings(device="cpu", galleries="none"))
    enc = loc.predictor.encoder
    clip = enc.backbone.clip
    seen = []

    def hook(_module, _inputs, out):
        cls = out[:, 0]
        if hasattr(clip, "post_layernorm"):
            cls = clip.post_layernorm(cls)
        seen.append(F.normalize(cls.float(), dim=-1).cpu().numpy())

    handle = enc.backbone.register_forward_hook(hook)
    geo, feats, results = [], [], []
    try:
        with torch.inference_mode():
            for a in bar(range(0, len(paths), batch), desc="encode", unit="batch"):
                seen.clear()
                preds = loc.locate(paths[a:a + batch], return_embeddings=True, cell_probabilities=False)
                if any(p.error for p in preds):
                    raise ValueError(f"cannot decode {[p.id for p in preds if p.error][:3]}")
                geo.append(np.array([p.embedding for p in preds], np.float32))
                feats.append(np.concatenate(seen))
    finally:
        handle.remove()
    geo = np.concatenate(geo)
    results = loc.index.search(geo, top_k=10)
    assert isinstance(results, SearchResult)
    return geo, np.concatenate(feats), results


def _points(ref_emb, ref_cell, ref_lat, ref_lon, q_emb, topk, n_cells, rule, agree_km):
    from geosurge_index.metrics import haversine_km

    by_cell: dict[int, np.ndarray] = {}
    for c in np.unique(ref_cell):
        by_cell[int(c)] = np.flatnonzero(ref_cell == c)
    lat = np.full(len(q_emb), np.nan)
    lon = np.full(len(q_emb), np.nan)
    for i in range(len(q_emb)):
        members = [by_cell[int(c)] for c in topk[i, :n_cells] if int(c) in by_cell]
        if not members:
            continue
        m = np.concatenate(members)
        sims = ref_emb[m] @ q_emb[i]
        order = np.argsort(-sims)[: (5 if rule == "mean" else 1)]
        best = m[order[0]]
        if rule == "nearest":
            lat[i], lon[i] = ref_lat[best], ref_lon[best]
            continue
        near = m[order]
        d = haversine_km(ref_lat[near], ref_lon[near], ref_lat[best], ref_lon[best])
        keep = near[d <= agree_km]
        w = np.maximum(sims[order][d <= agree_km], 1e-6)
        la, lo = np.radians(ref_lat[keep]), np.radians(ref_lon[keep])
        v = (np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], 1) * w[:, None]).sum(0)
        v /= np.linalg.norm(v)
        lat[i], lon[i] = np.degrees(np.arcsin(v[2])), np.degrees(np.arctan2(v[1], v[0]))
    return lat, lon


def run_choices(demo_out: str | Path) -> dict:
    import csv

    from geosurge_index.cells import assign_points
    from geosurge_index.index import IndexCells
    from geosurge_index.machine import describe_machine
    from geosurge_index.metrics import accuracy_at, haversine_km

    out = Path(demo_out)
    index_dir = out / "index"

    def manifest(path: Path, filt=None):
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if filt is None or filt(r)]
        base = path.parent
        files = [str(base / (r.get("path") or r["id"])) for r in rows]
        return files, np.array([float(r["lat"]) for r in rows]), np.array([float(r["lon"]) for r in rows])

    from geosurge_index.errors import UserError

    if not (out / "world/train/manifest.csv").is_file() or not (index_dir / "manifest.json").is_file():
        raise UserError(f"{out} is not a finished `geosurge demo` folder (world/train, index/)")
    scenarios = {"test photos vs training photos": (manifest(out / "world/train/manifest.csv"),
                                                    manifest(out / "world/test/manifest.csv"))}
    if (out / "world/archive/truth.csv").is_file():
        truth = out / "world/archive/truth.csv"
        scenarios["archive: untagged vs tagged"] = (manifest(truth, lambda r: r["tagged"] == "1"),
                                                    manifest(truth, lambda r: r["tagged"] == "0"))
    print("geosurge bench gallery-choices")
    print(f"machine: {describe_machine()}")
    print("method: " + " ".join(DESCRIPTION.split("\n\n", 1)[1].split()))
    with IndexCells.open(index_dir) as ic:
        part = ic.partition()
    figures = {}
    for name, ((rf, rlat, rlon), (qf, qlat, qlon)) in scenarios.items():
        r_geo, r_feat, _ = _encode_all(index_dir, rf)
        q_geo, q_feat, res = _encode_all(index_dir, qf)
        r_cell = assign_points(part, rlat, rlon)[:, -1]
        ok = r_cell >= 0
        rows = {"cell mean": accuracy_at(haversine_km(res.lat, res.lon, qlat, qlon))}
        # the true finest cell given (an oracle search): what the embedding alone does inside a cell
        q_cell = assign_points(part, qlat, qlon)[:, -1][:, None]
        for emb_name, (re_, qe) in {"geo": (r_geo, q_geo), "backbone": (r_feat, q_feat)}.items():
            for n_cells in (1, 3, 10):
                for rule, agree in (("nearest", 0.0), ("mean", 1.0), ("mean", 25.0)):
                    la, lo = _points(re_[ok], r_cell[ok], rlat[ok], rlon[ok], qe, res.topk_cells, n_cells, rule, agree)
                    la = np.where(np.isnan(la), res.lat, la)
                    lo = np.where(np.isnan(lo), res.lon, lo)
                    label = f"{emb_name}, {n_cells} cells, {rule}" + (f" {agree:g} km" if rule == "mean" else "")
                    rows[label] = accuracy_at(haversine_km(la, lo, qlat, qlon))
            la, lo = _points(re_[ok], r_cell[ok], rlat[ok], rlon[ok], qe, q_cell, 1, "nearest", 0.0)
            has = ~np.isnan(la)
            acc = accuracy_at(haversine_km(la[has], lo[has], qlat[has], qlon[has]))
            rows[f"{emb_name}, true cell given ({int(has.sum())} q)"] = acc
        print(f"\n[{name}] {len(rf)} references, {len(qf)} queries; % within")
        print(f"  {'setting':<34}{'1 km':>8}{'25 km':>8}{'200 km':>8}")
        for label, acc in rows.items():
            print(f"  {label:<34}{acc[1.0]:8.1f}{acc[25.0]:8.1f}{acc[200.0]:8.1f}")
        figures[name] = {k: {str(int(t)): v for t, v in acc.items()} for k, acc in rows.items()}
    return figures
