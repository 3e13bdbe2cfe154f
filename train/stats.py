"""Statistics behind the FFN comparison verdicts and the scaling-ladder fits (scipy; no torch).

Verdicts (same seed = same data order, so runs are paired by seed and only common seeds count):
- Δ, paired sample std, Student-t 95% CI and two-sided p of the mean paired difference (df = n-1): the seed-to-seed
  noise largely cancels within a pair, so the paired test is far more sensitive than comparing two means.
- Holm–Bonferroni across the variants of a sweep: every variant is tested against the same baseline, and Holm
  controls the family-wise error at α while being uniformly more powerful than plain Bonferroni.
- MDE: the smallest |Δ| a two-sided paired t-test detects with the requested power at this n and paired std, from
  the noncentral t (exact; the normal approximation is badly optimistic at 3-5 seeds). `seeds_needed` inverts it.
- sd_upper95: one-sided 95% chi-square upper bound of the paired std. With 3 seeds the std itself is barely known,
  so the MDE quoted from it may be optimistic; this bound shows how much.

Scaling: L(C) = E + A·C^(−α) fitted per variant; the compute multiplier is how much more compute the baseline's
curve needs to reach the variant's loss at the largest budget (C may be FLOPs or seconds), with a bootstrap CI
that resamples seeds within each ladder size. The fit profiles out (E, A), which are linear for fixed α, over a
global α grid and polishes with curve_fit: exact with 3 points, and no local minimum from a bad start.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import optimize, stats

__all__ = ["PairedResult", "paired_test", "holm", "mde_paired", "verdict", "verdicts",
           "PowerLawFit", "fit_power_law", "compute_multiplier", "bootstrap_multiplier"]


@dataclass
class PairedResult:
    n: int
    delta: Optional[float]
    sd: Optional[float]
    se: Optional[float]
    ci95: Optional[tuple[float, float]]
    p_value: Optional[float]
    mde: Optional[float]
    seeds_needed: Optional[int]
    sd_upper95: Optional[float]


def _ok(x) -> bool:
    return x is not None and math.isfinite(x)


def _power(ncp: float, df: int, t_crit: float) -> float:
    # Both rejection tails (P(T < -t) = P(T' > t) for T' with noncentrality -ncp). The lower tail is tiny for
    # ncp > 0 and scipy's nct can return nan out there at df=1, where 0 is the right answer to float precision.
    lower = float(stats.nct.sf(t_crit, df, -ncp))
    return float(stats.nct.sf(t_crit, df, ncp)) + (lower if math.isfinite(lower) else 0.0)


def mde_paired(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest |mean difference| a two-sided paired t-test at `alpha` detects with probability `power`."""
    if n < 2:
        raise ValueError(f"the MDE needs at least 2 paired observations, got n={n}")
    if not (sd >= 0 and math.isfinite(sd)):
        raise ValueError(f"sd must be finite and >= 0, got {sd}")
    if not (0 < alpha < 1 and alpha < power < 1):
        raise ValueError(f"need 0 < alpha < power < 1, got alpha={alpha}, power={power}")
    if sd == 0:
        return 0.0
    df = n - 1
    t_crit = float(stats.t.ppf(1 - alpha / 2, df))
    hi = 2.0 * (t_crit + float(stats.norm.ppf(power)))
    while _power(hi, df, t_crit) < power:   # n=2 (df=1) needs a very large noncentrality
        hi *= 2
    ncp = optimize.brentq(lambda d: _power(d, df, t_crit) - power, 0.0, hi, xtol=1e-12, rtol=1e-12)
    return ncp * sd / math.sqrt(n)


def _seeds_needed(sd: float, delta: float, alpha: float, power: float, n_max: int = 1000) -> Optional[int]:
    if delta == 0 or mde_paired(sd, n_max, alpha, power) > abs(delta):
        return None   # no effect to detect, or not within n_max seeds
    lo, hi = 1, n_max   # MDE decreases in n: invariant mde(hi) <= |delta|, and lo is infeasible (n=1 has no test)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mde_paired(sd, mid, alpha, power) <= abs(delta):
            hi = mid
        else:
            lo = mid
    return hi


