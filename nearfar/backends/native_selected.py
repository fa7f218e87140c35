"""Key lists made per call for the compiled CPU kernel: run-time key blocks, and queries that only some rows ask.

The plan-based path (``backends.native``) gives the kernel key lists made once per pattern. Here the lists are
data: ``attend(..., blocks=SelectedBlocks(...))`` lists, per (batch item, list head, query block), the tokens of the
selected key blocks, with the mask words of the blocks that need one (``within``, a short last block, a block the
static pattern reads in part); whole blocks get all-ones words and are flagged so the kernel applies no mask. The
static pattern, if any, runs on its cached plan as a second kernel call, and the two results merge by their
log-sum-exp (their pairs are disjoint: ``selected_plan.classify`` takes the pattern's pairs out of the selection).
The kernel reads the keys in place, so no K/V block is copied whatever the selection.

``lists_attention`` is the autograd function over such parts; a part may also list only some query rows per
(batch item, head), the others then get 0 and LSE = -inf (MoH's routed heads: a head runs only the rows that
picked it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import native as build
from ..patterns import Pattern
from ..selection import SelectedBlocks
from . import native
from .kernels import unit_last
from .selected_plan import classify

#: elements of the token masks of partial blocks built at once
_MASK_CHUNK = 1 << 22


@dataclass
class Lists:
    """One kernel call's lists: ``q_idx (Bq, Hq', c, T)`` query rows per tile (-1: none), ``k_idx (Bk, Hp, c, W)``
    keys (-1: none), ``bits (Bk, Hp, c, W, ceil(T/64))`` mask words per key, ``rows (Bk, Hp, c, nsub, 2)`` live tile
    rows and ``full (Bk, Hp, c, nsub)`` "no mask needed" per 64-key sub-block. ``rows_only``: some query rows are in
    no tile (their output is 0, their LSE -inf). ``row_causal``: no mask arrays; row ``r`` sees key ``j`` iff
    ``j <= q_idx[r] + offset`` (each tile's rows ascending, then -1)."""

    q_idx: torch.Tensor
    k_idx: torch.Tensor
    bits: torch.Tensor
    rows: torch.Tensor
    full: torch.Tensor
    rows_only: bool = False
    row_causal: bool = False
    offset: int = 0

    def arrays(self) -> tuple[torch.Tensor, ...]:
        return self.q_idx, self.k_idx, self.bits, self.rows, self.full


def sub_blocks(ok: torch.Tensor, r0: torch.Tensor, r1: torch.Tensor, exact: torch.Tensor, t: int,
               per: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 64-key sub-block of each list, made of ``per`` consecutive entries (keys, or whole blocks of
    ``64 / per`` keys): its live rows ``[min r0, max r1)`` over its entries that are ``ok`` and whether no mask is
    needed (every entry ``ok`` and ``exact``: all rows ``[0, t)`` allowed)."""
    pad = -ok.shape[-1] % per
    live = ok & (r1 > r0)
    lo = torch.nn.functional.pad(torch.where(live, r0, t), (0, pad), value=t).unflatten(-1, (-1, per)).amin(-1)
    hi = torch.nn.functional.pad(torch.where(live, r1, 0), (0, pad)).unflatten(-1, (-1, per)).amax(-1)
    ex = torch.nn.functional.pad(exact & ok, (0, pad), value=True).unflatten(-1, (-1, per)).all(-1)
    empty = lo >= hi
    rows = torch.stack([torch.where(empty, 0, lo), torch.where(empty, 0, hi)], -1).to(torch.int32)
    return rows.contiguous(), (ex & ~empty).contiguous()


def selected_lists(pattern: Pattern | None, sel: SelectedBlocks, nq: int, nk: int) -> Lists | None:
    """The selection's pairs that the pattern does not have, as kernel lists (None: no pair)."""
    cls = classify(pattern, sel, nq, nk)
    keep = cls.valid
    if keep.shape[-1] == 0 or not bool(keep.any()):
        return None
    width = int(keep.sum(-1).max())  # the selected blocks first in each row, trimmed to the widest row
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :width]
    valid, idx, full, overlap = (x.gather(-1, order) for x in (keep, cls.idx, cls.full, cls.overlap))
    t, kb, dev = sel.q_block, sel.k_block, idx.device
    bs, hs, qb, s = idx.shape
    k_idx = idx[..., None] * kb + torch.arange(kb, device=dev)  # (B', H', QB, S, kb)
    k_idx.masked_fill_(~valid[..., None], -1)
    if nk % kb:  # the short last block
        k_idx.masked_fill_(k_idx >= nk, -1)
    nw = -(-t // 64)
    # every row of a whole block: all-ones words (one write of the lists' size)
    bits = torch.where(full, -1, 0)[..., None, None].expand(bs, hs, qb, s, kb, nw).contiguous()
    r0 = torch.zeros(bs, hs, qb, s, dtype=torch.int64, device=dev)
    r1 = torch.where(valid, t, 0)
    part = valid & ~full
    if bool(part.any()):
        at = part.nonzero()  # (P, 4)
        qpos = torch.arange(qb * t, device=dev).view(qb, t)
        step = max(1, _MASK_CHUNK // (t * kb))
        for p0 in range(0, at.shape[0], step):
            a = at[p0:p0 + step].unbind(1)
            qp = qpos[a[2]][:, :, None]  # (P, T, 1)
            kp = k_idx[a][:, None, :]  # (P, 1, kb)
            ok = (kp >= 0) & (qp < nq)
            if sel.within is not None:
                ok = ok & sel.within.allowed(qp.clamp(max=nq - 1), kp.clamp(min=0), nq, nk)
            if pattern is not None:
                ov = overlap[a][:, None, None]
                ok = ok & ~(ov & pattern.allowed(qp.clamp(max=nq - 1), kp.clamp(min=0), nq, nk))
            bits[a] = native.pack_rows(ok)
            live = ok.any(-1)  # (P, T)
            anyrow = live.any(-1)
            r0[a] = torch.where(anyrow, live.int().argmax(-1), 0).long()
            r1[a] = torch.where(anyrow, t - live.flip(-1).int().argmax(-1), 0).long()
    k_idx = k_idx.flatten(-2)
    if kb % native.KB == 0:  # each 64-key sub-block inside one block: the block's rows and flag
        rep = kb // native.KB
        rows = torch.stack([r0, r1], -1).repeat_interleave(rep, 3).to(torch.int32).contiguous()
        whole = full.repeat_interleave(rep, 3).contiguous()
    elif native.KB % kb == 0:  # whole blocks per sub-block: min/max of their rows, exact if every one is whole
        rows, whole = sub_blocks(valid, r0, r1, full, t, native.KB // kb)
    else:  # blocks that straddle sub-blocks: per key
        r0k, r1k, fullk = (x[..., None].expand(-1, -1, -1, -1, kb).flatten(-2) for x in (r0, r1, full))
        rows, whole = sub_blocks(k_idx >= 0, r0k, r1k, fullk, t, native.KB)
    qrows = torch.arange(qb * t, device=dev)
    q_idx = torch.where(qrows < nq, qrows, -1).view(1, 1, qb, t)
    return Lists(q_idx, k_idx.contiguous(), bits.flatten(3, 4).contiguous(), rows, whole)


def causal_rows(picked: torch.Tensor, nk: int, tile: int = 64, causal: bool = True) -> Lists:
    """Attention of only the query rows ``picked (B, H, Nq)`` (bool): each (batch item, head)'s picked rows in tiles
    of ``tile``, row-causal over the keys (the queries are the last ``Nq`` of the ``nk`` key positions), or with
    every key visible (``causal=False``: the bound past the last key)."""
    b, h, nq = picked.shape
    m = max(1, int(picked.sum(-1).max()))
    c = -(-m // tile)
    order = torch.argsort((~picked).to(torch.uint8), dim=-1, stable=True)[..., :m]  # picked rows first, ascending
    live = picked.gather(-1, order)
    q_idx = torch.nn.functional.pad(torch.where(live, order, -1), (0, c * tile - m), value=-1).view(b, h, c, tile)
    k_idx = torch.arange(nk).view(1, 1, 1, nk)
    none = torch.empty(0, dtype=torch.int64)
    return Lists(q_idx.contiguous(), k_idx, none, none.int(), none.bool(), rows_only=True, row_causal=True,
                 offset=nk - nq if causal else nk)


def _blank(q: torch.Tensor, dv: int, rows_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    b, hq, nq, _ = q.shape
    # (B, N, H, dv) memory, as PyTorch's fused CPU SDPA returns it
    make = q.new_zeros if rows_only else q.new_empty
    out = make(b, nq, hq, dv).transpose(1, 2)
    lse = torch.full((b, hq, nq), float("-inf")) if rows_only else torch.empty(b, hq, nq)
    return out, lse


class _Lists(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, parts: list[list[Lists]], scale: float,
                kpm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # the parts after the first continue its softmax inside the kernel (its output and LSE as the starting
        # state), so each of them must list every query row once
        if len(parts) > 1 and any(x.rows_only for part in parts for x in part):
            raise ValueError("lists_attention: only a single part may list some query rows (rows_only)")
        out, lse = _blank(q, v.shape[-1], any(x.rows_only for x in parts[0]))
        for i, part in enumerate(parts):
            for x in part:
                torch.ops.nearfar_native.forward(q, k, v, *x.arrays(), kpm, None, None, None, scale, x.row_causal,
                                                 x.offset, i > 0, out, lse)
        ctx.parts, ctx.scale, ctx.kpm = parts, scale, kpm
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zeros tensor for lse's gradient: it has none
        return out, lse

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, _grad_lse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        # float32 accumulators for every dtype (not ``backward_owned``): the parts are separate calls with their own
        # dq and row-causal modes, and a key's sum would otherwise be rounded once per call
        dk, dv = native.kv_grads(k, v)
        do = unit_last(grad_out.to(q.dtype))
        dq_sum = None
        for part in ctx.parts:
            dq, _ = _blank(q, q.shape[-1], any(x.rows_only for x in part))
            for x in part:
                torch.ops.nearfar_native.backward(q, k, v, out, do, lse, *x.arrays(), ctx.kpm, None, None, None,
                                                  ctx.scale, x.row_causal, x.offset, dq, dk, dv, None, None)
            dq_sum = dq if dq_sum is None else dq_sum.add_(dq)
        dk, dv = native.summed(dk, dv)
        return dq_sum, dk.to(k.dtype), dv.to(v.dtype), None, None, None


def lists_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, parts: list[list[Lists]], scale: float,
                    kpm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of attention over the pairs of ``parts``: each part a list of kernel calls over disjoint
    query rows, the parts over disjoint pairs (each after the first continues the softmax of those before it, so
    it lists every query row; only a lone part may list some rows). ``kpm``: an additive (B, Nk) key mask."""
    if not build.available():
        raise RuntimeError(build.status())
    if kpm is not None:
        kpm = kpm.to(torch.float32).expand(q.shape[0], k.shape[2]).contiguous()
    return _Lists.apply(unit_last(q), unit_last(k), unit_last(v), parts, float(scale), kpm)


def native_selected(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern | None,
                    sel: SelectedBlocks, scale: float, plan: Any | None,
                    kpm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``attend(q, k, v, pattern, blocks=sel)`` on the kernel: the pattern's ``plan`` (None without a pattern) as
    one part, the selection's remaining pairs as another."""
    nq, nk = q.shape[2], k.shape[2]
    parts: list[list[Lists]] = []
    if plan is not None:
        parts.append([Lists(qi, ki, bits, rows, full) for qi, ki, bits, rows, full in native.plan_lists(plan)])
    got = selected_lists(pattern, sel, nq, nk)
    if got is not None:
        parts.append([got])
    if not parts:  # no pair at all: one empty list per query block (zeros, LSE -inf, zero gradients)
        qb = -(-nq // sel.q_block)
        rows = torch.arange(qb * sel.q_block)
        q_idx = torch.where(rows < nq, rows, -1).view(1, 1, qb, sel.q_block)
        words = torch.zeros(1, 1, qb, 1, -(-sel.q_block // 64), dtype=torch.int64)
        empty = Lists(q_idx, torch.full((1, 1, qb, 1), -1), words, torch.zeros(1, 1, qb, 1, 2, dtype=torch.int32),
                      torch.zeros(1, 1, qb, 1, dtype=torch.bool))
        parts.append([empty])
    return lists_attention(q, k, v, parts, scale, kpm)
