"""train/stats.py against textbook answers and independent computations (scipy directly, closed forms)."""
import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from train import stats

# Student (1908) / Cushny & Peebles sleep data: extra hours of sleep, drug 2 minus drug 1, ten patients.
SLEEP_DIFFS = [1.2, 2.4, 1.3, 1.3, 0.0, 1.0, 1.8, 0.8, 4.6, 1.4]


def _pair(diffs, base=None):
    """Seed-keyed (a, b) with a_s - b_s = diffs[s]; b is arbitrary so only the differences can matter."""
    base = base or [3.0 + 0.37 * i for i in range(len(diffs))]
    return {s: base[s] + d for s, d in enumerate(diffs)}, {s: base[s] for s in range(len(diffs))}


def test_paired_t_matches_the_sleep_data_textbook_answer():
    r = stats.paired_test(*_pair(SLEEP_DIFFS))
    assert r.n == 10
    assert r.delta == pytest.approx(1.58)
    assert r.sd == pytest.approx(1.22999, abs=1e-4)
    assert r.delta / r.se == pytest.approx(4.062, abs=1e-3)
    assert r.p_value == pytest.approx(0.00283, abs=1e-5)
    assert r.ci95 == pytest.approx((0.700, 2.460), abs=1e-3)
    # chi-square(0.05, df=9) = 3.3251 (tables): the std could be ~1.645x what 10 seeds show.
    assert r.sd_upper95 == pytest.approx(r.sd * math.sqrt(9 / 3.3251), rel=1e-4)


def test_paired_t_agrees_with_scipy_ttest_rel_on_common_seeds():
    a = {0: 2.91, 1: 2.87, 2: 2.95, 3: 2.90, 4: 2.88, 7: 9.9}      # seed 7 has no partner
    b = {0: 2.94, 1: 2.89, 2: 2.96, 3: 2.95, 4: 2.90, 5: 0.1}      # nor has seed 5
    r = stats.paired_test(a, b)
    common = [0, 1, 2, 3, 4]
    ref = sps.ttest_rel([a[s] for s in common], [b[s] for s in common])
    assert r.n == 5
    assert r.delta == pytest.approx(np.mean([a[s] - b[s] for s in common]))
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert r.ci95 == pytest.approx(tuple(ref.confidence_interval(0.95)), rel=1e-9)
    assert r.se == pytest.approx(r.sd / math.sqrt(5))


def test_missing_and_non_finite_values_are_not_paired():
    r = stats.paired_test({0: 1.0, 1: float("nan"), 2: None, 3: 2.0}, {0: 0.5, 1: 1.0, 2: 1.0, 3: 1.0})
    assert r.n == 2 and r.delta == pytest.approx(0.75)


def test_too_few_seeds_leave_the_spread_statistics_undefined():
    empty = stats.paired_test({1: 1.0}, {2: 1.0})
    assert empty.n == 0 and empty.delta is None and empty.p_value is None
    one = stats.paired_test({1: 1.5}, {1: 1.0})
    assert one.n == 1 and one.delta == pytest.approx(0.5)
    assert (one.sd, one.se, one.ci95, one.p_value, one.mde, one.seeds_needed, one.sd_upper95) == (None,) * 7


def test_identical_differences_give_clean_numbers_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shifted = stats.paired_test(*_pair([0.1, 0.1, 0.1]))
        same = stats.paired_test(*_pair([0.0, 0.0, 0.0]))
    assert shifted.sd == 0 and shifted.p_value == 0.0 and shifted.mde == 0.0
    assert shifted.ci95 == pytest.approx((0.1, 0.1))
    assert same.delta == 0 and same.p_value == 1.0 and same.mde == 0.0 and same.seeds_needed is None
    assert stats.verdict(shifted, stats.holm([shifted.p_value])[0]) == "worse"
    assert stats.verdict(same, stats.holm([same.p_value])[0]) == "not resolved"


def test_holm_known_example_and_none_handling():
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # None entries are not tests: same adjustment as above (m = 4), Nones kept in place.
    out = stats.holm([None, 0.01, None, 0.04, 0.03, 0.005])
    assert out[0] is None and out[2] is None
    assert [out[i] for i in (1, 3, 4, 5)] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.6]) == [1.0, 1.0]            # capped at 1, monotone in the raw p order
    assert stats.holm([]) == [] and stats.holm([None]) == [None]
    assert stats.holm([0.02]) == [0.02]


def _power(d, sd, n, alpha=0.05):
    df, ncp = n - 1, d * math.sqrt(n) / sd
    t = sps.t.ppf(1 - alpha / 2, df)
    return sps.nct.sf(t, df, ncp) + np.nan_to_num(sps.nct.cdf(-t, df, ncp))


