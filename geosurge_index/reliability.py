"""How far a confidence can be trusted, measured on photos with a known location: the expected
calibration error and reliability diagram of the cell probability, the coverage of the error radii,
and the selective-accuracy curve (what share is right among the x% most confident), as numbers
(`confidence_report`) and as one PNG (`plot_confidence`). numpy (matplotlib only for the picture).

- ECE: the photos in 10 equal-width bins of predicted probability; the mean over bins of
  |mean predicted - observed rate|, weighted by the bin's share of photos (Guo et al. 2017).
  The outcome is "the true point lies in the reported finest cell".
- Coverage: the share of photos whose true point is within r50 (resp. r90) km of the predicted
  point; a calibrated radius covers 50% (90%).
- Selective accuracy: photos sorted by decreasing probability; for x = 10, 20, .., 100, the share
  of the x% most confident within 1 / 25 / 200 / 750 / 2500 km. Photos without a point (errors,
  missing) count as wrong and as least confident. With the `p_within_*km` columns each distance's
  curve ranks by the probability of that very outcome (P(within 25 km) for the 25 km curve: what a
  user who needs answers within 25 km keeps), and the curve ranked by the cell probability
  `confidence` is reported beside it; without them (older predictions) by `confidence`.
- The ECE of each `p_within_*km` (outcome: the true point lies within that distance).
"""

from __future__ import annotations

import math

import numpy as np

from geosurge_index.metrics import THRESHOLDS_KM
from geosurge_index.metrics import km_key as _km

ECE_BINS = 10
KEEP_PCT = tuple(range(10, 101, 10))


def _bins(p: np.ndarray, n_bins: int) -> np.ndarray:
    return np.minimum((np.clip(p, 0.0, 1.0) * n_bins).astype(np.int64), n_bins - 1)


