"""Timing protocol and the built-in sweep behind ``nearfar bench``.

Protocol (ours): every method is warmed up, then all methods are timed in interleaved rounds with a rotating order, so a
slow spell of this shared machine hits them alike; we report per-method medians and the median of per-round ratios
against the baseline.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import patterns as P
from ..dispatch import attend


def interleave(methods: Mapping[str, Callable[[], object]], rounds: int = 5,
               warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each method, ``rounds`` interleaved rounds after ``warmup`` calls each."""
    for fn in methods.values():
        for _ in range(warmup):
            fn()
    names = list(methods)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            methods[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def attention_call(fn: Callable[..., torch.Tensor], leaves: list[torch.Tensor], mode: str,
                   grad_out: torch.Tensor) -> Callable[[], None]:
    """One timed call of an attention ``fn(q, k, v)`` on ``leaves``: ``"fwd"`` runs it under ``no_grad``;
    ``"fwd+bwd"`` clears the leaves' gradients and backpropagates ``grad_out`` into them."""
    if mode not in ("fwd", "fwd+bwd"):
        raise ValueError(f"mode must be 'fwd' or 'fwd+bwd', got {mode!r}")

    def run() -> None:
        if mode == "fwd":
            with torch.no_grad():
                fn(*leaves)
        else:
            for t in leaves:
                t.grad = None
            fn(*leaves).backward(grad_out)
    return run


def median_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``times[num][r] / times[den][r]`` (round-paired, robust to machine drift)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def load() -> str:
    try:
        return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load n/a"


@dataclass
class Example:
    name: str
    make: Callable[[bool], tuple[P.Pattern, int]]  # quick -> (pattern, N)
    heads: int = 4
    dim: int = 32


def _na2d(quick):
    s = 32 if quick else 96
    return P.Neighborhood(7, grid=(s, s)), s * s


#: named example patterns, one per family; ``nearfar bench`` sweeps them
EXAMPLES = [
    Example("neighborhood-1d k=129", lambda q: (P.Neighborhood(129), 2048 if q else 16384), dim=64),
    Example("dilated-neighborhood-1d k=33 d=4", lambda q: (P.Neighborhood(33, dilation=4), 2048 if q else 16384),
            dim=64),
    Example("neighborhood-2d 7x7", _na2d),
    Example("dilated-neighborhood-2d 7x7 d=3",
            lambda q: (P.Neighborhood(7, dilation=3, grid=(48, 48) if q else (96, 96)), 48 * 48 if q else 96 * 96)),
    Example("causal-neighborhood-2d 9x9",
            lambda q: (P.Neighborhood(9, is_causal=True, grid=(48, 48) if q else (96, 96)), 48 * 48 if q else 96 * 96)),
    Example("neighborhood-3d 5x5x5", lambda q: (P.Neighborhood(5, grid=(8, 16, 16) if q else (16, 32, 32)),
                                                8 * 16 * 16 if q else 16 * 32 * 32)),
    Example("swin-shifted-window 8x8", lambda q: (P.Blocks(8, shift=4, grid=(48, 48) if q else (96, 96)),
                                                  48 * 48 if q else 96 * 96)),
    Example("maxvit-grid 8x8", lambda q: (P.Grid(8, grid=(48, 48) if q else (96, 96)), 48 * 48 if q else 96 * 96)),
    Example("sliding-window-256+sinks-4, causal", lambda q: ((P.SlidingWindow(256) | P.Sinks(4)) & P.Causal(),
                                                              2048 if q else 16384), dim=64),
    Example("global-tokens-16 | neighborhood-1d k=65", lambda q: (P.GlobalTokens(16) | P.Neighborhood(65),
                                                                  2048 if q else 16384), dim=64),
    Example("strided-64 | sliding-window-64 (Sparse Transformer)",
            lambda q: (P.Strided(64) | P.SlidingWindow(63), 2048 if q else 16384), dim=64),
]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def check_example(pattern: P.Pattern, n: int, heads: int, dim: int, seed: int = 0) -> float:
    """Worst relative error of the block-sparse engine (outputs and q/k/v grads) against float64 dense."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n, dim, generator=g, requires_grad=True) for _ in range(3))
    out = attend(q, k, v, pattern, engine="blocksparse")
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = attend(q64, k64, v64, pattern, engine="dense")
    ref_grads = torch.autograd.grad(ref.square().sum(), (q64, k64, v64))
    return max(_rel_err(out, ref), *(_rel_err(a, b) for a, b in zip(grads, ref_grads)))


def _time_forward(q, k, v, mask, pattern, rounds):
    with torch.no_grad():
        return interleave({
            "dense": lambda: F.scaled_dot_product_attention(q, k, v),
            "masked": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            "nearfar": lambda: attend(q, k, v, pattern),
        }, rounds=rounds)


def sweep(quick: bool = True, rounds: int = 3, out: Callable[[str], None] = print) -> list[dict]:
    """Correctness and speed of every example: block-sparse vs dense SDPA and masked SDPA, forward, fp32."""
    from ..plan import get_plan

    out(f"nearfar bench ({'quick' if quick else 'full'}): fp32, B=1, {torch.get_num_threads()} threads, {load()}")
    out("correctness: worst rel. error of block-sparse outputs and grads vs float64 dense (small size)")
    head = f"{'pattern':<52} {'N':>6} {'work':>6} {'rel.err':>8} {'dense ms':>9} {'masked ms':>9} {'nearfar ms':>10} " \
           f"{'vs dense':>8} {'vs masked':>9}"
    out(head)
    out("-" * len(head))
    rows = []
    for ex in EXAMPLES:
        err = check_example(*ex.make(True), ex.heads, ex.dim)
        pattern, n = ex.make(quick)
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(1, ex.heads, n, ex.dim, generator=g) for _ in range(3))
        mask = pattern.mask(n, n)
        work = get_plan(pattern, n, n).density()
        times = _time_forward(q, k, v, mask, pattern, rounds)
        med = {m: statistics.median(t) * 1e3 for m, t in times.items()}
        row = dict(pattern=ex.name, n=n, work=work, err=err, **{f"{m}_ms": t for m, t in med.items()},
                   vs_dense=median_ratio(times, "dense", "nearfar"), vs_masked=median_ratio(times, "masked", "nearfar"))
        rows.append(row)
        out(f"{ex.name:<52} {n:>6} {work:>6.1%} {err:>8.1e} {med['dense']:>9.1f} {med['masked']:>9.1f} "
            f"{med['nearfar']:>10.1f} {row['vs_dense']:>7.1f}x {row['vs_masked']:>8.1f}x")
    bad = [r["pattern"] for r in rows if r["err"] > 1e-5]
    out(f"{len(rows) - len(bad)}/{len(rows)} patterns within 1e-5 of the float64 reference; {load()}")
    if bad:
        raise SystemExit(f"correctness check failed for: {', '.join(bad)}")
    return rows