@pytest.mark.parametrize("n", [2, 3, 5, 10, 30])
def test_mde_has_the_requested_power(n):
    mde = stats.mde_paired(0.02, n)
    assert _power(mde, 0.02, n) == pytest.approx(0.8, abs=1e-6)
    assert _power(0.9 * mde, 0.02, n) < 0.8


def test_mde_approaches_the_normal_approximation_and_scales_with_sd():
    z = sps.norm.ppf(0.975) + sps.norm.ppf(0.8)
    assert stats.mde_paired(1.0, 5000) == pytest.approx(z / math.sqrt(5000), rel=2e-4)
    # at few seeds the normal approximation is far too optimistic: 3 seeds need 2x the effect it claims
    assert stats.mde_paired(1.0, 3) > 2 * z / math.sqrt(3)
    assert stats.mde_paired(3.0, 7) == pytest.approx(3 * stats.mde_paired(1.0, 7))
    assert stats.mde_paired(0.0, 4) == 0.0
    for bad in [dict(sd=1.0, n=1), dict(sd=-1.0, n=5), dict(sd=1.0, n=5, power=0.01)]:
        with pytest.raises(ValueError):
            stats.mde_paired(**bad)


def test_seeds_needed():
    # Effect size 1 (delta = sd) needs 10 pairs for 80% power (pwr.t.test(d=1, power=.8) -> n = 9.94).
    r = stats.paired_test(*_pair([0.0, 2.0, 1.0]))                  # delta 1, sd 1
    assert (r.delta, r.sd) == pytest.approx((1.0, 1.0))
    assert r.seeds_needed == 10
    assert stats.mde_paired(1.0, 10) <= 1.0 < stats.mde_paired(1.0, 9)
    tiny = stats.paired_test(*_pair([0.001, -0.5, 0.5]))            # effect far below the noise
    assert tiny.seeds_needed is None                                # > 1000 seeds


def test_verdict_words():
    rng = np.random.default_rng(0)
    two = stats.paired_test(*_pair([-0.5, -0.5001]))
    assert stats.verdict(two, 1e-9) == "needs ≥ 3 seeds"
    noisy = stats.paired_test(*_pair(list(0.01 + 0.1 * rng.standard_normal(5))))
    assert stats.verdict(noisy, stats.holm([noisy.p_value])[0]) == "not resolved"
    clear = stats.paired_test(*_pair([-0.10, -0.11, -0.09, -0.10]))
    assert stats.verdict(clear, clear.p_value) == "better"
    assert stats.verdict(stats.paired_test(*_pair([0.10, 0.11, 0.09, 0.10])), 0.001) == "worse"
    assert stats.verdict(clear, 0.2) == "not resolved"
    assert stats.verdict(clear, None) == "not resolved"
    assert stats.verdict(clear, clear.p_value, min_seeds=5) == "needs ≥ 5 seeds"


def test_verdicts_for_a_sweep():
    base = {s: 3.0 + 0.05 * s for s in range(4)}
    per_variant = {
        "gelu": base,
        "swiglu": {s: v - 0.10 + 0.002 * (-1) ** s for s, v in base.items()},   # clearly lower loss
        "moe": {s: v + 0.01 * (-1) ** s for s, v in base.items()},             # noise around zero
        "tiny": {0: 2.0, 1: 2.0},                                              # two seeds only
    }
    out = stats.verdicts(per_variant, "gelu")
    assert sorted(out) == ["moe", "swiglu", "tiny"]
    json.dumps(out)
    assert set(out["swiglu"]) == {"n", "delta", "ci95", "p_value", "p_holm", "mde", "seeds_needed", "sd_upper95",
                                  "verdict"}
    assert [out[v]["verdict"] for v in ("swiglu", "moe", "tiny")] == ["better", "not resolved", "needs ≥ 3 seeds"]
    assert out["swiglu"]["delta"] == pytest.approx(-0.10)
    assert out["swiglu"]["ci95"][0] < -0.10 < out["swiglu"]["ci95"][1]
    ps = [out[v]["p_value"] for v in ("swiglu", "moe", "tiny")]
    assert [out[v]["p_holm"] for v in ("swiglu", "moe", "tiny")] == pytest.approx(stats.holm(ps))
    lonely = stats.verdicts({"gelu": base, "x": {0: 1.0}}, "gelu")["x"]
    assert lonely["p_value"] is None and lonely["p_holm"] is None and lonely["ci95"] is None
    with pytest.raises(ValueError, match="baseline"):
        stats.verdicts(per_variant, "relu")


