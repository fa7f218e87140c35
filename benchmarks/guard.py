"""What the non-finite guard costs (``nearfar/guard.py``): ``attend`` against the same engine call without it.

Training calls check q/k/v (three max-abs reductions) before the engine; inference calls check only the output.
Each case is timed in interleaved rounds (guarded, unguarded, alternating order) on the same inputs; the figure is
the median over rounds of the per-round ratio guarded / unguarded. Run from the repo root:

    .venv/bin/python benchmarks/guard.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import nearfar
import nearfar.dispatch as attend_module


def _unguarded(q, k, v, pattern):
    """The engine dispatch ``attend`` makes after validation, without the guard."""
    scale = q.shape[-1] ** -0.5
    return attend_module._run(q, k, v, pattern, scale, None, None, "auto", False)[0]


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


CASES = {
    "train 1D SlidingWindow(256) & Causal, N=8192, H=8, d=64 (fwd+bwd)":
        dict(shape=(1, 8, 8192, 64), pattern=nearfar.SlidingWindow(256) & nearfar.Causal(), train=True),
    "train 2D Neighborhood(13x13) on 64x64, H=4, d=32 (fwd+bwd)":
        dict(shape=(1, 4, 4096, 32), pattern=nearfar.Neighborhood((13, 13), grid=(64, 64)), train=True),
    "inference prefill SlidingWindow(256) & Causal, N=8192, H=8, d=64 (fwd)":
        dict(shape=(1, 8, 8192, 64), pattern=nearfar.SlidingWindow(256) & nearfar.Causal(), train=False),
    "inference decode, 1 query over 16384 cached keys, H=8, d=64, Causal (fwd)":
        dict(shape=(1, 8, 16384, 64), nq=1, pattern=nearfar.Causal(), train=False),
}


def run_case(shape, pattern, train, rounds, nq=None):
    b, h, n, d = shape
    q = torch.randn(b, h, nq or n, d, requires_grad=train)
    k, v = (torch.randn(b, h, n, d, requires_grad=train) for _ in range(2))

    def step(f):
        def go():
            with torch.set_grad_enabled(train):
                out = f(q, k, v, pattern)
                if train:
                    out.sum().backward()
        return go

    guarded, plain = step(nearfar.attend), step(_unguarded)
    for _ in range(2):
        guarded(), plain()
    ratios = []
    for r in range(rounds):
        if r % 2:
            tp, tg = _time(plain), _time(guarded)
        else:
            tg, tp = _time(guarded), _time(plain)
        ratios.append(tg / tp)
    return statistics.median(ratios), min(ratios), max(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds\n")
    print("| case | guarded / unguarded (median) | min-max |")
    print("|---|---|---|")
    for name, case in CASES.items():
        med, lo, hi = run_case(**case, rounds=args.rounds)
        print(f"| {name} | {med:.3f} | {lo:.3f}-{hi:.3f} |")


if __name__ == "__main__":
    main()
