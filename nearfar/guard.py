"""Non-finite and overflowing inputs stay where they belong.

Fused kernels compute every score of a tile (or, in the dense engine, of a whole row) and mask afterwards, so a
NaN or Inf in a key that a query may *not* attend still reaches that query: ``q·k`` is NaN and ``NaN + (-inf)`` is
NaN. Padded positions of a real batch hold garbage and half-precision activations overflow, so this is not rare.
``attend`` therefore looks: when gradients are needed, at its inputs first (three max-abs reductions; a huge finite
value can overflow in the backward pass only); otherwise only at its output (any forward leak makes it non-finite),
so decoding pays O(Nq·dv), not a pass over the cache. Only when some input value is non-finite or so large that a
product of two could overflow the accumulation type, it

1. runs the engine on copies where those tokens' rows are zero, so nothing unsafe enters a kernel, and
2. recomputes exactly, in float64 with the mask applied *before* the softmax (as the float64 reference does), every
   query row that may attend an unsafe key (by pattern and padding) or whose own query is unsafe.

A query that cannot reach an unsafe key is thus unaffected by it, forward and backward; a query that can gets what
the reference gives (NaN for a NaN key it attends). The rows' recomputation costs O(rows x Nk) and runs in row
chunks, so memory stays bounded. Under ``torch.compile`` the check is skipped (it is a data-dependent branch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch

from .bias import BiasSource, DenseBias, RelativePositionBias
from .mods import call_score_mod
from .patterns import Dense, Pattern
from .selection import SelectedBlocks

_CHUNK = 1 << 22  # float64 score elements per chunk of recomputed rows (32 MiB)


def _limit(dtype: torch.dtype, d: int, scale: float) -> float:
    """Largest |value| for which no score, score gradient or output can overflow the accumulation type: below it,
    ``d * |q|max * |k|max * scale`` stays under a quarter of the type's maximum (and likewise ``do . v``)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return math.sqrt(torch.finfo(acc).max / (4 * d * max(scale, 1.0)))


def _sane(x: torch.Tensor, limit: float) -> bool:
    # aminmax: one pass, no temporary (|x|.amax() allocates |x|; vector_norm(inf) is ~15x slower); NaN propagates
    lo, hi = torch.aminmax(x.detach())
    return bool(torch.maximum(-lo, hi).double() <= limit)  # False for NaN; in float64, where limit is not Inf


def output_finite(out: torch.Tensor) -> bool:
    """Cheap check that an output holds no NaN/Inf: one float32 sum (NaN and Inf survive a sum; isfinite().all()
    allocates a mask and is ~40x slower). A finite output so large that its sum overflows is reported as non-finite,
    which only costs the caller a look at its inputs."""
    return bool(torch.isfinite(out.detach().sum(dtype=torch.float32)))


def values_sane(tensors: tuple[torch.Tensor, ...], d: int, scale: float) -> bool:
    """True when every value of ``tensors`` (queries, keys and values of head dim ``d``, e.g. a fused projection
    output) is finite and below the bound of ``unsafe_tokens``: no score, score gradient or output can overflow.
    One ``aminmax`` pass per tensor; always True under ``torch.compile`` and on meta tensors, as there."""
    if torch.compiler.is_compiling() or any(t.device.type == "meta" for t in tensors):
        return True
    limit = _limit(tensors[0].dtype, d, scale)
    return all(_sane(t, limit) for t in tensors)


