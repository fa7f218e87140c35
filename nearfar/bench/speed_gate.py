"""The correctness gate of ``nearfar bench``'s speed suite: nothing is timed before it passes.

Protocol (ours, after the causality test of CAB, Zhang et al., "CAB: Comprehensive Attention Benchmarking on Long
Sequence Modeling", ICML 2023, Shark-NLP/CAB ``test_available_pattern_for_attention.py``):

(a) the module's outputs and input gradients on the engines the timed runs use (``"auto"``, and ``"blocksparse"``,
    which ``"auto"`` picks on CPU once a problem is past the small-problem threshold) equal those of the same module
    inside ``nearfar.engine_override("dense")``, the materialised-mask reference;
(b) causal patterns (CS, CC): prefix invariance, the output at ``i`` from the whole sequence equals the output from
    the prefix ``[:i+1]`` (2D: raster order, by perturbing the later tokens);
(c) where the layer has ``new_cache``: a prefill then one token at a time equals the parallel forward.

A module that never passes a pattern to ``attend`` (pooled, agent or summary tokens; linear attention) cannot be
checked against the dense engine beyond its kernel: the gate says so instead of pretending; the float64 reference of
such a mechanism lives in its unit tests.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, cast

import torch

from ..functional import engine_override, observe_calls
from ..patterns import Dense

#: relative tolerance of every gate check (max abs error over max(1, max |reference|)), fp32
TOL = 1e-4
#: the gate's 1D input: three 128-token tiles of the block-sparse engine, so windows skip tiles
GATE_1D = 384
#: the gate's 2D map (every registered 2D mechanism accepts it with its defaults)
GATE_2D = (28, 28)
#: 1D settings for the gate: structure (windows, groups, segments) well inside ``GATE_1D`` so that it is exercised;
#: the timed configuration (the ``make`` defaults) is engine-checked too, on the smallest timed length
GATE_SETTINGS = {
    "streaming_llm": dict(window=100, sinks=4), "longformer": dict(window=100),
    "bigbird": dict(block=32, global_blocks=1, random_blocks=2),
    "s2_attention": dict(block=16, local_blocks=4, vert_stride=4),
    "moa": dict(total_len=GATE_1D, sink_size=8, minimum_cache_size=32, split_size=32),
    "cca": dict(group_size=16, window_size=96), "titans_mac": dict(segment_len=64, num_persistent=4),
    "lightning": dict(block_size=32), "linear_attention": dict(block_size=32),
    "routing_transformer": dict(local_window=64, num_clusters=6, block_size=16),
    "moba": dict(chunk_size=32, topk=3), "nsa": dict(block_size=32, block_counts=5, window_size=64),
    "seer_attention": dict(block_size=32, gate_dim=32), "landmark": dict(block_size=31, top_k=2),
    "longheads": dict(chunk_size=32, num_chunks=5, begin_selective_length=64),
    # a search per query and at every decoded token: HiP's decoding equals its forward exactly only so (its default
    # forward searches per block of 32 queries, its decoding per token, refreshed every 8 tokens)
    "hip": dict(mask_k=64, q_block=1, kv_block=2, window=32, sinks=4, refresh_interval=1),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference over ``max(1, max |b|)`` (the unit tests' ``assert_close`` measure)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def recording_attend() -> contextlib.AbstractContextManager[list[tuple]]:
    """Every ``nearfar.attend`` call inside the block, as ``(pattern, q.shape, k.shape, v.shape)``."""
    return observe_calls()


def run_layer(layer: torch.nn.Module, x: torch.Tensor, context: torch.Tensor | None = None, seed: int = 0,
              **kw: object) -> torch.Tensor:
    """``layer(x)`` (``layer(x, context=...)`` for cross layers); the first output of layers returning tuples. The
    seed makes per-call draws (HiDiffusion's random shift) equal across the compared runs."""
    torch.manual_seed(seed)
    out = layer(x, context=context, **kw) if context is not None else layer(x, **kw)
    return out[0] if isinstance(out, tuple) else out


def engine_check(layer: torch.nn.Module, x: torch.Tensor, context: torch.Tensor | None = None, grads: bool = True,
                 seed: int = 0) -> tuple[float, list[tuple]]:
    """Worst relative error of outputs (and, with ``grads``, gradients of a random projection with respect to the
    inputs) under ``"auto"`` and ``"blocksparse"`` against ``engine_override("dense")``; and the attend calls."""

    def outputs(engine: str | None) -> tuple[list[torch.Tensor], list[tuple]]:
        leaves = [t.detach().clone().requires_grad_(grads) for t in (x, context) if t is not None]
        with contextlib.ExitStack() as stack, torch.set_grad_enabled(grads):
            if engine is not None:
                stack.enter_context(engine_override(engine))
            calls = stack.enter_context(recording_attend())
            out = run_layer(layer, leaves[0], leaves[1] if context is not None else None, seed)
            res = [out.detach()]
            if grads:
                g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
                res += [t for t in torch.autograd.grad(out, leaves, g, allow_unused=True) if t is not None]
        return res, calls

    ref, calls = outputs("dense")
    err = 0.0
    for engine in (None, "blocksparse"):
        got, _ = outputs(engine)
        if len(got) != len(ref):
            return float("inf"), calls
        err = max(err, *(rel_err(a, b) for a, b in zip(got, ref)))
    return err, calls


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1, -2)  # (B, *spatial, C) -> (B, tokens, C), raster order


