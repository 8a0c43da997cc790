"""blockloop.stats against independently known values.

The Wilson interval against its closed form written out here; the t interval against a tabulated
t quantile; the paired t-test against a hand-computed t statistic; the exact sign-flip p-value
against counting sign patterns; the bootstrap against the t interval and a constant sample;
gap_closed at its fixed points; and edge cases (one seed, empty, non-finite, all equal,
mismatched lengths). Every result must survive json.dumps(..., allow_nan=False).
"""

import json
import math

import numpy as np
import pytest

from blockloop.stats import (bootstrap_interval, gap_closed, mean_interval, paired_difference,
                             solve_rate)

Z_975 = 1.959963984540054      # standard normal 0.975 quantile (tables)
T_975_3 = 3.182446305284263    # Student t 0.975 quantile, 3 degrees of freedom (tables)
T_975_4 = 2.7764451051977987   # Student t 0.975 quantile, 4 degrees of freedom (tables)


def wilson(k, n, z=Z_975):
    """Wilson (1927) score interval, the textbook closed form."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def assert_plain_json(result):
    """Only builtin types, no NaN: what a report writer can dump as is."""
    json.dumps(result, allow_nan=False)
    for value in result.values():
        items = value if isinstance(value, list) else [value]
        for item in items:
            assert item is None or type(item) in (float, int, bool, str), (value, type(item))


# ---------------------------------------------------------------- mean_interval

def test_t_interval_of_one_to_four_matches_the_tabulated_quantile():
    r = mean_interval([1, 2, 3, 4])
    sd = math.sqrt(5 / 3)
    half = T_975_3 * sd / 2
    assert r["mean"] == 2.5 and r["n"] == 4
    assert r["sd"] == pytest.approx(sd, rel=1e-12)
    assert r["low"] == pytest.approx(2.5 - half, rel=1e-12)
    assert r["high"] == pytest.approx(2.5 + half, rel=1e-12)
    assert_plain_json(r)


def test_t_interval_narrows_with_lower_confidence():
    wide, narrow = mean_interval([1, 2, 3, 4], 0.99), mean_interval([1, 2, 3, 4], 0.90)
    assert wide["low"] < narrow["low"] < 2.5 < narrow["high"] < wide["high"]


def test_one_seed_has_a_mean_and_no_interval():
    r = mean_interval([3.25])
    assert r == {"mean": 3.25, "low": None, "high": None, "n": 1, "sd": None}
    assert_plain_json(r)


def test_all_equal_values_give_a_zero_width_interval():
    r = mean_interval(np.array([2.0, 2.0, 2.0]))
    assert (r["low"], r["mean"], r["high"], r["sd"]) == (2.0, 2.0, 2.0, 0.0)


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [1.0, float("inf")], [[1.0, 2.0]]])
def test_empty_nonfinite_or_not_1d_is_refused(bad):
    with pytest.raises(ValueError):
        mean_interval(bad)


@pytest.mark.parametrize("confidence", [0.0, 1.0, 95, -0.5])
def test_confidence_outside_zero_one_is_refused(confidence):
    with pytest.raises(ValueError, match="confidence"):
        mean_interval([1, 2, 3], confidence)


# ---------------------------------------------------------------- solve_rate

def test_wilson_interval_for_three_of_five_matches_the_closed_form():
    r = solve_rate([0.95, 0.2, 0.9, 0.99, 0.5], threshold=0.9)
    low, high = wilson(3, 5)
    assert (r["solved"], r["n"], r["rate"]) == (3, 5, 0.6)
    assert r["low"] == pytest.approx(low, abs=1e-12) and r["high"] == pytest.approx(high, abs=1e-12)
    assert (r["low"], r["high"]) == pytest.approx((0.2307, 0.8824), abs=1e-4)  # published value
    assert (r["median"], r["min"], r["max"]) == (0.9, 0.2, 0.99)
    assert_plain_json(r)


@pytest.mark.parametrize("k", [0, 5])
def test_wilson_interval_at_none_and_all_solved_stays_inside_zero_one(k):
    values = [1.0] * k + [0.0] * (5 - k)
    r = solve_rate(values, threshold=0.5)
    low, high = wilson(k, 5)
    assert r["solved"] == k
    assert r["low"] == pytest.approx(max(low, 0.0), abs=1e-12)
    assert r["high"] == pytest.approx(min(high, 1.0), abs=1e-12)
    assert 0.0 <= r["low"] < r["high"] <= 1.0
    assert (r["low"] == 0.0) == (k == 0) and (r["high"] == 1.0) == (k == 5)


def test_threshold_itself_counts_as_solved_and_lower_is_better_flips_it():
    assert solve_rate([0.5, 0.4, 0.6], threshold=0.5)["solved"] == 2
    assert solve_rate([0.5, 0.4, 0.6], threshold=0.5, higher_is_better=False)["solved"] == 2
    assert solve_rate([1.2, 1.5, 1.9], threshold=1.5, higher_is_better=False)["solved"] == 2


def test_wilson_interval_follows_the_confidence():
    r = solve_rate([1, 1, 0, 0, 1, 0, 1, 1], threshold=1, confidence=0.9)
    low, high = wilson(5, 8, z=1.6448536269514722)  # normal 0.95 quantile
    assert (r["low"], r["high"]) == pytest.approx((low, high), abs=1e-12)


def test_solve_rate_refuses_empty_and_nan_threshold():
    with pytest.raises(ValueError):
        solve_rate([], threshold=0.5)
    with pytest.raises(ValueError, match="threshold"):
        solve_rate([0.1], threshold=float("nan"))


# ---------------------------------------------------------------- bootstrap_interval

def test_bootstrap_of_a_constant_sample_has_zero_width():
    for method in ("BCa", "percentile"):
        r = bootstrap_interval([0.7, 0.7, 0.7, 0.7], method=method)
        assert r["low"] == pytest.approx(0.7) and r["high"] == pytest.approx(0.7)
        assert r["estimate"] == pytest.approx(0.7)
        assert_plain_json(r)
    assert bootstrap_interval([0.7] * 4)["method"].startswith("percentile")


def test_bootstrap_of_a_known_sample_is_near_the_t_interval():
    x = np.random.default_rng(1).normal(10.0, 2.0, size=40)
    t = mean_interval(x)
    for method in ("BCa", "percentile"):
        b = bootstrap_interval(x, method=method)
        assert b["estimate"] == pytest.approx(t["mean"])
        assert b["low"] < b["estimate"] < b["high"]
        # with 40 seeds the bootstrap and the t interval agree to within a tenth of the width
        width = t["high"] - t["low"]
        assert abs(b["low"] - t["low"]) < 0.1 * width and abs(b["high"] - t["high"]) < 0.1 * width


def test_bootstrap_is_reproducible_with_a_seed_and_depends_on_it():
    x = [2.1, 2.5, 1.9, 2.8, 2.2]
    first, again = bootstrap_interval(x, seed=3), bootstrap_interval(x, seed=3)
    other = bootstrap_interval(x, seed=4)
    assert first == again
    assert (other["low"], other["high"]) != (first["low"], first["high"])


def test_bootstrap_of_another_statistic():
    x = [1.0, 2.0, 3.0, 100.0, 4.0]
    r = bootstrap_interval(x, statistic=np.median, method="percentile")
    assert r["estimate"] == 3.0
    assert 1.0 <= r["low"] <= 3.0 <= r["high"] <= 100.0


def test_bootstrap_with_one_seed_has_no_interval_and_empty_is_refused():
    r = bootstrap_interval([1.5])
    assert (r["estimate"], r["low"], r["high"], r["n"]) == (1.5, None, None, 1)
    with pytest.raises(ValueError):
        bootstrap_interval([])


# ---------------------------------------------------------------- gap_closed

PARAM = [3.0, 3.1, 2.9, 3.05]
DEPTH = [2.0, 2.2, 1.9, 2.1]


def test_gap_closed_is_one_when_looped_matches_depth_and_zero_when_it_matches_param():
    full = gap_closed(PARAM, DEPTH, DEPTH)
    none = gap_closed(PARAM, PARAM, DEPTH)
    assert full["estimate"] == pytest.approx(1.0) and full["per_seed"] == pytest.approx([1.0] * 4)
    assert none["estimate"] == pytest.approx(0.0) and none["per_seed"] == pytest.approx([0.0] * 4)
    assert (full["low"], full["high"]) == pytest.approx((1.0, 1.0))
    assert (none["low"], none["high"]) == pytest.approx((0.0, 0.0))
    assert_plain_json(full)


def test_gap_closed_is_the_ratio_of_seed_means():
    r = gap_closed([4.0, 4.0], [3.0, 3.0], [2.0, 3.0])
    assert r["per_seed"] == pytest.approx([0.5, 1.0])
    assert r["estimate"] == pytest.approx(1.0 / 1.5)  # not the mean of per-seed ratios, 0.75


def test_gap_closed_interval_resamples_seeds_jointly():
    looped = [2.6, 2.5, 2.5, 2.55]
    r = gap_closed(PARAM, looped, DEPTH, method="percentile")
    assert r["low"] < r["estimate"] < r["high"]
    # joint resampling: every resample's ratio lies within the per-seed ratios' range (it is a
    # weighted mean of them with weights from the gaps, all positive here); resampling the three
    # arrays independently would break that.
    assert min(r["per_seed"]) - 1e-12 <= r["low"] and r["high"] <= max(r["per_seed"]) + 1e-12
    assert gap_closed(PARAM, looped, DEPTH, method="percentile") == r


def test_gap_closed_is_none_where_the_gap_is_zero():
    r = gap_closed([3.0, 3.0], [2.5, 2.5], [3.0, 2.0])
    assert r["per_seed"][0] is None and r["per_seed"][1] == pytest.approx(0.5)
    assert r["estimate"] == pytest.approx(1.0)  # seed means: (3 - 2.5) / (3 - 2.5)
    # resamples drawing only the first seed have no gap: the interval is undefined, not NaN
    assert (r["low"], r["high"]) == (None, None)
    assert_plain_json(r)
    zero = gap_closed([3.0, 3.0], [2.5, 2.5], [3.0, 3.0])
    assert (zero["estimate"], zero["low"], zero["high"]) == (None, None, None)
    assert zero["per_seed"] == [None, None]
    assert_plain_json(zero)


def test_gap_closed_with_one_seed_and_mismatched_lengths():
    one = gap_closed([3.0], [2.5], [2.0])
    assert (one["estimate"], one["low"], one["high"], one["n"]) == (0.5, None, None, 1)
    with pytest.raises(ValueError, match="lengths"):
        gap_closed([3.0, 3.1], [2.5], [2.0, 2.1])


# ---------------------------------------------------------------- paired_difference

def test_paired_difference_matches_the_hand_computed_t_test():
    # differences 1, 2, 3, 4: t = 2.5 / (sqrt(5/3) / 2) = 3.8729833, two-sided p(df=3) = 0.030466
    r = paired_difference([2.0, 4.0, 6.0, 8.0], [1.0, 2.0, 3.0, 4.0])
    half = T_975_3 * math.sqrt(5 / 3) / 2
    assert r["mean_diff"] == 2.5 and r["n"] == 4
    assert (r["low"], r["high"]) == pytest.approx((2.5 - half, 2.5 + half), rel=1e-12)
    assert r["p_value"] == pytest.approx(0.030466291662170977, rel=1e-9)
    assert r["significant"] is True and "t-test" in r["test"]
    # sign flip: only all-plus and all-minus patterns reach |mean| >= 2.5, so p = 2 / 2^4
    assert r["p_value_sign_flip"] == pytest.approx(2 / 16)
    assert_plain_json(r)


def test_a_consistent_shift_is_significant():
    b = np.array([3.20, 3.05, 3.31, 3.12, 3.25])
    a = b - 0.10 + np.array([0.01, -0.01, 0.005, 0.0, -0.005])
    r = paired_difference(a, b)
    assert r["mean_diff"] == pytest.approx(-0.10)
    assert r["significant"] is True and r["high"] < 0 and r["p_value"] < 0.001
    assert r["p_value_sign_flip"] == pytest.approx(2 / 32)  # the smallest possible with 5 seeds


def test_a_zero_mean_symmetric_difference_is_not_significant():
    b = np.array([3.0, 3.1, 3.2, 3.3, 3.4])
    r = paired_difference(b + np.array([-0.2, 0.2, -0.1, 0.1, 0.0]), b)
    assert r["mean_diff"] == pytest.approx(0.0, abs=1e-12)
    assert r["significant"] is False and r["low"] < 0 < r["high"]
    assert r["p_value"] == pytest.approx(1.0) and r["p_value_sign_flip"] == pytest.approx(1.0)


def test_significance_is_the_interval_excluding_zero():
    # t = 2.7, df=4: outside the 90% interval's reach of 0, inside the 95% one
    d = np.array([1.0, 2.0, 0.5, 1.5, -0.2])
    t = d.mean() / (d.std(ddof=1) / math.sqrt(5))
    assert 2.1318 < t < T_975_4  # between the 0.95 and 0.975 quantiles of t with 4 df
    assert paired_difference(d, np.zeros(5), confidence=0.90)["significant"] is True
    loose = paired_difference(d, np.zeros(5), confidence=0.95)
    assert loose["significant"] is False and 0.05 < loose["p_value"] < 0.10


def test_equal_differences_give_a_zero_width_interval():
    same = paired_difference([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert (same["low"], same["high"]) == (0.0, 0.0)
    assert same["p_value"] == 1.0 and same["significant"] is False
    shift = paired_difference([1.5, 2.5, 3.5], [1.0, 2.0, 3.0])
    assert (shift["low"], shift["high"]) == (0.5, 0.5)
    assert shift["p_value"] == 0.0 and shift["significant"] is True
    assert_plain_json(same)
    assert_plain_json(shift)


def test_paired_difference_with_one_seed_and_mismatched_lengths():
    r = paired_difference([2.0], [1.5])
    assert r["mean_diff"] == 0.5 and r["n"] == 1
    assert (r["low"], r["high"], r["p_value"], r["p_value_sign_flip"]) == (None,) * 4
    assert r["significant"] is False
    assert_plain_json(r)
    with pytest.raises(ValueError, match="lengths"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        paired_difference([], [])
