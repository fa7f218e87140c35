"""Vision mechanisms on the issue's two feature maps: each registered 2D module's forward against the
straightforward implementation of its official approach (``tests/oracles``), and NA/DiNA against the
installed peers (NATTEN's module, compiled FlexAttention).

    python benchmarks/vision.py                        # every 2D mechanism, markdown to stdout
    python benchmarks/vision.py --mechanisms swin hilo --rounds 9

    python benchmarks/vision.py --modes fwd+bwd --mechanisms biformer   # forward+backward, with peak memory

fp32 (``--dtype bfloat16``/``float16``: the module and its input cast), B=8: (56, 56, 96) with ``make(96, 3)`` and
(14, 14, 384) with ``make(384, 12)``; ``fwd`` runs under no_grad, ``fwd+bwd`` backpropagates a fixed random cotangent
to the input and the parameters (gradients set to None before each call, so both sides allocate them). Methods are
timed in interleaved rounds with a rotating order (``nearfar.bench.interleave``); "speed-up" is the median over rounds
of baseline time / nearfar time (>= 1: nearfar no slower). Peak memory (``--memory``, default on for fwd+bwd) is the
largest total of tensors alive at once during one call, parameters and input excluded
(``nearfar.bench.speed_metrics.peak_bytes``). Every pair passes a correctness gate first (max abs difference of the
outputs; with fwd+bwd also of the input gradients)."""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import pkgutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the official-approach oracles

import nearfar  # noqa: E402
from nearfar.bench.speed_metrics import peak_bytes  # noqa: E402
from nearfar.bench.timing import interleave, load, median_ratio  # noqa: E402

MODES = ("fwd", "fwd+bwd")

SHAPES = [((8, 56, 56, 96), 3), ((8, 14, 14, 384), 12)]
#: extra settings timed beside a mechanism's defaults: DiNAT's dilation at each stage (224 input, k = 7)
#: and both without the relative-position bias, which NATTEN >= 0.20 (the installed peer) no longer has
VARIANTS = {"neighborhood": {
    "DiNA": {56: dict(dilation=8), 14: dict(dilation=2)},
    "NA, no rpb": {56: dict(rel_pos_bias=False), 14: dict(rel_pos_bias=False)},
    "DiNA, no rpb": {56: dict(dilation=8, rel_pos_bias=False), 14: dict(dilation=2, rel_pos_bias=False)},
}}


def baselines() -> dict:
    import oracles as pkg

    out = {}
    for info in pkgutil.iter_modules(pkg.__path__):  # sequence oracles (kdgqa, longheads) have no vision baseline
        out.update(getattr(importlib.import_module(f"oracles.{info.name}"), "BASELINES", {}))
    return out


def _peers(module, x) -> dict:
    """NA/DiNA peers with the module's weights: NATTEN's NeighborhoodAttention2D, and compiled Flex."""
    peers = {}
    if module.rpb is not None:
        return peers
    try:
        import natten

        nat = natten.NeighborhoodAttention2D(module.dim, module.num_heads, module.kernel_size,
                                             dilation=module.dilation).eval()
        nat.load_state_dict(module.state_dict())
        peers["NATTEN module"] = lambda: nat(x)
    except Exception as err:  # noqa: BLE001 - a peer that does not install or run is reported, not fatal
        peers["NATTEN module"] = repr(err)[:120]
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        from nearfar.functional import merge_heads, split_qkv

        spatial = tuple(x.shape[1:-1])
        pattern = module.pattern(spatial)
        n = x[0, ..., 0].numel()
        block_mask = create_block_mask(lambda b, h, qi, ki: pattern.allowed(qi, ki, n, n), None, None, n, n,
                                       device="cpu")
        flex = torch.compile(flex_attention, dynamic=False)

        def run():
            q, k, v = split_qkv(module.qkv(x), module.num_heads)
            return module.proj(merge_heads(flex(q, k, v, block_mask=block_mask, scale=module.scale), spatial))

        run()
        peers["compiled Flex"] = run
    except Exception as err:  # noqa: BLE001
        peers["compiled Flex"] = repr(err)[:120]
    return peers


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _caller(fn, module, x: torch.Tensor, mode: str):
    """One timed call of ``fn(module, x)``: under no_grad (fwd), or forward + backward of a fixed cotangent."""
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return _first(fn(module, x))
        return call
    cot = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x.dtype)

    def call():
        module.zero_grad(set_to_none=True)
        x.grad = None
        out = _first(fn(module, x))
        out.backward(cot.reshape(out.shape) if out.numel() == cot.numel() else torch.ones_like(out))
        return out
    return call