def paired_test(a: dict[int, float], b: dict[int, float], alpha: float = 0.05, power: float = 0.8) -> PairedResult:
    """Paired comparison of a vs b over their common seeds (missing / non-finite values count as missing)."""
    common = sorted(s for s in set(a) & set(b) if _ok(a[s]) and _ok(b[s]))
    d = np.array([float(a[s]) - float(b[s]) for s in common])
    n = len(d)
    if n == 0:
        return PairedResult(0, None, None, None, None, None, None, None, None)
    delta = float(d.mean())
    if n == 1:
        return PairedResult(1, delta, None, None, None, None, None, None, None)
    df = n - 1
    sd = float(d.std(ddof=1))
    if sd <= 1e-12 * max(1.0, abs(delta)):   # identical differences up to rounding: no spread, t undefined
        sd = 0.0
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(0.975, df)) * se
    if sd == 0:
        p = 0.0 if delta != 0 else 1.0
    else:
        p = float(2 * stats.t.sf(abs(delta) / se, df))
    sd_upper = sd * math.sqrt(df / float(stats.chi2.ppf(0.05, df)))
    return PairedResult(n, delta, sd, se, (delta - half, delta + half), p, mde_paired(sd, n, alpha, power),
                        _seeds_needed(sd, delta, alpha, power), sd_upper)


