"""The block-sparse engine on the compiled CPU kernel (``nearfar/csrc/sparse_attention.cpp``).

The kernel reads q/k/v in place and walks each query tile's key list in sub-blocks of ``kb`` keys with an online
softmax, skipping the sub-blocks no query of the tile sees and the rows of a sub-block that see none of its keys.
What it needs besides the tensors is data-independent and made once per plan (cached with it): each tile's key list
in ascending key order (so a 2D/3D box is read row by row and a sub-block spans few query rows of the tile), the
exact mask in the same order, and per (tile, sub-block) the live row range and whether every pair in it is allowed.

It covers the plan-based block-sparse path: float32, bfloat16 and float16 inputs (float32 accumulation), GQA,
per-head patterns, key padding, and a bias with its gradient. A relative-position table (NAT/DiNAT, windows) is
looked up by the kernel itself through a per-plan index, and its gradient is added into one small copy of the table
per work item, so it costs no memory per call; any other bias is looked up into a (B', H', c, W, T) block per call
and its score gradients come back the same way, in calls of at most ``_BIAS_BYTES``. float64 and other devices
keep the PyTorch path.

dK/dV (sums over every tile that lists a key) accumulate in float32 per (batch, kv head) owner, each owned by one
thread at a time, so no atomics. float32 inputs add into float32 accumulators ``(nsplit, B, Hkv, Nk, e)``, one
kernel call per tile group: with ``nsplit = 1`` they are the gradients themselves; with fewer owners than threads an
owner's tiles are split over ``nsplit`` of them and summed after. Half-precision inputs with ``nsplit = 1`` (and no
per-call bias blocks) run every tile group in one call (``backward_owned``) and sum each owner in a float32
``(Nk, d + dv)`` scratch slot per thread, written once into bfloat16/float16 gradients: the same float32 sum rounded
once, without float32 copies of the gradients' size (``benchmarks/memory.py --dtype bfloat16``, one thread:
forward+backward peak 1.07-1.18x dense SDPA's, was 1.27-1.36x; the rest is the scratch slot, which the fused SDPA
kernel keeps out of the meter's sight). Other half-precision calls keep the float32 accumulators.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .. import native
from ..bias import BiasSource, RelativePositionBias
from ..patterns import Blocks
from ..plan import Plan, TileGroup, get_plan
from .kernels import unit_last

#: keys per sub-block (fixed in the kernel: one 64-bit mask word per query row); 16 and 32 were slower at C1-C3
#: (more, smaller matrix products), 128 no faster
KB = 64
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class NativeGroup:
    q_idx: torch.Tensor  # (c, T) int64
    k_idx: torch.Tensor  # (Hp, c, W) int64, ascending, -1 last
    bits: torch.Tensor  # (Hp, c, W, ceil(T/64)) int64: bit r of word w = query row 64w+r of the tile sees the key
    rows: torch.Tensor  # (Hp, c, nsub, 2) int32: [r0, r1) tile rows that see any key of the sub-block
    full: torch.Tensor  # (Hp, c, nsub) bool: every pair of the sub-block's rows [r0, r1) is allowed
    #: per tile range of a kernel call: what a bias source memoises (e.g. the relative-position index)
    memos: dict = field(default_factory=dict)


def supports(q: torch.Tensor) -> bool:
    """Whether the compiled kernel can run this call (and is built and loaded)."""
    return q.device.type == "cpu" and q.dtype in DTYPES and native.available()


def pack_rows(mask: torch.Tensor) -> torch.Tensor:
    """(..., T, W) bool -> (..., W, ceil(T/64)) int64 words, bit r of word w = row 64w + r (little-endian bytes, as
    the kernel reads them)."""
    *lead, t, w = mask.shape
    nw = -(-t // 64)
    m = mask.reshape(-1, t, w)
    rows = torch.nn.functional.pad(m, (0, 0, 0, nw * 64 - t)).view(m.shape[0], nw, 8, 8, w).to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)[:, None]
    byte = (rows * weights).sum(3, dtype=torch.uint8)  # (n, nw, 8, W)
    out = torch.empty(m.shape[0], w, nw, 8, dtype=torch.uint8, device=mask.device)  # fresh: standard strides
    return out.copy_(byte.permute(0, 3, 1, 2)).view(torch.int64).view(*lead, w, nw)


def live_rows(mask: torch.Tensor, kb: int = KB) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sub-block of ``kb`` keys of ``mask (Hp, c, T, W)`` (keys in list order): whether any tile row sees one of
    its keys, and the first row that does and one past the last (both 0 where none does), each ``(Hp, c, nsub)``:
    the rows the kernel scores for that sub-block."""
    hp, c, t, w = mask.shape
    nsub = -(-w // kb)
    live = torch.nn.functional.pad(mask, (0, nsub * kb - w)).view(hp, c, t, nsub, kb).any(-1)  # (Hp, c, T, nsub)
    any_row = live.any(2)
    r0 = torch.where(any_row, live.int().argmax(2), 0)
    r1 = torch.where(any_row, t - live.flip(2).int().argmax(2), 0)
    return any_row, r0, r1


def _chunk(plan: Plan, g: TileGroup, t0: int, t1: int, kb: int) -> tuple[torch.Tensor, ...]:
    k = g.k_idx[:, t0:t1]
    order = torch.argsort(torch.where(k < 0, plan.nk, k), dim=-1, stable=True)
    k = k.gather(-1, order)
    mask = plan.allowed(g, t0, t1, keep=False)  # packed into bits below: the plan need not hold it
    mask = mask.gather(-1, order[:, :, None, :].expand_as(mask))
    hp, c, t, w = mask.shape
    nsub = -(-w // kb)
    allowed = torch.nn.functional.pad(mask, (0, nsub * kb - w), value=True).view(hp, c, t, nsub, kb).all(-1)
    any_row, r0, r1 = live_rows(mask, kb)
    ar = torch.arange(t)[None, None, :, None]
    in_range = (ar >= r0[:, :, None]) & (ar < r1[:, :, None])  # (Hp, c, T, nsub)
    full = (allowed | ~in_range).all(2) & any_row
    return k, pack_rows(mask), torch.stack([r0, r1], -1).to(torch.int32), full


def _group(plan: Plan, g: TileGroup, kb: int) -> NativeGroup:
    """The kernel's arrays for one tile group, made a few MB of mask at a time (a 1M-token plan has 8,192 tiles)."""
    hp, c, w = g.k_idx.shape
    step = max(1, (4 << 20) // max(1, hp * plan.tile * w))
    parts = [_chunk(plan, g, t0, min(c, t0 + step), kb) for t0 in range(0, c, step)]
    k, bits, rows, full = (torch.cat([p[i] for p in parts], 1).contiguous() for i in range(4))
    return NativeGroup(g.q_idx.contiguous(), k, bits, rows, full)


def groups(plan: Plan, kb: int = KB) -> list[NativeGroup]:
    key = ("native", kb)
    out = plan.engine_cache.get(key)
    if out is None:
        out = [_group(plan, g, kb) for g in plan.groups]
        size = sum(x.q_idx.numel() * 8 + x.k_idx.numel() * 8 + x.bits.numel() * 8 + x.rows.numel() * 4
                   + x.full.numel() for x in out)
        plan.engine_cache.put(key, out, size)
    return out


#: extra float32 dK/dV accumulators (beyond the gradients themselves) a backward call may hold
_SPLIT_BYTES = 64 << 20


def splits(b: int, hkv: int, nk: int, e: int) -> int:
    """dK/dV accumulators: one per (batch, kv head) owner, so no two threads add into the same rows; more when there
    are fewer owners than threads (the tiles are then split over them), as many as ``_SPLIT_BYTES`` allows (a
    1M-token single-head backward would otherwise hold two more copies of dK and dV: it runs on one thread)."""
    threads = torch.get_num_threads()
    if b * hkv >= threads:
        return 1
    extra = max(1, b * hkv * nk * e * 4)
    return max(1, min(-(-threads // (b * hkv)), 1 + _SPLIT_BYTES // extra))


def kv_grads(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed float32 dK/dV accumulators ``(nsplit, B, Hkv, Nk, e)`` of a backward pass (``splits``)."""
    b, hkv, nk, d = k.shape
    s = splits(b, hkv, nk, d + v.shape[-1])
    f32 = torch.float32
    return torch.zeros(s, b, hkv, nk, d, dtype=f32), torch.zeros(s, b, hkv, nk, v.shape[-1], dtype=f32)


def owned_grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a backward pass adds dK/dV straight into gradients of q's dtype (``backward_owned``): half-precision
    inputs with one accumulator split. Their float32 sums are then formed in ``kv_scratch`` (per thread, not per
    owner) and rounded once; float32 inputs (whose accumulator is the gradient) and split owners keep ``kv_grads``."""
    b, hkv, nk, d = k.shape
    return q.dtype != torch.float32 and splits(b, hkv, nk, d + v.shape[-1]) == 1


def kv_scratch(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``backward_owned``'s float32 dK/dV sums: one ``(Nk, d + dv)`` slot per thread that runs an owner (the
    kernel zeroes a slot at each owner's start). A tensor rather than memory inside the kernel, so that memory
    meters see it."""
    b, hkv, nk, d = k.shape
    slots = max(1, min(torch.get_num_threads(), b * hkv))
    return torch.empty(slots, nk, d + v.shape[-1], dtype=torch.float32, device=k.device)


def summed(dk: torch.Tensor, dv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The accumulators of ``kv_grads`` summed over their splits, in place (no third copy)."""
    for i in range(1, dk.shape[0]):
        dk[0] += dk[i]
        dv[0] += dv[i]
    return dk[0], dv[0]


#: bias values (and their gradients) of one kernel call: tile groups with a bias run in calls of this many bytes
_BIAS_BYTES = 32 << 20


def _table(bias: BiasSource | None, plan: Plan) -> RelativePositionBias | None:
    """A relative-position table the kernel looks up itself (no bias block per call), or None."""
    return bias if isinstance(bias, RelativePositionBias) and plan.heads == 1 else None


def _rpb_index(rpb: RelativePositionBias, g: NativeGroup, t0: int, t1: int) -> torch.Tensor:
    """(c, W, T rounded up to 16) int32 table index of tiles t0:t1, cached with the plan."""
    memo = g.memos.setdefault((t0, t1), {})
    key = ("rpb", rpb.pattern, rpb.n)
    if key not in memo:
        q = g.q_idx[t0:t1].clamp(min=0)[:, :, None]
        k = g.k_idx[0, t0:t1].clamp(min=0)[:, None, :]
        idx = rpb.pattern.rpb_index(q, k, rpb.n).transpose(1, 2)  # (c, W, T)
        pad = -(-idx.shape[2] // 16) * 16 - idx.shape[2]
        memo[key] = torch.nn.functional.pad(idx, (0, pad)).to(torch.int32).contiguous()
    return memo[key]


def _calls(g: NativeGroup, tile: int, b: int, hq: int, bias: BiasSource | None) -> list[tuple[int, int]]:
    """Tile ranges of one group's kernel calls: the whole group, or bias-sized pieces of it."""
    c, w = g.q_idx.shape[0], g.k_idx.shape[2]
    if bias is None:
        return [(0, c)]
    step = max(1, _BIAS_BYTES // (b * hq * w * (-(-tile // 16) * 16) * 4))
    return [(t0, min(c, t0 + step)) for t0 in range(0, c, step)]


def _bias_tile(bias: BiasSource, g: NativeGroup, t0: int, t1: int) -> torch.Tensor:
    """The bias of tiles t0:t1 as the kernel reads it: (B', H', c, W, T rounded up to 16), float32."""
    memo = g.memos.setdefault((t0, t1), {})
    t = bias.tile(g.q_idx[t0:t1], g.k_idx[:, t0:t1], memo).to(torch.float32)  # (B', H', c, T, W)
    pad = -(-t.shape[3] // 16) * 16 - t.shape[3]
    return torch.nn.functional.pad(t.transpose(3, 4), (0, pad)).contiguous()


def _slices(g: NativeGroup, t0: int, t1: int) -> tuple[torch.Tensor, ...]:
    """Tiles t0:t1 of a group as the kernel takes its lists: one batch item, ``q_idx`` shared by the heads."""
    if t0 == 0 and t1 == g.q_idx.shape[0]:
        parts = (g.q_idx[None], g.k_idx, g.bits, g.rows, g.full)
    else:
        parts = (g.q_idx[None, t0:t1], g.k_idx[:, t0:t1], g.bits[:, t0:t1], g.rows[:, t0:t1], g.full[:, t0:t1])
    return tuple(x.contiguous()[None] for x in parts)


def plan_lists(plan: Plan) -> list[tuple[torch.Tensor, ...]]:
    """The kernel's list arrays ``(q_idx, k_idx, bits, rows, full)`` of every tile group of a plan (no bias)."""
    return [_slices(g, 0, g.q_idx.shape[0]) for g in groups(plan)]


def grad_like(x: torch.Tensor) -> torch.Tensor:
    """An empty gradient for ``x (B, H, N, d)`` in the kernel's output layout: ``x``'s own strides where it is
    contiguous (autograd then keeps it as a leaf's ``.grad``; other strides cost a copy there, 2.6% of C2's
    forward+backward), else ``(B, N, H, d)`` memory, which a head merge or a fused projection's gradient reads as
    rows."""
    if x.is_contiguous():
        return torch.empty_like(x)
    b, h, n, d = x.shape
    return x.new_empty(b, n, h, d).transpose(1, 2)


class _Native(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_tensor: torch.Tensor | None,
                plan: Plan, scale: float, kpm: torch.Tensor | None,
                bias: BiasSource | None) -> tuple[torch.Tensor, torch.Tensor]:
        b, hq, nq, _ = q.shape
        # (B, N, H, dv) memory, as PyTorch's fused CPU SDPA returns it: merging the heads after is then a view
        out = q.new_empty(b, nq, hq, v.shape[-1]).transpose(1, 2)
        lse = torch.empty(b, hq, nq, dtype=torch.float32, device=q.device)
        rpb = _table(bias, plan)
        table = rpb.tensor.reshape(hq, -1).to(torch.float32).contiguous() if rpb is not None else None
        blocks = bias if rpb is None else None
        for g in groups(plan):
            for t0, t1 in _calls(g, plan.tile, b, hq, blocks):
                bt = _bias_tile(blocks, g, t0, t1) if blocks is not None else None
                ix = _rpb_index(rpb, g, t0, t1) if rpb is not None else None
                torch.ops.nearfar_native.forward(q, k, v, *_slices(g, t0, t1), kpm, bt, table, ix, scale, False, 0,
                                                 False, out, lse)
        ctx.plan, ctx.scale, ctx.kpm, ctx.bias, ctx.table = plan, scale, kpm, bias, table
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zeros tensor for lse's gradient: it has none
        return out, lse

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, _grad_lse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        b, hkv = k.shape[:2]
        hq = q.shape[1]
        dq = grad_like(q)
        do = unit_last(grad_out.to(q.dtype))
        bias: BiasSource | None = ctx.bias
        train_bias = bias is not None and bias.requires_grad
        if bias is not None and train_bias:
            bias.zero_grad()
        rpb = _table(bias, ctx.plan)
        blocks = bias if rpb is None else None
        if blocks is None and owned_grads(q, k, v):
            # every tile group in one kernel call: each owner's dK/dV sum is complete in its thread's scratch
            dk, dv = torch.empty(k.shape, dtype=k.dtype), torch.empty(v.shape, dtype=v.dtype)
            dtable = torch.zeros(b * hkv, hq, ctx.table.shape[1]) if rpb is not None and train_bias else None
            gs = groups(ctx.plan)
            lists = [_slices(g, 0, g.q_idx.shape[0]) for g in gs]
            ixs = [_rpb_index(rpb, g, 0, g.q_idx.shape[0]) for g in gs] if rpb is not None else []
            torch.ops.nearfar_native.backward_owned(q, k, v, out, do, lse, *(list(x) for x in zip(*lists)), ctx.kpm,
                                                    ctx.table, ixs, ctx.scale, dq, dk, dv, kv_scratch(k, v), dtable)
        else:
            dk, dv, dtable = _split_backward(ctx, q, k, v, out, do, lse, dq, rpb, blocks, train_bias)
        if dtable is not None:
            assert bias is not None and bias.grad is not None
            bias.grad += dtable.sum(0).reshape(bias.grad.shape).to(bias.grad.dtype)
        dbias = None
        if train_bias:
            assert bias is not None and bias.grad is not None
            dbias = bias.grad.to(bias.tensor.dtype).reshape(bias.tensor.shape)
        return dq, dk.to(k.dtype), dv.to(v.dtype), dbias, None, None, None, None


def _split_backward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    do: torch.Tensor, lse: torch.Tensor, dq: torch.Tensor, rpb: RelativePositionBias | None,
                    blocks: BiasSource | None,
                    train_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """dK/dV in ``kv_grads``' float32 accumulators, one kernel call per tile group (and bias piece); fills ``dq``.
    Returns the summed (dk, dv) and the table gradient's per-work-item copies (or None)."""
    b, hkv = k.shape[:2]
    hq = q.shape[1]
    dk, dv = kv_grads(k, v)
    s = dk.shape[0]
    dtable = torch.zeros(b * hkv * s, hq, ctx.table.shape[1]) if rpb is not None and train_bias else None
    for g in groups(ctx.plan):
        for t0, t1 in _calls(g, ctx.plan.tile, b, hq, blocks):
            bt = _bias_tile(blocks, g, t0, t1) if blocks is not None else None
            ix = _rpb_index(rpb, g, t0, t1) if rpb is not None else None
            db = None
            if train_bias and blocks is not None:
                t = ctx.plan.tile
                db = torch.zeros(b, hq, t1 - t0, g.k_idx.shape[2], -(-t // 16) * 16, dtype=torch.float32)
            torch.ops.nearfar_native.backward(q, k, v, out, do, lse, *_slices(g, t0, t1), ctx.kpm, bt, ctx.table,
                                              ix, ctx.scale, False, 0, dq, dk, dv, db, dtable)
            if db is not None:
                assert blocks is not None
                ds = db[..., :ctx.plan.tile].transpose(3, 4)  # (B, Hq, c, T, W)
                blocks.accumulate(g.q_idx[t0:t1], g.k_idx[:, t0:t1], ds, g.memos.setdefault((t0, t1), {}))
    dk, dv = summed(dk, dv)
    return dk, dv, dtable


def native_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, scale: float,
                     kpm: torch.Tensor | None = None,
                     bias: BiasSource | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``; ``kpm`` an additive (B, Nk) mask, ``bias`` a bias source (dense or relative-position table,
    with its gradient). A query with no allowed key gets 0 and lse = -inf."""
    if not native.available():
        raise RuntimeError(native.status())
    if kpm is not None:
        kpm = kpm.to(torch.float32).expand(q.shape[0], k.shape[2]).contiguous()
    bias_tensor = bias.tensor if bias is not None else None
    out, lse = _Native.apply(unit_last(q), unit_last(k), unit_last(v), bias_tensor, plan, float(scale), kpm, bias)
    return out, lse


#: dense attention of many short sequences (the windows ``WindowBatch`` cuts a window module's input into; ``attend``
#: with a window pattern reaches the kernel through its plan instead, ``dispatch.choose_engine``) runs on the
#: kernel, one query tile per window (K/V read once per window), where it was measured faster than SDPA's fused
#: CPU kernel: per dtype the fewest and most tokens per window and the widest head. 2026-12-08, 2 threads, 25,088
#: tokens in windows of T, q/k/v strided views of a fused projection, A/B alternated:
#: - float32, heads of 16 and 32 (3, 6 and 8 heads), T = 196-1,024: forward 1.03-1.58x SDPA's speed,
#:   forward+backward 1.03-1.75x; heads of 64 tie (0.94-1.17x) and stay on SDPA; up to 144 tokens the window
#:   kernel (``windows``) is faster than both;
#: - bfloat16 and float16 (which the window kernel does not take), heads of 32 and 64, T = 49-1,024: forward
#:   1.09-2.5x, forward+backward 3.2-9.1x (SDPA's half-precision CPU backward is slow).
#: Past 1,024 tokens one tile's buffers outgrow the L2 cache.
DENSE_WINDOWS = {torch.float32: (145, 1024, 32), torch.bfloat16: (1, 1024, 64), torch.float16: (1, 1024, 64)}


def dense_windows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Unmasked attention of every sequence of ``q (B, H, T, d)`` over ``k``, ``v`` of the same shape, on the
    kernel where it is measured faster than SDPA (``DENSE_WINDOWS``, eager); None elsewhere, for the caller's SDPA
    call."""
    t, d = q.shape[-2], q.shape[-1]
    fewest, most, widest = DENSE_WINDOWS.get(q.dtype, (1, 0, 0))
    if not (supports(q) and fewest <= t <= most and d <= widest and k.shape == q.shape and v.shape == q.shape
            and not torch.compiler.is_compiling()):
        return None
    return native_attention(q, k, v, get_plan(Blocks(t), t, t, device=q.device), scale)[0]


def density(plan: Plan) -> float:
    """Fraction of the dense ``Nq x Nk`` scores the kernel computes for this plan (live sub-blocks, their query
    columns rounded to the vector width): what ``auto`` weighs against the dense engine."""
    key = ("native-density",)
    got = plan.engine_cache.get(key)
    if got is None:
        work = 0
        for g in groups(plan):
            r = g.rows.long()
            work += int(((r[..., 1] - r[..., 0]).clamp(min=0)).sum()) * KB
        got = work / max(1, plan.nq * plan.nk * plan.heads)
        plan.engine_cache.put(key, got, 64)
    return got
