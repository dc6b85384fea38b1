"""Calibrating the model's confidence: per level, a map from the raw probability that the true point
lies in the reported cell to a calibrated one, fitted on held-out photos; the index carries it.

What is calibrated. For every answer and level l, the raw score m_l is the search posterior's mass
on the reported level-l cell: the summed probabilities of the top-k finest cells that lie in it
(`confidence.level_masses`; at the finest level m_L = `probability`). A level calibrator maps
m_l to P_l = P(the true point lies in the reported level-l cell), fitted on photos the model did
not train on (`geosurge train` keeps a split aside; `geosurge calibrate` fits on any geotagged set).
The calibrated P_l are made non-increasing from level 1 to L (a finer cell lies inside its parent).

The methods, each fitted per level and compared by 5-fold cross-validation on the calibration set
(`choose`: the simplest method within one standard error of the lowest out-of-fold Brier score;
log loss and ECE are reported beside it):
- `identity`: P = m (the uncalibrated model);
- `temperature`: logit(P) = logit(m) / T, one parameter (temperature scaling of the binary
  "reported cell or elsewhere" distribution);
- `platt`: logit(P) = a logit(m) + b, two parameters (Platt scaling);
- `isotonic`: the monotone step function of least squares (pool adjacent violators), interpolated
  between block centres, each block's rate shrunk by one pseudo-observation toward the overall
  rate so that a small block never claims certainty.

The error radii (`radius.py`) get one more fitted factor per quantile (`radius_scale`): the
quantile of (true distance / model radius) on the calibration set, a split-conformal correction
that makes r50 / r90 cover 50% / 90% of held-out photos when the posterior's geometry alone does not.

The probability of being within a distance (`within`): for each evaluation threshold t (1, 25,
200, 750, 2500 km), the raw score w_t is the posterior's mass within t km of the predicted point
(`radius.posterior_cdf` from the calibrated P_l and the cells' geometry); a calibrator per
threshold (chosen as above) maps it to P(true point within t km), fitted on the same photos. Why:
the finest cell's probability mixes cells of very different sizes (a small cell in a city has a
low probability and a small error), so it ranks answers poorly by distance; the mass within t
km is what a user who needs answers within t km should rank and threshold by (measured on the
demo world: README "Confidence"). Calibrations without it map w_t as it is (`identity`).

INDEX_DIR/calibration.json (format `geosurge-calibration` v1) holds it; `index.add_listed_file`
lists it in the manifest with its checksum. pure numpy: reading predictions is the caller's job.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from geosurge_index.errors import FormatError, UserError
from geosurge_index.formats import check_format, read_json
from geosurge_index.metrics import THRESHOLDS_KM, km_key

CALIBRATION_FILE = "calibration.json"
CALIBRATION_FORMAT = "geosurge-calibration"
CALIBRATION_VERSION = 1
METHODS = ("identity", "temperature", "platt", "isotonic")
FIT_METHODS = ("temperature", "platt", "isotonic")  # what `choose` compares with identity
QUANTILES = (0.5, 0.9)  # the error radii: r50, r90
WITHIN_KM = THRESHOLDS_KM  # the distances of `p_within_*`: those every accuracy table reports
_EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # stable for large |z|


@dataclass(frozen=True)
class LevelCalibrator:
    """One level's map from the raw mass m to P(truth in the reported cell)."""

    method: str
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise FormatError(f"calibration method {self.method!r}: expected one of {', '.join(METHODS)}")

    def __call__(self, m) -> np.ndarray:
        m = np.asarray(m, dtype=np.float64)
        if self.method == "identity":
            return np.clip(m, 0.0, 1.0)
        if self.method == "temperature":
            return _sigmoid(_logit(m) / self.params["t"])
        if self.method == "platt":
            return _sigmoid(self.params["a"] * _logit(m) + self.params["b"])
        return np.interp(m, self.params["x"], self.params["y"])  # isotonic: flat beyond the ends

    def to_json(self) -> dict:
        return {"method": self.method, **self.params}

    @classmethod
    def from_json(cls, d: dict) -> LevelCalibrator:
        d = dict(d)
        method = d.pop("method", None)
        need = {"identity": (), "temperature": ("t",), "platt": ("a", "b"), "isotonic": ("x", "y")}.get(method)
        if need is None or any(k not in d for k in need):
            raise FormatError(f"calibration level entry {d | {'method': method}} is malformed")
        return cls(method, {k: d[k] for k in need})


# -- fitting ---------------------------------------------------------------------------------------