# --- scaling fits

E0, A0, ALPHA0 = 2.0, 3e4, 0.3
C5 = np.logspace(15, 17, 5)          # two decades of FLOPs


def _true(c, k=1.0):
    return E0 + A0 * (k * np.asarray(c)) ** -ALPHA0


def test_fit_recovers_an_exact_curve_from_three_and_five_points():
    for c in (C5[[0, 2, 4]], C5):
        fit = stats.fit_power_law(list(c), list(_true(c)))
        assert (fit.E, fit.alpha) == pytest.approx((E0, ALPHA0), rel=1e-6)
        assert fit.A == pytest.approx(A0, rel=1e-5)
        assert fit.loss(3e16) == pytest.approx(_true(3e16), rel=1e-9)


def test_fit_recovers_parameters_from_noisy_points():
    # 0.3% noise over two decades: the curve is pinned, E/alpha only roughly (they trade off against A).
    alphas = []
    for seed in range(8):
        noisy = _true(C5) * (1 + 0.003 * np.random.default_rng(seed).standard_normal(5))
        fit = stats.fit_power_law(list(C5), list(noisy))
        assert abs(fit.E - E0) < 0.1 and abs(fit.alpha - ALPHA0) < 0.06
        grid = np.logspace(15, 17, 20)
        assert np.allclose([fit.loss(c) for c in grid], _true(grid), rtol=0.005)
        alphas.append(fit.alpha)
    assert np.mean(alphas) == pytest.approx(ALPHA0, abs=0.02)
    # 0.03% noise: every parameter is recovered
    quiet = _true(C5) * (1 + 0.0003 * np.random.default_rng(0).standard_normal(5))
    fit = stats.fit_power_law(list(C5), list(quiet))
    assert fit.E == pytest.approx(E0, abs=0.01) and fit.alpha == pytest.approx(ALPHA0, abs=0.005)
    assert fit.A == pytest.approx(A0, rel=0.15)


def test_fit_weights_and_bounds():
    y = _true(C5)
    y[2] += 0.2                                         # an outlier...
    fit = stats.fit_power_law(list(C5), list(y), sigma=[0.001, 0.001, 100.0, 0.001, 0.001])   # ...weighted out
    assert (fit.E, fit.alpha) == pytest.approx((E0, ALPHA0), rel=1e-3)
    flat = stats.fit_power_law([1.0, 2.0, 4.0], [3.0, 3.1, 3.2])   # loss rising with compute: flat, not an error
    assert 0 <= flat.E < 3.0 and 0 < flat.alpha <= 3
    steep = stats.fit_power_law([1.0, 10.0, 100.0], [5.0, 0.1, 0.05])
    assert 0 <= steep.E < 0.05 and 0 < steep.alpha <= 3


@pytest.mark.parametrize("c, loss, sigma", [([1.0, 2.0], [3.0, 2.0], None), ([1.0, 1.0, 2.0], [3.0, 2.9, 2.0], None),
                                            ([1.0, 2.0, 4.0], [3.0, 2.0], None), ([0.0, 2.0, 4.0], [3, 2, 1], None),
                                            ([1.0, 2.0, 4.0], [3.0, float("nan"), 2.0], None),
                                            ([1.0, 2.0, 4.0], [3.0, 2.5, 2.0], [1.0, 0.0, 1.0])])
def test_fit_rejects_bad_input(c, loss, sigma):
    with pytest.raises(ValueError):
        stats.fit_power_law(c, loss, sigma)


def test_compute_multiplier_on_exact_curves():
    base = stats.PowerLawFit(E=E0, A=A0, alpha=ALPHA0)
    assert stats.compute_multiplier(base, base, 1e17) == pytest.approx(1.0, abs=1e-12)
    for k in (0.5, 1.7, 4.0):
        # L_v(C) = L_b(kC) = E + (A k^-alpha) C^-alpha: the variant is worth k times the compute.
        variant = stats.PowerLawFit(E=E0, A=A0 * k ** -ALPHA0, alpha=ALPHA0)
        assert variant.loss(3e16) == pytest.approx(float(_true(3e16, k)), rel=1e-12)
        assert stats.compute_multiplier(base, variant, 3e16) == pytest.approx(k, rel=1e-6)
    lower_floor = stats.PowerLawFit(E=E0 - 0.5, A=A0, alpha=ALPHA0)   # reaches below anything the baseline can
    assert stats.compute_multiplier(base, lower_floor, 1e17) == math.inf
    assert base.compute_for_loss(E0) == math.inf and base.compute_for_loss(E0 - 1) == math.inf
    assert base.compute_for_loss(base.loss(2e16)) == pytest.approx(2e16, rel=1e-9)


