"""Peak memory of the window / block-sparse layers at the full sweep's largest sizes, against dense attention.

    python benchmarks/memory.py                         # every 1D and 2D layer below, fwd and fwd+bwd
    python benchmarks/memory.py --mechanisms longformer neighborhood

Each registered mechanism is built as ``nearfar bench speed --full`` builds it (1D: 8,192 tokens, dim 128 in 2 heads;
2D: 84x84, 96 channels in 3 heads; batch 1) for each CAB pattern it claims, beside the registered ``dense`` layer
for the same pattern, and ``nearfar.bench.speed_metrics.peak_bytes`` measures the largest total of tensors each
call holds at once (after a warm-up call, so cached plans are not counted; parameters and inputs excluded), forward
under ``no_grad`` and forward+backward. ``--no-native`` runs the block-sparse engine's PyTorch path instead of the
compiled kernel, for comparison. ``--dtype bfloat16`` (or ``float16``) casts both layers and the input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nearfar as nf  # noqa: E402
from nearfar import native  # noqa: E402
from nearfar.bench.speed_metrics import peak_bytes  # noqa: E402

#: the 1D window / block-sparse layers and the 2D neighbourhood (the issue's list); others may be named
DEFAULT = ["bigbird", "longformer", "streaming_llm", "moa", "cca", "s2_attention", "neighborhood"]
SIZE_1D, WIDTH_1D = 8192, (128, 2)
SIZE_2D, WIDTH_2D = (84, 84), (96, 3)


def _call(layer: torch.nn.Module, x: torch.Tensor, ctx: torch.Tensor | None, phase: str):
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    leaf = x.clone().requires_grad_(phase != "fwd")
    g = torch.Generator().manual_seed(0)

    def run():
        if phase == "fwd":
            with torch.no_grad():
                out = layer(leaf) if ctx is None else layer(leaf, context=ctx)
            return out
        out = layer(leaf) if ctx is None else layer(leaf, context=ctx)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.randn(out.shape, generator=g).to(out.dtype))
        leaf.grad = None
        for p in layer.parameters():
            p.grad = None

    run()  # warm-up: plans and masks are cached here, not counted below
    return peak_bytes(run, params) / 2**20


def measure(name: str, dims: str, dtype: torch.dtype = torch.float32) -> list[tuple]:
    mech = next(m for m in nf.mechanisms() if m.name == name)
    dense = next(m for m in nf.mechanisms() if m.name == "dense")
    rows = []
    for pattern in mech.patterns:
        if pattern in ("NC", "CC"):
            continue
        dim, heads = WIDTH_1D if dims == "1d" else WIDTH_2D
        extra = {"ndim": 1} if (name, dims) == ("neighborhood", "1d") else {}
        torch.manual_seed(0)
        ours = mech.build(dim, heads, pattern, **extra).to(dtype)
        ref = dense.build(dim, heads, pattern if pattern in dense.patterns else "NS").to(dtype)
        shape = (SIZE_1D,) if dims == "1d" else SIZE_2D
        x = torch.randn(1, *shape, dim, generator=torch.Generator().manual_seed(1)).to(dtype)
        for phase in ("fwd", "fwd+bwd"):
            a = _call(ours, x, None, phase)
            b = _call(ref, x.reshape(1, -1, dim), None, phase)
            rows.append((name, pattern, "x".join(map(str, shape)), phase, a, b, a / b))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mechanisms", nargs="*", default=DEFAULT)
    parser.add_argument("--no-native", action="store_true", help="the block-sparse engine's PyTorch path")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {args.dtype}, native kernel in use: {native.available() and not args.no_native}"
          "\n")
    print("| mechanism | pattern | size | phase | ours MiB | dense MiB | ours / dense |")
    print("|---|---|---|---|---|---|---|")
    for name in args.mechanisms:
        mech = next(m for m in nf.mechanisms() if m.name == name)
        for dims in [d for d in ("1d", "2d") if d in mech.dims]:
            if args.no_native:
                with native.disabled():
                    rows = measure(name, dims, dtype)
            else:
                rows = measure(name, dims, dtype)
            for r in rows:
                print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