def _log_loss(x: np.ndarray, y: np.ndarray, w: np.ndarray, ridge: float) -> float:
    z = x @ w
    return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * ridge * w @ w)


def _newton_logistic(x: np.ndarray, y: np.ndarray, w0, ridge: float = 1e-3, iters: int = 100) -> np.ndarray:
    """Weights w of P = sigmoid(x @ w) minimising the log loss (+ ridge |w|^2 / 2): Newton steps
    halved until the loss decreases (a raw score that is ~constant, e.g. a coarse level's mass
    near 1 for every photo, makes plain Newton overshoot)."""
    w = np.asarray(w0, dtype=np.float64).copy()
    loss = _log_loss(x, y, w, ridge)
    for _ in range(iters):
        p = _sigmoid(x @ w)
        g = x.T @ (p - y) + ridge * w
        h = (x * (p * (1 - p))[:, None]).T @ x + ridge * np.eye(len(w))
        step = np.linalg.solve(h, g)
        t = 1.0
        while t > 1e-6 and _log_loss(x, y, w - t * step, ridge) > loss:
            t *= 0.5
        w = w - t * step
        new = _log_loss(x, y, w, ridge)
        if loss - new < 1e-10 * max(1.0, abs(loss)):
            break
        loss = new
    return w


def fit_level(m, hit, method: str) -> LevelCalibrator:
    """Fit one level's calibrator on raw masses `m` (n,) and outcomes `hit` (n,) bool."""
    m = np.asarray(m, dtype=np.float64)
    y = np.asarray(hit, dtype=np.float64)
    if m.shape != y.shape or m.ndim != 1:
        raise ValueError("fit_level: m and hit must be 1-d of one length")
    if method == "identity" or len(m) == 0:
        return LevelCalibrator("identity")
    if method == "temperature":
        a = _newton_logistic(_logit(m)[:, None], y, [1.0])[0]  # from the identity map
        return LevelCalibrator("temperature", {"t": float(1.0 / max(a, 1e-3))})
    if method == "platt":
        rate = float(np.clip(y.mean(), 1e-3, 1 - 1e-3))  # from the constant map (well conditioned)
        a, b = _newton_logistic(np.stack([_logit(m), np.ones_like(m)], axis=1), y, [0.0, float(_logit(rate))])
        return LevelCalibrator("platt", {"a": float(a), "b": float(b)})
    if method == "isotonic":
        return _fit_isotonic(m, y)
    raise UserError(f"calibration method {method!r}: expected one of {', '.join(METHODS)}")


def _fit_isotonic(m: np.ndarray, y: np.ndarray) -> LevelCalibrator:
    order = np.argsort(m, kind="stable")
    xs, ys = m[order], y[order]
    # pool adjacent violators over (sum y, count, sum x) blocks
    sums, counts, xsum = [], [], []
    for xv, yv in zip(xs.tolist(), ys.tolist(), strict=True):
        sums.append(yv)
        counts.append(1.0)
        xsum.append(xv)
        while len(sums) > 1 and sums[-2] / counts[-2] >= sums[-1] / counts[-1]:
            s, c, x = sums.pop(), counts.pop(), xsum.pop()
            sums[-1] += s
            counts[-1] += c
            xsum[-1] += x
    s, c, x = np.array(sums), np.array(counts), np.array(xsum)
    rate = y.mean()
    fitted = np.maximum.accumulate((s + rate) / (c + 1.0))  # one pseudo-observation at the overall rate
    return LevelCalibrator("isotonic", {"x": (x / c).round(8).tolist(), "y": fitted.round(8).tolist()})


def scores(p, hit) -> dict[str, float]:
    """Brier score, log loss and ECE (`reliability.ece`) of probabilities p for outcomes hit."""
    from geosurge_index.reliability import ece

    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    y = np.asarray(hit, dtype=np.float64)
    if len(p) == 0:
        return {"brier": math.nan, "brier_se": math.nan, "log_loss": math.nan, "ece": math.nan}
    q = np.clip(p, 1e-4, 1 - 1e-4)
    sq = (p - y) ** 2
    return {"brier": float(sq.mean()), "brier_se": float(sq.std() / math.sqrt(len(sq))),
            "log_loss": float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q))),
            "ece": float(ece(p, y))}


