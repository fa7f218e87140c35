"""Intervals of the quality suite: Wilson for accuracies (with the sample size corrected for targets that share an
item), and a normal interval of a mean over items for bits per character."""

from __future__ import annotations

import math

import torch

from ..checks import check_positive_float


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (95% for z=1.96); ``(0, 1)`` when ``n == 0``."""
    if isinstance(k, bool) or isinstance(n, bool) or not isinstance(k, int) or not isinstance(n, int):
        raise TypeError(f"k and n must be ints, got {k!r} and {n!r}")
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    z = check_positive_float(z, "z")
    if n == 0:
        return 0.0, 1.0
    return _wilson(k / n, n, z)


def _wilson(p: float, n: float, z: float) -> tuple[float, float]:
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # exact ends at p = 0 and p = 1 (rounding would leave e.g. 1e-18 instead of 0)
    return (0.0 if p == 0 else max(0.0, centre - half)), (1.0 if p == 1 else min(1.0, centre + half))


def clustered_wilson(correct: torch.Tensor, count: torch.Tensor, z: float = 1.96) -> tuple[float, float]:
    """Wilson interval of the accuracy ``sum(correct) / sum(count)`` over items that each hold ``count[i]`` scored
    targets, ``correct[i]`` of them right (items with no target are left out).

    Targets of one item are not independent (an MQAR model that fails on a sequence often fails on several of its
    queries), so counting targets as trials gives too narrow an interval. The sample size is replaced by Kish's
    effective size ``p(1-p) / var(p)``, with ``var(p)`` the ratio estimator's variance over items, kept between
    that of fully correlated targets (``(sum count)^2 / sum count^2``, the number of items when all hold as many
    targets) and the number of targets: one target per item gives exactly ``wilson(k, n)``; items whose
    targets are all right or all wrong together give the interval of as many trials as items (and so do all-right
    and all-wrong results, whose correlation cannot be measured)."""
    keep = count > 0
    correct, count = correct[keep].double(), count[keep].double()
    items, n = correct.numel(), float(count.sum())
    k = round(float(correct.sum()))
    if items < 2:
        return wilson(k, round(n), z)
    p = float(correct.sum()) / n
    # fully correlated targets: an item is one trial weighted by its target count, (sum c)^2 / sum c^2 of them
    # (the number of items when every item has as many targets)
    floor = n * n / float((count * count).sum())
    if k in (0, round(n)):  # no spread to measure the correlation by: assume the worst
        return _wilson(p, floor, check_positive_float(z, "z"))
    var = items / (items - 1) * float(((correct - p * count) ** 2).sum()) / n**2
    n_eff = min(n, max(floor, p * (1 - p) / var)) if var > 0 else n
    return _wilson(p, n_eff, check_positive_float(z, "z"))


def mean_ci(bits: torch.Tensor, n: torch.Tensor, z: float = 1.96) -> tuple[float, float]:
    """Normal interval of the mean over items of each item's bits per target (items with no target left out)."""
    per_item = bits[n > 0] / n[n > 0]
    if per_item.numel() < 2:
        return math.nan, math.nan
    mean, half = float(per_item.mean()), z * float(per_item.std()) / math.sqrt(per_item.numel())
    return mean - half, mean + half
