"""Statistics for comparing variants trained with several seeds, in forms a reviewer accepts.

A claim such as "looping closes 70% of the gap" or "variant A beats variant B" rests on a few
seeds per variant (often 3 to 5). This module turns such per-seed numbers into intervals and
tests, using scipy's implementations rather than our own:

- `mean_interval`: mean with a Student-t confidence interval;
- `solve_rate`: the fraction of seeds reaching a threshold, with a Wilson (1927) score interval;
- `bootstrap_interval`: a bootstrap interval over seeds for any statistic (scipy.stats.bootstrap);
- `gap_closed`: the fraction of the gap between a parameter-matched and a depth-matched plain
  model that the looped model closes, with a bootstrap interval resampling seeds jointly;
- `paired_difference`: the mean seed-paired difference of two variants, its t interval and
  p-values (paired t-test, and an exact sign-flip permutation test).

Inputs are 1-D sequences of finite numbers, one per seed (lists, tuples or numpy arrays); an
empty or non-finite input raises ValueError, since a diverged run must be dealt with by the
caller, not averaged. Every function returns a dict of plain Python floats, ints, bools, strings
and None (None where a quantity is undefined, e.g. an interval from a single seed), so the result
goes through `json.dumps(..., allow_nan=False)` unchanged. Nothing here imports the package.
"""

import math
import warnings

import numpy as np
from scipy import stats

DEFAULT_RESAMPLES = 9999


def _values(values, name: str = "values") -> np.ndarray:
    """`values` as a 1-D float64 array; ValueError if empty, not 1-D or not all finite."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of per-seed numbers, "
                         f"got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: a statistic needs at least one seed")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(f"{name} has non-finite entries at positions {bad.tolist()}")
    return array


def _paired(named: dict[str, object]) -> list[np.ndarray]:
    """The named per-seed sequences as arrays; ValueError unless all have the same length."""
    arrays = [_values(v, name) for name, v in named.items()]
    lengths = {name: len(a) for name, a in zip(named, arrays)}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"paired by seed index, so the lengths must agree: {lengths}")
    return arrays


def _check_confidence(confidence: float) -> None:
    """ValueError unless 0 < confidence < 1 (a two-sided confidence level, e.g. 0.95)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")


def _number(x) -> float | None:
    """A plain float, or None where x is None or not finite."""
    return None if x is None or not math.isfinite(x) else float(x)