def unsafe_tokens(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(unsafe queries (B, Hq, Nq), unsafe keys (B, Hkv, Nk))``, or None when every value is sane."""
    if torch.compiler.is_compiling() or q.device.type == "meta":
        return None
    limit = _limit(q.dtype, q.shape[-1], scale)
    if _sane(q, limit) and _sane(k, limit) and _sane(v, limit):
        return None

    def bad(x):
        return ~(x.detach().abs().double() <= limit).all(-1)

    return bad(q), bad(k) | bad(v)


def zero_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x`` with zeros where the bool ``rows`` (broadcastable to ``x``, e.g. ``(..., N, 1)``) is True."""
    return torch.where(rows, torch.zeros((), dtype=x.dtype, device=x.device), x)


def _allowed(pattern: Pattern | None, rows: torch.Tensor, cols: torch.Tensor, nq: int, nk: int,
             blocks: SelectedBlocks | None = None, hq: int = 1, hkv: int = 1) -> torch.Tensor:
    """(B' or 1, H' or 1, len(rows), len(cols)) bool: H' is the PerHead count or, with ``blocks``, ``hq``."""
    ok = None
    if pattern is not None or blocks is None:
        pattern = Dense() if pattern is None else pattern
        ok = pattern.allowed(rows[:, None], cols[None, :], nq, nk)
        ok = ok if pattern.heads is not None else ok[None]
        ok = ok.expand(ok.shape[0], rows.numel(), cols.numel())[None]
    if blocks is not None:
        table = blocks.block_table(nk)
        if table.shape[1] not in (1, hq):
            table = table.repeat_interleave(hq // hkv, dim=1)
        sel = table[:, :, rows // blocks.q_block][..., cols // blocks.k_block]
        if blocks.within is not None:
            sel = sel & blocks.within.allowed(rows[:, None], cols[None, :], nq, nk)
        ok = sel if ok is None else ok | sel
    assert ok is not None
    return ok


def dirty_rows(pattern: Pattern | None, unsafe_q: torch.Tensor, unsafe_k: torch.Tensor,
               key_padding_mask: torch.Tensor | None, nq: int, nk: int,
               blocks: SelectedBlocks | None = None) -> torch.Tensor:
    """Query indices (sorted) that may attend an unsafe key in some batch item and head, or whose query is unsafe."""
    b, hq, _ = unsafe_q.shape
    group = hq // unsafe_k.shape[1]
    keys = unsafe_k if key_padding_mask is None else unsafe_k & key_padding_mask[:, None]
    dirty = unsafe_q.any(0).any(0)
    cols = torch.nonzero(keys.any(0).any(0))[:, 0]
    if cols.numel():
        per_head = keys.repeat_interleave(group, 1).to(torch.float32)  # (B, Hq, Nk)
        rows = torch.arange(nq, device=unsafe_q.device)
        step = max(1, _CHUNK // max(1, nq))
        for c0 in range(0, cols.numel(), step):
            c = cols[c0:c0 + step]
            ok = _allowed(pattern, rows, c, nq, nk, blocks, hq, unsafe_k.shape[1]).to(torch.float32)
            hits = torch.matmul(per_head[:, :, None, c], ok.transpose(-1, -2))  # (B, Hq, 1, Nq)
            dirty |= (hits > 0).flatten(0, 2).any(0)
    return torch.nonzero(dirty)[:, 0]


def _bias_rows(bias: BiasSource | None, rows: torch.Tensor, nq: int, nk: int) -> torch.Tensor | None:
    """The bias at query rows ``rows`` and every key, broadcastable to (B, Hq, R, Nk)."""
    if bias is None:
        return None
    if isinstance(bias, DenseBias):
        b4 = bias.b4
        return b4.index_select(2, rows) if b4.shape[2] > 1 else b4
    assert isinstance(bias, RelativePositionBias)
    cols = torch.arange(nk, device=rows.device)
    table = bias.tensor.reshape(bias.tensor.shape[0], -1)
    return table[:, bias.pattern.rpb_index(rows[:, None], cols[None, :], nq)][None]


def exact_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, unsafe_q: torch.Tensor, unsafe_k: torch.Tensor,
               rows: torch.Tensor, pattern: Pattern | None, scale: float, bias: BiasSource | None,
               key_padding_mask: torch.Tensor | None, return_lse: bool, blocks: SelectedBlocks | None = None,
               score_mod: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Attention of query rows ``rows`` over every key in float64, masked *before* anything multiplies a query, a key
    or a value (so a key a row may not attend contributes exactly nothing, forward and backward, whatever it or the
    query holds). Safe pairs go through plain matmuls on copies with the unsafe tokens zeroed; the unsafe keys'
    scores and values, and the whole rows of unsafe queries, are taken pair by pair behind ``where`` (a product
    outside ``where`` would send ``0 * NaN`` into gradients). Returns ``(order, out (B, Hq, R, dv), lse)``: the
    rows in the order of ``out``. A ``score_mod`` rewrites the scaled scores (before the bias), as in the engines."""
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    group = hq // hkv
    f64 = torch.float64

    in_cols = unsafe_k.any(0).any(0)  # keys unsafe in some item and head: taken pair by pair in every one
    cols = torch.nonzero(in_cols)[:, 0]
    k_all, v_all = (x.to(f64).repeat_interleave(group, 1) for x in (k, v))
    k_safe, v_safe = zero_rows(k_all, in_cols[:, None]), zero_rows(v_all, in_cols[:, None])
    k_u, v_u = k_all.index_select(2, cols), v_all.index_select(2, cols)  # (B, Hq, U, e)
    q_rows = unsafe_q.any(0).any(0)[rows]
    zero = torch.zeros((), dtype=f64, device=q.device)
    keys = torch.arange(nk, device=q.device)

    def chunk(r: torch.Tensor, pairwise: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        qr = q.index_select(2, r).to(f64)
        ok = _allowed(pattern, r, keys, nq, nk, blocks, hq, hkv)  # (B' or 1, H' or 1, R, Nk)
        if key_padding_mask is not None:
            ok = ok & key_padding_mask[:, None, None, :]
        if pairwise:  # an unsafe query: every product behind the mask
            ok5 = ok[..., None]
            s = (torch.where(ok5, qr[:, :, :, None], zero) * torch.where(ok5, k_all[:, :, None], zero)).sum(-1)
        else:
            s = torch.matmul(qr, k_safe.transpose(-1, -2))
            if cols.numel():
                ok_u = ok.index_select(-1, cols)[..., None]
                s_u = (torch.where(ok_u, qr[:, :, :, None], zero) * torch.where(ok_u, k_u[:, :, None], zero)).sum(-1)
                s = s.index_copy(-1, cols, s_u)
        s = s * scale
        if score_mod is not None:
            dev = q.device
            s = call_score_mod(score_mod, s, torch.arange(b, device=dev).view(-1, 1, 1, 1),
                               torch.arange(hq, device=dev).view(1, -1, 1, 1), r.view(1, 1, -1, 1),
                               keys.view(1, 1, 1, -1))
        br = _bias_rows(bias, r, nq, nk)
        if br is not None:
            s = s + br.to(f64)
        return _softmax_rows(s, ok, pairwise, return_lse)

    def _softmax_rows(s, ok, pairwise, want_lse):
        neg = torch.tensor(float("-inf"), dtype=f64, device=q.device)
        s = torch.where(ok, s, neg)
        live = ~torch.isneginf(s).all(-1, keepdim=True)  # NaN counts as live: it must show
        s = torch.where(live, s, zero)
        m = s.detach().amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(s - m)
        denom = e.sum(-1, keepdim=True)
        p = torch.where(ok, e / denom, zero) * live  # a NaN row sends nothing to the values it may not attend
        if pairwise:
            out = (p[..., None] * torch.where(ok[..., None], v_all[:, :, None], zero)).sum(-2)
        else:
            out = torch.matmul(p, v_safe)
            if cols.numel():
                ok_u = ok.index_select(-1, cols)[..., None]
                out = out + (p.index_select(-1, cols)[..., None] * torch.where(ok_u, v_u[:, :, None], zero)).sum(-2)
        lse = torch.where(live[..., 0], (m + denom.log())[..., 0], neg) if want_lse else None
        return out, lse

    order, outs, lses = [], [], []
    for pairwise, sel in ((False, rows[~q_rows]), (True, rows[q_rows])):
        width = nk * (d + dv) if pairwise else nk + cols.numel() * (d + dv)
        step = max(1, _CHUNK // max(1, b * hq * width))
        for r0 in range(0, sel.numel(), step):
            r = sel[r0:r0 + step]
            out, lse = chunk(r, pairwise)
            order.append(r)
            outs.append(out)
            lses.append(lse)
    out = torch.cat(outs, 2).to(q.dtype)
    # with return_lse every chunk returned its lse
    return torch.cat(order), out, (torch.cat(cast("list[torch.Tensor]", lses), 2) if return_lse else None)
