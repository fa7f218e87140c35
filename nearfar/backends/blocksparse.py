"""Block-sparse engine: attention over each query tile's exact key list, in cache-sized chunks.

Each query tile (a compact box of tokens, see ``nearfar.plan``) gathers its ``W`` keys and values and runs
one small dense attention with the tile's mask. Tiles of similar width form groups; chunks of a group are
processed one at a time, so memory stays O(N·d) for inputs and outputs plus the gathered operands of one
chunk; nothing of size N² is ever formed. The backward pass is flash-style: it keeps only the output and
the log-sum-exp and recomputes each chunk.

Two chunk kernels: ``fused`` calls PyTorch's CPU flash-attention operator (forward and backward, with an
additive mask) and is the default on CPU; ``matmul`` is plain PyTorch (any device, and the one the backward
pass uses when a bias needs a gradient, since the fused operator returns none for its mask; the forward
pass stays fused, as the backward recomputes the scores anyway).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..bias import BiasSource
from ..plan import Plan, TileGroup
from .kernels import (
    acc_dtype,
    equal_head_dims,
    fused_available,
    fused_mask,
    index_add,
    matmul_backward,
    matmul_forward,
    unit_last,
)
from .native import native_attention
from .native import supports as native_supports

_CHUNK_BYTES = int(os.environ.get("NEARFAR_CHUNK_BYTES", 16 << 20))






@dataclass
class Chunk:
    """Tiles ``t0:t1`` of one group: what a bias source needs to produce or absorb its values."""

    group: TileGroup
    t0: int
    t1: int
    view: tuple[int, int] | None  # (first key, spacing) when K/V can be read as a strided view
    index: torch.Tensor  # flat gather index of the chunk's key lists (see ``Problem._gather_index``)
    memo: dict = field(default_factory=dict)  # data-independent values of bias sources (e.g. the rpb index)

    @property
    def size(self) -> int:
        return self.t1 - self.t0

    @property
    def tiles(self) -> torch.Tensor:
        return self.group.tiles[self.t0:self.t1]

    @property
    def q_idx(self) -> torch.Tensor:
        return self.group.q_idx[self.t0:self.t1]

    @property
    def k_idx(self) -> torch.Tensor:
        return self.group.k_idx[:, self.t0:self.t1]

    def tile_slice(self) -> slice | None:
        if not self.group.contiguous:
            return None
        first = int(self.group.tiles[0])
        return slice(first + self.t0, first + self.t1)


class Problem:
    """Everything one call needs besides q/k/v: the plan, layout modes, extra masks and the bias."""

    def __init__(self, plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 kpm: torch.Tensor | None = None, bias: BiasSource | None = None, kernel: str = "auto"):
        self.plan = plan
        b, hq, nq, d = q.shape
        hkv = k.shape[1]
        self.b, self.hq, self.hkv, self.d, self.dv = b, hq, hkv, d, v.shape[-1]
        self.nk = k.shape[2]
        self.per_head = plan.heads > 1
        # compute heads Hx and query-group gx: shared key lists keep GQA groups together (one gather per
        # kv head); per-head key lists need K/V per query head
        self.hx, self.gx = (hq, 1) if self.per_head else (hkv, hq // hkv)
        self.scale = scale
        self.kpm = kpm
        self.bias = bias
        need_bias_grad = bias is not None and bias.requires_grad and torch.is_grad_enabled()
        if kernel == "auto":
            kernel = "fused" if fused_available(q.device) and d == self.dv else "matmul"
        self.kernel = kernel
        self.backward_kernel = "matmul" if need_bias_grad else kernel
        # half-precision inputs are computed in float32 chunk by chunk on CPU: more accurate, and AVX2 CPUs have
        # no fast half-precision matmul anyway
        half = q.dtype in (torch.float16, torch.bfloat16)
        self.compute_dtype = torch.float32 if half and q.device.type == "cpu" else q.dtype
        self.grad_dtype = torch.float32 if half else q.dtype  # dK/dV accumulate over tiles
        self._q_identity = plan.q_in_order
        key = (b, self.hx, d, self.dv, q.element_size(), self.per_head, _CHUNK_BYTES)
        self.chunks = plan.engine_cache.get(key)
        if self.chunks is None:
            self.chunks = self._make_chunks(q.element_size())
            # charged: the gather indices, and the rpb index a bias source may memoise per chunk (c*T*W int64)
            size = sum(ch.index.numel() * 8 + ch.size * plan.tile * ch.group.width * 8 for ch in self.chunks)
            plan.engine_cache.put(key, self.chunks, size)
        # "direct" layouts read chunks as strided views of (B, H, N, e) tensors instead of packing copies:
        # queries in tile order (the caller's tensor itself when tokens are already in tile order), and
        # keys/values when most chunks read evenly spaced runs of keys (1D windows)
        self.direct_q = b == 1 and self.gx == 1
        # the caller's K/V need no token-major copy when every chunk reads runs of them (1D windows)
        self.direct_kv = not self.per_head and all(ch.view is not None and ch.group.stage is None
                                                   for ch in self.chunks)

    def _make_chunks(self, elsize: int) -> list[Chunk]:
        out = []
        for g in self.plan.groups:
            per_tile = self.b * self.hx * g.width * (self.d + self.dv) * elsize
            size = max(1, _CHUNK_BYTES // max(1, per_tile))
            starts = g.run_start.tolist() if g.run_start is not None and self.b == 1 and not self.per_head else None
            for t0 in range(0, len(g), size):
                t1 = min(len(g), t0 + size)
                view = None
                if starts is not None:
                    s = starts[t0:t1]
                    step = s[1] - s[0] if len(s) > 1 else 0
                    if min(s) >= 0 and step >= 0 and all(y - x == step for x, y in zip(s, s[1:])):
                        view = (s[0], step)
                out.append(Chunk(g, t0, t1, view, self._gather_index(g.k_idx[:, t0:t1])))
        return out

    # ----- query-side layout: (B, nT, Hx, gx*T, ...) packed, or the caller's (1, H, nT*T, ...) when direct -----
    def to_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Hq, Nq, e) -> tile layout, empty slots zero."""
        plan = self.plan
        b, _, n, e = x.shape
        if self._q_identity:  # tokens already in tile order: only pad the last tile
            extra = plan.num_tiles * plan.tile - n
            xt = torch.nn.functional.pad(x, (0, 0, 0, extra)) if extra else x
        else:
            src = torch.where(plan.q_idx < 0, n, plan.q_idx).reshape(-1)
            xt = torch.cat([x, x.new_zeros(b, self.hq, 1, e)], 2).index_select(2, src)
        if self.direct_q:
            return xt.contiguous()
        xt = xt.view(b, self.hx, self.gx, plan.num_tiles, plan.tile, e).permute(0, 3, 1, 2, 4, 5)
        return xt.reshape(b, plan.num_tiles, self.hx, self.gx * plan.tile, e)

    def from_tiles(self, xt: torch.Tensor) -> torch.Tensor:
        """Inverse of ``to_tiles`` for the occupied slots: -> (B, Hq, Nq, e)."""
        plan = self.plan
        if self.direct_q:
            return xt[:, :, :plan.nq] if self._q_identity else xt.index_select(2, plan.q_inv)
        b, e = xt.shape[0], xt.shape[-1]
        x = xt.view(b, plan.num_tiles, self.hx, self.gx, plan.tile, e).permute(0, 2, 3, 1, 4, 5)
        x = x.reshape(b, self.hq, plan.num_tiles * plan.tile, e)
        return x[:, :, :plan.nq] if self._q_identity else x.index_select(2, plan.q_inv)

    def _tile_view(self, xt: torch.Tensor) -> torch.Tensor:
        """Direct layout (1, H, nT*T, ...) seen as (H, nT, T, ...)."""
        return xt.view(xt.shape[1], self.plan.num_tiles, self.plan.tile, *xt.shape[3:])

    def read(self, xt: torch.Tensor, ch: Chunk) -> torch.Tensor:
        """The chunk's rows of a tile-layout tensor, as (B*c, Hx, gx*T, ...)."""
        sl = ch.tile_slice()
        if self.direct_q:
            v = self._tile_view(xt)
            return (v[:, sl] if sl is not None else v.index_select(1, ch.tiles)).transpose(0, 1)
        x = xt[:, sl] if sl is not None else xt.index_select(1, ch.tiles)
        return x.reshape(self.b * ch.size, *xt.shape[2:])

    def write(self, xt: torch.Tensor, ch: Chunk, value: torch.Tensor) -> None:
        sl = ch.tile_slice()
        value = value.to(xt.dtype)  # half-precision inputs are computed in float32; index_copy_ does not cast
        if self.direct_q:
            v = self._tile_view(xt)
            value = value.reshape(ch.size, *v.shape[:1], *v.shape[2:]).transpose(0, 1)
            if sl is not None:
                v[:, sl] = value
            else:
                v.index_copy_(1, ch.tiles, value)
            return
        value = value.reshape(self.b, ch.size, *xt.shape[2:])
        if sl is not None:
            xt[:, sl] = value
        else:
            xt.index_copy_(1, ch.tiles, value)

    # ----- key/value side: token-major (B, Nk, Hx, e) copies, or the caller's (B, Hkv, Nk, e) when direct -----
    def kv_tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.direct_kv:
            return x.contiguous()
        if self.hx != x.shape[1]:
            x = x.repeat_interleave(self.hq // self.hkv, dim=1)
        return x.transpose(1, 2).contiguous()

    def kv_untokens(self, xt: torch.Tensor) -> torch.Tensor:
        """Gradient in ``kv_tokens`` layout -> (B, Hkv, Nk, e)."""
        if self.direct_kv:
            return xt
        x = xt.transpose(1, 2)
        if self.hx != self.hkv:  # per-head key lists expanded K/V to query heads: fold the groups back
            x = x.reshape(self.b, self.hkv, -1, *x.shape[2:]).sum(2)
        return x

    def compute(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Chunk operands in the compute dtype with unit last-dim stride: PyTorch's CPU flash-attention operators
        (forward and backward) silently return wrong values for a view whose last dim is strided, e.g. a fused
        qkv projection seen as ``(3, B, H, N, d)`` from a ``(..., d, 3)`` layout (issue 16)."""
        return tuple(unit_last(x.to(self.compute_dtype)) for x in xs)

    def _gather_index(self, k_idx: torch.Tensor) -> torch.Tensor:
        # padding slots read key 0: the mask excludes them, so they add nothing forward or backward
        kpos = k_idx.clamp(min=0)
        if not self.per_head:
            return kpos[0].reshape(-1)
        heads = torch.arange(self.hx, device=kpos.device)
        return (kpos.permute(1, 2, 0) * self.hx + heads).reshape(-1)

    def _windows(self, src: torch.Tensor, first: int, step: int, c: int, w: int) -> torch.Tensor:
        """Tiles reading keys ``first + t*step + [0, w)`` of ``src``, as a strided (c, Hx, w, e) view."""
        if self.direct_kv:  # (B=1, Hx, n, e)
            _, hx, n, e = src.shape
            return src.as_strided((c, hx, w, e), (step * e, n * e, e, 1), src.storage_offset() + first * e)
        _, _, hx, e = src.shape  # token-major (B=1, n, Hx, e)
        return src.as_strided((c, hx, w, e), (step * hx * e, e, hx * e, 1), src.storage_offset() + first * hx * e)

    def stage(self, xt: torch.Tensor, g: TileGroup) -> torch.Tensor | None:
        """A staged group's keys (or values) in stage order, read once for all its chunks (see ``plan._staged``)."""
        if g.stage is None or self.b != 1:
            return None
        return xt.index_select(2 if self.direct_kv else 1, g.stage)

    def gather(self, xt: torch.Tensor, index: torch.Tensor, ch: Chunk,
               staged: torch.Tensor | None = None) -> torch.Tensor:
        """K or V of the chunk's key lists as (B*c, Hx, W, e): a strided view for evenly spaced runs, else a copy."""
        w = ch.group.width
        if ch.view is not None:  # runs of the keys themselves, or of the group's staged copy
            src = staged if ch.group.stage is not None else xt
            assert src is not None  # a view is made only for B == 1, where a staged group has its copy
            return self._windows(src, *ch.view, ch.size, w)
        if self.direct_kv:
            b, hx, n, e = xt.shape
            g = xt.index_select(2, index).view(b, hx, ch.size, w, e).transpose(1, 2)
            return g.reshape(b * ch.size, hx, w, e)
        b, _, hx, e = xt.shape
        src = xt.view(b, -1, e) if self.per_head else xt
        return src.index_select(1, index).view(b * ch.size, w, hx, e).transpose(1, 2)

    def scatter_add(self, dst: torch.Tensor, index: torch.Tensor, grad: torch.Tensor, ch: Chunk,
                    staged: torch.Tensor | None = None) -> None:
        """Add a chunk's K or V gradient back: into the staged copy when there is one (see ``stage``)."""
        if ch.view is not None and (ch.size == 1 or ch.view[1] > 0):
            # tile t read keys first + t*step + w: add back in slices of ``step`` keys, whose views over the
            # tiles do not overlap, instead of a scattered index_add
            into = staged if ch.group.stage is not None else dst
            assert into is not None  # a view is made only for B == 1, where a staged group has its copy
            dst = into
            first, step = ch.view
            w = grad.shape[2]
            step = step if ch.size > 1 else w
            for j in range(0, w, step):
                width = min(step, w - j)
                self._windows(dst, first + j, step, ch.size, width).add_(grad[:, :, j:j + width])
            return
        if self.direct_kv:
            b, hx, _, e = dst.shape
            g = grad.view(b, ch.size, hx, -1, e).transpose(1, 2).reshape(b, hx, -1, e)
            index_add(dst, 2, index, g)
            return
        b, _, hx, e = dst.shape
        row = e if self.per_head else hx * e
        index_add(dst.view(b, -1, row), 1, index, grad.transpose(1, 2).reshape(b, -1, row))

    # ----- the chunk mask: pattern (+ key padding) (+ bias), as SDPA's additive attn_mask -----
    def chunk_mask(self, ch: Chunk) -> torch.Tensor:
        plan, c, w = self.plan, ch.size, ch.group.width
        m = plan.additive_mask(ch.group, ch.t0, ch.t1)  # (Hp, c, T, W)
        m6 = m.permute(1, 0, 2, 3)[None, :, :, None]  # (1, c, Hp, 1, T, W)
        if self.kpm is None and self.bias is None and self.b == 1 and self.gx == 1:
            return m6[0, :, :, 0]
        if self.kpm is not None:
            kp = self.kpm[:, ch.k_idx.clamp(min=0)]  # (B, Hp, c, W); padding slots are masked already
            m6 = m6 + kp.permute(0, 2, 1, 3)[:, :, :, None, None, :]
        if self.bias is not None:
            m6 = m6 + self.bias_tile(ch)
        m6 = m6.expand(self.b, c, m6.shape[2], self.gx, plan.tile, w)
        return m6.reshape(self.b * c, m6.shape[2], self.gx * plan.tile, w)

    def bias_tile(self, ch: Chunk) -> torch.Tensor:
        """Bias of a chunk as (B', c, H', gx', T, W), matching the 6D chunk mask layout."""
        assert self.bias is not None
        t = self.bias.tile(ch.q_idx, ch.k_idx, ch.memo)  # (B', H', c, T, W) with H' in {1, Hq}
        t = t.to(torch.promote_types(t.dtype, torch.float32))
        bb, hh = t.shape[:2]
        if hh == 1:
            return t.permute(0, 2, 1, 3, 4)[:, :, :, None]
        return t.view(bb, self.hx, self.gx, *t.shape[2:]).permute(0, 3, 1, 2, 4, 5)

    def bias_grad(self, ch: Chunk, ds: torch.Tensor) -> None:
        """ds: (B*c, Hx, gx*T, W) -> the bias' own accumulation, as (B, Hq, c, T, W)."""
        t, w = self.plan.tile, ch.group.width
        ds = ds.view(self.b, ch.size, self.hx, self.gx, t, w).permute(0, 2, 3, 1, 4, 5)
        assert self.bias is not None
        self.bias.accumulate(ch.q_idx, ch.k_idx, ds.reshape(self.b, self.hq, ch.size, t, w), ch.memo)


# ----- chunk loops -----
def _run_forward(pb: Problem, qt: torch.Tensor, kt: torch.Tensor,
                 vt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # every tile belongs to exactly one chunk, so every slot is written
    ot = qt.new_empty(*qt.shape[:-1], pb.dv)
    lt = torch.empty(qt.shape[:-1], dtype=acc_dtype(qt.dtype), device=qt.device)
    group, sk, sv = None, None, None
    for ch in pb.chunks:
        if ch.group is not group:
            group = ch.group
            sk, sv = pb.stage(kt, group), pb.stage(vt, group)
        idx = ch.index
        qc, kc, vc = pb.compute(pb.read(qt, ch), pb.gather(kt, idx, ch, sk), pb.gather(vt, idx, ch, sv))
        mask = pb.chunk_mask(ch)
        if pb.kernel == "fused":
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qc, kc, vc, attn_mask=fused_mask(mask, qc), scale=pb.scale)
        else:
            o, lse = matmul_forward(qc, kc, vc, mask, pb.scale)
        pb.write(ot, ch, o)
        pb.write(lt, ch, lse)
    return ot, lt


def _run_backward(pb: Problem, qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, ot: torch.Tensor, lt: torch.Tensor,
                  dot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dqt = torch.empty_like(qt)
    dkt = torch.zeros_like(kt, dtype=pb.grad_dtype)
    dvt = torch.zeros_like(vt, dtype=pb.grad_dtype)
    group, sk, sv, dsk, dsv = None, None, None, None, None

    def flush():  # a staged group's gradients go back to their keys once, after all its chunks
        if dsk is not None:
            dim = 2 if pb.direct_kv else 1
            index_add(dkt, dim, group.stage, dsk)
            index_add(dvt, dim, group.stage, dsv)

    for ch in pb.chunks:
        if ch.group is not group:
            flush()
            group = ch.group
            sk, sv = pb.stage(kt, group), pb.stage(vt, group)
            dsk = torch.zeros_like(sk, dtype=pb.grad_dtype) if sk is not None else None
            dsv = torch.zeros_like(sv, dtype=pb.grad_dtype) if sv is not None else None
        idx = ch.index
        qc, oc, doc = pb.compute(pb.read(qt, ch), pb.read(ot, ch), pb.read(dot, ch))
        kc, vc = pb.compute(pb.gather(kt, idx, ch, sk), pb.gather(vt, idx, ch, sv))
        lc = pb.read(lt, ch)
        mask = pb.chunk_mask(ch)
        if pb.backward_kernel == "fused":
            # the fused op reports lse = 0 for rows with no key; its gradients there are 0 as well
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                doc, qc, kc, vc, oc, lc, 0.0, False, attn_mask=fused_mask(mask, qc), scale=pb.scale)
        else:
            dq, dk, dv, ds = matmul_backward(doc, qc, kc, vc, oc, lc, mask, pb.scale)
            if pb.bias is not None and pb.bias.requires_grad:
                pb.bias_grad(ch, ds)
        pb.write(dqt, ch, dq)
        pb.scatter_add(dkt, idx, dk.to(pb.grad_dtype), ch, dsk)
        pb.scatter_add(dvt, idx, dv.to(pb.grad_dtype), ch, dsv)
    flush()
    return dqt, dkt, dvt


class _BlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_tensor: torch.Tensor | None,
                pb: Problem) -> tuple[torch.Tensor, torch.Tensor]:
        qt = pb.to_tiles(q)
        kt, vt = pb.kv_tokens(k), pb.kv_tokens(v)
        ot, lt = _run_forward(pb, qt, kt, vt)
        ctx.pb = pb
        ctx.save_for_backward(qt, kt, vt, ot, lt)
        out = pb.from_tiles(ot)
        lse = pb.from_tiles(lt[..., None])[..., 0]
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zeros tensor for lse's gradient: it has none
        return out, lse

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, _grad_lse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        pb: Problem = ctx.pb
        qt, kt, vt, ot, lt = ctx.saved_tensors
        if pb.bias is not None:
            pb.bias.zero_grad()
        dot = pb.to_tiles(grad_out.contiguous())
        dqt, dkt, dvt = _run_backward(pb, qt, kt, vt, ot, lt, dot)
        dq = pb.from_tiles(dqt)
        dk, dv = pb.kv_untokens(dkt).to(kt.dtype), pb.kv_untokens(dvt).to(vt.dtype)
        dbias = None
        if pb.bias is not None and pb.bias.requires_grad:
            assert pb.bias.grad is not None  # zero_grad() above
            dbias = pb.bias.grad.to(pb.bias.tensor.dtype).reshape(pb.bias.tensor.shape)
        return dq, dk, dv, dbias, None


def _empty_rows_lse(pb: Problem, lse: torch.Tensor) -> torch.Tensor:
    """The fused kernel reports lse = 0 for a query with no allowed key: mark those rows -inf."""
    any_key = pb.to_tiles(torch.zeros(pb.b, pb.hq, pb.plan.nq, 1, device=lse.device))[..., 0]
    for ch in pb.chunks:
        ok = (pb.chunk_mask(ch) > float("-inf")).any(-1)  # (B*c or c, Hm, gx*T)
        pb.write(any_key, ch, ok.view(-1, ch.size, *ok.shape[1:]).expand(pb.b, -1, pb.hx, -1).float())
    keep = pb.from_tiles(any_key[..., None])[..., 0] > 0
    return torch.where(keep, lse, float("-inf"))


@torch.compiler.disable  # data-independent Python control flow: run eagerly inside compiled graphs
def blocksparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, scale: float,
                          kpm: torch.Tensor | None = None, bias: BiasSource | None = None, return_lse: bool = False,
                          kernel: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the block-sparse engine. ``kpm`` is an additive (B, Nk) float mask, ``bias`` a bias source.

    On CPU the compiled kernel (``nearfar.native``) runs float32/bfloat16/float16 inputs when it is built;
    ``kernel="fused"`` or ``"matmul"`` asks for the PyTorch paths."""
    if kernel in ("auto", "native") and native_supports(q):
        return native_attention(q, k, v, plan, scale, kpm, bias)
    padded = equal_head_dims(q, k, v) if kernel != "matmul" else None
    if padded is not None:
        out, lse = blocksparse_attention(*padded, plan, scale, kpm, bias, return_lse, kernel)
        return out[..., :v.shape[-1]], lse
    pb = Problem(plan, q, k, v, scale, kpm, bias, kernel)
    out, lse = _BlockSparse.apply(q, k, v, bias.tensor if bias is not None else None, pb)
    if return_lse and pb.kernel == "fused":
        lse = _empty_rows_lse(pb, lse)
    return out, lse
