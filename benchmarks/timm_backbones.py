"""nearfar's timm backbones against timm's own models: forward+backward (and forward) time on the CPU.

    python benchmarks/timm_backbones.py                                  # every model below, 224x224, batch 8
    python benchmarks/timm_backbones.py --models nearfar_swin_tiny_patch4_window7_224 --rounds 9
    python benchmarks/timm_backbones.py --modes fwd fwd+bwd --threads 2

Each row builds the nearfar model and its timm counterpart by name through ``timm.create_model`` (random init,
``drop_path_rate=0``), loads timm's state dict into the nearfar model (strict), checks that the logits agree, and
times both in interleaved rounds with a rotating order (as ``nearfar.bench.timing.interleave``), after warm-up calls.
``fwd+bwd``: train mode, the logits backpropagated with a fixed random cotangent to the input and the parameters
(gradients set to None before each call); ``fwd``: eval mode under ``no_grad``. "speed-up" is the median over rounds
of timm's time / nearfar's time (>= 1: nearfar no slower), from wall-clock time and from the process's CPU time (on a
machine shared with other work the CPU time is the steadier of the two: time spent descheduled is not counted; with
several threads it includes the threads' waits at the end of each parallel region). float32, CPU. Needs timm
(``pip install 'nearfar[timm]'``).

To add a model, add one line to ``MODELS``: the nearfar name, the timm name, and extra ``create_model`` arguments
used for both (e.g. a smaller ``img_size`` for a quick check).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nearfar.bench.timing import load  # noqa: E402

MODELS = [
    {"nearfar": "nearfar_swin_tiny_patch4_window7_224", "timm": "swin_tiny_patch4_window7_224", "kwargs": {}},
    {"nearfar": "nearfar_maxvit_tiny_tf_224", "timm": "maxvit_tiny_tf_224", "kwargs": {}},
]

MODES = ("fwd", "fwd+bwd")


def _pair(entry: dict, size: int, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module, float]:
    import timm

    import nearfar.integrations.timm  # noqa: F401  (registers the nearfar names with timm)

    kw = {"drop_path_rate": 0.0, **entry.get("kwargs", {})}
    if size != 224:
        kw.setdefault("img_size", size)
    torch.manual_seed(seed)
    ref = timm.create_model(entry["timm"], **kw)
    ours = timm.create_model(entry["nearfar"], **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        err = (ref.eval()(x) - ours.eval()(x)).abs().max().item()
    return ref, ours, err


def _call(model: torch.nn.Module, x: torch.Tensor, mode: str, cot: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> None:
        if mode == "fwd":
            with torch.no_grad():
                model(x)
            return
        for p in params:
            p.grad = None
        x.grad = None
        model(x).backward(cot)

    return run


def timed(methods: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Wall-clock and CPU seconds per call of each method: ``rounds`` interleaved rounds (rotating order) after
    ``warmup`` calls each."""
    for fn in methods.values():
        for _ in range(warmup):
            fn()
    names = list(methods)
    out: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            w0, c0 = time.perf_counter(), time.process_time()
            methods[n]()
            out["cpu"][n].append(time.process_time() - c0)
            out["wall"][n].append(time.perf_counter() - w0)
    return out


def ratio(times: dict[str, list[float]]) -> float:
    """Median over rounds of timm's time / nearfar's time (round-paired)."""
    return statistics.median(a / b for a, b in zip(times["timm"], times["nearfar"]))


def bench(entry: dict, modes: tuple[str, ...], batch: int, size: int, rounds: int, warmup: int) -> list[dict]:
    ref, ours, err = _pair(entry, size)
    rows = []
    for mode in modes:
        for m in (ref, ours):
            m.train(mode == "fwd+bwd")
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
        x.requires_grad_(mode == "fwd+bwd")
        with torch.no_grad():
            n_out = ours(x).shape[-1]
        cot = torch.randn(batch, n_out, generator=torch.Generator().manual_seed(2))
        times = timed({"timm": _call(ref, x, mode, cot), "nearfar": _call(ours, x, mode, cot)}, rounds, warmup)
        wall = times["wall"]
        rows.append(dict(model=entry["nearfar"], timm=entry["timm"], mode=mode, err=err,
                         timm_ms=1e3 * statistics.median(wall["timm"]),
                         nearfar_ms=1e3 * statistics.median(wall["nearfar"]),
                         speedup=ratio(wall), speedup_cpu=ratio(times["cpu"])))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", help="nearfar names (default: all of MODELS)")
    ap.add_argument("--modes", nargs="*", default=["fwd+bwd"], choices=MODES)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")  # timm imports torchvision, whose ops may not load beside a CPU torch
    if args.threads:
        torch.set_num_threads(args.threads)
    known = {e["nearfar"]: e for e in MODELS}
    names = args.models or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        ap.error(f"unknown models {unknown}; known: {sorted(known)}")
    print(f"<!-- batch {args.batch}, {args.size}x{args.size}, float32, CPU, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds, torch {torch.__version__}, {load()} -->")
    print("| model | timm model | mode | max abs logit diff | timm ms | nearfar ms | speed-up (wall) "
          "| speed-up (CPU time) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        for r in bench(known[name], tuple(args.modes), args.batch, args.size, args.rounds, args.warmup):
            print(f"| {r['model']} | {r['timm']} | {r['mode']} | {r['err']:.1e} | {r['timm_ms']:.0f} | "
                  f"{r['nearfar_ms']:.0f} | {r['speedup']:.2f}x | {r['speedup_cpu']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