def ece(p, hit, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of probabilities p for outcomes hit (equal-width bins)."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(hit, dtype=np.float64)
    if len(p) == 0:
        return math.nan
    b = _bins(p, n_bins)
    count = np.bincount(b, minlength=n_bins)
    gap = np.abs(np.bincount(b, p, n_bins) - np.bincount(b, y, n_bins))
    return float(gap.sum() / count.sum())


def reliability_bins(p, hit, n_bins: int = ECE_BINS) -> list[dict]:
    """Per bin: its range, photo count, mean predicted probability and observed rate (None when empty)."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(hit, dtype=np.float64)
    b = _bins(p, n_bins)
    count = np.bincount(b, minlength=n_bins)
    sp, sy = np.bincount(b, p, n_bins), np.bincount(b, y, n_bins)
    return [{"low": i / n_bins, "high": (i + 1) / n_bins, "n": int(count[i]),
             "mean_probability": float(sp[i] / count[i]) if count[i] else None,
             "observed": float(sy[i] / count[i]) if count[i] else None} for i in range(n_bins)]


def selective_accuracy(confidence, distance_km, keep_pct=KEEP_PCT, thresholds=THRESHOLDS_KM) -> dict:
    """{threshold km (str): [% within among the x% most confident, for x in keep_pct]}; NaN
    confidence or distance = least confident and wrong. Ties keep input order."""
    c = np.asarray(confidence, dtype=np.float64)
    d = np.asarray(distance_km, dtype=np.float64)
    usable = np.isfinite(c) & np.isfinite(d)
    d = np.where(usable, d, np.inf)
    order = np.argsort(-np.where(usable, c, -np.inf), kind="stable")
    n = len(c)
    out: dict[str, list[float | None]] = {}
    for t in thresholds:
        right = np.cumsum(d[order] <= t)
        vals = []
        for x in keep_pct:
            k = max(1, int(round(n * x / 100.0))) if n else 0
            vals.append(float(100.0 * right[k - 1] / k) if k else None)
        out[_km(t)] = vals
    return out


def top_half_ratio(score, distance_km, km: float = 25.0) -> float | None:
    """% within `km` among the half ranked first by `score` over % within `km` of all (None: none within)."""
    curve = selective_accuracy(score, distance_km, keep_pct=(50, 100), thresholds=(km,))[_km(km)]
    return float(curve[0] / curve[1]) if curve[1] else None


def selective_accuracy_by_outcome(within, distance_km, within_km, keep_pct=KEEP_PCT) -> dict:
    """Like `selective_accuracy`, but the curve of each distance within_km[j] ranks photos by
    within[:, j], the probability of being within that distance."""
    w = np.asarray(within, dtype=np.float64)
    return {_km(t): selective_accuracy(w[:, j], distance_km, keep_pct, (t,))[_km(t)]
            for j, t in enumerate(within_km)}


def confidence_report(confidence, distance_km, hit=None, r50=None, r90=None, *, level_confidence=None,
                      level_hits=None, calibrated: bool | None = None, groups=None,
                      signals: dict | None = None, within=None, within_km=None) -> dict:
    """The numbers of `geosurge eval` about confidence (JSON-ready). `confidence` (n,) the cell
    probability; `distance_km` (n,) true error (inf/NaN = no point); `hit` (n,) bool, the true point
    in the reported finest cell (None: unknown without the index, no ECE); `r50`, `r90` (n,) km;
    `level_confidence`, `level_hits` (n, L): per-level ECE. `groups` (n,) labels (e.g. the
    `point_source` of each answer): r50 / r90 coverage per label as well. `signals` {name: (n,)
    scores, higher = more confident}: other candidate rankings, each scored like `confidence` by
    the share within 25 km of its most confident half over the share of all (`top_half_ratio`).
    `within` (n, T): P(within within_km[j] km) per photo (`p_within_*km`): its ECE per distance, and
    the selective-accuracy curves ranked by it (the cell probability's curves are kept beside)."""
    c = np.asarray(confidence, dtype=np.float64)
    d = np.asarray(distance_km, dtype=np.float64)
    has = np.isfinite(c) & np.isfinite(d)
    out: dict = {"n": int(len(c)), "n_with_confidence": int(has.sum()), "calibrated": calibrated,
                 "mean_confidence": float(c[has].mean()) if has.any() else None,
                 "ece_bins": ECE_BINS, "keep_pct": list(KEEP_PCT)}
    if hit is not None:
        y = np.asarray(hit, dtype=bool)
        out["cell_hit_rate"] = float(y[has].mean()) if has.any() else None
        out["ece"] = ece(c[has], y[has]) if has.any() else None
        out["reliability"] = reliability_bins(c[has], y[has])
    if level_confidence is not None and level_hits is not None:
        lc, lh = np.asarray(level_confidence, dtype=np.float64), np.asarray(level_hits, dtype=bool)
        out["ece_per_level"] = {str(j + 1): ece(lc[has, j], lh[has, j]) if has.any() else None
                                for j in range(lc.shape[1])}
    for name, r in (("r50", r50), ("r90", r90)):
        if r is not None:
            r = np.asarray(r, dtype=np.float64)
            ok = has & np.isfinite(r)
            out[f"{name}_coverage"] = float(np.mean(d[ok] <= r[ok])) if ok.any() else None
            out[f"{name}_median_km"] = float(np.median(r[ok])) if ok.any() else None
    if groups is not None and r50 is not None and r90 is not None:
        g = np.asarray(groups, dtype=object)
        r50a, r90a = np.asarray(r50, dtype=np.float64), np.asarray(r90, dtype=np.float64)
        out["coverage_by_group"] = {
            str(k): {"n": int(m.sum()), "r50": float(np.mean(d[m] <= r50a[m])), "r90": float(np.mean(d[m] <= r90a[m]))}
            for k in sorted(set(g[has].tolist())) for m in [has & (g == k) & np.isfinite(r90a)] if m.any()}
    if signals:
        out["within_25km_top_half_vs_all_by_signal"] = {
            name: top_half_ratio(np.where(has, np.asarray(v, dtype=np.float64), np.nan), d) for name, v in signals.items()}
    by_cell = selective_accuracy(np.where(has, c, np.nan), d)
    curve, ranking = by_cell, "confidence"
    if within is not None and within_km is not None:
        w = np.asarray(within, dtype=np.float64)
        w = np.where(has[:, None], w, np.nan)
        out["within_km"] = [float(t) for t in within_km]
        out["within_ece"] = {_km(t): (ece(w[ok, j], d[ok] <= t) if ok.any() else None)
                             for j, t in enumerate(within_km) for ok in [np.isfinite(w[:, j]) & has]}
        out["within_mean"] = {_km(t): (float(np.nanmean(w[:, j])) if np.isfinite(w[:, j]).any() else None)
                              for j, t in enumerate(within_km)}
        if np.isfinite(w).any():
            curve = {**by_cell, **selective_accuracy_by_outcome(w, d, within_km)}
            ranking = "p_within"
            out["selective_accuracy_by_confidence_pct"] = by_cell
    out["selective_accuracy_pct"] = curve
    out["selective_ranking"] = ranking  # "p_within": each distance's curve by P(within it)
    for name, cur in (("within_25km_top_half_vs_all", curve), ("within_25km_top_half_vs_all_by_confidence", by_cell)):
        if cur.get("25") and cur["25"][-1]:
            out[name] = float(cur["25"][KEEP_PCT.index(50)] / cur["25"][-1])
    return out


def summary_rows(rep: dict) -> list[tuple[str, str]]:
    """A few (metric, value) rows of a `confidence_report` for a human-readable table."""
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    rows = [("probabilities", "calibrated" if rep.get("calibrated") else
             ("uncalibrated (the model's own)" if rep.get("calibrated") is False else "unknown"))]
    if rep.get("ece") is not None:
        rows.append(("ECE of the cell probability", f"{rep['ece']:.4f}  (mean {rep['mean_confidence']:.3f}, "
                                                     f"observed {rep['cell_hit_rate']:.3f})"))
    for name in ("r50", "r90"):
        if f"{name}_coverage" in rep:
            rows.append((f"{name} covers", f"{pct(rep[f'{name}_coverage'])} of true points "
                                            f"(median radius {rep[f'{name}_median_km'] or float('nan'):.0f} km)"))
    by = rep.get("coverage_by_group") or {}
    if len(by) > 1:
        rows.append(("r50 / r90 cover, per point source", ", ".join(
            f"{k} {pct(v['r50'])} / {pct(v['r90'])} (n={v['n']})" for k, v in by.items())))
    by_signal = {k: v for k, v in (rep.get("within_25km_top_half_vs_all_by_signal") or {}).items() if v is not None}
    if by_signal:
        best = sorted(by_signal.items(), key=lambda kv: -kv[1])[:4]
        rows.append(("within 25 km, top half / all, by ranking", ", ".join(f"{k} {v:.2f}x" for k, v in best)))
    we = {k: v for k, v in (rep.get("within_ece") or {}).items() if v is not None}
    if we:
        rows.append(("ECE of p_within_1/25/200/750/2500km", " / ".join(f"{v:.3f}" for v in we.values())))
    by = "p_within_25km" if rep.get("selective_ranking") == "p_within" else "confidence"
    for key, label in (("selective_accuracy_pct", by), ("selective_accuracy_by_confidence_pct", "confidence")):
        curve = rep.get(key, {}).get("25")
        if curve:
            pick = {x: curve[KEEP_PCT.index(x)] for x in (10, 50, 100)}
            half = f" (top half / all {pick[50] / pick[100]:.2f}x)" if pick[50] is not None and pick[100] else ""
            rows.append((f"% within 25 km, most confident 10/50/100% by {label}",
                         " / ".join("n/a" if v is None else f"{v:.1f}" for v in pick.values()) + half))
    return rows


def plot_confidence(rep: dict, path, title: str = "") -> None:
    """One PNG: the reliability diagram (left; needs `hit`) and the selective-accuracy curves (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))
    bins = rep.get("reliability")
    ax1.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect calibration")
    if bins:
        mids = [(b["low"] + b["high"]) / 2 for b in bins]
        obs = [b["observed"] if b["observed"] is not None else np.nan for b in bins]
        ax1.bar(mids, obs, width=1 / len(bins), edgecolor="k", alpha=0.7, label="observed rate")
        pred = [b["mean_probability"] if b["mean_probability"] is not None else np.nan for b in bins]
        ax1.plot(pred, obs, "o-", color="C3", label="mean predicted vs observed")
        ax1.set_title(f"reliability: ECE {rep['ece']:.3f}" if rep.get("ece") is not None else "reliability")
    else:
        ax1.text(0.5, 0.5, "no cell outcomes\n(evaluate with --index)", ha="center", va="center")
    ax1.set_xlabel("probability that the true point is in the reported cell")
    ax1.set_ylabel("share of photos whose true point is in it")
    ax1.set_xlim(0, 1)
    ax1.set_ylim(0, 1)
    ax1.legend(loc="upper left", fontsize=8)
    keep = rep.get("keep_pct", list(KEEP_PCT))
    for i, (t, vals) in enumerate(rep.get("selective_accuracy_pct", {}).items()):
        ax2.plot(keep, [np.nan if v is None else v for v in vals], "o-", color=f"C{i}", label=f"within {t} km")
    ax2.set_xlabel("% of photos kept (most confident first)")
    ax2.set_ylabel("% of kept photos within the distance")
    ax2.set_xlim(100, 5)
    ax2.set_ylim(0, 100)
    cov = [f"{n} covers {100 * rep[f'{n}_coverage']:.0f}%" for n in ("r50", "r90")
           if rep.get(f"{n}_coverage") is not None]
    by = ("each curve by P(within its distance)" if rep.get("selective_ranking") == "p_within"
          else "by cell probability")
    ax2.set_title(f"selective accuracy, {by}" + (f"\n({', '.join(cov)})" if cov else ""))
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
