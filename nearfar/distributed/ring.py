"""Ring attention for dense and causal attention: K/V rotate around the ranks, partial results merge by LSE.

Liu, Zaharia & Abbeel, "Ring Attention with Blockwise Transformers for Near-Infinite Context" (ICLR 2024,
arXiv 2310.01889; haoliuhl/ringattention ``ringattention_base.py``) and PyTorch's context parallelism
(``_templated_ring_attention`` and its backward in ``torch/distributed/tensor/experimental/_context_parallel/
_attention.py``). Step ``i`` of ``world``: rank ``r`` attends its queries to the K/V of rank ``(r - i) mod world``
while that block travels one rank on; partials merge in fp32 by their LSE. With ``Layout.head_tail`` every causal
step does about the same work on every rank (the skipped blocks are exactly PyTorch's head/tail halves).

Backward follows PyTorch: the K/V rotate again, each step recomputes its block's gradients from the *merged* output
and LSE (``P = exp(z - L)``, ``dZ = P (dO v^T - rowsum(dO * O))``), and the dK/dV accumulator of a block travels
with it, arriving home after the last hop (fp32). What differs: the forward blocks run on nearfar's ``attend``
(any engine, GQA, key padding, uneven and padded layouts, any ``world``); the backward block math is plain
chunked torch ops (no fused kernel); which (query range, key range) blocks are skipped is decided from the global
ranges of the layout, not from a fixed head/tail schedule.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..patterns import Causal
from . import comm
from .layout import Layout, Ranges
from .merge import merge_into
from .view import GlobalView, local_attend

_ROWS = 256  # query rows per chunk of the backward block math


def _real(layout: Layout, rank: int) -> Ranges:
    """The rank's ranges clipped to the real tokens (not merged: each lies in one local run)."""
    n = layout.n_real
    return tuple((lo, min(hi, n)) for lo, hi in layout.ranges[rank] if min(hi, n) > lo)


def _blocks(layout: Layout, me: int, src: int, causal: bool) -> list[tuple[int, int, Ranges, bool]]:
    """``(q_lo, q_hi, key ranges of src, full)`` per real query range of ``me``: the keys of ``src`` it may read
    and whether every pair is allowed (no mask but padding)."""
    out = []
    for qa, qb in _real(layout, me):
        ks = []
        full = True
        for ka, kb in _real(layout, src):
            if causal and ka > qb - 1:
                continue
            ks.append((ka, kb))
            full = full and (not causal or kb - 1 <= qa)
        if ks:
            out.append((qa, qb, tuple(ks), full))
    return out


def _keys(buf: torch.Tensor, layout: Layout, src: int, ranges: Ranges) -> torch.Tensor:
    loc = [r for lo, hi in ranges for r in layout.local(src, lo, hi)]
    return torch.cat([buf[..., a:b, :] if buf.dim() == 4 else buf[..., a:b] for a, b in loc], -2 if buf.dim() == 4
                     else -1)


def _rows(layout: Layout, me: int, lo: int, hi: int) -> slice:
    (a, b), = layout.local(me, lo, hi)
    return slice(a, b)


def _allowed(qa: int, qb: int, kr: Ranges, causal: bool, valid: torch.Tensor | None,
             device: torch.device) -> torch.Tensor | None:
    """Bool ``(B|1, 1, m, nk)`` of the allowed pairs of a block, None when all are."""
    ok = None
    if causal:
        qg = torch.arange(qa, qb, device=device)
        kg = torch.cat([torch.arange(a, b, device=device) for a, b in kr])
        ok = (kg[None, :] <= qg[:, None])[None, None]
    if valid is not None:
        v = valid[:, None, None, :]
        ok = v if ok is None else ok & v
    return ok