def holm(p_values: list[Optional[float]]) -> list[Optional[float]]:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1); None stays None and is not counted."""
    idx = sorted((i for i, p in enumerate(p_values) if p is not None), key=lambda i: p_values[i])
    m = len(idx)
    out: list[Optional[float]] = [None] * len(p_values)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * float(p_values[i])))
        out[i] = running
    return out


def verdict(result: PairedResult, p_holm: Optional[float], min_seeds: int = 3, alpha: float = 0.05) -> str:
    if result.n < min_seeds:
        return f"needs ≥ {min_seeds} seeds"
    if p_holm is not None and p_holm < alpha and result.delta is not None and result.delta != 0:
        return "better" if result.delta < 0 else "worse"   # lower loss is better
    return "not resolved"


def verdicts(per_variant: dict[str, dict[int, float]], baseline: str, alpha: float = 0.05, power: float = 0.8,
             min_seeds: int = 3) -> dict[str, dict]:
    """Every variant but the baseline vs the baseline, Holm-adjusted across the variants that have a p-value."""
    if baseline not in per_variant:
        raise ValueError(f"baseline {baseline!r} is not among the variants {sorted(per_variant)}")
    names = [v for v in per_variant if v != baseline]
    results = {v: paired_test(per_variant[v], per_variant[baseline], alpha, power) for v in names}
    adjusted = dict(zip(names, holm([results[v].p_value for v in names])))
    return {v: {"n": r.n, "delta": r.delta, "ci95": list(r.ci95) if r.ci95 else None, "p_value": r.p_value,
                "p_holm": adjusted[v], "mde": r.mde, "seeds_needed": r.seeds_needed, "sd_upper95": r.sd_upper95,
                "verdict": verdict(r, adjusted[v], min_seeds, alpha)}
            for v, r in results.items()}


# --- scaling-law fits: L(C) = E + A * C**(-alpha)

_ALPHA_MAX = 3.0


@dataclass
class PowerLawFit:
    E: float
    A: float        # for C in absolute units
    alpha: float
    c_ref: float = 1.0   # geometric mean of the fitted C (the fit ran on C / c_ref for conditioning)

    def loss(self, c: float) -> float:
        return self.E + math.exp(math.log(self.A) - self.alpha * math.log(c))   # logs: C^alpha may overflow

    def compute_for_loss(self, loss: float) -> float:
        """The C at which the curve reaches `loss`; math.inf if the curve never gets that low (loss <= E)."""
        if loss <= self.E:
            return math.inf
        log_c = (math.log(self.A) - math.log(loss - self.E)) / self.alpha
        return math.exp(log_c) if log_c < 709 else math.inf


def _profile(x: np.ndarray, y: np.ndarray, w: np.ndarray, alphas: np.ndarray, e_max: float):
    """For each alpha the model is linear in (E, a): solve the weighted least squares with 0 <= E <= e_max, a >= 0
    in closed form (a convex QP in 2 unknowns: the optimum is interior or on an edge, so try all and keep the
    best feasible). Returns (sse, E, a), one per alpha."""
    f = x[None, :] ** -alphas[:, None]
    sw, swf, swff = w.sum(), (w * f).sum(1), (w * f * f).sum(1)
    swy, swfy = (w * y).sum(), (w * f * y).sum(1)
    det = sw * swff - swf ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        e_free = np.where(det > 0, (swff * swy - swf * swfy) / det, -1.0)
        a_free = np.where(det > 0, (sw * swfy - swf * swy) / det, -1.0)
    e = np.stack([e_free, 0 * swf, 0 * swf + e_max, 0 * swf + min(max(swy / sw, 0.0), e_max)])
    a = np.stack([a_free, np.maximum(swfy / swff, 0.0), np.maximum((swfy - e_max * swf) / swff, 0.0), 0 * swf])
    feasible = (e >= 0) & (e <= e_max) & (a >= 0)
    sse = np.where(feasible, (w * (y - e[..., None] - a[..., None] * f) ** 2).sum(-1), np.inf)
    k = sse.argmin(0)
    g = np.arange(len(alphas))
    return sse[k, g], e[k, g], a[k, g]


def _fit_arrays(c: np.ndarray, y: np.ndarray, sigma: Optional[np.ndarray], polish: bool) -> PowerLawFit:
    c_ref = float(np.exp(np.mean(np.log(c))))
    x = c / c_ref
    w = np.ones_like(y) if sigma is None else 1.0 / sigma ** 2
    e_max = float(y.min()) * (1 - 1e-9)   # E < min(loss): the curve must stay below every observed loss
    # Profile over alpha on successively finer grids: global over (0, 3], so no local-minimum trap from a bad start.
    lo, hi = 1e-3, _ALPHA_MAX
    for _ in range(3):
        alphas = np.linspace(lo, hi, 61)
        sse, e, a = _profile(x, y, w, alphas, e_max)
        k = int(np.argmin(sse))
        step = alphas[1] - alphas[0]
        lo, hi = max(1e-3, alphas[k] - step), min(_ALPHA_MAX, alphas[k] + step)
    best = (float(sse[k]), float(e[k]), max(float(a[k]), 1e-300), float(alphas[k]))
    if polish:
        def model(xx, e_, a_, al):
            return e_ + a_ * xx ** -al
        lb, ub = [0.0, 1e-300, 1e-3], [e_max, np.inf, _ALPHA_MAX]
        guesses = [best[1:], (0.5 * e_max, float(y.max() - y.min()) + 1e-3, 0.3)]
        for p0 in guesses:
            try:
                with warnings.catch_warnings():   # zero residual dof (3 points) only means no covariance
                    warnings.simplefilter("ignore", optimize.OptimizeWarning)
                    p, _ = optimize.curve_fit(model, x, y, p0=np.clip(p0, lb, ub), sigma=sigma, bounds=(lb, ub),
                                              method="trf", maxfev=2000)
            except (RuntimeError, ValueError):
                continue
            s = float((w * (y - model(x, *p)) ** 2).sum())
            if np.isfinite(s) and s < best[0]:
                best = (s, float(p[0]), float(p[1]), float(p[2]))
    _, e_fit, a_fit, alpha_fit = best   # losses that do not fall with C give a flat curve (A ~ 0), not an error
    return PowerLawFit(E=e_fit, A=math.exp(math.log(a_fit) + alpha_fit * math.log(c_ref)), alpha=alpha_fit,
                       c_ref=c_ref)


def _arrays(c, loss, sigma):
    if len(c) != len(loss) or (sigma is not None and len(sigma) != len(c)):
        raise ValueError(f"c, loss and sigma must have equal lengths, got {len(c)}, {len(loss)}")
    if len(c) < 3:
        raise ValueError(f"a power-law fit L = E + A*C^-alpha needs at least 3 points, got {len(c)}")
    cc, yy = np.asarray(c, dtype=float), np.asarray(loss, dtype=float)
    if not (np.all(np.isfinite(cc)) and np.all(cc > 0)):
        raise ValueError(f"compute values must be finite and > 0, got {list(c)}")
    if len(np.unique(cc)) < 3:
        raise ValueError(f"a power-law fit needs at least 3 distinct compute values, got {sorted(set(c))}")
    if not (np.all(np.isfinite(yy)) and np.all(yy > 0)):
        raise ValueError(f"losses must be finite and > 0, got {list(loss)}")
    ss = None
    if sigma is not None:
        ss = np.asarray(sigma, dtype=float)
        if not (np.all(np.isfinite(ss)) and np.all(ss > 0)):
            raise ValueError(f"sigma must be finite and > 0, got {list(sigma)}")
    return cc, yy, ss


def fit_power_law(c: list[float], loss: list[float], sigma: Optional[list[float]] = None) -> PowerLawFit:
    """Weighted least-squares fit of L(C) = E + A*C^-alpha with 0 <= E < min(loss), A > 0, 0 < alpha <= 3."""
    return _fit_arrays(*_arrays(c, loss, sigma), polish=True)


def compute_multiplier(base: PowerLawFit, variant: PowerLawFit, c_max: float) -> float:
    """C_base(L_variant(c_max)) / c_max: > 1 when the variant reaches at c_max a loss the baseline needs more for."""
    if not c_max > 0:
        raise ValueError(f"c_max must be > 0, got {c_max}")
    return base.compute_for_loss(variant.loss(c_max)) / c_max


def _clean(points: dict, xs: Optional[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per size: (x per seed, loss per seed), keeping finite losses; x is the key unless `xs` gives it (one value
    or one per seed, e.g. each seed's wall-clock seconds)."""
    out = []
    for key, losses in points.items():
        xk = key if xs is None else xs[key]
        xk = list(xk) if isinstance(xk, (list, tuple, np.ndarray)) else [xk] * len(losses)
        if len(xk) != len(losses):
            raise ValueError(f"size {key!r}: {len(xk)} x values for {len(losses)} losses")
        pairs = [(float(x), float(v)) for x, v in zip(xk, losses) if _ok(v) and _ok(x)]
        if pairs:
            out.append((np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])))
    if len(out) < 3:
        raise ValueError(f"the bootstrap needs at least 3 sizes with finite losses, got {len(out)}")
    return out


