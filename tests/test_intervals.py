"""Coverage of the comparison intervals, Holm's adjustment and the Wilcoxon count (hypermorph_spatially_adaptive.intervals).

Coverage is checked by simulation: each case draws ``SIMS`` samples whose true mean is known and
counts how often the 95 % interval contains it. With SIMS = 2000 the Monte Carlo standard error of
a coverage near 0.95 is sqrt(0.95 * 0.05 / 2000) = 0.005, so the bound 0.93 sits about 4 standard
errors below the nominal 0.95 (a correct interval fails it with probability ~1e-4) while an
interval at 0.905 (the plain t interval on exponential differences at n = 9, measured) fails it.
Everything is seeded, so the test is deterministic.
"""
import numpy as np
import pytest
from scipy import stats

from hypermorph_spatially_adaptive import intervals

SIMS = 2000


def _differences(kind: str, n: int, rng) -> tuple:
    """``SIMS`` samples of n paired differences and their true mean."""
    if kind == "normal":
        return rng.normal(0.01, 0.02, (SIMS, n)), 0.01
    # skewed: shifted exponential (skewness 2), e.g. a few pairs that one method registers much better
    return 0.02 * rng.exponential(1.0, (SIMS, n)) - 0.01, 0.01


def _coverage(lo, hi, truth) -> float:
    return float(np.mean((lo <= truth) & (truth <= hi)))


@pytest.mark.parametrize("kind", ["normal", "skewed"])
@pytest.mark.parametrize("n", [9, 30])
def test_one_seed_interval_keeps_its_coverage(kind, n):
    rng = np.random.default_rng(100 + n)
    d, truth = _differences(kind, n, rng)
    lo, hi, p = intervals.one_sample_interval(d, 0.95, "bootstrap-t", n_boot=1000, seed=1)
    cov = _coverage(lo, hi, truth)
    assert cov >= 0.93, f"bootstrap-t coverage {cov:.3f} ({kind}, n = {n})"
    # the p-value inverts the interval: p < 0.05 iff 0 is outside it (up to the resampling grid)
    outside = (lo > 0) | (hi < 0)
    assert np.mean(outside == (p < 0.05)) > 0.98


def test_plain_t_interval_loses_coverage_on_skewed_differences_at_n9():
    """Why the bootstrap-t: the check above can fail, and does for the t interval."""
    d, truth = _differences("skewed", 9, np.random.default_rng(109))
    lo, hi, _ = intervals.one_sample_interval(d, 0.95, "t")
    assert _coverage(lo, hi, truth) < 0.925


def test_t_interval_and_p_equal_scipy():
    d = np.array([0.01, -0.02, 0.03, 0.05, 0.012, -0.004, 0.02, 0.031, 0.007])
    lo, hi, p = intervals.one_sample_interval(d, 0.95, "t")
    ref = stats.ttest_1samp(d, 0.0)
    assert float(p) == pytest.approx(ref.pvalue)
    ci = ref.confidence_interval(0.95)
    assert (float(lo), float(hi)) == pytest.approx((ci.low, ci.high))


def test_bootstrap_t_is_seeded_and_validates_input():
    d = np.random.default_rng(0).normal(0.02, 0.01, 12)
    a = intervals.one_sample_interval(d, seed=7)
    assert a == intervals.one_sample_interval(d, seed=7) and a != intervals.one_sample_interval(d, seed=8)
    assert a[0] < d.mean() < a[1]
    with pytest.raises(ValueError, match="at least 2"):
        intervals.one_sample_interval([0.1])
    with pytest.raises(ValueError, match="NaN"):
        intervals.one_sample_interval([0.1, np.nan, 0.2])
    with pytest.raises(ValueError, match="method"):
        intervals.one_sample_interval(d, method="jackknife")


def _crossed(S: int, P: int, seed_sd: float, skewed: bool, rng) -> np.ndarray:
    """``[SIMS, S, P]``: mean 0 + seed effect + pair effect (shared by every seed) + residual."""
    pair = rng.lognormal(0.0, 0.5, (SIMS, 1, P)) if skewed else rng.normal(0.0, 1.0, (SIMS, 1, P))
    if skewed:
        pair = (pair - np.exp(0.125)) / 0.6
    return seed_sd * rng.normal(0.0, 1.0, (SIMS, S, 1)) + pair + 0.5 * rng.normal(0.0, 1.0, (SIMS, S, P))