def mean_interval(values, confidence: float = 0.95) -> dict:
    """Mean of per-seed values with a two-sided Student-t confidence interval.

    values: one number per seed, in the values' own units (e.g. validation loss in nats/token).
    Returns {"mean", "low", "high", "n", "sd"}: the sample mean, the interval
    mean -+ t_{(1+confidence)/2, n-1} * sd / sqrt(n) (Student 1908; quantile from
    scipy.stats.t), the number of seeds and the sample standard deviation (ddof=1), all in the
    values' units. With one seed sd, low and high are None (no interval); with all values equal
    the interval has zero width. Raises ValueError if empty or non-finite.
    """
    _check_confidence(confidence)
    x = _values(values)
    n, mean = len(x), float(np.mean(x))
    if n == 1:
        return {"mean": mean, "low": None, "high": None, "n": 1, "sd": None}
    sd = float(np.std(x, ddof=1))
    half = float(stats.t.ppf((1.0 + confidence) / 2.0, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "sd": sd}


def solve_rate(values, threshold: float, confidence: float = 0.95,
               higher_is_better: bool = True) -> dict:
    """Fraction of seeds that reach `threshold`, with a Wilson score interval; median and range.

    values: one number per seed (e.g. task accuracy in [0, 1]); threshold in the same units. A
    seed counts as solved when value >= threshold, or value <= threshold when higher_is_better
    is False (e.g. a loss). Returns {"solved", "n", "rate", "low", "high", "median", "min",
    "max"}: the solved count, the seed count, solved / n, the Wilson (1927) score interval for
    the rate (scipy.stats.binomtest(...).proportion_ci(method="wilson"), no continuity
    correction), and the median, minimum and maximum of the values. Raises ValueError if empty.
    """
    _check_confidence(confidence)
    x = _values(values)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    solved = int(np.sum(x >= threshold if higher_is_better else x <= threshold))
    n = len(x)
    ci = stats.binomtest(solved, n).proportion_ci(confidence_level=confidence, method="wilson")
    return {"solved": solved, "n": n, "rate": solved / n,
            "low": min(max(float(ci.low), 0.0), 1.0), "high": min(max(float(ci.high), 0.0), 1.0),
            "median": float(np.median(x)), "min": float(np.min(x)), "max": float(np.max(x))}


def _bootstrap(data: tuple, statistic, confidence: float, n_resamples: int, seed: int,
               method: str) -> tuple[float | None, float | None, str]:
    """scipy.stats.bootstrap over seeds (samples in `data` resampled jointly, paired by index).

    Returns (low, high, method used). BCa is undefined when the bootstrap distribution is
    degenerate (e.g. a constant sample) or its jackknife hits an undefined statistic; then the
    percentile interval of the same resamples is returned and the method says so. Bounds that
    are still not finite (a statistic undefined on some resamples) come back as None.
    """
    common = {"paired": True, "confidence_level": confidence, "rng": np.random.default_rng(seed)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.bootstrap(data, statistic, n_resamples=n_resamples, method=method, **common)
        ci = result.confidence_interval
        if method.lower() == "bca" and not (np.isfinite(ci.low) and np.isfinite(ci.high)):
            method = "percentile (BCa undefined on these resamples)"
            ci = stats.bootstrap(data, statistic, n_resamples=0, method="percentile",
                                 bootstrap_result=result, **common).confidence_interval
    return _number(ci.low), _number(ci.high), method


def bootstrap_interval(values, statistic=np.mean, confidence: float = 0.95,
                       n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                       method: str = "BCa") -> dict:
    """Bootstrap confidence interval over seeds for `statistic` of the per-seed values.

    values: one number per seed. statistic: a function of a 1-D array returning a number,
    ideally accepting `axis` (np.mean, np.median) so scipy can vectorise it. method: "BCa"
    (bias-corrected and accelerated, Efron 1987) or "percentile" (Efron 1979), computed by
    scipy.stats.bootstrap with n_resamples resamples drawn from numpy's default_rng(seed), so the
    result is deterministic given the seed. Where BCa is undefined (a degenerate bootstrap
    distribution, e.g. all values equal) the percentile interval of the same resamples is given.
    Returns {"estimate", "low", "high", "n", "method"}: statistic(values), the interval bounds in
    the values' units, the seed count and the method used. With one seed low and high are None.
    Note that with few seeds the bootstrap interval is too narrow (it cannot see variation the
    seeds did not show); prefer `mean_interval` for means of 2-5 seeds.
    """
    _check_confidence(confidence)
    x = _values(values)
    estimate = float(statistic(x))
    if len(x) < 2:
        return {"estimate": estimate, "low": None, "high": None, "n": len(x), "method": method}
    low, high, used = _bootstrap((x,), statistic, confidence, n_resamples, seed, method)
    return {"estimate": estimate, "low": low, "high": high, "n": len(x), "method": used}


def _gap_ratio(param, looped, depth, axis=-1):
    """(mean param - mean looped) / (mean param - mean depth) along axis; NaN where the gap is 0."""
    gap = np.mean(param, axis=axis) - np.mean(depth, axis=axis)
    closed = np.mean(param, axis=axis) - np.mean(looped, axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gap == 0, np.nan, closed / np.where(gap == 0, 1.0, gap))


def gap_closed(param_losses, looped_losses, depth_losses, confidence: float = 0.95,
               n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, method: str = "BCa") -> dict:
    """Fraction of the parameter-matched to depth-matched gap that the looped model closes.

    param_losses: per-seed losses of the plain model with the looped model's parameter count;
    looped_losses: of the looped model; depth_losses: of the plain model with the looped model's
    unrolled depth. All in the same units (e.g. validation nats/token) and paired by seed index,
    so the three sequences must have the same length. The fraction is
    (param - looped) / (param - depth): 0 when looping does no better than the parameter-matched
    model, 1 when it matches the depth-matched one (it may fall outside [0, 1]).
    Returns {"estimate", "low", "high", "n", "method", "per_seed"}: the estimate is the ratio of
    the seed means (stabler than the mean of per-seed ratios when a seed's gap is small); low and
    high a bootstrap interval resampling seeds jointly (all three losses of a seed together; see
    `bootstrap_interval` for the method); per_seed the ratio for each seed. None where the gap is 0
    (the estimate or a seed's ratio), and low/high None with one seed or where resamples with a
    zero gap leave the interval undefined.
    """
    _check_confidence(confidence)
    param, looped, depth = _paired({"param_losses": param_losses, "looped_losses": looped_losses,
                                    "depth_losses": depth_losses})
    per_seed = [_number(r) for r in _gap_ratio(param[:, None], looped[:, None], depth[:, None])]
    estimate = _number(_gap_ratio(param, looped, depth))
    result = {"estimate": estimate, "low": None, "high": None, "n": len(param), "method": method,
              "per_seed": per_seed}
    if len(param) >= 2 and estimate is not None:
        low, high, result["method"] = _bootstrap((param, looped, depth), _gap_ratio, confidence,
                                                 n_resamples, seed, method)
        result["low"], result["high"] = low, high
    return result


def _sign_flip_p(differences: np.ndarray, n_resamples: int, seed: int) -> float:
    """Two-sided p-value of the sign-flip permutation test of mean(differences) == 0.

    Exact (all 2^n sign patterns) when 2^n <= n_resamples, otherwise Monte Carlo with
    default_rng(seed); scipy.stats.permutation_test with one sample and
    permutation_type="samples" flips the sign of each observation independently.
    """
    result = stats.permutation_test((differences,), np.mean, permutation_type="samples",
                                    n_resamples=n_resamples, rng=np.random.default_rng(seed))
    return float(min(result.pvalue, 1.0))


def paired_difference(a, b, confidence: float = 0.95, n_resamples: int = DEFAULT_RESAMPLES,
                      seed: int = 0) -> dict:
    """Mean of the seed-paired differences a - b, its t interval and p-values for "no difference".

    a, b: per-seed values of two variants (e.g. validation loss), paired by seed index, same
    length and units. Returns {"mean_diff", "low", "high", "p_value", "p_value_sign_flip",
    "significant", "n", "test"}:
    - mean_diff: mean of a - b, in the values' units; low, high: its Student-t interval
      (`mean_interval` of the differences);
    - p_value: two-sided paired t-test (Student 1908; scipy.stats.ttest_rel). It is the dual of
      the interval, so significant == (p_value < 1 - confidence) up to rounding;
    - p_value_sign_flip: two-sided exact sign-flip permutation test (Fisher 1935; see
      `_sign_flip_p`), which assumes only symmetry of the differences under the null, not
      normality. With n seeds it cannot fall below 2 / 2^n (0.25 for n=3, 0.0625 for n=5), so
      with fewer than 6 seeds it can never reach 0.05: report it next to the t-test;
    - significant: True when the interval excludes 0 (False with one seed: no interval);
    - test: the name of the test behind p_value.
    All differences equal gives a zero-width interval and p_value 1 (all zero) or 0 (otherwise).
    With one seed low, high and both p-values are None.
    """
    _check_confidence(confidence)
    a, b = _paired({"a": a, "b": b})
    d = a - b
    interval = mean_interval(d, confidence)
    result = {"mean_diff": interval["mean"], "low": interval["low"], "high": interval["high"],
              "p_value": None, "p_value_sign_flip": None, "significant": False, "n": len(d),
              "test": "paired t-test (Student), two-sided"}
    if len(d) < 2:
        return result
    if interval["sd"] == 0.0:
        result["p_value"] = 1.0 if interval["mean"] == 0.0 else 0.0
    else:
        with warnings.catch_warnings():
            # Differences equal up to rounding make scipy warn about precision; the p-value
            # it returns is still the test's (near 0 or near 1), which is what we report.
            warnings.simplefilter("ignore", RuntimeWarning)
            result["p_value"] = float(stats.ttest_rel(a, b).pvalue)
    result["p_value_sign_flip"] = _sign_flip_p(d, n_resamples, seed)
    result["significant"] = bool(interval["low"] > 0.0 or interval["high"] < 0.0)
    return result
