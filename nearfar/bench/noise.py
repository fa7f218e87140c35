"""When ``nearfar bench`` can tell two numbers apart, and when it says "not separable here" instead of ranking.

Speed. A ratio is the median over ``n`` interleaved rounds of per-round time ratios (``timing.median_ratio``). Its
interval is the min-max of those per-round ratios: each round falls on either side of the true median with
probability 1/2, independently, so the range holds it with probability ``1 - 2^(1-n)`` (75% with 3 rounds, 94% with
5; ``coverage``). Fewer than ``MIN_ROUNDS`` rounds measure no usable spread, and nothing is separated then. Two
ratios against dense timed in different rounds (the suite's rows) are separable when their intervals are disjoint;
two mechanisms timed in the same rounds (``--compare``) are separable when the interval of their own per-round
ratio excludes 1.

Quality. An accuracy has the Wilson 95% interval and bits per character the normal 95% interval of the mean over
items that evaluation records (``stats.py``); with several seeds the interval runs from the lowest seed's lower end
to the highest seed's upper end (seed spread and evaluation noise together). Two scores are separable when their
intervals are disjoint. That is conservative: every mechanism is scored on the same evaluation items, so a paired
test could still separate some pairs this calls "not separable here".
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import NamedTuple

#: rounds (or seeds without recorded intervals) below which no spread is measured
MIN_ROUNDS = 3
NOT_SEPARABLE = "not separable here"


class Interval(NamedTuple):
    """A number's interval; ``measured`` is False when the run measured no spread (too few rounds, no interval
    recorded), and then it separates from nothing."""

    lo: float
    hi: float
    measured: bool


def coverage(rounds: int) -> float:
    """Probability that the min-max of ``rounds`` per-round ratios holds their median: ``1 - 2^(1-rounds)``."""
    return 1.0 - 2.0 ** (1 - rounds) if rounds >= 1 else 0.0


def round_interval(per_round: Sequence[float]) -> Interval:
    """The min-max of per-round ratios (measured from ``MIN_ROUNDS`` rounds on)."""
    values = [float(v) for v in per_round]
    if not values:
        return Interval(math.nan, math.nan, False)
    return Interval(min(values), max(values), len(values) >= MIN_ROUNDS)


def row_interval(row: dict) -> Interval:
    """The interval of a speed row's ratio to dense from its ``ratio_min``, ``ratio_max`` and ``rounds`` (rows of
    older runs carry no ``rounds``: their spread counts as measured if min and max differ)."""
    lo, hi = row.get("ratio_min"), row.get("ratio_max")
    if lo is None or hi is None:
        return Interval(row["ratio"], row["ratio"], False)
    rounds = row.get("rounds")
    return Interval(lo, hi, rounds >= MIN_ROUNDS if rounds is not None else lo < hi)


def separable(a: Interval, b: Interval) -> bool:
    """True when both spreads were measured and the intervals are disjoint."""
    return a.measured and b.measured and (a.hi < b.lo or b.hi < a.lo)


def versus_one(iv: Interval) -> str:
    """``"faster"`` (the interval of a time ratio lies above 1), ``"slower"`` (below), or ``NOT_SEPARABLE``."""
    if iv.measured and iv.lo > 1:
        return "faster"
    if iv.measured and iv.hi < 1:
        return "slower"
    return NOT_SEPARABLE


def pair_ratio(times_a: Sequence[float], times_b: Sequence[float]) -> tuple[float, Interval]:
    """How many times faster ``a`` is than ``b`` from their times in the same rounds: the median over rounds of
    ``time_b / time_a`` (> 1: ``a`` faster) and the min-max interval of the per-round ratios."""
    if len(times_a) != len(times_b) or not times_a:
        raise ValueError(f"need the times of the same rounds, got {len(times_a)} and {len(times_b)}")
    per_round = [b / a for a, b in zip(times_a, times_b)]
    return statistics.median(per_round), round_interval(per_round)


def pair_verdict(a: str, b: str, iv: Interval) -> str:
    """The verdict on ``a`` against ``b`` from the interval of ``time_b / time_a``."""
    if not iv.measured:
        return f"{NOT_SEPARABLE} (fewer than {MIN_ROUNDS} rounds)"
    return {"faster": f"{a} faster", "slower": f"{b} faster"}.get(versus_one(iv), NOT_SEPARABLE)


def higher_is_better(metric: str) -> bool:
    """Accuracy: higher is better; bits per character (any other metric): lower is."""
    return metric == "accuracy"


def joined_interval(cis: Sequence[object]) -> tuple[float, float] | None:
    """The lowest lower end and the highest upper end of ``cis`` (``(lo, hi)`` pairs, e.g. one per seed); None if
    there are none or one is missing or NaN."""
    ends: list[tuple[float, float]] = []
    for ci in cis:
        if not isinstance(ci, (tuple, list)) or len(ci) != 2 or not all(isinstance(v, (int, float)) and v == v
                                                                          for v in ci):
            return None
        ends.append((float(ci[0]), float(ci[1])))
    return (min(lo for lo, _ in ends), max(hi for _, hi in ends)) if ends else None


def quality_interval(rows: Sequence[dict]) -> Interval:
    """The interval of a mechanism's score over its seeds' rows (see the module docstring)."""
    joined = joined_interval([r.get("ci_overall") for r in rows])
    if joined is not None:
        return Interval(joined[0], joined[1], True)
    scores = [r["overall"] for r in rows if r["overall"] == r["overall"]]
    if not scores:
        return Interval(math.nan, math.nan, False)
    return Interval(min(scores), max(scores), len(scores) >= MIN_ROUNDS)


def within_noise(best: Interval, others: dict[str, Interval]) -> list[str]:
    """The names of ``others`` not separable from ``best``."""
    return [name for name, iv in others.items() if not separable(best, iv)]
