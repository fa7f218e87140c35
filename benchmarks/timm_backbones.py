"""nearfar's timm backbones against timm's own models: forward+backward on CPU, same weights.

    python benchmarks/timm_backbones.py                          # every model in MODELS, markdown to stdout
    python benchmarks/timm_backbones.py --models nearfar_gcvit_xxtiny --rounds 7

Needs timm (``pip install 'nearfar[timm]'``). For each entry of ``MODELS`` both models are built with
``timm.create_model`` (random init), timm's state dict is loaded strictly into the nearfar model, and a correctness
gate checks the logits (eval mode, max abs difference) before timing. Timed: one training step's
forward+backward (``model(x).sum().backward()``, gradients set to None before each call) at 224x224, batch 8,
float32, on CPU, both models in train mode with dropout/drop-path off. The two are timed in interleaved rounds
with a rotating order after warm-up (``nearfar.bench.interleave``); "speed-up" is the median over rounds of
timm time / nearfar time (>= 1: nearfar no slower).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nearfar.bench.timing import interleave, load, median_ratio  # noqa: E402

#: one entry per model: the nearfar name and the timm model it mirrors (one line each)
MODELS = [
    {"name": "nearfar_gcvit_xxtiny", "timm": "gcvit_xxtiny"},
    {"name": "nearfar_shvit_s1", "timm": "shvit_s1"},
]


def _step(model: torch.nn.Module, x: torch.Tensor):
    def call():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
    return call


def bench_one(entry: dict, batch: int, size: int, rounds: int, warmup: int) -> dict:
    import timm

    import nearfar.integrations.timm  # noqa: F401  (registers the nearfar_* names)

    torch.manual_seed(0)
    ref = timm.create_model(entry["timm"], **entry.get("kwargs", {}))
    ours = timm.create_model(entry["name"], **entry.get("kwargs", {}))
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    ref.eval(), ours.eval()
    with torch.no_grad():
        err = float((ref(x) - ours(x)).abs().max())
    ref.train(), ours.train()
    res = {"model": entry["name"], "timm": entry["timm"], "max_abs_logit_err": err, "load_before": load()}
    times = interleave({"nearfar": _step(ours, x), "timm": _step(ref, x)}, rounds=rounds, warmup=warmup)
    res["ms"] = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    res["speedup"] = median_ratio(times, "timm", "nearfar")
    res["load_after"] = load()
    return res


def markdown(results: list[dict], batch: int, size: int) -> str:
    lines = [f"forward+backward, float32, CPU, batch {batch}, {size}x{size}, {torch.get_num_threads()} threads", "",
             "| model | timm model | logits max abs err | nearfar ms | timm ms | speed-up (timm / nearfar) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['timm']} | {r['max_abs_logit_err']:.1e} | {r['ms']['nearfar']:.0f} | "
                     f"{r['ms']['timm']:.0f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", help="nearfar names (default: all of MODELS)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")  # timm imports torchvision, whose ops may not load on this torch
    chosen = [m for m in MODELS if not args.models or m["name"] in args.models]
    if args.models and len(chosen) != len(args.models):
        known = [m["name"] for m in MODELS]
        raise SystemExit(f"unknown model in {args.models}; known: {known}")
    results = []
    for entry in chosen:
        results.append(bench_one(entry, args.batch, args.size, args.rounds, args.warmup))
        print(f"{entry['name']}: {results[-1]['speedup']:.2f}x ({results[-1]['load_after']})", file=sys.stderr)
    print(markdown(results, args.batch, args.size))


if __name__ == "__main__":
    main()
