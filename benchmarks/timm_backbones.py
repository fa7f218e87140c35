"""Whole vision backbones: nearfar's ``timm.create_model`` backbones against the model they mirror, forward+backward.

    python benchmarks/timm_backbones.py                      # every entry of MODELS, markdown to stdout
    python benchmarks/timm_backbones.py --models nearfar_nat_mini --rounds 7

Each entry of ``MODELS`` names a registered nearfar backbone and its reference: ``"timm:<name>"`` (timm's model,
needs timm) or ``"oracle:<module>:<variant>"`` (``tests/oracles/<module>.py``'s ``build(variant)``: an
official-style plain-PyTorch model, for backbones timm does not have). The reference is built with random weights
and its state dict is loaded into the nearfar model with ``strict=True``, so both compute the same function; a
correctness gate compares the logits and the input gradient before timing.

Timed: float32 CPU, training mode (batch-norm statistics from the batch, as in a training step; dropout and
drop-path are 0 in these configs), batch 8 at 224x224 by default; one call = forward, then backward of a fixed
random cotangent of the logits to the input and every parameter (gradients set to None before each call). The gate
runs in eval mode.
Methods run in interleaved rounds with a rotating order (``nearfar.bench.timing.interleave``) after warm-up;
"speed-up" is the median over rounds of reference time / nearfar time (>= 1: nearfar no slower), with the quartiles
and the range of the per-round ratios beside it (the spread of this machine's noise). The machine is shared: read
the ratio, not the absolute times.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the official-style oracles

from nearfar.bench.timing import interleave, load, median_ratio  # noqa: E402
from nearfar.models.vision import create_backbone  # noqa: E402

#: one line per backbone: the nearfar name and its reference
MODELS = [
    {"name": "nearfar_nat_mini", "reference": "oracle:nat_model:nat_mini"},
    {"name": "nearfar_nat_tiny", "reference": "oracle:nat_model:nat_tiny"},
    {"name": "nearfar_dinat_mini", "reference": "oracle:nat_model:dinat_mini"},
    {"name": "nearfar_dinat_tiny", "reference": "oracle:nat_model:dinat_tiny"},
    {"name": "nearfar_biformer_tiny", "reference": "oracle:biformer_model:biformer_tiny"},
    {"name": "nearfar_gcvit_xxtiny", "reference": "timm:gcvit_xxtiny"},
    {"name": "nearfar_shvit_s1", "reference": "timm:shvit_s1"},
    {"name": "nearfar_swin_tiny_patch4_window7_224", "reference": "timm:swin_tiny_patch4_window7_224"},
    {"name": "nearfar_maxvit_tiny_tf_224", "reference": "timm:maxvit_tiny_tf_224"},
]


def reference(spec: str) -> torch.nn.Module:
    kind, _, rest = spec.partition(":")
    if kind == "timm":
        warnings.filterwarnings("ignore")
        import timm

        return timm.create_model(rest)
    if kind == "oracle":
        module, _, variant = rest.partition(":")
        return importlib.import_module(f"oracles.{module}").build(variant)  # type: ignore[no-any-return]
    raise ValueError(f"a reference is 'timm:<name>' or 'oracle:<module>:<variant>', got {spec!r}")


def _step(model: torch.nn.Module, x: torch.Tensor, cot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    x.grad = None
    out = model(x)
    out.backward(cot)
    return out.detach(), x.grad


def bench(entry: dict, batch: int, size: int, rounds: int, warmup: int) -> dict:
    torch.manual_seed(0)
    ref = reference(entry["reference"]).eval()
    ours = create_backbone(entry["name"]).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(batch, 3, size, size, requires_grad=True)
    cot = torch.randn(batch, 1000)
    a, ga = _step(ref, x, cot)
    b, gb = _step(ours, x, cot)
    err = max(float((a - b).abs().max()), float((ga - gb).abs().max() / ga.abs().max()))
    ref.train(), ours.train()
    times = interleave({"reference": lambda: _step(ref, x, cot), "nearfar": lambda: _step(ours, x, cot)},
                       rounds=rounds, warmup=warmup)
    return {"name": entry["name"], "reference": entry["reference"], "err": err,
            "ours_ms": 1e3 * statistics.median(times["nearfar"]), "ref_ms": 1e3 * statistics.median(times["reference"]),
            "speedup": median_ratio(times, "reference", "nearfar"),
            "ratios": sorted(a / b for a, b in zip(times["reference"], times["nearfar"]))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", help="names from MODELS (default: all)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args(argv)
    entries = [e for e in MODELS if not args.models or e["name"] in args.models]
    if args.models and len(entries) != len(set(args.models)):
        p.error(f"unknown model; known: {[e['name'] for e in MODELS]}")
    print(f"fwd+bwd, fp32, B={args.batch}, {args.size}x{args.size}, {torch.get_num_threads()} threads, {load()}")
    print("\n| model | reference | nearfar ms | reference ms | speed-up | rounds: quartiles (min-max) "
          "| max err (logits / rel. input grad) |")
    print("|---|---|---:|---:|---:|---|---:|")
    for e in entries:
        r = bench(e, args.batch, args.size, args.rounds, args.warmup)
        q1, _, q3 = statistics.quantiles(r["ratios"], n=4) if len(r["ratios"]) > 1 else [r["speedup"]] * 3
        print(f"| {r['name']} | {r['reference']} | {r['ours_ms']:.0f} | {r['ref_ms']:.0f} | **{r['speedup']:.2f}x** "
              f"| {q1:.2f}-{q3:.2f} ({r['ratios'][0]:.2f}-{r['ratios'][-1]:.2f}) | {r['err']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