def _block_grads(q, k, v, do, lse, delta, ok, scale, acc):
    """Gradients ``(dq, dk, dv)`` of one block given the merged LSE and ``delta = rowsum(dO * O)``."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.to(acc).repeat_interleave(g, 1), v.to(acc).repeat_interleave(g, 1)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk, dv = torch.zeros(kk.shape, dtype=acc, device=q.device), torch.zeros(vv.shape, dtype=acc, device=q.device)
    for r0 in range(0, q.shape[2], _ROWS):
        r1 = min(q.shape[2], r0 + _ROWS)
        qc, doc, lc = q[:, :, r0:r1].to(acc), do[:, :, r0:r1], lse[:, :, r0:r1, None]
        p = torch.exp(torch.matmul(qc, kk.transpose(-1, -2)) * scale - torch.where(torch.isfinite(lc), lc, 0.0))
        keep = torch.isfinite(lc)
        if ok is not None:
            keep = keep & (ok[:, :, r0:r1] if ok.shape[2] > 1 else ok)
        p = torch.where(keep, p, 0.0)
        dv += torch.matmul(p.transpose(-1, -2), doc)
        ds = p * (torch.matmul(doc, vv.transpose(-1, -2)) - delta[:, :, r0:r1, None])
        dq[:, :, r0:r1] = torch.matmul(ds, kk) * scale
        dk += torch.matmul(ds.transpose(-1, -2), qc) * scale
    b, hkv = k.shape[:2]
    return dq, dk.view(b, hkv, g, *dk.shape[2:]).sum(2), dv.view(b, hkv, g, *dv.shape[2:]).sum(2)


class RingAttention(torch.autograd.Function):
    """``RingAttention.apply(q, k, v, kpm, layout, causal, scale, group, engine)`` -> ``(out, lse)``."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: torch.Tensor | None,
                layout: Layout, causal: bool, scale: float, group: dist.ProcessGroup | None,
                engine: str) -> tuple[torch.Tensor, torch.Tensor]:
        me, world, n = dist.get_rank(group), layout.world, layout.n_real
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        b, hq, nq, _ = q.shape
        out = torch.zeros(b, hq, nq, v.shape[-1], dtype=acc, device=q.device)
        lse = torch.full((b, hq, nq), -torch.inf, dtype=acc, device=q.device)
        kv = torch.cat([k, v], -1).contiguous()
        valid = kpm.to(torch.uint8).contiguous() if kpm is not None else None
        d = k.shape[-1]
        for i in range(world):
            src = (me - i) % world
            wait = lambda: None  # noqa: E731
            if i < world - 1:
                nxt = (me - i - 1) % world
                kv_n = kv.new_empty(b, k.shape[1], layout.size(nxt), kv.shape[-1])
                sends, recvs = [((me + 1) % world, kv)], [((me - 1) % world, kv_n)]
                if valid is not None:
                    valid_n = valid.new_empty(b, layout.size(nxt))
                    sends.append(((me + 1) % world, valid))
                    recvs.append(((me - 1) % world, valid_n))
                wait = comm.p2p_start(sends, recvs, group, "ring.fwd")
            for qa, qb, kr, full in _blocks(layout, me, src, causal):
                rows = _rows(layout, me, qa, qb)
                ks = _keys(kv, layout, src, kr)
                mask = _keys(valid, layout, src, kr).bool() if valid is not None else None
                pat = None if full else GlobalView(Causal(), ((qa, qb),), kr, n)
                with torch.no_grad():
                    o, l_ = local_attend(q[:, :, rows], ks[..., :d], ks[..., d:], pat, scale, mask, engine)
                    assert l_ is not None  # asked for
                merge_into(out[:, :, rows], lse[:, :, rows], o, l_)
            wait()
            if i < world - 1:
                kv = kv_n
                if valid is not None:
                    valid = valid_n
        ctx.save_for_backward(q, k, v, out, lse, kpm)
        ctx.layout, ctx.causal, ctx.scale, ctx.group = layout, causal, scale, group
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zeros tensor for lse's gradient: it has none
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, _grad_lse: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse, kpm = ctx.saved_tensors
        layout, causal, scale, group = ctx.layout, ctx.causal, ctx.scale, ctx.group
        me, world = dist.get_rank(group), layout.world
        acc = out.dtype
        do = grad_out.to(acc)
        delta = (do * out).sum(-1)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = torch.cat([k, v], -1).contiguous()
        dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)
        valid = kpm.to(torch.uint8).contiguous() if kpm is not None else None
        b, hkv, d = k.shape[0], k.shape[1], k.shape[-1]
        for i in range(world):
            src = (me - i) % world
            for qa, qb, kr, _full in _blocks(layout, me, src, causal):
                rows = _rows(layout, me, qa, qb)
                ks = _keys(kv, layout, src, kr)
                ok = _allowed(qa, qb, kr, causal, _keys(valid, layout, src, kr).bool() if valid is not None else None,
                              q.device)
                gq, gk, gv = _block_grads(q[:, :, rows], ks[..., :d], ks[..., d:], do[:, :, rows], lse[:, :, rows],
                                          delta[:, :, rows], ok, scale, acc)
                dq[:, :, rows] += gq
                gkv, pos = torch.cat([gk, gv], -1), 0
                for a, c in (r for lo, hi in kr for r in layout.local(src, lo, hi)):
                    dkv[:, :, a:c] += gkv[:, :, pos:pos + c - a]
                    pos += c - a
            if world == 1:
                break
            nxt = (me - i - 1) % world
            sends = [((me + 1) % world, dkv)]
            dkv_n = dkv.new_empty(b, hkv, layout.size(nxt), dkv.shape[-1])
            recvs = [((me - 1) % world, dkv_n)]
            if i < world - 1:
                kv_n = kv.new_empty(b, hkv, layout.size(nxt), kv.shape[-1])
                sends.append(((me + 1) % world, kv))
                recvs.append(((me - 1) % world, kv_n))
                if valid is not None:
                    valid_n = valid.new_empty(b, layout.size(nxt))
                    sends.append(((me + 1) % world, valid))
                    recvs.append(((me - 1) % world, valid_n))
            comm.p2p(sends, recvs, group, "ring.bwd")
            dkv = dkv_n
            if i < world - 1:
                kv = kv_n
                if valid is not None:
                    valid = valid_n
        return (dq.to(q.dtype), dkv[..., :d].to(k.dtype), dkv[..., d:].to(v.dtype), None, None, None, None, None,
                None)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, *, causal: bool,
                   scale: float, key_padding_mask: torch.Tensor | None = None,
                   group: dist.ProcessGroup | None = None, engine: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (``causal=False``) or causal attention of the local shards by a ring; returns ``(out, lse)``.

    Padding tokens (``>= layout.n_real``) are never keys and their outputs are 0; ``key_padding_mask (B, n_local)``
    travels with the keys. ``lse`` (fp32, fp64 for fp64 inputs) is detached.
    """
    return RingAttention.apply(q, k, v, key_padding_mask, layout, causal, scale, group, engine)
