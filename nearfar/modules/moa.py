"""MoA: Mixture of (sparse) Attention spans -- per-head, length-elastic sinks + sliding window (causal).

Paper: Fu et al., "Mixture of Attention Spans: Optimizing LLM Inference Efficiency with Heterogeneous
Sliding-Window Lengths" (CoLM 2025). Official code: thu-nics/MoA -- ``MoA/attention/cache_utils.py``
(``moa_config_to_cache_config``: the span rule; ``StaticCircularCache``: the decode cache),
``MoA/models/llama/modify_llama_profile.py`` (``LlamaModel_get_attention_matrix_log``: the influence), and
``MoA/universal/optimizer.py`` (the MILP search).

Head ``h`` with ``(alpha_h, beta_h)`` and total length ``N`` (prompt + new tokens) has the span
(``moa_config_to_cache_config``, checked in the code)::

    S = ceil(max(min(int(alpha + beta * N), N), minimum_cache_size) / split_size) * split_size   # 128, 64

and query ``i`` sees key ``j <= i`` iff ``j < min(S, sink_size)`` (sink_size 64: the cache's static part) or
``i - j < S - min(S, sink_size)`` (the circular part, which holds the current token once it is written: the
official cache writes before attending). A head whose span covers ``N`` is dense causal on sequences up to ``N``;
beyond ``N`` it stays a sinks + window head of its span, as the official circular cache does.

Profiling (``moa_profile``): per layer, the model runs with dense causal attention whose probabilities ``A`` are
built explicitly (an explicit softmax, for profiling only: it needs ``A`` and ``dL/dA``); with ``g = dL/dA`` the
first-order loss increase of masking ``A_ij`` and renormalising row ``i`` is
``E_ij = -A_ij (g_ij - sum_k A_ik g_ik) / (1 - A_ij + eps)``; row 0 (one key, ``A_00 = 1``) uses ``-A_0j g_0j``
as the official code does. A candidate's predicted loss is the sum of ``E`` (batch mean) over the causal
entries its mask removes; its density is its kept entries over the causal entries.

Differences from the official code:
- Heads are not permuted to group equal spans (an official kernel-layout optimisation; the function is the same),
  and the decode cache is one cache for all heads keeping the union (the largest sink and the largest window),
  not a ragged per-head cache; so it holds ``O(max span)`` keys, not ``sum of spans``.
- Profiling is at one length (the calibration tokens' length) with token-level entries (no 64-block pooling; the
  masks are summed exactly) on any token batch (not the official long-context QA calibration set whose loss is
  only on the dense model's own responses); the per-layer choice is exhaustive over small grids
  (``len(candidates) ** num_heads <= 65536``) and greedy above, instead of the multi-length Gurobi MILP with a
  Pareto front and validation at an unseen length.
- GQA: spans are per query head (the official code converts GQA models to MHA first, ``gqa_to_mha.py``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from ..patterns import Causal, PerHead, Sinks, SlidingWindow
from ..patterns.base import as_positive_int
from .common import merge_heads, split_heads
from .registry import POSITIONS_SHARED, Mechanism, register
from .sequence import kv_heads
from .sparse_attention import PatternAttention

_EXHAUSTIVE_LIMIT = 65536


def _check_spans_args(sink_size: int, minimum_cache_size: int, split_size: int) -> None:
    as_positive_int(sink_size, "sink_size")
    as_positive_int(minimum_cache_size, "minimum_cache_size")
    as_positive_int(split_size, "split_size")
    if minimum_cache_size <= sink_size:
        raise ValueError(f"minimum_cache_size ({minimum_cache_size}) must be > sink_size ({sink_size}): every head "
                         f"needs a non-empty recent window")


def moa_span(alpha: float, beta: float, total_len: int, *, sink_size: int = 64, minimum_cache_size: int = 128,
             split_size: int = 64) -> int:
    """The official span rule: ``int(alpha + beta * N)`` capped at ``N``, floored to ``minimum_cache_size``,
    rounded up to a multiple of ``split_size`` (so it may exceed ``N``: the head is then dense on ``N`` tokens)."""
    total_len = as_positive_int(total_len, "total_len")
    _check_spans_args(sink_size, minimum_cache_size, split_size)
    if not (math.isfinite(alpha) and math.isfinite(beta)) or beta < 0:
        raise ValueError(f"alpha must be finite and beta a finite number >= 0, got alpha={alpha}, beta={beta}")
    span = min(int(alpha + beta * total_len), total_len)
    return math.ceil(max(span, minimum_cache_size) / split_size) * split_size


def _head_pattern(span: int, sink_size: int):
    sinks = min(span, sink_size)
    return (Sinks(sinks) | SlidingWindow(left=span - sinks - 1)) & Causal()


def moa_pattern(alphas: Sequence[float], betas: Sequence[float], total_len: int, num_heads: int,
                num_kv_heads: int | None = None, *, sink_size: int = 64, minimum_cache_size: int = 128,
                split_size: int = 64) -> PerHead:
    """A ``PerHead`` (one entry per query head) of ``(Sinks(min(S, sink)) | SlidingWindow(S - sink - 1)) & Causal``.

    ``num_kv_heads`` is only checked (spans are per query head; a GQA group's heads may differ)."""
    num_heads = as_positive_int(num_heads, "num_heads")
    kv_heads(num_heads, num_kv_heads)
    if len(alphas) != num_heads or len(betas) != num_heads:
        raise ValueError(f"alphas and betas need num_heads={num_heads} entries, got {len(alphas)} and {len(betas)}")
    spans = [moa_span(a, b, total_len, sink_size=sink_size, minimum_cache_size=minimum_cache_size,
                      split_size=split_size) for a, b in zip(alphas, betas)]
    return PerHead([_head_pattern(s, sink_size) for s in spans])


class MoAAttention(PatternAttention):
    """``MoAAttention(dim, num_heads, alphas=None, betas=None, total_len=4096, num_kv_heads=None, sink_size=64,
    minimum_cache_size=128, split_size=64)``: causal, RoPE, GQA; x ``(B, N, dim)``.

    Default ``alphas = 0, betas = 0.5`` for every head: the uniform half-length span of the official
    ``examples/*/streamingllm_alpha_beta.json`` baseline; pass ``moa_profile``'s result for a searched plan. The
    decode cache keeps the largest sink and the largest recent window over the heads (``<= max span`` keys)."""

    def __init__(self, dim: int, num_heads: int, alphas: Sequence[float] | None = None,
                 betas: Sequence[float] | None = None, total_len: int = 4096, num_kv_heads: int | None = None,
                 sink_size: int = 64, minimum_cache_size: int = 128, split_size: int = 64):
        num_heads = as_positive_int(num_heads, "num_heads")
        alphas = [0.0] * num_heads if alphas is None else [float(a) for a in alphas]
        betas = [0.5] * num_heads if betas is None else [float(b) for b in betas]
        pattern = moa_pattern(alphas, betas, total_len, num_heads, num_kv_heads, sink_size=sink_size,
                              minimum_cache_size=minimum_cache_size, split_size=split_size)
        spans = [moa_span(a, b, total_len, sink_size=sink_size, minimum_cache_size=minimum_cache_size,
                          split_size=split_size) for a, b in zip(alphas, betas)]
        # one cache for all heads: the union of their keys is the largest sink plus the largest window
        sinks = max(min(s, sink_size) for s in spans)
        window = max(s - min(s, sink_size) for s in spans)
        super().__init__(dim, num_heads, pattern, num_kv_heads, causal=True,
                         keep=lambda p, nxt: (p < sinks) | (p > nxt - window))
        self.spans = spans
        self.alphas, self.betas, self.total_len, self.sink_size = alphas, betas, total_len, sink_size
        self.minimum_cache_size, self.split_size = minimum_cache_size, split_size


# ---------------------------------------------------------------------------------------------- profiling

def moa_influence(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``E_ij = -A_ij (g_ij - sum_k A_ik g_ik) / (1 - A_ij + eps)`` on ``(..., N, N)``; row 0 uses ``-A_0j g_0j``.

    The first-order loss increase of masking ``A_ij`` and renormalising its row (official
    ``LlamaModel_get_attention_matrix_log``)."""
    ag = a * g
    eff = -a * (g - ag.sum(-1, keepdim=True)) / (1 - a + torch.finfo(a.dtype).eps)
    eff[..., 0, :] = -ag[..., 0, :]
    return eff


def _dense_probs_forward(attn: PatternAttention, x: torch.Tensor, store: list) -> torch.Tensor:
    """The layer's forward with dense causal attention and an explicit softmax (profiling only: it keeps A)."""
    n = x.shape[1]
    pos = torch.arange(n, device=x.device)
    q = split_heads(attn.q_proj(x), attn.num_heads)
    k = split_heads(attn.k_proj(x), attn.num_kv_heads)
    v = split_heads(attn.v_proj(x), attn.num_kv_heads)
    if attn.rope is not None:
        q, k = attn.rope(q, pos), attn.rope(k, pos)
    group = attn.num_heads // attn.num_kv_heads
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    causal = pos[:, None] >= pos[None, :]
    a = (q @ k.transpose(-1, -2) * attn.head_dim ** -0.5).masked_fill(~causal, float("-inf")).softmax(-1)
    store.append(a)
    return attn.o_proj(merge_heads(a @ v, (n,)))


def moa_profile_influence(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per layer the batch-mean influence ``E (H, N-1, N-1)`` of every attention entry of the dense causal model on
    the next-token loss of ``tokens (B, N)``, and that loss."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] < 2 or tokens.is_floating_point():
        raise ValueError(f"tokens must be an integer (B, N >= 2) tensor, got {getattr(tokens, 'shape', tokens)}")
    attns = [b.attn for b in model.blocks]
    for i, attn in enumerate(attns):
        if not isinstance(attn, PatternAttention):
            raise TypeError(f"moa_profile needs softmax PatternAttention layers; layer {i} is {type(attn).__name__}")
    store: list[torch.Tensor] = []
    try:
        for attn in attns:
            attn.forward = lambda x, cache=None, key_padding_mask=None, _a=attn: _dense_probs_forward(_a, x, store)
        with torch.enable_grad():
            loss = model.loss(tokens)
            grads = torch.autograd.grad(loss, store)
    finally:
        for attn in attns:
            del attn.forward
    return [moa_influence(a.detach(), g).mean(0) for a, g in zip(store, grads)], loss.detach()


def _choose(loss: torch.Tensor, density: torch.Tensor, budget: float) -> list[int]:
    """Per head a candidate index minimising the summed loss with mean density <= budget (``loss (H, C)``)."""
    h, c = loss.shape
    tol = 1e-9
    if float(density.min()) > budget + tol:
        raise ValueError(f"density_budget={budget} is below the sparsest candidate's density "
                         f"{float(density.min()):.4f}")
    if c ** h <= _EXHAUSTIVE_LIMIT:
        idx = torch.tensor(list(itertools.product(range(c), repeat=h)))
        total = loss.gather(1, idx.T).sum(0)
        total = total.masked_fill(density[idx].mean(1) > budget + tol, float("inf"))
        return idx[int(total.argmin())].tolist()
    # greedy: start from the sparsest candidate everywhere, then take the best loss drop per density added
    pick = [int(density.argmin())] * h
    while True:
        used = float(density[pick].mean())
        best, move = 0.0, None
        for i in range(h):
            for j in range(c):
                gain = float(loss[i, pick[i]] - loss[i, j])
                extra = float(density[j] - density[pick[i]])
                if gain > 0 and used + extra / h <= budget + tol and gain / max(extra, 1e-12) > best:
                    best, move = gain / max(extra, 1e-12), (i, j)
        if move is None:
            return pick
        pick[move[0]] = move[1]


def moa_profile(model: torch.nn.Module, tokens: torch.Tensor, candidates: Sequence[tuple[float, float]],
                density_budget: float = 0.5, *, sink_size: int = 64, minimum_cache_size: int = 128,
                split_size: int = 64) -> list[tuple[list[float], list[float]]]:
    """Per layer ``(alphas, betas)`` (one per query head) from ``candidates``: the least predicted loss increase
    with the layer's mean density (kept / causal entries at the profiled length ``N - 1``) ``<= density_budget``."""
    if not candidates or any(len(c) != 2 for c in candidates):
        raise ValueError(f"candidates must be a non-empty list of (alpha, beta) pairs, got {candidates!r}")
    if not 0 < density_budget <= 1:
        raise ValueError(f"density_budget must be in (0, 1], got {density_budget}")
    effects, _ = moa_profile_influence(model, tokens)
    n = effects[0].shape[-1]
    spans = [moa_span(a, b, n, sink_size=sink_size, minimum_cache_size=minimum_cache_size, split_size=split_size)
             for a, b in candidates]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    masks = torch.stack([_head_pattern(s, sink_size).mask(n, n) for s in spans])  # (C, N, N)
    removed = (causal & ~masks).to(effects[0].dtype)
    density = masks.sum((1, 2)).double() / causal.sum()
    plans = []
    for eff in effects:
        loss = torch.einsum("hij,cij->hc", eff, removed.to(eff.device)).double().cpu()
        pick = _choose(loss, density, density_budget)
        plans.append(([float(candidates[j][0]) for j in pick], [float(candidates[j][1]) for j in pick]))
    return plans


def moa_layer_kwargs(plans: Sequence[tuple[Sequence[float], Sequence[float]]], total_len: int, **kw):
    """``layer_kwargs`` for ``TinyLM(mechanism="moa", layer_kwargs=...)``: layer ``i`` gets ``plans[i]``."""
    return lambda i: dict(alphas=list(plans[i][0]), betas=list(plans[i][1]), total_len=total_len, **kw)


def moa_apply(model: torch.nn.Module, plans: Sequence[tuple[Sequence[float], Sequence[float]]], total_len: int,
              **kw) -> torch.nn.Module:
    """Replace each block's attention of ``model`` (a TinyLM of softmax PatternAttention layers without biases) by an
    ``MoAAttention`` with the same weights and ``plans[i]``; in place, returns ``model``."""
    if len(plans) != len(model.blocks):
        raise ValueError(f"plans has {len(plans)} layers, the model {len(model.blocks)}")
    for block, (alphas, betas) in zip(model.blocks, plans):
        old = block.attn
        new = MoAAttention(old.dim, old.num_heads, alphas, betas, total_len, old.num_kv_heads, **kw)
        new.load_state_dict(old.state_dict())
        block.attn = new.to(device=old.q_proj.weight.device, dtype=old.q_proj.weight.dtype)
    model.mechanism = "moa"
    return model


register(Mechanism(
    name="moa", paper="Mixture of Attention Spans: Optimizing LLM Inference Efficiency with Heterogeneous "
    "Sliding-Window Lengths (CoLM 2025)", repo="thu-nics/MoA", family="local", dims=("1d",),
    patterns={"CS": {}}, why_not={
        "NS": "spans alpha + beta*N are profiled for causal decoding (sinks + the recent past); the paper defines "
              "no bidirectional span", "NC": POSITIONS_SHARED, "CC": POSITIONS_SHARED},
    cls=MoAAttention, make=lambda dim, num_heads, **kw: MoAAttention(dim, num_heads, **kw),
    notes="per-head span S = alpha + beta * total_len (total_len 4096; rounded up to 64, >= 128): 64 sinks + the "
          "last S - 64 tokens; default alpha 0, beta 0.5 on every head (the official uniform baseline): use "
          "moa_profile for searched spans; decode cache <= max span keys"))
