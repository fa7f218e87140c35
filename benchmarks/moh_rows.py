"""MoH's causal routed heads: only the picked rows (``nearfar.attend_rows`` on the compiled kernel) against every row.

    python benchmarks/moh_rows.py                 # both parts, markdown to stdout
    python benchmarks/moh_rows.py --rounds 7 --threads 2

fp32, 2 threads, medians of interleaved rounds, ratios per round.

1. ``attend_rows`` alone (B=1, 8 heads, N=4,096, d=64, causal): the kernel given only the picked rows (each row's
   keys bounded by its position), against PyTorch's fused causal SDPA on every row, for picked shares 1/8 to 1:
   where the kernel stops paying sets ``nearfar.rows.ROWS_DENSITY``.
2. ``MoHAttention`` (dim 512, 16 heads, learned router at its init, causal self-attention): every head on
   (8 shared + top-8 of 8), 8 shared + top-4 of 8 (75% of the (token, head) pairs) and 4 shared + top-4 of 12
   (50%); forward at 4,096 tokens and forward+backward at 2,048; each with the kernel's row lists and with every
   routed row computed and zeroed (``nearfar.native.disabled()``: what the layer did before).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nearfar as nf  # noqa: E402
from nearfar.bench.timing import interleave, load, median_ratio  # noqa: E402


def part1(rounds: int) -> None:
    print(f"\n### attend_rows: B=1, 8 heads, N=4,096, d=64, causal ({load()})\n")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 4096, 64, generator=g) for _ in range(3))
    jobs = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    shares = (0.125, 0.25, 0.5, 0.625, 0.75, 1.0)
    for s in shares:
        rows = torch.rand(1, 8, 4096, generator=g) < s
        jobs[f"rows {s}"] = lambda rows=rows: nf.attend_rows(q, k, v, rows)
    with torch.no_grad():
        t = interleave(jobs, rounds=rounds)
    print("| picked share | kernel ms | fused causal SDPA, every row, ms | speed-up |\n|---|---|---|---|")
    for s in shares:
        print(f"| {s:g} | {statistics.median(t[f'rows {s}']) * 1e3:.1f} | {statistics.median(t['sdpa']) * 1e3:.1f} | "
              f"{median_ratio(t, 'sdpa', f'rows {s}'):.2f}x |")


def part2(rounds: int) -> None:
    print(f"\n### MoHAttention, causal, dim 512, 16 heads ({load()})\n")
    configs = {"all 16 heads": (8, 8), "8 shared + top-4 of 8 (75%)": (8, 4), "4 shared + top-4 of 12 (50%)": (4, 4)}
    torch.manual_seed(0)
    layers = {name: nf.MoHAttention(512, 16, causal=True, shared_heads=s, top_k=k).eval()
              for name, (s, k) in configs.items()}

    def without_kernel(fn):
        def run():
            with nf.native.disabled():
                return fn()
        return run

    for mode, n in (("forward", 4096), ("forward+backward", 2048)):
        x = torch.randn(1, n, 512, requires_grad=mode != "forward")
        jobs = {}
        for name, layer in layers.items():
            if mode == "forward":
                def fn(layer=layer, x=x):
                    with torch.no_grad():
                        return layer(x)
            else:
                def fn(layer=layer, x=x):
                    layer.zero_grad(set_to_none=True)
                    layer(x).sum().backward()
            jobs[name] = fn
            jobs[name + " (every row)"] = without_kernel(fn)
        t = interleave(jobs, rounds=rounds)
        print(f"\n{mode}, {n} tokens\n\n| layer | row lists ms | every routed row ms | row lists vs every row | "
              f"vs all 16 heads |\n|---|---|---|---|---|")
        for name in configs:
            print(f"| {name} | {statistics.median(t[name]) * 1e3:.0f} | "
                  f"{statistics.median(t[name + ' (every row)']) * 1e3:.0f} | "
                  f"{median_ratio(t, name + ' (every row)', name):.2f}x | "
                  f"{median_ratio(t, 'all 16 heads', name):.2f}x |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", nargs="+", type=int, default=[1, 2], choices=[1, 2])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# MoH causal row skipping: fp32, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"kernel {'built' if nf.native.available() else 'NOT built'}")
    if 1 in args.parts:
        part1(args.rounds)
    if 2 in args.parts:
        part2(args.rounds)


if __name__ == "__main__":
    main()
