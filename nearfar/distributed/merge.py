"""Combining partial attention over disjoint key sets by their log-sum-exp (online softmax).

A partial over key set ``S`` has ``L = log sum_{j in S} exp(z_j)`` (``-inf`` if empty) and
``O = sum_j exp(z_j - L) v_j`` (0 if empty). Partials merge as ``L = log sum_s exp(L_s)`` and
``O = sum_s exp(L_s - L) O_s``. ``merge_into`` is the pairwise, in-place form PyTorch's ring attention uses
(``_SDPAMerger`` in ``torch/distributed/tensor/experimental/_context_parallel/_attention.py``, after
ring-flash-attention): ``O <- O - sigmoid(L_b - L) (O - O_b)``, ``L <- L - logsigmoid(L - L_b)``, in fp32. What
differs: rows where either side is ``-inf`` are handled explicitly (the formula gives NaN when both are), keeping
nearfar's convention of output 0 and LSE ``-inf`` for a query with no key.

``partial`` and ``merge`` are differentiable through the LSE (``attend`` returns it detached, so merging its outputs
under autograd would drop the ``dL/dz`` term): they serve the few global queries, computed with plain torch ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def merge_into(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Merge the partial ``(out_b, lse_b)`` into the accumulators ``(out, lse)`` in place (no autograd).

    Args:
        out: ``(..., N, dv)`` accumulator (fp32 or fp64).
        lse: ``(..., N)`` accumulator.
        out_b: The partial's output, same shape (any float dtype).
        lse_b: The partial's LSE.
    """
    lse_b = lse_b.to(lse.dtype)
    out_b = out_b.to(out.dtype)
    take_b = torch.isneginf(lse) & ~torch.isneginf(lse_b)
    both = ~torch.isneginf(lse) & ~torch.isneginf(lse_b)
    w = torch.sigmoid(lse_b - lse)
    merged = out - w[..., None] * (out - out_b)
    new_lse = lse - F.logsigmoid(lse - lse_b)
    out.copy_(torch.where(take_b[..., None], out_b, torch.where(both[..., None], merged, out)))
    lse.copy_(torch.where(take_b, lse_b, torch.where(both, new_lse, lse)))


def _safe_lse(s: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lse, weights, any)`` of scores ``s`` along ``dim`` with ``-inf`` entries, finite gradients everywhere."""
    m = s.detach().amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    tot = e.sum(dim, keepdim=True)
    ok = tot > 0
    lse = torch.where(ok, torch.log(tot.clamp_min(torch.finfo(s.dtype).tiny)) + m, torch.full_like(m, -torch.inf))
    return lse.squeeze(dim), e / tot.clamp_min(torch.finfo(s.dtype).tiny), ok.squeeze(dim)


def partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float,
            acc: torch.dtype, mod: Callable[[torch.Tensor], torch.Tensor] | None = None,
            bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable partial attention ``(O, L)`` of ``q (B, Hq, m, d)`` over ``k, v (B, Hkv, n, .)`` where
    ``allowed`` (broadcastable to ``(B, Hq, m, n)``) is True, computed in ``acc``; empty rows give 0 and ``-inf``.
    The scores are ``mod(q . k * scale) + bias`` before the mask, in ``nearfar.attend``'s order."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1).to(acc), v.repeat_interleave(g, 1).to(acc)
    s = torch.matmul(q.to(acc), kk.transpose(-1, -2)) * scale
    if mod is not None:
        s = mod(s)
    if bias is not None:
        s = s + bias.to(acc)
    s = s.masked_fill(~allowed, -torch.inf)
    lse, p, _ = _safe_lse(s, -1)
    return torch.matmul(p, vv), lse


def merge(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable merge of stacked partials ``outs (S, ..., dv)``, ``lses (S, ...)`` over the first axis."""
    lse, w, _ = _safe_lse(lses, 0)
    return (w.unsqueeze(-1) * outs).sum(0), lse
