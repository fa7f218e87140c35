"""LaMamba block vs the official approach (``selective_scan_ref``'s loop over tokens, the official code's only CPU
scan): too slow for ``benchmarks/vision.py``'s rounds, so one timed baseline call per case (its 56x56
forward+backward is not run: over 40 minutes), nearfar the median of 3 after a warm-up, B=8, 2 threads, fp32.

    OMP_NUM_THREADS=2 python benchmarks/vision_lamamba.py      # markdown rows to stdout
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the official-approach baselines

from oracles.lamamba import lamamba_baseline  # noqa: E402

import nearfar  # noqa: E402

CASES = (((8, 14, 14, 384), 12), ((8, 56, 56, 96), 3))


def timed(fn, module: torch.nn.Module, x: torch.Tensor, mode: str) -> float:
    t = time.perf_counter()
    if mode == "fwd":
        with torch.no_grad():
            fn(module, x)
    else:
        module.zero_grad(set_to_none=True)
        x.grad = None
        fn(module, x).sum().backward()
    return time.perf_counter() - t


def main() -> None:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    make = {m.name: m for m in nearfar.mechanisms()}["lamamba"].make
    for shape, heads in CASES:
        torch.manual_seed(0)
        module = make(shape[-1], heads).eval()
        x = torch.randn(*shape, requires_grad=True)
        for mode in ("fwd", "fwd+bwd"):
            ours = statistics.median([timed(lambda m, t: m(t), module, x, mode) for _ in range(4)][1:])
            row = f"| lamamba | {mode} | {'x'.join(map(str, shape[1:]))} | {1e3 * ours:.0f} |"
            if mode == "fwd+bwd" and shape[1] == 56:
                print(row + " not run (over 40 min) | | |", flush=True)
                continue
            err = ""
            if mode == "fwd":
                with torch.no_grad():
                    err = f"{(module(x) - lamamba_baseline(module, x)).abs().max().item():.1e}"
            base = timed(lamamba_baseline, module, x, mode)
            print(row + f" {1e3 * base:.0f} | **{base / ours:.1f}x** | {err} |", flush=True)


if __name__ == "__main__":
    main()