def cross_validate(m, hit, method: str, folds: int = 5, seed: int = 0) -> dict[str, float]:
    """Out-of-fold scores of `method` on (m, hit): fitted on 4/5, scored on the rest, 5 times."""
    m = np.asarray(m, dtype=np.float64)
    hit = np.asarray(hit, dtype=bool)
    n = len(m)
    if n < 2 * folds:
        return scores(fit_level(m, hit, method)(m), hit)
    fold = np.random.default_rng([seed, 4242]).permutation(n) % folds
    out = np.empty(n)
    for f in range(folds):
        test = fold == f
        out[test] = fit_level(m[~test], hit[~test], method)(m[test])
    return scores(out, hit)


def choose(m, hit, methods=FIT_METHODS) -> tuple[LevelCalibrator, dict[str, dict[str, float]]]:
    """The simplest method (in METHODS order: identity, temperature, platt, isotonic) whose
    out-of-fold Brier score is within one standard error of the lowest (the one-standard-error
    rule: a step function is kept only when it is clearly better than a smooth, order-keeping map),
    refitted on all of (m, hit); and every method's out-of-fold scores."""
    table = {name: cross_validate(m, hit, name) for name in ("identity", *methods)}
    low = min(table, key=lambda k: table[k]["brier"])
    bound = table[low]["brier"] + table[low]["brier_se"]
    best = next(k for k in METHODS if k in table and table[k]["brier"] <= bound)
    return fit_level(m, hit, best), table


# -- the calibration of an index -------------------------------------------------------------------

@dataclass
class Calibration:
    """An index's calibration: one calibrator per level, the radius factors, and how it was fitted."""

    levels: list[LevelCalibrator]  # index 0 = level 1
    top_k: int  # the raw masses are summed over this many top finest cells
    radius_scale: dict[str, float] = field(default_factory=lambda: {"50": 1.0, "90": 1.0})
    meta: dict = field(default_factory=dict)  # n, source, search settings, comparison, created_utc
    # P(within t km): one calibrator per threshold, keyed by `km_key(t)`; a missing one is `identity`
    within: dict[str, LevelCalibrator] = field(default_factory=dict)

    def probabilities(self, masses) -> np.ndarray:
        """(n, L) raw level masses -> (n, L) calibrated probabilities, non-increasing in level."""
        m = np.asarray(masses, dtype=np.float64)
        if m.ndim != 2 or m.shape[1] != len(self.levels):
            raise ValueError(f"masses must be (n, {len(self.levels)}), got {m.shape}")
        out = np.stack([cal(m[:, j]) for j, cal in enumerate(self.levels)], axis=1) if m.shape[0] else m.copy()
        return np.minimum.accumulate(np.clip(out, 0.0, 1.0), axis=1)

    def within_probabilities(self, raw, km) -> np.ndarray:
        """(n, T) posterior masses within each of `km` (T,) -> calibrated P(within), non-decreasing in km."""
        w = np.asarray(raw, dtype=np.float64)
        if w.ndim != 2 or w.shape[1] != len(km):
            raise ValueError(f"raw masses must be (n, {len(km)}), got {w.shape}")
        if w.shape[0] == 0:
            return w.copy()
        ident = LevelCalibrator("identity")
        out = np.stack([self.within.get(km_key(t), ident)(w[:, j]) for j, t in enumerate(km)], axis=1)
        return np.maximum.accumulate(np.clip(out, 0.0, 1.0), axis=1)

    def scale(self, q: float) -> float:
        return float(self.radius_scale.get(f"{round(q * 100)}", 1.0))

    def summary(self) -> dict:
        """What the manifest and `/v1/index` say about it: methods per level, n, the source."""
        return {"calibrated": True, "file": CALIBRATION_FILE,
                "methods": [c.method for c in self.levels], "radius_scale": self.radius_scale,
                "within_km_methods": {k: c.method for k, c in self.within.items()},
                **{k: self.meta[k] for k in ("n", "source", "created_utc") if k in self.meta}}

    def to_json(self) -> dict:
        return {"format": CALIBRATION_FORMAT, "format_version": CALIBRATION_VERSION, "top_k": self.top_k,
                "levels": [{"level": i + 1, **c.to_json()} for i, c in enumerate(self.levels)],
                "radius_scale": self.radius_scale,
                "within_km": [{"km": float(k), **c.to_json()} for k, c in self.within.items()], **self.meta}

    @classmethod
    def from_json(cls, d: dict, where: str | os.PathLike = CALIBRATION_FILE) -> Calibration:
        check_format(d, where, CALIBRATION_FORMAT, CALIBRATION_VERSION)
        try:
            entries = sorted(d["levels"], key=lambda e: e["level"])
            if [e["level"] for e in entries] != list(range(1, len(entries) + 1)):
                raise FormatError(f"{where}: levels are not 1..{len(entries)}")
            levels = [LevelCalibrator.from_json({k: v for k, v in e.items() if k != "level"}) for e in entries]
            top_k = int(d["top_k"])
            scale = {str(k): float(v) for k, v in d.get("radius_scale", {}).items()}
            within = {km_key(e["km"]): LevelCalibrator.from_json({k: v for k, v in e.items() if k != "km"})
                      for e in d.get("within_km", [])}  # absent in calibrations fitted before it
        except (KeyError, TypeError, ValueError) as err:
            raise FormatError(f"{where}: malformed calibration ({err})") from err
        meta = {k: v for k, v in d.items()
                if k not in ("format", "format_version", "top_k", "levels", "radius_scale", "within_km")}
        return cls(levels, top_k, scale or {"50": 1.0, "90": 1.0}, meta, within)

    @classmethod
    def read(cls, path: str | os.PathLike) -> Calibration:
        return cls.from_json(read_json(path, CALIBRATION_FORMAT, CALIBRATION_VERSION), path)