def _percentile(sorted_vals: np.ndarray, q: float) -> float:
    # Linear interpolation like np.percentile, but inf stays inf instead of turning into nan (0 * inf).
    pos = q / 100 * (len(sorted_vals) - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    t = pos - lo
    if t == 0 or sorted_vals[lo] == sorted_vals[hi]:
        return float(sorted_vals[lo])
    if math.isinf(sorted_vals[hi]):
        return math.inf
    return float(sorted_vals[lo] + t * (sorted_vals[hi] - sorted_vals[lo]))


def bootstrap_multiplier(base_points: dict[float, list[float]], variant_points: dict[float, list[float]],
                         c_max: float, n_boot: int = 1000, seed: int = 0, base_x: Optional[dict] = None,
                         variant_x: Optional[dict] = None) -> Optional[tuple[float, float]]:
    """Percentile 95% CI of compute_multiplier: seeds are resampled with replacement within each size, independently
    for base and variant, and both curves refitted on the per-size means. None if under half the refits succeed."""
    groups = (_clean(base_points, base_x), _clean(variant_points, variant_x))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        fits = []
        for g in groups:
            xs, ys = [], []
            for x, y in g:
                i = rng.integers(0, len(y), len(y))
                xs.append(x[i].mean())
                ys.append(y[i].mean())
            try:
                # No curve_fit polish: the grid's alpha is within ~3e-5 of the optimum, far below the bootstrap spread.
                fits.append(_fit_arrays(*_arrays(xs, ys, None), polish=False))
            except (ValueError, FloatingPointError, OverflowError):
                break
        if len(fits) == 2:
            m = compute_multiplier(fits[0], fits[1], c_max)
            if not math.isnan(m):
                values.append(m)
    if len(values) < n_boot / 2:
        return None
    vals = np.sort(np.array(values))
    return _percentile(vals, 2.5), _percentile(vals, 97.5)


# --- agreement between two rankings (a sweep crossed with a second factor)

def rank_agreement(a: dict[str, float], b: dict[str, float]) -> dict:
    """Kendall's τ-b between two rankings of the same variants (by mean loss; +1 same order, −1 reversed) with its
    two-sided p-value, and the pairs whose order flips. Only variants present in both count."""
    names = [n for n in a if n in b and a[n] is not None and b[n] is not None]
    flips = [[x, y] for i, x in enumerate(names) for y in names[i + 1:] if (a[x] - a[y]) * (b[x] - b[y]) < 0]
    if len(names) < 2:
        return {"n": len(names), "kendall_tau": None, "p_value": None, "order_flips": flips}
    res = stats.kendalltau([a[n] for n in names], [b[n] for n in names])
    tau, p = float(res.statistic), float(res.pvalue)
    return {"n": len(names), "kendall_tau": None if math.isnan(tau) else tau,
            "p_value": None if math.isnan(p) else p, "order_flips": flips}
