"""The block-sparse engine with a ``score_mod``: the tiles' attention through plain, differentiable PyTorch ops.

A FlexAttention-style ``score_mod(score, b, h, q_idx, kv_idx)`` rewrites each score before the softmax (ALiBi,
tanh soft-capping, relative-position tables). The fast chunk kernels of the block-sparse engine (PyTorch's fused
CPU flash-attention operators, the compiled kernel of ``nearfar.native``) take an additive mask, not a Python
function, so a call with a ``score_mod`` runs here instead. Each chunk of query tiles gathers its tiles' queries
and key lists, forms the scores ``(B, Hq, c, T, W)`` (``q . k * scale``), applies ``score_mod`` to them with the
tokens' own indices, adds the mask (0 / -inf, as the other chunk kernels) and the bias, and takes a safe softmax
(a query with no key gets 0 and LSE ``-inf``); nothing of size ``Nq x Nk`` is formed.

For training each chunk is recomputed in the backward pass (``torch.utils.checkpoint``, non-reentrant), so memory
stays one chunk's plus the outputs, and autograd differentiates everything: ``q``, ``k``, ``v``, the bias and every
tensor the ``score_mod`` captures (a learned relative-bias table, learned ALiBi slopes), as Flex does. Slower than
the fused paths: the price of an arbitrary function of the score.

Two sources of key lists: a plan (``nearfar.plan``: a static pattern's tiles and their exact masks) and run-time
blocks (``SelectedBlocks``: per item and head, joined with the pattern's blocks as ``flex_selected`` does).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
from torch.utils.checkpoint import checkpoint

from ..bias import BiasSource, DenseBias, RelativePositionBias
from ..mods import call_score_mod
from ..patterns import Pattern, PerHead
from ..plan import Plan, TileGroup
from ..selection import SelectedBlocks
from .kernels import acc_dtype

#: score-sized elements (scores, their exponentials, the probabilities) per chunk, about; a single tile may exceed it
_CHUNK_ELEMS = 1 << 20

#: (query index (c, T), key index (Bs, Hs, c, W), exact additive mask (Bs, Hs|1, c, T, W) when called: 0 where the
#: pair may attend, -inf elsewhere, empty query and key slots included)
Lists = tuple[torch.Tensor, torch.Tensor, Callable[[], torch.Tensor]]


def _bias_values(bias: BiasSource, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 nq: int) -> torch.Tensor:
    """The bias at broadcast (item, head, query, key) indices (differentiable)."""
    if isinstance(bias, DenseBias):
        b4 = bias.b4
        return b4[b * (b4.shape[0] > 1), h * (b4.shape[1] > 1), q * (b4.shape[2] > 1), k * (b4.shape[3] > 1)]
    assert isinstance(bias, RelativePositionBias)
    table = bias.tensor.reshape(bias.tensor.shape[0], -1)
    return table[h, bias.pattern.rpb_index(q, k, nq)]


def _heads(x: torch.Tensor, hkv: int, g: int) -> torch.Tensor:
    """A per-list tensor ``(Bs, Hs, c, ...)`` (``Hs`` 1, ``Hkv`` or ``Hq = Hkv * g``) in the chunk layout
    ``(Bs, Hs or Hkv, c, 1 or g, ...)``: query heads grouped under their KV head."""
    bs, hs, c, *rest = x.shape
    if hs in (1, hkv):
        return x.view(bs, hs, c, 1, *rest)
    return x.view(bs, hkv, g, c, *rest).transpose(2, 3)


def _chunk(q: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, hkv: int, lists: Lists, scale: float,
           score_mod: Callable | None, kpm: torch.Tensor | None,
           bias: BiasSource | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, Hq, c, T, dv), lse (B, Hq, c, T))`` of one chunk of query tiles. ``kf``/``vf``: the keys and values
    as rows ``(B * Hkv * Nk, e)``. Scores live as ``(B, Hkv, c, g, T, W)`` (a GQA group's queries under their KV
    head, so shared key lists are gathered once per KV head); the score_mod gets index tensors of that layout."""
    q_idx, k_idx, mask_fn = lists
    b, hq, nq, d = q.shape
    g, nk, dv = hq // hkv, kf.shape[0] // (b * hkv), vf.shape[-1]
    c, t = q_idx.shape
    acc = acc_dtype(q.dtype)
    dev = q.device
    qi = q_idx.clamp(min=0)
    ki = _heads(k_idx.clamp(min=0), hkv, g)  # (Bs, Hk, c, gk, W)
    gk, w = ki.shape[3], ki.shape[4]
    rows = ((torch.arange(b, device=dev).view(b, 1, 1, 1, 1) * hkv + torch.arange(hkv, device=dev).view(
        1, hkv, 1, 1, 1)) * nk + ki).reshape(-1)  # (B, Hkv, c, gk, W) rows of kf
    kc = kf.index_select(0, rows).view(b, hkv, c, gk, w, d).to(acc)
    vc = vf.index_select(0, rows).view(b, hkv, c, gk, w, dv).to(acc)
    qc = q.index_select(2, qi.reshape(-1)).view(b, hkv, g, c, t, d).transpose(2, 3).to(acc) * scale
    if gk == 1:  # one key list per KV head: its g query heads in one product
        s = torch.matmul(qc.reshape(b, hkv, c, g * t, d), kc[:, :, :, 0].transpose(-1, -2)).view(b, hkv, c, g, t, w)
    else:
        s = torch.matmul(qc, kc.transpose(-1, -2))  # (B, Hkv, c, g, T, W)
    b6 = torch.arange(b, device=dev).view(b, 1, 1, 1, 1, 1)
    h6 = (torch.arange(hkv, device=dev).view(hkv, 1) * g + torch.arange(g, device=dev)).view(1, hkv, 1, g, 1, 1)
    q6, k6 = qi.view(1, 1, c, 1, t, 1), ki[:, :, :, :, None, :]
    if score_mod is not None:
        s = call_score_mod(score_mod, s, b6, h6, q6, k6)
    # the mask is added, not applied with ``where``: a pass fewer over the scores; a masked score is finite here (the
    # guard keeps non-finite and huge inputs out of the engines) unless the score_mod makes it +inf or NaN. ``s`` is
    # then a fresh tensor of this function, so the rest runs in place
    s = s + _heads(mask_fn(), hkv, g)
    if kpm is not None:
        s.add_(kpm[b6[..., 0], ki][:, :, :, :, None, :])
    if bias is not None:
        s.add_(_bias_values(bias, b6, h6, q6, k6, nq).to(acc))
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=acc, device=dev))
    e = s.sub_(m).exp_()
    den = e.sum(-1, keepdim=True)
    if gk == 1:
        o = torch.matmul(e.view(b, hkv, c, g * t, w), vc[:, :, :, 0]).view(b, hkv, c, g, t, dv)
    else:
        o = torch.matmul(e, vc)
    # normalised on (T, dv), not on (T, W); a row with no key has e = 0 and divides by 1 (a tiny divisor would send
    # inf * 0 = NaN into the gradients)
    o = o / torch.where(den > 0, den, 1.0)
    lse = (m + den.detach().log())[..., 0]
    out = o.transpose(2, 3).reshape(b, hq, c, t, dv).to(q.dtype)
    return out, lse.transpose(2, 3).reshape(b, hq, c, t)