def fit_calibration(masses, hits, *, top_k: int, methods=FIT_METHODS, meta: dict | None = None) -> Calibration:
    """Fit every level: `masses` (n, L) raw level masses, `hits` (n, L) bool (the true point lies in
    the reported cell of that level). Each level's method is `choose`n among `methods` (one name:
    that method everywhere). The radius factors stay 1 (`fit_radius_scale` sets them)."""
    m = np.asarray(masses, dtype=np.float64)
    y = np.asarray(hits, dtype=bool)
    if m.shape != y.shape or m.ndim != 2:
        raise ValueError(f"masses {m.shape} and hits {y.shape} must be (n, L)")
    if m.shape[0] < 20:
        raise UserError(f"{m.shape[0]} calibration photos are too few to fit a calibration (need 20 or more; "
                        "a few hundred give a reliable one)")
    levels, comparison = [], []
    for j in range(m.shape[1]):
        cal, table = choose(m[:, j], y[:, j], tuple(methods))
        levels.append(cal)
        comparison.append({"level": j + 1, "chosen": cal.method, "hit_rate": float(y[:, j].mean()),
                           "cross_validated": table})
    return Calibration(levels, int(top_k), meta={**(meta or {}), "n": int(m.shape[0]), "comparison": comparison})


def within_column(km: float) -> str:
    """The prediction column (and API field) of P(true point within `km` of the predicted point)."""
    return f"p_within_{km_key(km)}km"


WITHIN_COLUMNS = tuple(within_column(t) for t in WITHIN_KM)  # p_within_1km .. p_within_2500km


def fit_within(raw, distance_km, km, methods=FIT_METHODS) -> tuple[dict[str, LevelCalibrator], list[dict]]:
    """Per threshold t of `km`, the calibrator (`choose`) of raw posterior masses within t km
    (n, T) for the outcome distance <= t; and the comparison table. Photos without a point are
    left out."""
    w = np.asarray(raw, dtype=np.float64)
    d = np.asarray(distance_km, dtype=np.float64)
    ok = np.isfinite(d) & np.isfinite(w).all(axis=1)
    cals, comparison = {}, []
    for j, t in enumerate(km):
        y = d[ok] <= t
        cal, table = choose(w[ok, j], y, tuple(methods))
        cals[km_key(t)] = cal
        comparison.append({"km": float(t), "chosen": cal.method, "hit_rate": float(y.mean()) if len(y) else None,
                           "cross_validated": table})
    return cals, comparison


def fit_radius_scale(distance_km, radii: dict[float, np.ndarray]) -> dict[str, float]:
    """Per quantile q, the factor s with P(distance <= s * r_q) = q on these photos (split
    conformal: the q-quantile of distance / r_q). Photos without a point are left out."""
    d = np.asarray(distance_km, dtype=np.float64)
    out = {}
    for q, r in radii.items():
        r = np.maximum(np.asarray(r, dtype=np.float64), 1e-3)
        ok = np.isfinite(d) & np.isfinite(r)
        if ok.sum() < 10:
            out[f"{round(q * 100)}"] = 1.0
            continue
        ratio = np.sort(d[ok] / r[ok])
        k = min(len(ratio) - 1, int(math.ceil(q * (len(ratio) + 1))) - 1)  # finite-sample conformal rank
        out[f"{round(q * 100)}"] = float(max(ratio[k], 1e-6))
    return out