def test_compute_multiplier_from_noisy_fits_and_any_x_unit():
    rng = np.random.default_rng(3)
    b = _true(C5) * (1 + 0.001 * rng.standard_normal(5))
    v = _true(C5, k=2.0) * (1 + 0.001 * rng.standard_normal(5))
    m = stats.compute_multiplier(stats.fit_power_law(list(C5), list(b)), stats.fit_power_law(list(C5), list(v)),
                                 C5[-1])
    assert m == pytest.approx(2.0, rel=0.1)
    # seconds instead of FLOPs (a constant throughput): the multiplier is unit-free
    s = C5 / 4e13
    m_s = stats.compute_multiplier(stats.fit_power_law(list(s), list(b)), stats.fit_power_law(list(s), list(v)),
                                   s[-1])
    assert m_s == pytest.approx(m, rel=1e-5)


def _ladder(k, rng, seeds=3, noise=0.004, sizes=C5[:4]):
    return {float(c): list(float(_true(c, k)) * (1 + noise * rng.standard_normal(seeds))) for c in sizes}


def test_bootstrap_interval_contains_the_point_estimate_and_is_deterministic():
    rng = np.random.default_rng(7)
    base, variant = _ladder(1.0, rng), _ladder(1.5, rng)
    c_max = max(variant)
    point = stats.compute_multiplier(
        stats.fit_power_law(list(base), [np.mean(v) for v in base.values()]),
        stats.fit_power_law(list(variant), [np.mean(v) for v in variant.values()]), c_max)
    t0 = time.perf_counter()
    ci = stats.bootstrap_multiplier(base, variant, c_max, n_boot=1000, seed=0)
    elapsed = time.perf_counter() - t0
    assert ci is not None and ci[0] < point < ci[1]
    assert elapsed < 20   # ~1.5 s on one free core; curve_fit in the loop would be ~10x slower
    assert stats.bootstrap_multiplier(base, variant, c_max, n_boot=200, seed=0) == \
        stats.bootstrap_multiplier(base, variant, c_max, n_boot=200, seed=0)
    assert stats.bootstrap_multiplier(base, variant, c_max, n_boot=200, seed=1) != \
        stats.bootstrap_multiplier(base, variant, c_max, n_boot=200, seed=0)


def test_bootstrap_x_per_size_or_per_seed():
    rng = np.random.default_rng(1)
    base, variant = _ladder(1.0, rng), _ladder(2.0, rng)
    c_max = max(variant)
    plain = stats.bootstrap_multiplier(base, variant, c_max, n_boot=100)
    labelled = stats.bootstrap_multiplier({f"s{i}": v for i, v in enumerate(base.values())},
                                          {f"s{i}": v for i, v in enumerate(variant.values())}, c_max, n_boot=100,
                                          base_x={f"s{i}": c for i, c in enumerate(base)},
                                          variant_x={f"s{i}": [c] * 3 for i, c in enumerate(variant)})
    assert labelled == pytest.approx(plain)
    with pytest.raises(ValueError):
        stats.bootstrap_multiplier(dict(list(base.items())[:2]), variant, c_max, n_boot=10)


def test_bootstrap_keeps_infinite_multipliers():
    # The variant gets below the baseline's fitted floor E at c_max in part of the refits: no baseline compute
    # reaches that loss, so the upper end is inf (not nan, not dropped) while the lower end stays finite.
    rng = np.random.default_rng(0)
    sizes = C5[:4]
    base = {float(c): list(float(_true(c)) * (1 + 0.004 * rng.standard_normal(3))) for c in sizes}
    variant = {float(c): list((E0 - 0.36 + A0 * c ** -ALPHA0) * (1 + 0.004 * rng.standard_normal(3))) for c in sizes}
    ci = stats.bootstrap_multiplier(base, variant, float(sizes[-1]), n_boot=200)
    assert ci is not None and ci[1] == math.inf and 1 < ci[0] < math.inf


def test_percentiles_match_numpy_for_finite_values():
    vals = np.sort(np.random.default_rng(0).standard_normal(37))
    for q in (0, 2.5, 50, 97.5, 100):
        assert stats._percentile(vals, q) == pytest.approx(np.percentile(vals, q))
    assert stats._percentile(np.array([1.0, 2.0, math.inf]), 97.5) == math.inf


def test_importing_stats_does_not_import_torch():
    code = "import sys, train.stats; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
