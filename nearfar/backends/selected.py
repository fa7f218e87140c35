"""The block-sparse engine of run-time key blocks: ``SelectedBlocks`` joined with a static pattern.

Each query block's key list is the union of its static blocks (those the pattern's ``block_allowed`` keeps, cached
per shape) and its selected blocks, each block once. A block then is

- **full** when every pair in it is allowed (``block_full`` of the pattern where it is static, of ``within`` where
  it is selected) and it holds ``kv_block`` real keys: it needs no token mask, only its block-level validity, which
  the fused kernel reads as a mask broadcast over the query rows;
- **partial** otherwise (the diagonal of ``Causal``, a window's edge, the last short block): its pairs get a token
  mask, ``(static & pattern) | (selected & within)``.

Full and partial blocks run as two streams of batched fused-kernel calls over chunks of query blocks (gathers of
whole key blocks, no Python loop over blocks, heads or batch items) and are merged by their log-sum-exp, which is
exact since the streams' keys are disjoint. The backward pass runs each stream's backward with the merged output
and LSE (as FlashAttention splits keys), so each returns its share of the gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..bias import DenseBias
from ..cache import CACHE
from ..patterns import Pattern, Tiles
from ..selection import SelectedBlocks
from .kernels import acc_dtype, fused_available, matmul_backward, matmul_forward, unit_last

#: elements (gathered keys and values, masks) per chunk of query blocks
_CHUNK = 1 << 23


@dataclass
class _Stream:
    """One stream's key blocks per (batch item, list head, query block): ``rows`` index the flat key blocks
    ``(B * Hkv * KB, kv_block, d)``; ``blk`` is the block index; ``static``/``sel`` (partial stream only) say which
    source allows the block."""

    rows: torch.Tensor  # (B, Hx, QB, S) int64
    blk: torch.Tensor  # (B, Hx, QB, S) int64
    valid: torch.Tensor  # (B, Hx, QB, S) bool
    static: torch.Tensor | None = None
    sel: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.rows.shape[-1]


def _static_blocks(pattern: Pattern, qt: Tiles, kt: Tiles, nq: int, nk: int,
                   key: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """``(blocks (QB, Ws) int64, -1 padded, ascending; full (QB, Ws) bool)`` of the static pattern, cached."""
    hit = CACHE.get(key)
    if hit is not None:
        return hit
    qb, nkb = qt.idx.shape[0], kt.idx.shape[0]
    rows = max(1, _CHUNK // max(1, nkb))
    lists = []
    for r0 in range(0, qb, rows):  # bounded memory: (rows, KB) booleans at a time
        ok = pattern.block_allowed(Tiles(qt.idx[r0:r0 + rows]), kt, nq, nk)
        lists.append(ok)
    ok = torch.cat(lists) if lists else torch.zeros(0, nkb, dtype=torch.bool, device=qt.idx.device)
    width = max(1, int(ok.sum(-1).max())) if ok.numel() else 1
    order = torch.argsort((~ok).to(torch.int8), dim=-1, stable=True)[..., :width]
    blocks = torch.where(ok.gather(-1, order), order, -1)
    full = pattern.block_full(qt, Tiles(kt.idx[blocks.clamp(min=0)]), nq, nk) & (blocks >= 0)
    return CACHE.put(key, (blocks, full))


def _streams(pattern: Pattern | None, sel: SelectedBlocks, b: int, hq: int, hkv: int, nq: int,
             nk: int) -> tuple[_Stream, _Stream, int]:
    """The full and partial streams, and ``Hx`` (the heads that own a key list)."""
    kb = sel.k_block
    nkb = -(-nk // kb)
    idx, valid = sel.normalized(nk)  # (B', Hs, QB, S)
    hs = idx.shape[1]
    hx = hq if hs == hq and hq != hkv else hkv
    if hs != hx:  # one selection for every head: one list per KV head
        idx, valid = idx.expand(-1, hx, -1, -1), valid.expand(-1, hx, -1, -1)
    qt, kt = sel.tiles(nq, nk)
    dev = idx.device
    w_full = torch.ones_like(valid)
    if sel.within is not None and idx.numel():
        keys = kt.idx[idx.permute(2, 0, 1, 3).reshape(idx.shape[2], -1)]  # (QB, B'*Hx*S, kb)
        w_full = sel.within.block_full(qt, Tiles(keys), nq, nk).reshape(idx.shape[2], *idx.shape[:2], -1)
        w_full = w_full.permute(1, 2, 0, 3)
    is_sel = valid
    blk = idx
    st_full = torch.zeros_like(valid)
    is_static = torch.zeros_like(valid)
    if pattern is not None:
        sblk, sfull = _static_blocks(pattern, qt, kt, nq, nk, ("selected_static", pattern, nq, nk, sel.q_block, kb,
                                                                 str(dev)))
        shape = (idx.shape[0], hx, *sblk.shape)
        blk = torch.cat([sblk.clamp(min=0).expand(shape), idx], -1)
        is_static = torch.cat([(sblk >= 0).expand(shape), torch.zeros_like(valid)], -1)
        is_sel = torch.cat([torch.zeros(shape, dtype=torch.bool, device=dev), valid], -1)
        st_full = torch.cat([sfull.expand(shape), torch.zeros_like(valid)], -1)
        w_full = torch.cat([torch.zeros(shape, dtype=torch.bool, device=dev), w_full], -1)
        # one slot per block: sort by block (static before selected), fold a selected repeat into its static slot
        live = is_static | is_sel
        order = torch.argsort(torch.where(live, blk * 2 + is_sel.long(), 2 * nkb + 2), dim=-1, stable=True)
        blk, is_static, is_sel, st_full, w_full, live = (x.gather(-1, order) for x in
                                                         (blk, is_static, is_sel, st_full, w_full, live))
        repeat = torch.zeros_like(live)
        repeat[..., 1:] = live[..., 1:] & live[..., :-1] & (blk[..., 1:] == blk[..., :-1])
        nxt = torch.zeros_like(live)
        nxt[..., :-1] = repeat[..., 1:]
        is_sel = (is_sel & ~repeat) | nxt
        w_full[..., :-1] = torch.where(nxt[..., :-1], w_full[..., 1:], w_full[..., :-1])
        is_static = is_static & ~repeat
    live = is_static | is_sel
    whole = (blk + 1) * kb <= nk
    full = live & whole & ((is_static & st_full) | (is_sel & w_full))
    part = live & ~full
    group = hq // hkv
    kvh = torch.arange(hx, device=dev) // (group if hx == hq and hq != hkv else 1)
    base = (torch.arange(b, device=dev)[:, None] * hkv + kvh) * nkb  # (B, Hx)

    def compact(mask: torch.Tensor, *extra: torch.Tensor) -> tuple[torch.Tensor, ...]:
        xs = (mask, blk, *extra)
        if mask.shape[-1] == 0:  # nothing selected and no pattern: one dead slot keeps every shape valid
            xs = tuple(torch.nn.functional.pad(x, (0, 1)) for x in xs)
            mask = xs[0]
        width = max(1, int(mask.sum(-1).max())) if mask.numel() else 1
        order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :width]
        return tuple(x.gather(-1, order).expand(b, -1, -1, -1) for x in xs)

    v_f, b_f = compact(full)
    rows_f = base[:, :, None, None] + torch.where(v_f, b_f, 0)
    v_p, b_p, s_p, e_p = compact(part, is_static, is_sel)
    rows_p = base[:, :, None, None] + torch.where(v_p, b_p, 0)
    return (_Stream(rows_f, b_f, v_f), _Stream(rows_p, b_p, v_p, s_p & v_p, e_p & v_p), hx)


class _Problem:
    """Shapes, layouts and masks of one call."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern | None,
                 sel: SelectedBlocks, scale: float, kpm: torch.Tensor | None, bias: DenseBias | None) -> None:
        self.b, self.hq, self.nq, self.d = q.shape
        self.hkv, self.nk, self.dv = k.shape[1], k.shape[2], v.shape[-1]
        self.pattern, self.sel, self.scale, self.kpm, self.bias = pattern, sel, scale, kpm, bias
        self.t, self.kb = sel.q_block, sel.k_block
        self.qb, self.nkb = -(-self.nq // self.t), -(-self.nk // self.kb)
        self.full, self.part, self.hx = _streams(pattern, sel, self.b, self.hq, self.hkv, self.nq, self.nk)
        self.gx = self.hq // self.hx
        half = q.dtype in (torch.float16, torch.bfloat16)
        self.compute_dtype = torch.float32 if half and q.device.type == "cpu" else q.dtype
        self.acc = acc_dtype(self.compute_dtype)
        need_bias_grad = bias is not None and bias.requires_grad and torch.is_grad_enabled()
        self.fused = fused_available(q.device) and self.d == self.dv and not need_bias_grad
        qpos = torch.arange(self.qb * self.t, device=q.device)
        self.qpos = torch.where(qpos < self.nq, qpos, -1).view(self.qb, self.t)

    # ----- layouts: queries as (B, Hx, gx, QB, T, e) blocks; keys as (B * Hkv * KB, kv_block, e) blocks -----
    def q_blocks(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        pad = self.qb * self.t - x.shape[2]
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.reshape(self.b, self.hx, self.gx, self.qb, self.t, x.shape[-1])

    def q_unblocks(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.b, self.hq, self.qb * self.t, x.shape[-1])[:, :, :self.nq]

    def k_blocks(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        pad = self.nkb * self.kb - x.shape[2]
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.reshape(self.b * self.hkv * self.nkb, self.kb, x.shape[-1])

    def chunks(self, st: _Stream) -> list[tuple[int, int]]:
        w = st.width * self.kb
        per_block = self.b * self.hx * (w * (self.d + self.dv) + self.gx * self.t * (w + self.d + self.dv))
        c = max(1, min(self.qb, _CHUNK // max(1, per_block)))
        return [(r0, min(self.qb, r0 + c)) for r0 in range(0, self.qb, c)]

    def read_q(self, xb: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """(B, Hx, gx, QB, T, e) -> (B*c, Hx, gx*T, e)."""
        x = xb[:, :, :, r0:r1].permute(0, 3, 1, 2, 4, 5)
        return unit_last(x.reshape(self.b * (r1 - r0), self.hx, self.gx * self.t, x.shape[-1]))

    def write_q(self, xb: torch.Tensor, r0: int, r1: int, value: torch.Tensor, add: bool = False) -> None:
        value = value.reshape(self.b, r1 - r0, self.hx, self.gx, self.t, -1).permute(0, 2, 3, 1, 4, 5)
        if add:
            xb[:, :, :, r0:r1] += value
        else:
            xb[:, :, :, r0:r1] = value

    def gather(self, kb: torch.Tensor, st: _Stream, r0: int, r1: int) -> torch.Tensor:
        """Key (or value) blocks of query blocks ``r0:r1`` as (B*c, Hx, S*kv_block, e)."""
        rows = st.rows[:, :, r0:r1].permute(0, 2, 1, 3).reshape(-1)
        g = kb.index_select(0, rows)
        return g.view(self.b * (r1 - r0), self.hx, st.width * self.kb, kb.shape[-1])

    def scatter(self, dkb: torch.Tensor, st: _Stream, r0: int, r1: int, grad: torch.Tensor) -> None:
        rows = st.rows[:, :, r0:r1].permute(0, 2, 1, 3).reshape(-1)
        dkb.index_add_(0, rows, grad.reshape(-1, self.kb, grad.shape[-1]))

    def mask(self, st: _Stream, r0: int, r1: int, token: bool) -> torch.Tensor:
        """The chunk's additive mask, (B*c, Hx, gx*T, W) or, for full blocks without bias, (B*c, Hx, 1, W)."""
        c, w = r1 - r0, st.width * self.kb
        off = torch.arange(self.kb, device=st.blk.device)
        kpos = (st.blk[:, :, r0:r1, :, None] * self.kb + off).reshape(self.b, self.hx, c, 1, w)
        ok = st.valid[:, :, r0:r1, :, None].expand(-1, -1, -1, -1, self.kb).reshape(self.b, self.hx, c, 1, w)
        if token:
            qpos = self.qpos[r0:r1].clamp(min=0)[:, :, None]  # (c, T, 1)
            ok = ok & (kpos < self.nk)
            pair = torch.zeros((), dtype=torch.bool, device=ok.device)
            if self.pattern is not None and st.static is not None:
                flag = st.static[:, :, r0:r1, :, None].expand(-1, -1, -1, -1, self.kb).reshape(ok.shape)
                pair = pair | (flag & self.pattern.allowed(qpos, kpos, self.nq, self.nk))
            if st.sel is not None:
                flag = st.sel[:, :, r0:r1, :, None].expand(-1, -1, -1, -1, self.kb).reshape(ok.shape)
                within = self.sel.within
                pair = pair | (flag & (within.allowed(qpos, kpos, self.nq, self.nk) if within is not None else flag))
            ok = ok & pair  # (B, Hx, c, T, W)
        m = torch.where(ok, 0.0, float("-inf")).to(self.acc)
        if self.kpm is not None:
            kp = self.kpm.gather(1, kpos.clamp(max=self.nk - 1).reshape(self.b, -1)).view(kpos.shape)
            m = m + kp.to(self.acc)
        rows = m.shape[3]
        m = m.permute(0, 2, 1, 3, 4)[:, :, :, None]  # (B, c, Hx, 1, rows, W)
        if self.bias is not None:
            m = m + self._bias(kpos, r0, r1)
        elif rows == 1:
            return m.reshape(self.b * c, self.hx, 1, w)
        m = m.expand(self.b, c, self.hx, self.gx, self.t, w)
        return m.reshape(self.b * c, self.hx, self.gx * self.t, w)

    def _bias_index(self, kpos: torch.Tensor, r0: int, r1: int) -> tuple[torch.Tensor, ...]:
        """Indices into the bias (B', H', Nq', Nk') for the chunk's pairs, shaped (B, c, Hx, gx, T, W)."""
        assert self.bias is not None
        b4 = self.bias.b4
        dev = kpos.device
        bi = torch.arange(self.b, device=dev).view(-1, 1, 1, 1, 1, 1) * (b4.shape[0] > 1)
        heads = (torch.arange(self.hx, device=dev)[:, None] * self.gx + torch.arange(self.gx, device=dev))
        hi = heads.view(1, 1, self.hx, self.gx, 1, 1) * (b4.shape[1] > 1)
        qi = self.qpos[r0:r1].clamp(min=0).view(1, r1 - r0, 1, 1, self.t, 1) * (b4.shape[2] > 1)
        ki = kpos[:, :, :, 0].clamp(max=self.nk - 1).permute(0, 2, 1, 3)[:, :, :, None, None] * (b4.shape[3] > 1)
        return bi, hi, qi, ki

    def _bias(self, kpos: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        assert self.bias is not None
        return self.bias.b4.detach()[self._bias_index(kpos, r0, r1)].to(self.acc)

    def bias_grad(self, grad: torch.Tensor, st: _Stream, r0: int, r1: int, ds: torch.Tensor) -> None:
        c, w = r1 - r0, st.width * self.kb
        off = torch.arange(self.kb, device=st.blk.device)
        kpos = (st.blk[:, :, r0:r1, :, None] * self.kb + off).reshape(self.b, self.hx, c, 1, w)
        bi, hi, qi, ki = self._bias_index(kpos, r0, r1)
        ds = ds.view(self.b, c, self.hx, self.gx, self.t, w)
        keep = (self.qpos[r0:r1] >= 0).view(1, c, 1, 1, self.t, 1) & (kpos < self.nk).permute(0, 2, 1, 3, 4)[
            :, :, :, None]
        ds = torch.where(keep, ds, 0.0)
        shape = ds.shape
        grad.index_put_(tuple(x.expand(shape) for x in (bi, hi, qi, ki)), ds.to(grad.dtype), accumulate=True)


def _kernel_forward(pb: _Problem, qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                    mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if pb.fused:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qc, kc, vc, attn_mask=mask,
                                                                               scale=pb.scale)
        live = (mask > float("-inf")).any(-1)  # the fused operator reports lse = 0 for a row with no key
        return out, torch.where(live, lse, float("-inf"))
    return matmul_forward(qc, kc, vc, mask, pb.scale)


def _stream_forward(pb: _Problem, st: _Stream, qb: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor,
                    token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out = qb.new_zeros(*qb.shape[:-1], pb.dv)
    lse = torch.full(qb.shape[:-1], float("-inf"), dtype=pb.acc, device=qb.device)
    for r0, r1 in pb.chunks(st):
        o, lc = _kernel_forward(pb, pb.read_q(qb, r0, r1), pb.gather(kb, st, r0, r1), pb.gather(vb, st, r0, r1),
                                pb.mask(st, r0, r1, token))
        pb.write_q(out, r0, r1, o)
        pb.write_q(lse[..., None], r0, r1, lc.expand(-1, -1, pb.gx * pb.t)[..., None])
    return out, lse


def _stream_backward(pb: _Problem, st: _Stream, qb, kb, vb, ob, lb, dob, dqb, dkb, dvb, token: bool,
                     dbias: torch.Tensor | None) -> None:
    for r0, r1 in pb.chunks(st):
        qc, oc, doc = pb.read_q(qb, r0, r1), pb.read_q(ob, r0, r1), pb.read_q(dob, r0, r1)
        lc = pb.read_q(lb[..., None], r0, r1)[..., 0]
        kc, vc = pb.gather(kb, st, r0, r1), pb.gather(vb, st, r0, r1)
        mask = pb.mask(st, r0, r1, token)
        if pb.fused:
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                doc, qc, kc, vc, oc, lc, 0.0, False, attn_mask=mask, scale=pb.scale)
        else:
            dq, dk, dv, ds = matmul_backward(doc, qc, kc, vc, oc, lc, mask, pb.scale)
            if dbias is not None:
                pb.bias_grad(dbias, st, r0, r1, ds)
        pb.write_q(dqb, r0, r1, dq, add=True)
        pb.scatter(dkb, st, r0, r1, dk)
        pb.scatter(dvb, st, r0, r1, dv)


class _Selected(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_tensor: torch.Tensor | None,
                pb: _Problem) -> tuple[torch.Tensor, torch.Tensor]:
        qb, kb, vb = pb.q_blocks(q), pb.k_blocks(k), pb.k_blocks(v)
        of, lf = _stream_forward(pb, pb.full, qb, kb, vb, token=False)
        op, lp = _stream_forward(pb, pb.part, qb, kb, vb, token=True)
        lse = torch.logaddexp(lf, lp)
        empty = torch.isneginf(lse)
        wf = torch.where(empty, 0.0, torch.exp(lf - lse))[..., None]
        wp = torch.where(empty, 0.0, torch.exp(lp - lse))[..., None]
        ob = (of * wf + op * wp).to(qb.dtype)
        ctx.pb = pb
        ctx.save_for_backward(q, k, v, ob, lse)
        out = pb.q_unblocks(ob.reshape(pb.b, pb.hq, pb.qb, pb.t, pb.dv)).to(q.dtype)
        lse_out = pb.q_unblocks(lse.reshape(pb.b, pb.hq, pb.qb, pb.t)[..., None])[..., 0]
        ctx.mark_non_differentiable(lse_out)
        return out, lse_out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, _grad_lse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        pb: _Problem = ctx.pb
        q, k, v, ob, lse = ctx.saved_tensors
        qb, kb, vb, dob = pb.q_blocks(q), pb.k_blocks(k), pb.k_blocks(v), pb.q_blocks(grad_out)
        lb = torch.where(torch.isneginf(lse), float("inf"), lse)  # no key: p = exp(s - inf) = 0
        grad_dtype = pb.acc if q.dtype in (torch.float16, torch.bfloat16) else pb.compute_dtype
        dqb = torch.zeros_like(qb)
        dkb = torch.zeros(kb.shape, dtype=grad_dtype, device=kb.device)
        dvb = torch.zeros(vb.shape, dtype=grad_dtype, device=vb.device)
        dbias = None
        if pb.bias is not None and pb.bias.requires_grad:
            dbias = torch.zeros(pb.bias.b4.shape, dtype=pb.acc, device=q.device)
        for st, token in ((pb.full, False), (pb.part, True)):
            _stream_backward(pb, st, qb, kb, vb, ob, lb, dob, dqb, dkb, dvb, token, dbias)
        dq = pb.q_unblocks(dqb.reshape(pb.b, pb.hq, pb.qb, pb.t, pb.d)).to(q.dtype)

        def kv(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            x = x.view(pb.b, pb.hkv, pb.nkb * pb.kb, x.shape[-1])[:, :, :pb.nk]
            return x.to(like.dtype)

        db = None
        if dbias is not None:
            assert pb.bias is not None
            db = dbias.to(pb.bias.tensor.dtype).reshape(pb.bias.tensor.shape)
        return dq, kv(dkb, k), kv(dvb, v), db, None


@torch.compiler.disable  # data-dependent widths: run eagerly inside compiled graphs
def selected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern | None,
                       blocks: SelectedBlocks, scale: float, kpm: torch.Tensor | None = None,
                       bias: DenseBias | None = None,
                       return_lse: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention over the union of ``pattern``'s pairs and ``blocks``' pairs (see ``nearfar.selection``).

    ``kpm`` is an additive (B, Nk) float mask, ``bias`` a dense bias source. Returns ``(out, lse or None)``."""
    d, dv = q.shape[-1], v.shape[-1]
    if d != dv and fused_available(q.device):  # the fused operator wants one head size: zero-pad the smaller
        e = max(d, dv)
        pad = torch.nn.functional.pad
        out, lse = selected_attention(pad(q, (0, e - d)), pad(k, (0, e - d)), pad(v, (0, e - dv)), pattern, blocks,
                                      scale, kpm, bias, return_lse)
        return out[..., :dv], lse
    pb = _Problem(q, k, v, pattern, blocks, scale, kpm, bias)
    out, lse = _Selected.apply(q, k, v, bias.tensor if bias is not None else None, pb)
    return out, (lse if return_lse else None)


def selection_work(pattern: Pattern | None, blocks: SelectedBlocks, b: int, hq: int, hkv: int, nq: int,
                   nk: int) -> dict[str, float]:
    """How much work a call does: key blocks per query block in the full and partial streams, and the fraction of
    the dense ``Nq x Nk`` scores computed (for benchmarks and tests)."""
    full, part, hx = _streams(pattern, blocks, b, hq, hkv, nq, nk)
    qb = math.ceil(nq / blocks.q_block)
    work = (full.width + part.width) * blocks.k_block * blocks.q_block * qb
    return {"full_blocks": float(full.width), "partial_blocks": float(part.width),
            "density": work / max(1, nq * nk), "list_heads": float(hx)}