@pytest.mark.parametrize("S,P,seed_sd,skewed", [(3, 30, 1.0, False), (3, 30, 0.0, True), (3, 9, 0.5, True),
                                                (5, 30, 2.0, False)])
def test_crossed_interval_keeps_its_coverage(S, P, seed_sd, skewed):
    """Seeds x pairs with the same pairs under every seed (crossed). (3, 30, seed SD 1) is where a
    Satterthwaite t covered 0.92 (seed-dominated variance, 2 degrees of freedom)."""
    d = _crossed(S, P, seed_sd, skewed, np.random.default_rng(S * 100 + P))
    lo, hi, p = intervals.crossed_interval(d, 0.95)
    cov = _coverage(lo, hi, 0.0)
    assert cov >= 0.93, f"crossed coverage {cov:.3f} (S={S}, P={P}, seed SD {seed_sd}, skewed={skewed})"
    np.testing.assert_array_equal((lo > 0) | (hi < 0), p < 0.05)


def test_nested_resampling_would_be_too_narrow_and_one_seed_misses_the_seed_effect():
    """The interval accounts for both factors: over pairs alone (one seed's models) it cannot cover
    a seed effect, which is what the demo reruns showed."""
    d = _crossed(3, 30, 1.0, False, np.random.default_rng(5))
    lo, hi, _ = intervals.one_sample_interval(d[:, 0, :], 0.95, "t")
    assert _coverage(lo, hi, 0.0) < 0.6


def test_crossed_interval_equals_hand_computation():
    d = np.array([[1.0, 2.0, 4.0], [2.0, 2.0, 5.0]])  # S = 2 seeds x P = 3 pairs
    # seed means 7/3, 3; grand mean 8/3; pair means 1.5, 2, 4.5
    ms_seed = 3 * ((7 / 3 - 8 / 3) ** 2 + (3 - 8 / 3) ** 2) / 1
    ms_pair = 2 * ((1.5 - 8 / 3) ** 2 + (2 - 8 / 3) ** 2 + (4.5 - 8 / 3) ** 2) / 2
    got = intervals.mean_squares(d)
    assert got[0] == pytest.approx(ms_seed) and got[1] == pytest.approx(ms_pair)
    half = np.sqrt((stats.t.ppf(0.975, 1) ** 2 * ms_seed + stats.t.ppf(0.975, 2) ** 2 * ms_pair) / 6)
    lo, hi, p = intervals.crossed_interval(d)
    assert (float(lo), float(hi)) == pytest.approx((8 / 3 - half, 8 / 3 + half))
    lo_p, hi_p, _ = intervals.crossed_interval(d, 1.0 - float(p))  # at level 1 - p the interval touches 0
    assert min(abs(float(lo_p)), abs(float(hi_p))) == pytest.approx(0.0, abs=1e-6)
    # one seed: the one-seed interval over pairs
    one = intervals.crossed_interval(d[:1], 0.95, single="t")
    assert one == intervals.one_sample_interval(d[0], 0.95, "t")


def test_holm_against_a_hand_computed_example():
    p = [0.01, 0.04, 0.03, 0.005, np.nan]
    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4): 4 * 0.005 = 0.02, 3 * 0.01 = 0.03, 2 * 0.03 = 0.06, 1 * 0.04 -> 0.06
    np.testing.assert_allclose(intervals.holm(p), [0.03, 0.06, 0.06, 0.02, np.nan])
    np.testing.assert_allclose(intervals.holm([0.5, 0.9]), [1.0, 1.0])
    assert intervals.holm([]).size == 0


def test_wilcoxon_counts_the_nonzero_differences_it_ranks():
    d = np.array([0.0, 0.01, -0.02, 0.03, 0.0, 0.05, 0.012, -0.004, 0.02])
    p, nonzero = intervals.wilcoxon_test(d)
    assert nonzero == 7 and p == pytest.approx(stats.wilcoxon(d[d != 0]).pvalue)
    assert intervals.wilcoxon_test(np.zeros(5)) == (1.0, 0)


def test_bootstrap_t_falls_back_to_t_when_most_differences_are_zero():
    d = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -0.5, 0.0])  # e.g. HD95 at the voxel size
    got = intervals.one_sample_interval(d, 0.95, "bootstrap-t", n_boot=2000, seed=0)
    assert np.all(np.isfinite(got))
    assert got == intervals.one_sample_interval(d, 0.95, "t")