def run_lists(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: Iterator[Lists], nq: int, scale: float,
              score_mod: Callable | None, kpm: torch.Tensor | None, bias: BiasSource | None,
              return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention over chunks of query tiles with their key lists; every query is in exactly one tile."""
    train = torch.is_grad_enabled()  # also for a score_mod capturing a tensor that requires grad (not seen here)
    hkv = k.shape[1]
    kf, vf = k.reshape(-1, k.shape[-1]), v.reshape(-1, v.shape[-1])  # rows for index_select (a copy if strided)
    outs, lses, rows = [], [], []
    for lists in chunks:
        if train:
            out, lse = checkpoint(_chunk, q, kf, vf, hkv, lists, scale, score_mod, kpm, bias, use_reentrant=False)
        else:
            out, lse = _chunk(q, kf, vf, hkv, lists, scale, score_mod, kpm, bias)
        outs.append(out.flatten(2, 3))
        lses.append(lse.detach().flatten(2, 3))
        rows.append(lists[0].reshape(-1))
    flat = torch.cat(rows)
    used = flat >= 0
    inv = torch.empty(nq, dtype=torch.long, device=q.device)
    inv[flat[used]] = torch.nonzero(used)[:, 0]
    out = torch.cat(outs, 2).index_select(2, inv)
    lse = torch.cat(lses, 2).index_select(2, inv) if return_lse else None
    return out, lse


def _per_chunk(b: int, hq: int, t: int, w: int, d: int, dv: int) -> int:
    return max(1, _CHUNK_ELEMS // max(1, b * hq * (3 * t * w + w * (d + dv) + t * (d + dv))))


def _group_mask(plan: Plan, g: TileGroup, t0: int, t1: int) -> torch.Tensor:
    return plan.additive_mask(g, t0, t1)[None]


def plan_lists(plan: Plan, b: int, hq: int, d: int, dv: int) -> Iterator[Lists]:
    """The chunks of a plan's tile groups."""
    for g in plan.groups:
        step = _per_chunk(b, hq, plan.tile, g.width, d, dv)
        for t0 in range(0, len(g), step):
            t1 = min(len(g), t0 + step)
            yield g.q_idx[t0:t1], g.k_idx[None, :, t0:t1], functools.partial(_group_mask, plan, g, t0, t1)


def selected_lists(pattern: Pattern | None, blocks: SelectedBlocks, b: int, hq: int, hkv: int, nq: int, nk: int,
                   d: int, dv: int, dtype: torch.dtype) -> Iterator[Lists]:
    """Chunks of query blocks over the union of the selected blocks and the pattern's blocks (at the selection's
    block sizes), with the exact mask ``pattern | (selected & within)``."""
    table = blocks.block_table(nk)  # (Bt, Ht, QB, KB)
    per_head = pattern is not None and pattern.heads is not None
    if per_head and table.shape[1] != hq:
        table = table.repeat_interleave(hq // table.shape[1], 1)
    qt, kt = blocks.tiles(nq, nk)
    union = table
    if pattern is not None:
        static = pattern.block_allowed(qt, kt, nq, nk)
        union = table | (static if per_head else static[None])[None]
    kb, t = blocks.k_block, blocks.q_block
    count = union.sum(-1)
    s = max(1, int(count.max()))
    blk = torch.argsort((~union).to(torch.int8), dim=-1, stable=True)[..., :s]
    live = torch.arange(s, device=blk.device) < count[..., None]
    kpos = blk[..., None] * kb + torch.arange(kb, device=blk.device)
    kpos = torch.where(live[..., None] & (kpos < nk), kpos, -1).flatten(-2)  # (Bt, Hs, QB, W)
    qpos = qt.idx

    def exact(r0: int, r1: int, acc: torch.dtype) -> torch.Tensor:
        kp, qp = kpos[:, :, r0:r1], qpos[r0:r1]
        q5, k5 = qp.clamp(min=0)[None, None, :, :, None], kp.clamp(min=0)[:, :, :, None, :]
        ok = table[:, :, r0:r1].gather(-1, kp.clamp(min=0) // kb)[:, :, :, None, :]
        if blocks.within is not None:
            ok = ok & blocks.within.allowed(q5, k5, nq, nk)
        if per_head:
            assert isinstance(pattern, PerHead)
            q4, shape = qp.clamp(min=0)[None, :, :, None], (kp.shape[0], r1 - r0, qp.shape[1], kp.shape[-1])
            ok = ok | torch.stack([torch.broadcast_to(p.allowed(q4, k5[:, i], nq, nk), shape)
                                   for i, p in enumerate(pattern.patterns)], 1)
        elif pattern is not None:
            ok = ok | pattern.allowed(q5, k5, nq, nk)
        ok = ok & (kp >= 0)[:, :, :, None, :] & (qp >= 0)[None, None, :, :, None]
        return torch.where(ok, 0.0, float("-inf")).to(acc)

    step = _per_chunk(b, hq, t, kpos.shape[-1], d, dv)
    acc = acc_dtype(dtype)
    for r0 in range(0, qpos.shape[0], step):
        r1 = min(qpos.shape[0], r0 + step)
        yield qpos[r0:r1], kpos[:, :, r0:r1], functools.partial(exact, r0, r1, acc)


def scored_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan | None, scale: float,
                     score_mod: Callable | None, kpm: torch.Tensor | None = None, bias: BiasSource | None = None,
                     return_lse: bool = False, pattern: Pattern | None = None,
                     blocks: SelectedBlocks | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention with a ``score_mod`` over a plan's tiles, or (``blocks`` given) over run-time key blocks joined
    with ``pattern`` (which may be a ``PerHead``, unlike on ``nearfar.backends.selected``). ``kpm``: additive
    ``(B, Nk)`` float mask (0 / -inf); ``bias``: a bias source; ``score_mod`` None: plain scores."""
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    if blocks is not None:
        chunks = selected_lists(pattern, blocks, b, hq, hkv, nq, nk, d, dv, q.dtype)
    else:
        assert plan is not None
        chunks = plan_lists(plan, b, hq, d, dv)
    return run_lists(q, k, v, chunks, nq, scale, score_mod, kpm, bias, return_lse)
