"""Plain causal attention: ``attend(q, k, v, Causal())`` against fused SDPA with ``is_causal=True``.

    python benchmarks/causal.py                       # every size, fp32 and bf16, forward and forward+backward
    python benchmarks/causal.py --sizes 1024 4096 --dtypes float32 --rounds 9

Each case times, in interleaved rounds on the same inputs: ``F.scaled_dot_product_attention(..., is_causal=True)``
(the bar: the same mask in PyTorch's fused kernel, which skips the blocks above the diagonal), ``attend`` with
``engine="auto"``, and the block-sparse engine forced. Reported: medians (ms), the median per-round ratio SDPA time /
method time (>= 1: as fast as fused causal SDPA or faster), and which engine ``auto`` picked. Also the first call of
each method at each size in a fresh plan cache: the block-sparse engine builds its plan then. Forward runs under
``no_grad``; forward+backward backpropagates a fixed cotangent into q, k and v.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nearfar as nf  # noqa: E402
from nearfar import native  # noqa: E402
from nearfar.bench.timing import attention_call, interleave, load, median_ratio  # noqa: E402
from nearfar.cache import clear_caches  # noqa: E402
from nearfar.dispatch import choose_engine  # noqa: E402

#: tokens: (batch, heads) -- a decoder's prefill at growing lengths, d = 64
SHAPES = {256: (4, 8), 1024: (4, 8), 4096: (1, 8), 16384: (1, 4)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _first_call(fn, leaves, mode, go) -> float:
    """Seconds of one call with the plan cache emptied first (what a new sequence length costs)."""
    clear_caches()
    call = attention_call(fn, leaves, mode, go)
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def run_case(n: int, dtype: torch.dtype, rounds: int) -> list[tuple]:
    b, h = SHAPES[n]
    g = torch.Generator().manual_seed(0)
    q, k, v, go = (torch.randn(b, h, n, 64, generator=g).to(dtype) for _ in range(4))
    pattern = nf.Causal()
    picked = choose_engine(q, pattern, n, n)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        leaves = [t.clone().requires_grad_(mode == "fwd+bwd") for t in (q, k, v)]
        methods = {"causal SDPA": lambda a, b_, c: F.scaled_dot_product_attention(a, b_, c, is_causal=True),
                   "auto": lambda a, b_, c: nf.attend(a, b_, c, pattern),
                   "blocksparse": lambda a, b_, c: nf.attend(a, b_, c, pattern, engine="blocksparse")}
        first = {m: _first_call(fn, leaves, mode, go) for m, fn in methods.items()}
        fns = {m: attention_call(fn, leaves, mode, go) for m, fn in methods.items()}
        times = interleave(fns, rounds=rounds)
        rows.append((f"{n}", str(dtype).removeprefix("torch."), mode, picked,
                     *(statistics.median(times[m]) * 1e3 for m in fns),
                     *(median_ratio(times, "causal SDPA", m) for m in ("auto", "blocksparse")),
                     *(first[m] * 1e3 for m in fns)))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", type=int, default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native kernel: "
          f"{native.available()}, load before {load()}\n")
    print("| tokens | dtype | mode | auto picks | causal SDPA ms | auto ms | blocksparse ms | SDPA/auto "
          "| SDPA/blocksparse | first call ms: SDPA / auto / blocksparse |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dt in args.dtypes:
        for n in args.sizes:
            for r in run_case(n, DTYPES[dt], args.rounds):
                med = [f"{x:.1f}" for x in r[4:7]]
                ratio = [f"{x:.2f}" for x in r[7:9]]
                print("| " + " | ".join([*r[:4], *med, *ratio, " / ".join(f"{x:.0f}" for x in r[9:])]) + " |",
                      flush=True)
    print(f"\nload after {load()}")


if __name__ == "__main__":
    main()