def bench_one(name: str, make, baseline, shape, heads: int, rounds: int, kw: dict, peers: bool,
              mode: str = "fwd", memory: bool = False, dtype: torch.dtype = torch.float32) -> dict:
    torch.manual_seed(0)
    module = make(shape[-1], heads, **kw).eval().to(dtype)
    x = torch.randn(*shape).to(dtype).requires_grad_(mode != "fwd")
    res = dict(mechanism=name, mode=mode, shape=list(shape), kwargs=kw, dtype=str(dtype), load_before=load())
    methods = {"nearfar": _caller(lambda m, t: m(t), module, x, mode)}
    if baseline is not None:
        methods["baseline"] = _caller(baseline, module, x, mode)
        torch.manual_seed(1)  # mechanisms that draw per call (HiDiffusion's shift) draw the same in both
        out = methods["nearfar"]().detach()
        grad = None if x.grad is None else x.grad.clone()
        torch.manual_seed(1)
        ref = methods["baseline"]().detach()
        res["max_abs_err_vs_baseline"] = float((out.float() - ref.float()).abs().max())
        if grad is not None:
            res["max_abs_grad_err_vs_baseline"] = float((grad.float() - x.grad.float()).abs().max())
    if peers and mode == "fwd":
        with torch.no_grad():
            for label, fn in _peers(module, x).items():
                if isinstance(fn, str):
                    res[f"{label} error"] = fn
                else:
                    methods[label] = fn
    if memory:
        keep = {p.untyped_storage().data_ptr() for p in module.parameters()} | {x.untyped_storage().data_ptr()}
        res["peak_mib"] = {k: peak_bytes(fn, keep) / 2**20 for k, fn in methods.items()}
    times = interleave(methods, rounds=rounds, warmup=1)
    res["ms"] = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    res["speedup"] = {k: median_ratio(times, k, "nearfar") for k in times if k != "nearfar"}
    res["load_after"] = load()
    return res


def run(selected: list[str] | None, rounds: int, peers: bool, modes: tuple[str, ...] = ("fwd",),
        memory: bool | None = None, dtype: torch.dtype = torch.float32) -> list[dict]:
    base = baselines()
    results = []
    for mech in nearfar.mechanisms():
        if "2d" not in mech.dims or (selected and mech.name not in selected):
            continue
        for shape, heads in SHAPES:
            settings = {"": {}}
            for label, per_size in VARIANTS.get(mech.name, {}).items():
                settings[label] = per_size[shape[1]]
            for (label, kw), mode in itertools.product(settings.items(), modes):
                name = mech.name + (f" ({label})" if label else "")
                t0 = time.perf_counter()
                try:
                    res = bench_one(name, mech.make, base.get(mech.name), shape, heads, rounds, kw,
                                    peers and mech.name == "neighborhood", mode,
                                    mode != "fwd" if memory is None else memory, dtype)
                except Exception as err:  # noqa: BLE001 - one failing mechanism must not hide the others
                    res = dict(mechanism=name, mode=mode, shape=list(shape), error=repr(err)[:300])
                res["seconds"] = round(time.perf_counter() - t0, 1)
                print(json.dumps(res), file=sys.stderr, flush=True)
                results.append(res)
    return results


def markdown(results: list[dict]) -> str:
    lines = ["| mechanism | mode | input | nearfar ms | baseline ms | speed-up vs baseline"
             " | peak MiB (nearfar / baseline) | peers (speed-up) | max err |",
             "|---|---|---|---:|---:|---:|---|---|---:|"]
    for r in results:
        shape = "x".join(map(str, r["shape"][1:]))
        head = f"| {r['mechanism']} | {r.get('mode', 'fwd')} | {shape} |"
        if "error" in r:
            lines.append(f"{head} error: {r['error'][:80]} | | | | | |")
            continue
        ms, sp, mem = r["ms"], r["speedup"], r.get("peak_mib", {})
        peers = ", ".join(f"{k} {ms[k]:.1f} ms ({sp[k]:.2f}x)" for k in ms if k not in ("nearfar", "baseline"))
        base = f"{ms['baseline']:.1f}" if "baseline" in ms else "n/a"
        bsp = f"**{sp['baseline']:.2f}x**" if "baseline" in sp else "n/a"
        peak = (f"{mem['nearfar']:.0f} / {mem['baseline']:.0f} ({mem['nearfar'] / mem['baseline']:.2f}x)"
                if mem.get("baseline") else (f"{mem['nearfar']:.0f}" if mem else ""))
        err = f"{r['max_abs_err_vs_baseline']:.1e}" if "max_abs_err_vs_baseline" in r else ""
        if "max_abs_grad_err_vs_baseline" in r:
            err += f" (grad {r['max_abs_grad_err_vs_baseline']:.1e})"
        lines.append(f"{head} {ms['nearfar']:.1f} | {base} | {bsp} | {peak} | {peers} | {err} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mechanisms", nargs="*", help="registry names (default: every 2D mechanism)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=["fwd"], help="fwd and/or fwd+bwd (default fwd)")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                    help="measure peak memory (default: with fwd+bwd only)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    results = run(args.mechanisms, args.rounds, not args.skip_peers, tuple(args.modes), args.memory,
                  getattr(torch, args.dtype))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, {load()}\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