def prefix_check(layer: torch.nn.Module, x: torch.Tensor, context: torch.Tensor | None = None,
                 seed: int = 0) -> tuple[float, str]:
    """Worst relative error of CAB's prefix invariance at a few positions ``i``: 1D, the output at ``i`` from
    ``x[:, :i+1]`` against the full sequence's; a prefix length the layer rejects, and every 2D map, are checked
    by perturbing the tokens after ``i`` (raster order) instead. Returns the error and what was done."""
    n = _flat(x).shape[1]
    positions = sorted({0, n // 4 + 1, n // 2 + 3, n - 2})
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        full = _flat(run_layer(layer, x, context, seed))
        err, how = 0.0, Counter[str]()
        for i in positions:
            if x.dim() == 3:
                try:
                    out = run_layer(layer, x[:, :i + 1], context, seed)
                    err = max(err, rel_err(out[:, i], full[:, i]))
                    how["prefix"] += 1
                    continue
                except ValueError:
                    pass  # a length this layer does not take: perturb instead
            moved = x.clone()
            _flat(moved)[:, i + 1:] += torch.randn(_flat(moved)[:, i + 1:].shape, generator=g)
            out = _flat(run_layer(layer, moved, context, seed))
            err = max(err, rel_err(out[:, :i + 1], full[:, :i + 1]))
            how["perturbed"] += 1
    return err, ", ".join(f"{k} x{v}" for k, v in how.items()) + f" at i in {positions}"


def decode_check(layer: torch.nn.Module, x: torch.Tensor, context: torch.Tensor | None = None, steps: int = 4,
                 seed: int = 0) -> float:
    """Relative error of a prefill of all but ``steps`` tokens then one token at a time against the forward."""
    n = x.shape[1]
    with torch.no_grad():
        full = run_layer(layer, x, context, seed)
        cache = cast(Any, layer).new_cache(x.shape[0])  # a decoding layer; torch's stubs see a plain Module
        outs = [run_layer(layer, x[:, :n - steps], context, seed, cache=cache)]
        outs += [run_layer(layer, x[:, t:t + 1], context, seed, cache=cache) for t in range(n - steps, n)]
    return rel_err(torch.cat(outs, 1), full)


def describe_calls(calls: list[tuple]) -> tuple[bool, str]:
    """Whether any attend call had a pattern, and a short account of the calls."""
    if not calls:
        return False, "never calls nearfar.attend (its own kernel)"
    kinds = Counter("no pattern" if p is None or isinstance(p, Dense) else type(p).__name__ for p, *_ in calls)
    said = ", ".join(f"{k} x{v}" for k, v in kinds.items())
    return any(k != "no pattern" for k in kinds), f"attend calls: {said}"


def gate_layer(layer: torch.nn.Module, pattern: str, x: torch.Tensor, context: torch.Tensor | None = None,
               tol: float = TOL, seed: int = 0) -> dict:
    """Checks (a), (b) for CS/CC and (c) where the layer decodes, on one built layer and input (fp32, small).
    Returns ``{"passed", "max_err", "prefix_invariant", "decode_ok", "detail"}``."""
    causal = pattern in ("CS", "CC")
    layer.eval()
    try:
        err, calls = engine_check(layer, x, context, grads=True, seed=seed)
        patterned, detail = describe_calls(calls)
        parts = [f"(a) outputs+input grads, auto and blocksparse vs dense engine: max rel err {err:.1e}; {detail}"]
        if not calls:
            parts.append("so (a) cannot check it against the dense engine (its float64 reference is in the unit "
                         "tests)")
        elif not patterned:
            parts.append("no pattern reaches attend, so (a) checks the attend kernels only, not the mechanism's own "
                         "token selection (its float64 reference is in the unit tests)")
        prefix_ok = decode_ok = None
        if causal:
            perr, how = prefix_check(layer, x, context, seed)
            prefix_ok = perr <= tol
            parts.append(f"(b) prefix invariance: max rel err {perr:.1e} ({how})")
        if causal and hasattr(layer, "new_cache") and x.dim() == 3:
            derr = decode_check(layer, x, context, seed=seed)
            decode_ok = derr <= tol
            parts.append(f"(c) prefill + 4 single-token decodes vs forward: max rel err {derr:.1e}")
        passed = err <= tol and prefix_ok is not False and decode_ok is not False
        return {"passed": passed, "max_err": err, "prefix_invariant": prefix_ok, "decode_ok": decode_ok,
                "detail": "; ".join(parts)}
    except Exception as exc:  # noqa: BLE001 - a module that cannot run the gate fails it, with the reason
        return {"passed": False, "max_err": float("inf"), "prefix_invariant": None, "decode_ok": None,
                "detail": f"gate raised {type(exc).__name__}: {exc}"[:300]}
