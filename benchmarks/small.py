"""Small sizes, where vision models spend most stages: ``attend`` with fixed patterns against fused dense SDPA.

    python benchmarks/small.py                  # every case, forward and forward+backward, markdown to stdout
    python benchmarks/small.py --rounds 9 --cases na2d-14 causal-512

Each case times, in interleaved rounds on the same inputs (fp32; ``--dtype bfloat16``/``float16`` casts them):
unmasked ``F.scaled_dot_product_attention`` (the bar: "dense SDPA"), ``attend`` with ``engine="auto"``, and each
engine ``auto`` chooses between (``dense``, ``blocksparse``). Reported: medians (ms) and the median per-round ratio
SDPA time / method time (>= 1: faster than dense SDPA), and which engine ``auto`` picked. Forward runs under
``no_grad``; forward+backward backpropagates a fixed cotangent into q, k and v."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nearfar as nf  # noqa: E402
from nearfar import native  # noqa: E402
from nearfar.bench.timing import attention_call, interleave, load, median_ratio  # noqa: E402
from nearfar.dispatch import choose_engine  # noqa: E402

# name: (pattern, batch, heads, tokens, head dim) -- vision stages at B=8 (NAT-mini: 3 heads of 32 at 28x28,
# 12 heads of 32 at 14x14 after two downsamplings), sequences at B=4
CASES = {
    "na2d-14": (lambda: nf.Neighborhood((7, 7), grid=(14, 14)), 8, 12, 196, 32),
    "na2d-28": (lambda: nf.Neighborhood((7, 7), grid=(28, 28)), 8, 6, 784, 32),
    "dina2d-28": (lambda: nf.Neighborhood((7, 7), dilation=(2, 2), grid=(28, 28)), 8, 6, 784, 32),
    "na1d-256": (lambda: nf.Neighborhood(65), 4, 8, 256, 64),
    "na1d-512": (lambda: nf.Neighborhood(129), 4, 8, 512, 64),
    "na1d-1024": (lambda: nf.Neighborhood(129), 4, 8, 1024, 64),
    "causal-256": (lambda: nf.Causal(), 4, 8, 256, 64),
    "causal-1024": (lambda: nf.Causal(), 4, 8, 1024, 64),
    "swa-1024": (lambda: nf.SlidingWindow(left=255) & nf.Causal(), 4, 8, 1024, 64),
    "sinks-swa-512": (lambda: (nf.SlidingWindow(left=127) | nf.Sinks(4)) & nf.Causal(), 4, 8, 512, 64),
    "global-1024": (lambda: nf.SlidingWindow(left=64, right=64) | nf.GlobalTokens(8), 4, 8, 1024, 64),
}


def run_case(name: str, rounds: int, dtype: torch.dtype = torch.float32) -> list[tuple]:
    make, b, h, n, d = CASES[name]
    pattern = make()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(3))
    go = torch.randn(b, h, n, d, generator=g).to(dtype)
    picked = choose_engine(q, pattern, n, n)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        leaves = [t.clone().requires_grad_(mode == "fwd+bwd") for t in (q, k, v)]

        def call(fn, leaves=leaves, mode=mode):
            return attention_call(fn, leaves, mode, go)

        fns = {"dense SDPA": call(F.scaled_dot_product_attention),
               "auto": call(lambda a, b_, c: nf.attend(a, b_, c, pattern)),
               "dense": call(lambda a, b_, c: nf.attend(a, b_, c, pattern, engine="dense")),
               "blocksparse": call(lambda a, b_, c: nf.attend(a, b_, c, pattern, engine="blocksparse"))}
        times = interleave(fns, rounds=rounds)
        rows.append((name, mode, picked, *(statistics.median(times[m]) * 1e3 for m in fns),
                     *(median_ratio(times, "dense SDPA", m) for m in ("auto", "dense", "blocksparse"))))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, native kernel: "
          f"{native.available()}, load before {load()}\n")
    print("| case | mode | auto picks | SDPA ms | auto ms | dense ms | blocksparse ms | SDPA/auto | SDPA/dense "
          "| SDPA/blocksparse |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.cases:
        for r in run_case(name, args.rounds, getattr(torch, args.dtype)):
            print("| " + " | ".join([*r[:3], *(f"{x:.2f}" for x in r[3:])]) + " |", flush=True)
    print(f"\nload after {load()}")


if __name__ == "__main__":
    main()
