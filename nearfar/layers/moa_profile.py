"""MoA's profiler: which span each head can afford, from the loss increase of masking attention entries.

Paper: Fu et al., "Mixture of Attention Spans" (CoLM 2025). Official code: thu-nics/MoA --
``MoA/models/llama/modify_llama_profile.py`` (``LlamaModel_get_attention_matrix_log``: the influence) and
``MoA/universal/optimizer.py`` (the MILP search). What we compute and how it differs is described in
``nearfar/layers/moa.py``'s module docstring.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, cast

import torch

from ..functional import merge_heads, split_heads
from .moa import MoAAttention, moa_head_pattern, moa_span
from .pattern_attention import PatternAttention

_EXHAUSTIVE_LIMIT = 65536


class BlockLM(Protocol):
    """What the profiler reads of a model (a ``TinyLM``): ``blocks``, each with an ``attn`` layer, ``loss(tokens)``
    and ``mechanism``."""

    blocks: torch.nn.ModuleList
    mechanism: str

    def loss(self, tokens: torch.Tensor) -> torch.Tensor: ...


_LM = TypeVar("_LM", bound=BlockLM)



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



def moa_profile_influence(model: BlockLM, tokens: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per layer the batch-mean influence ``E (H, N-1, N-1)`` of every attention entry of the dense causal model on
    the next-token loss of ``tokens (B, N)``, and that loss."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] < 2 or tokens.is_floating_point():
        raise ValueError(f"tokens must be an integer (B, N >= 2) tensor, got {getattr(tokens, 'shape', tokens)}")
    attns = [b.attn for b in model.blocks]
    for i, attn in enumerate(attns):
        if not isinstance(attn, PatternAttention):
            raise TypeError(f"moa_profile needs softmax PatternAttention layers; layer {i} is {type(attn).__name__}")
    layers = cast(list[PatternAttention], attns)  # checked just above
    store: list[torch.Tensor] = []
    try:
        for attn in layers:
            # an instance attribute over the method, removed again below
            setattr(attn, "forward",  # noqa: B010
                    lambda x, cache=None, key_padding_mask=None, _a=attn: _dense_probs_forward(_a, x, store))
        with torch.enable_grad():
            loss = model.loss(tokens)
            grads = torch.autograd.grad(loss, store)
    finally:
        for attn in layers:
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



def moa_profile(model: BlockLM, tokens: torch.Tensor, candidates: Sequence[tuple[float, float]],
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
    masks = torch.stack([moa_head_pattern(s, sink_size).mask(n, n) for s in spans])  # (C, N, N)
    removed = (causal & ~masks).to(effects[0].dtype)
    density = masks.sum((1, 2)).double() / causal.sum()
    plans = []
    for eff in effects:
        loss = torch.einsum("hij,cij->hc", eff, removed.to(eff.device)).double().cpu()
        pick = _choose(loss, density, density_budget)
        plans.append(([float(candidates[j][0]) for j in pick], [float(candidates[j][1]) for j in pick]))
    return plans



def moa_layer_kwargs(plans: Sequence[tuple[Sequence[float], Sequence[float]]], total_len: int,
                     **kw: Any) -> Callable[[int], dict[str, Any]]:
    """``layer_kwargs`` for ``TinyLM(mechanism="moa", layer_kwargs=...)``: layer ``i`` gets ``plans[i]``."""
    return lambda i: dict(alphas=list(plans[i][0]), betas=list(plans[i][1]), total_len=total_len, **kw)



def moa_apply(model: _LM, plans: Sequence[tuple[Sequence[float], Sequence[float]]], total_len: int,
              **kw: Any) -> _LM:
    """Replace each block's attention of ``model`` (a TinyLM of softmax PatternAttention layers without biases) by an
    ``MoAAttention`` with the same weights and ``plans[i]``; in place, returns ``model``."""
    if len(plans) != len(model.blocks):
        raise ValueError(f"plans has {len(plans)} layers, the model {len(model.blocks)}")
    for block, (alphas, betas) in zip(model.blocks, plans):
        old = cast(PatternAttention, block.attn)  # a softmax PatternAttention, as documented
        new = MoAAttention(old.dim, old.num_heads, alphas, betas, total_len, old.num_kv_heads, **kw)
        new.load_state_dict(old.state_dict())
        block.attn = new.to(device=old.q_proj.weight.device, dtype=old.q_proj.weight.dtype)
    model.mechanism = "moa"
    return model
