"""Speedup statistics that survive machine load: paired per-prompt ratios, their median and a 95% interval.

A method's time and the AR time of the *same prompt and repeat* are measured moments apart (:mod:`.schedule`), so
their ratio cancels most of a load change that a sum over the whole run would not. Definitions:

* paired ratio of prompt ``i``, repeat ``j``: ``AR time(i, j) / method time(i, j)``;
* per-prompt ratio: the median of prompt ``i``'s paired ratios over the repeats (one disturbed repeat cannot
  move it);
* ``tau``: the median of the per-prompt ratios, with a distribution-free 95% interval for that median
  (:func:`median_interval`: order statistics of the per-prompt ratios, exact binomial coverage, no resampling);
* ``tau_total``: sum of AR times / sum of method times over the same paired runs (the definition reports used
  before; kept so old and new reports compare).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "CI_LEVEL",
    "MedianInterval",
    "median_interval",
    "per_prompt_ratios",
    "relative_spread",
    "total_ratio",
]

CI_LEVEL = 0.95

RunKey = tuple[int, int]  # (prompt index, repeat)


@dataclass(frozen=True)
class MedianInterval:
    """The median of ``n`` values and an interval ``[low, high]`` that covers the population median with
    probability ``level`` (the exact coverage of the chosen order statistics, >= the level asked for when ``n`` is
    large enough). ``warning`` says why the interval is weaker than asked (too few values), else ``None``."""

    median: float | None
    low: float | None
    high: float | None
    level: float | None
    n: int
    warning: str | None = None


def _binomial_half_cdf(k: int, n: int) -> float:
    """P(B <= k) for B ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


def median_interval(values: Iterable[float], level: float = CI_LEVEL) -> MedianInterval:
    """Median of ``values`` with the distribution-free order-statistic interval for the median.

    For sorted values ``x_1 <= .. <= x_n`` the interval ``[x_k, x_{n-k+1}]`` covers the median of the distribution
    the values are drawn from (independently) with probability ``1 - 2 P(B <= k - 1)``, ``B ~ Bin(n, 1/2)``,
    whatever that distribution is. We take the largest ``k`` whose coverage is still ``>= level``. Below 6 values
    even ``[x_1, x_n]`` covers less than 95%: then ``[min, max]`` is returned with its true coverage and a
    warning (one value: a degenerate interval of coverage 0), never an error.
    """
    xs = sorted(float(v) for v in values)
    n = len(xs)
    if n == 0:
        return MedianInterval(None, None, None, None, 0, "no paired runs")
    median = statistics.median(xs)
    k = 0
    while k + 1 <= n - k and 1 - 2 * _binomial_half_cdf(k, n) >= level:
        k += 1  # coverage of [x_(k+1), x_(n-k)] is still >= level: tighten
    if k == 0:
        coverage = 1 - 2 * _binomial_half_cdf(0, n)
        warning = (
            f"{n} prompt(s) are too few for a {level:.0%} interval of the median tau (6 needed): the interval given "
            f"is [min, max], which covers it with probability {coverage:.0%} only; raise bench.samples_per_resolution "
            "(or give more bench.prompts)"
        )
        return MedianInterval(median, xs[0], xs[-1], coverage, n, warning)
    coverage = 1 - 2 * _binomial_half_cdf(k - 1, n)
    return MedianInterval(median, xs[k - 1], xs[n - k], coverage, n)


def per_prompt_ratios(baseline: Mapping[RunKey, float], method: Mapping[RunKey, float]) -> dict[int, float]:
    """``{prompt: median over repeats of baseline time / method time}`` over the (prompt, repeat) keys both
    have; a pair with a non-positive method time is left out (no ratio exists)."""
    paired: dict[int, list[float]] = defaultdict(list)
    for key, t in method.items():
        if key in baseline and t > 0:
            paired[key[0]].append(baseline[key] / t)
    return {prompt: statistics.median(rs) for prompt, rs in sorted(paired.items())}


def total_ratio(baseline: Mapping[RunKey, float], method: Mapping[RunKey, float]) -> float | None:
    """Sum of baseline times / sum of method times over the (prompt, repeat) keys both have."""
    keys = [k for k in method if k in baseline]
    t = sum(method[k] for k in keys)
    return sum(baseline[k] for k in keys) / t if t > 0 else None


def relative_spread(times_per_prompt: Mapping[int, Sequence[float]]) -> float | None:
    """The median over prompts of ``(max - min) / median`` of each prompt's times across repeats: how much the
    same run of the same method moved while the benchmark ran. ``None`` without a prompt timed twice."""
    spreads = [
        (max(ts) - min(ts)) / statistics.median(ts)
        for ts in times_per_prompt.values()
        if len(ts) >= 2 and statistics.median(ts) > 0
    ]
    return statistics.median(spreads) if spreads else None
