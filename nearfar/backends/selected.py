"""The block-sparse engine of run-time key blocks: ``SelectedBlocks`` joined with a static pattern.

Each query block's key list is the union of its static blocks (those the pattern's ``block_allowed`` keeps, cached
per shape) and its selected blocks, each block once. A block is **full** when every pair in it is allowed
(``block_full`` of the pattern where it is static, of ``within`` where it is selected) and it holds ``kv_block``
real keys, else **partial**. Three streams of batched fused-kernel calls over chunks of query blocks cover them:

- ``run``: the static full blocks, when every query block's are one run of keys that moves by a fixed step from
  one query block to the next (windows): read as strided views of the keys, no gather, no token mask;
- ``full``: the other full blocks, gathered, with a block-level mask broadcast over the query rows;
- ``partial``: gathered, with a token mask ``(static & pattern) | (selected & within)``.

The streams' keys are disjoint, so their results merge exactly by log-sum-exp; the backward pass runs each
stream's backward with the merged output and LSE (as FlashAttention splits keys), which gives its share of the
gradients. No Python loop runs over blocks, heads or batch items: only over chunks of query blocks, whose size
bounds the memory of gathered keys and masks.
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
class _Run:
    """Static full blocks as runs: query block ``r`` reads keys ``first + r * step + [0, width)`` of the keys
    padded with ``front`` zeros before and ``back`` after; ``ok (QB, width)`` says which of them it may attend."""

    first: int
    step: int
    width: int
    front: int
    back: int
    ok: torch.Tensor
    mask: torch.Tensor  # (QB, 1, 1, width) additive
    all_ok: torch.Tensor  # (QB,) bool: the row's whole run is allowed


@dataclass
class _Static:
    blocks: torch.Tensor  # (QB, Ws) int64, -1 padded
    full: torch.Tensor  # (QB, Ws) bool
    run: _Run | None


@dataclass
class _Stream:
    """Gathered key blocks per (query block, batch item, list head): ``rows`` index the flat key blocks
    ``(B * Hkv * KB, kv_block, d)``; ``static``/``sel`` (partial stream only) say which source allows the block."""

    rows: torch.Tensor  # (QB, B, Hx, S) int64
    blk: torch.Tensor  # (QB, B, Hx, S) int64
    valid: torch.Tensor  # (QB, B, Hx, S) bool
    static: torch.Tensor | None = None
    sel: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.rows.shape[-1]

    @property
    def empty(self) -> bool:
        return not bool(self.valid.any())


def _as_run(blocks: torch.Tensor, full: torch.Tensor, t: int, kb: int, nk: int) -> _Run | None:
    """The static full blocks as evenly moving runs of keys, or None when they are not (or would waste > 25%)."""
    sel = full & (blocks >= 0) & ((blocks + 1) * kb <= nk)
    count = sel.sum(-1)
    rows = torch.nonzero(count > 0)[:, 0]
    if rows.numel() == 0:
        return None
    big = 1 << 40
    lo = torch.where(sel, blocks, big).amin(-1)
    hi = torch.where(sel, blocks, -big).amax(-1)
    if bool(((hi - lo + 1)[rows] != count[rows]).any()):  # not one contiguous run of blocks
        return None
    r = torch.arange(blocks.shape[0], device=blocks.device)
    for step in (t, 0):  # runs that move with the query block (windows), or the same keys for all (sinks)
        first = int((lo[rows] * kb - r[rows] * step).min())
        width = int(((hi[rows] + 1) * kb - r[rows] * step - first).max())
        if blocks.shape[0] * width <= int(count.sum()) * kb * 5 // 4 + blocks.shape[0] * kb:
            break
    else:  # mostly masked either way (e.g. Causal: a run that grows with the query block)
        return None
    keys = first + r[:, None] * step + torch.arange(width, device=blocks.device)  # (QB, width) key positions
    kblk = torch.div(keys, kb, rounding_mode="floor")
    ok = (keys >= 0) & (keys < nk) & (kblk >= lo[:, None]) & (kblk <= hi[:, None]) & (count > 0)[:, None]
    front = max(0, -first)
    back = max(0, int(keys[-1, -1]) + 1 - nk)
    mask = torch.where(ok, 0.0, float("-inf"))[:, None, None, :]
    return _Run(first, step, width, front, back, ok, mask, ok.all(-1))


def _static(pattern: Pattern, qt: Tiles, kt: Tiles, nq: int, nk: int, t: int, kb: int) -> _Static:
    """The static pattern's blocks per query block, which are full, and their runs: cached per shape."""
    key = ("selected_static", pattern, nq, nk, t, kb, str(qt.idx.device))
    hit = CACHE.get(key)
    if hit is not None:
        return hit
    qb, nkb = qt.idx.shape[0], kt.idx.shape[0]
    rows = max(1, _CHUNK // max(1, nkb))
    parts = [pattern.block_allowed(Tiles(qt.idx[r0:r0 + rows]), kt, nq, nk) for r0 in range(0, qb, rows)]
    ok = torch.cat(parts)
    width = max(1, int(ok.sum(-1).max()))
    order = torch.argsort((~ok).to(torch.int8), dim=-1, stable=True)[..., :width]
    blocks = torch.where(ok.gather(-1, order), order, -1)
    full = pattern.block_full(qt, Tiles(kt.idx[blocks.clamp(min=0)]), nq, nk) & (blocks >= 0)
    return CACHE.put(key, _Static(blocks, full, _as_run(blocks, full, t, kb, nk)))


def _streams(pattern: Pattern | None, sel: SelectedBlocks, b: int, hq: int, hkv: int, nq: int,
             nk: int) -> tuple[_Run | None, _Stream, _Stream, int]:
    """The run of static full blocks (or None), the gathered full and partial streams, and ``Hx`` (the heads
    that own a key list: ``Hq`` for a per-query-head selection under GQA, else ``Hkv``)."""
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
    blk, is_sel = idx, valid
    is_static = st_full = torch.zeros_like(valid)
    run = None
    if pattern is not None:
        static = _static(pattern, qt, kt, nq, nk, sel.q_block, kb)
        run = static.run
        shape = (idx.shape[0], hx, *static.blocks.shape)
        no = torch.zeros(shape, dtype=torch.bool, device=dev)
        blk = torch.cat([static.blocks.clamp(min=0).expand(shape), idx], -1)
        is_static = torch.cat([(static.blocks >= 0).expand(shape), torch.zeros_like(valid)], -1)
        is_sel = torch.cat([no, valid], -1)
        st_full = torch.cat([static.full.expand(shape), torch.zeros_like(valid)], -1)
        w_full = torch.cat([no, w_full], -1)
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
        w_full = w_full.clone()
        w_full[..., :-1] = torch.where(nxt[..., :-1], w_full[..., 1:], w_full[..., :-1])
        is_static = is_static & ~repeat
    live = is_static | is_sel
    whole = (blk + 1) * kb <= nk
    full = live & whole & ((is_static & st_full) | (is_sel & w_full))
    part = live & ~full
    if run is not None:  # static full blocks are read through the run
        full = full & ~(is_static & st_full)
    group = hq // hkv
    kvh = torch.arange(hx, device=dev) // (group if hx == hq and hq != hkv else 1)
    base = (torch.arange(b, device=dev)[:, None] * hkv + kvh) * nkb  # (B, Hx)

    def compact(mask: torch.Tensor, *extra: torch.Tensor) -> tuple[torch.Tensor, ...]:
        xs = (mask, blk, *extra)
        if mask.shape[-1] == 0:  # nothing selected and no pattern: one dead slot keeps every shape valid
            xs = tuple(torch.nn.functional.pad(x, (0, 1)) for x in xs)
            mask = xs[0]
        width = max(1, int(mask.sum(-1).max()))
        order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :width]
        # (B', Hx, QB, S) -> (QB, B, Hx, S): the chunk layout of the kernels
        return tuple(x.gather(-1, order).expand(b, -1, -1, -1).permute(2, 0, 1, 3) for x in xs)

    v_f, b_f = compact(full)
    rows_f = base[None, :, :, None] + torch.where(v_f, b_f, 0)
    v_p, b_p, s_p, e_p = compact(part, is_static, is_sel)
    rows_p = base[None, :, :, None] + torch.where(v_p, b_p, 0)
    return run, _Stream(rows_f, b_f, v_f), _Stream(rows_p, b_p, v_p, s_p & v_p, e_p & v_p), hx


class _Problem:
    """Shapes, layouts and masks of one call. Queries live as ``(QB, B, Hq, T, e)`` blocks, so a chunk of query
    blocks is a view ``(c, B * Hx, gx * T, e)`` (the GQA group's queries stacked on one key list); keys as flat
    blocks ``(B * Hkv * KB, kv_block, e)`` for gathers, or padded rows ``(B * Hkv, front + Nk + back, e)`` for runs."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern | None,
                 sel: SelectedBlocks, scale: float, kpm: torch.Tensor | None, bias: DenseBias | None) -> None:
        self.b, self.hq, self.nq, self.d = q.shape
        self.hkv, self.nk, self.dv = k.shape[1], k.shape[2], v.shape[-1]
        self.pattern, self.sel, self.scale, self.kpm, self.bias = pattern, sel, scale, kpm, bias
        self.t, self.kb = sel.q_block, sel.k_block
        self.qb, self.nkb = -(-self.nq // self.t), -(-self.nk // self.kb)
        self.run, self.full, self.part, self.hx = _streams(pattern, sel, self.b, self.hq, self.hkv, self.nq, self.nk)
        self.gx = self.hq // self.hx
        half = q.dtype in (torch.float16, torch.bfloat16)
        self.compute_dtype = torch.float32 if half and q.device.type == "cpu" else q.dtype
        self.acc = acc_dtype(self.compute_dtype)
        need_bias_grad = bias is not None and bias.requires_grad and torch.is_grad_enabled()
        self.fused = fused_available(q.device) and self.d == self.dv and not need_bias_grad
        qpos = torch.arange(self.qb * self.t, device=q.device)
        self.qpos = torch.where(qpos < self.nq, qpos, -1).view(self.qb, self.t)

    # ----- layouts -----
    def q_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Hq, Nq, e) -> (QB, B, Hq, T, e) in the compute dtype."""
        x = x.to(self.compute_dtype)
        pad = self.qb * self.t - x.shape[2]
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.view(self.b, self.hq, self.qb, self.t, x.shape[-1]).permute(2, 0, 1, 3, 4).contiguous()

    def q_unblocks(self, x: torch.Tensor) -> torch.Tensor:
        """(QB, B, Hq, T, ...) -> (B, Hq, Nq, ...)."""
        x = x.permute(1, 2, 0, 3, *range(4, x.dim()))
        return x.reshape(self.b, self.hq, self.qb * self.t, *x.shape[4:])[:, :, :self.nq]

    def rows(self, xb: torch.Tensor, r0: int, r1: int, hx: int | None = None) -> torch.Tensor:
        """A chunk of query blocks of a ``(QB, B, Hq, T, ...)`` tensor as ``(c, B * Hx, gx * T, ...)`` (a view)."""
        hx = hx or self.hx
        return xb[r0:r1].view(r1 - r0, self.b * hx, (self.hq // hx) * self.t, *xb.shape[4:])

    def k_blocks(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        pad = self.nkb * self.kb - x.shape[2]
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.reshape(self.b * self.hkv * self.nkb, self.kb, x.shape[-1])

    def k_rows(self, x: torch.Tensor) -> torch.Tensor:
        assert self.run is not None
        x = torch.nn.functional.pad(x.to(self.compute_dtype), (0, 0, self.run.front, self.run.back))
        return x.reshape(self.b * self.hkv, x.shape[2], x.shape[-1]).contiguous()  # as_strided assumes it

    def run_view(self, xr: torch.Tensor, r0: int, r1: int, j: int = 0, width: int | None = None) -> torch.Tensor:
        """Keys ``first + r * step + [j, j + width)`` of query blocks ``r0:r1``, as a (c, B*Hkv, width, e) view."""
        run = self.run
        assert run is not None
        n, e = xr.shape[1], xr.shape[2]
        width = run.width if width is None else width
        start = run.front + run.first + r0 * run.step + j
        return xr.as_strided((r1 - r0, xr.shape[0], width, e), (run.step * e, n * e, e, 1),
                             xr.storage_offset() + start * e)

    # ----- chunks -----
    def chunks(self, width: int, token: bool) -> list[tuple[int, int]]:
        per_block = self.b * self.hx * (width * (self.d + self.dv) + self.gx * self.t * (self.d + 2 * self.dv)
                                        + (self.gx * self.t * width if token or self.bias is not None else width))
        c = max(1, min(self.qb, _CHUNK // max(1, per_block)))
        return [(r0, min(self.qb, r0 + c)) for r0 in range(0, self.qb, c)]

    def gather(self, kb: torch.Tensor, st: _Stream, r0: int, r1: int, buf: torch.Tensor) -> torch.Tensor:
        """Key (or value) blocks of query blocks ``r0:r1`` as (c, B*Hx, S*kv_block, e), into ``buf``."""
        rows = st.rows[r0:r1].reshape(-1)
        out = buf[:rows.numel()]
        torch.index_select(kb, 0, rows, out=out)
        return out.view(r1 - r0, self.b * self.hx, st.width * self.kb, kb.shape[-1])

    def buffer(self, st: _Stream, chunks: list[tuple[int, int]], e: int, device: torch.device) -> torch.Tensor:
        c = max(r1 - r0 for r0, r1 in chunks)
        return torch.empty(c * self.b * self.hx * st.width, self.kb, e, dtype=self.compute_dtype, device=device)

    def scatter(self, dkb: torch.Tensor, st: _Stream, r0: int, r1: int, grad: torch.Tensor) -> None:
        dkb.index_add_(0, st.rows[r0:r1].reshape(-1), grad.reshape(-1, self.kb, grad.shape[-1]))

    def run_scatter(self, dxr: torch.Tensor, r0: int, r1: int, grad: torch.Tensor) -> None:
        """Add a run chunk's key gradient back in slices of ``step`` keys, whose views over the query blocks do not
        overlap (a plain add through the overlapping view would lose updates)."""
        assert self.run is not None
        step, width = self.run.step, self.run.width
        if step == 0:  # every query block read the same keys
            self.run_view(dxr, r0, r0 + 1)[0].add_(grad.sum(0))
            return
        for j in range(0, width, step):
            w = min(step, width - j)
            self.run_view(dxr, r0, r1, j, w).add_(grad[:, :, j:j + w])

    # ----- masks: (c, B*Hx, rows, W) additive, rows = 1 when no token mask or bias is needed -----
    def kpos(self, st: _Stream, r0: int, r1: int) -> torch.Tensor:
        off = torch.arange(self.kb, device=st.blk.device)
        return (st.blk[r0:r1, :, :, :, None] * self.kb + off).flatten(-2)  # (c, B, Hx, W)

    def mask(self, st: _Stream, r0: int, r1: int, token: bool) -> torch.Tensor:
        c = r1 - r0
        kpos = self.kpos(st, r0, r1)
        ok = st.valid[r0:r1, :, :, :, None].expand(-1, -1, -1, -1, self.kb).flatten(-2)[:, :, :, None]
        if token:  # (c, B, Hx, T, W)
            qpos = self.qpos[r0:r1].clamp(min=0)[:, None, None, :, None]
            kp = kpos[:, :, :, None]
            ok = ok & (kp < self.nk)
            pair = torch.zeros((), dtype=torch.bool, device=ok.device)
            if self.pattern is not None and st.static is not None:
                flag = st.static[r0:r1, :, :, :, None].expand(-1, -1, -1, -1, self.kb).flatten(-2)[:, :, :, None]
                pair = pair | (flag & self.pattern.allowed(qpos, kp, self.nq, self.nk))
            if st.sel is not None:
                flag = st.sel[r0:r1, :, :, :, None].expand(-1, -1, -1, -1, self.kb).flatten(-2)[:, :, :, None]
                within = self.sel.within
                pair = pair | (flag & within.allowed(qpos, kp, self.nq, self.nk) if within is not None else flag)
            ok = ok & pair
        m = torch.where(ok, 0.0, float("-inf")).to(self.acc)  # (c, B, Hx, rows, W)
        if self.kpm is not None:
            kp = self.kpm.gather(1, kpos.clamp(max=self.nk - 1).transpose(0, 1).reshape(self.b, -1))
            m = m + kp.view(self.b, c, self.hx, -1).transpose(0, 1)[:, :, :, None].to(self.acc)
        return self._finish(m, kpos, r0, r1)

    def run_mask(self, r0: int, r1: int) -> torch.Tensor | None:
        run = self.run
        assert run is not None
        c = r1 - r0
        m = None if bool(run.all_ok[r0:r1].all()) else run.mask[r0:r1].to(self.acc)  # (c, 1, 1, W)
        if self.kpm is None and self.bias is None:
            return m
        kpos = self.run_kpos(r0, r1).clamp(0, self.nk - 1)  # (c, B, Hkv, W)
        m5 = torch.zeros((), dtype=self.acc, device=kpos.device) if m is None else m.view(c, 1, 1, 1, run.width)
        if self.kpm is not None:
            kp = self.kpm[:, kpos[:, 0, 0]].transpose(0, 1)  # (c, B, W)
            m5 = m5 + kp[:, :, None, None, :].to(self.acc)
        m5 = m5.expand(c, self.b, self.hkv, 1, run.width)
        return self._finish(m5, kpos, r0, r1, self.hkv)

    def _finish(self, m: torch.Tensor, kpos: torch.Tensor, r0: int, r1: int, hx: int | None = None) -> torch.Tensor:
        """(c, B, Hx, rows, W) -> (c, B*Hx, rows', W), adding the bias (which makes rows' = gx * T)."""
        hx = hx or self.hx
        gx, c, w = self.hq // hx, r1 - r0, m.shape[-1]
        if self.bias is None:
            if m.shape[3] == 1:
                return m.reshape(c, self.b * hx, 1, w)
            return m[:, :, :, None].expand(c, self.b, hx, gx, self.t, w).reshape(c, self.b * hx, gx * self.t, w)
        m = m[:, :, :, None] + self.bias.b4.detach()[self._bias_index(kpos, r0, r1, hx)].to(self.acc)
        return m.expand(c, self.b, hx, gx, self.t, w).reshape(c, self.b * hx, gx * self.t, w)

    def _bias_index(self, kpos: torch.Tensor, r0: int, r1: int, hx: int) -> tuple[torch.Tensor, ...]:
        """Indices into the bias ``(B', H', Nq', Nk')`` of a chunk's pairs, broadcast to (c, B, Hx, gx, T, W)."""
        assert self.bias is not None
        b4, dev, gx, c = self.bias.b4, kpos.device, self.hq // hx, r1 - r0
        bi = torch.arange(self.b, device=dev).view(1, -1, 1, 1, 1, 1) * (b4.shape[0] > 1)
        heads = torch.arange(hx, device=dev)[:, None] * gx + torch.arange(gx, device=dev)
        hi = heads.view(1, 1, hx, gx, 1, 1) * (b4.shape[1] > 1)
        qi = self.qpos[r0:r1].clamp(min=0).view(c, 1, 1, 1, self.t, 1) * (b4.shape[2] > 1)
        ki = kpos.clamp(0, self.nk - 1)[:, :, :, None, None, :] * (b4.shape[3] > 1)
        return bi, hi, qi, ki

    def bias_grad(self, grad: torch.Tensor, kpos: torch.Tensor, r0: int, r1: int, ds: torch.Tensor,
                  hx: int) -> None:
        gx, c = self.hq // hx, r1 - r0
        ds = ds.view(c, self.b, hx, gx, self.t, -1)
        keep = (self.qpos[r0:r1] >= 0).view(c, 1, 1, 1, self.t, 1) & ((kpos >= 0) & (kpos < self.nk))[:, :, :, None,
                                                                                                        None]
        ds = torch.where(keep, ds, 0.0)
        idx = tuple(x.expand(ds.shape) for x in self._bias_index(kpos, r0, r1, hx))
        grad.index_put_(idx, ds.to(grad.dtype), accumulate=True)

    def run_kpos(self, r0: int, r1: int) -> torch.Tensor:
        run = self.run
        assert run is not None
        kpos = (run.first + torch.arange(r0, r1, device=run.ok.device)[:, None] * run.step
                + torch.arange(run.width, device=run.ok.device))
        return torch.where(run.ok[r0:r1], kpos, -1)[:, None, None, :].expand(-1, self.b, self.hkv, -1)


def _kernel_forward(pb: _Problem, qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                    mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    qc, kc, vc = unit_last(qc), unit_last(kc), unit_last(vc)
    if pb.fused:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qc, kc, vc, attn_mask=mask,
                                                                               scale=pb.scale)
        if mask is None:
            return out, lse
        live = (mask > float("-inf")).any(-1)  # the fused operator reports lse = 0 for a row with no key
        return out, torch.where(live, lse, float("-inf"))
    m = mask if mask is not None else torch.zeros((), dtype=pb.acc, device=qc.device)
    return matmul_forward(qc, kc, vc, m, pb.scale)


def _kernel_backward(pb: _Problem, doc, qc, kc, vc, oc, lc, mask):
    qc, kc, vc = unit_last(qc), unit_last(kc), unit_last(vc)
    if pb.fused:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            doc, qc, kc, vc, oc, lc, 0.0, False, attn_mask=mask, scale=pb.scale)
        return dq, dk, dv, None
    m = mask if mask is not None else torch.zeros((), dtype=pb.acc, device=qc.device)
    return matmul_backward(doc, qc, kc, vc, oc, lc, m, pb.scale)


def _streams_of(pb: _Problem) -> list[str]:
    names = ["run"] if pb.run is not None else []
    return names + [n for n, st in (("full", pb.full), ("partial", pb.part)) if not st.empty]


def _forward(pb: _Problem, name: str, qb: torch.Tensor, keys: tuple[torch.Tensor, torch.Tensor]):
    out = qb.new_empty(*qb.shape[:-1], pb.dv)
    lse = torch.empty(qb.shape[:-1], dtype=pb.acc, device=qb.device)
    if name == "run":
        assert pb.run is not None
        kr, vr = keys
        for r0, r1 in pb.chunks(pb.run.width, False):
            o, lc = _kernel_forward(pb, pb.rows(qb, r0, r1, pb.hkv), pb.run_view(kr, r0, r1),
                                    pb.run_view(vr, r0, r1), pb.run_mask(r0, r1))
            pb.rows(out, r0, r1, pb.hkv).copy_(o)
            pb.rows(lse[..., None], r0, r1, pb.hkv).copy_(lc[..., None])
        return out, lse
    st, token = (pb.full, False) if name == "full" else (pb.part, True)
    kb, vb = keys
    chunks = pb.chunks(st.width * pb.kb, token)
    kbuf, vbuf = pb.buffer(st, chunks, pb.d, qb.device), pb.buffer(st, chunks, pb.dv, qb.device)
    for r0, r1 in chunks:
        o, lc = _kernel_forward(pb, pb.rows(qb, r0, r1), pb.gather(kb, st, r0, r1, kbuf),
                                pb.gather(vb, st, r0, r1, vbuf), pb.mask(st, r0, r1, token))
        pb.rows(out, r0, r1).copy_(o)
        pb.rows(lse[..., None], r0, r1).copy_(lc[..., None])
    return out, lse


def _backward(pb: _Problem, name: str, qb, ob, lb, dob, dqb, keys, grads, dbias) -> None:
    if name == "run":
        assert pb.run is not None
        (kr, vr), (dkr, dvr) = keys, grads
        for r0, r1 in pb.chunks(pb.run.width, False):
            h = pb.hkv
            mask = pb.run_mask(r0, r1)
            dq, dk, dv, ds = _kernel_backward(pb, pb.rows(dob, r0, r1, h), pb.rows(qb, r0, r1, h),
                                              pb.run_view(kr, r0, r1), pb.run_view(vr, r0, r1),
                                              pb.rows(ob, r0, r1, h), pb.rows(lb[..., None], r0, r1, h)[..., 0], mask)
            if dbias is not None and ds is not None:
                pb.bias_grad(dbias, pb.run_kpos(r0, r1), r0, r1, ds, h)
            pb.rows(dqb, r0, r1, h).add_(dq)
            pb.run_scatter(dkr, r0, r1, dk)
            pb.run_scatter(dvr, r0, r1, dv)
        return
    st, token = (pb.full, False) if name == "full" else (pb.part, True)
    (kb, vb), (dkb, dvb) = keys, grads
    chunks = pb.chunks(st.width * pb.kb, token)
    kbuf, vbuf = pb.buffer(st, chunks, pb.d, qb.device), pb.buffer(st, chunks, pb.dv, qb.device)
    for r0, r1 in chunks:
        dq, dk, dv, ds = _kernel_backward(pb, pb.rows(dob, r0, r1), pb.rows(qb, r0, r1),
                                          pb.gather(kb, st, r0, r1, kbuf), pb.gather(vb, st, r0, r1, vbuf),
                                          pb.rows(ob, r0, r1), pb.rows(lb[..., None], r0, r1)[..., 0],
                                          pb.mask(st, r0, r1, token))
        if dbias is not None and ds is not None:
            pb.bias_grad(dbias, torch.where(pb.kpos(st, r0, r1) < pb.nk, pb.kpos(st, r0, r1), -1), r0, r1, ds, pb.hx)
        pb.rows(dqb, r0, r1).add_(dq)
        pb.scatter(dkb, st, r0, r1, dk)
        pb.scatter(dvb, st, r0, r1, dv)


class _Selected(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_tensor: torch.Tensor | None,
                pb: _Problem) -> tuple[torch.Tensor, torch.Tensor]:
        qb = pb.q_blocks(q)
        names = _streams_of(pb)
        outs, lses = [], []
        for name in names:
            keys = (pb.k_rows(k), pb.k_rows(v)) if name == "run" else (pb.k_blocks(k), pb.k_blocks(v))
            o, lc = _forward(pb, name, qb, keys)
            outs.append(o)
            lses.append(lc)
        if not names:  # nothing to attend anywhere
            ob = qb.new_zeros(*qb.shape[:-1], pb.dv)
            lse = torch.full(qb.shape[:-1], float("-inf"), dtype=pb.acc, device=qb.device)
        elif len(names) == 1:
            ob, lse = outs[0], lses[0]
        else:
            lse = torch.logsumexp(torch.stack(lses), 0)
            safe = torch.where(torch.isneginf(lse), 0.0, lse)
            ob = sum(o * torch.exp(lc - safe)[..., None] for o, lc in zip(outs, lses))
            ob = ob.to(qb.dtype)
        ctx.pb, ctx.names = pb, names
        ctx.save_for_backward(q, k, v, ob, lse)
        out = pb.q_unblocks(ob).to(q.dtype)
        lse_out = pb.q_unblocks(lse)
        ctx.mark_non_differentiable(lse_out)
        return out, lse_out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, _grad_lse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        pb: _Problem = ctx.pb
        q, k, v, ob, lse = ctx.saved_tensors
        qb, dob = pb.q_blocks(q), pb.q_blocks(grad_out)
        lb = torch.where(torch.isneginf(lse), float("inf"), lse)  # no key: p = exp(s - inf) = 0
        grad_dtype = pb.acc if q.dtype in (torch.float16, torch.bfloat16) else pb.compute_dtype
        dqb = torch.zeros_like(qb)
        dbias = None
        if pb.bias is not None and pb.bias.requires_grad:
            dbias = torch.zeros(pb.bias.b4.shape, dtype=pb.acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=grad_dtype, device=k.device)
        dv = torch.zeros(v.shape, dtype=grad_dtype, device=v.device)
        for name in ctx.names:
            if name == "run":
                assert pb.run is not None
                keys = (pb.k_rows(k), pb.k_rows(v))
                grads = (torch.zeros_like(keys[0], dtype=grad_dtype), torch.zeros_like(keys[1], dtype=grad_dtype))
                _backward(pb, name, qb, ob, lb, dob, dqb, keys, grads, dbias)
                lo, hi = pb.run.front, pb.run.front + pb.nk
                dk += grads[0][:, lo:hi].view(dk.shape)
                dv += grads[1][:, lo:hi].view(dv.shape)
            else:
                keys = (pb.k_blocks(k), pb.k_blocks(v))
                grads = (torch.zeros_like(keys[0], dtype=grad_dtype), torch.zeros_like(keys[1], dtype=grad_dtype))
                _backward(pb, name, qb, ob, lb, dob, dqb, keys, grads, dbias)
                dk += grads[0].view(pb.b, pb.hkv, pb.nkb * pb.kb, -1)[:, :, :pb.nk]
                dv += grads[1].view(pb.b, pb.hkv, pb.nkb * pb.kb, -1)[:, :, :pb.nk]
        db = None
        if dbias is not None:
            assert pb.bias is not None
            db = dbias.to(pb.bias.tensor.dtype).reshape(pb.bias.tensor.shape)
        return pb.q_unblocks(dqb).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), db, None


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
    """What a call does: key blocks per query block in each stream (the run's width in blocks), and the fraction of
    the dense ``Nq x Nk`` scores computed (for benchmarks and tests)."""
    run, full, part, hx = _streams(pattern, blocks, b, hq, hkv, nq, nk)
    run_blocks = run.width / blocks.k_block if run is not None else 0.0
    qb = math.ceil(nq / blocks.q_block)
    work = (full.width + part.width + run_blocks) * blocks.k_block * blocks.q_block * qb
    return {"run_blocks": run_blocks, "full_blocks": float(full.width), "partial_blocks": float(part.width),
            "density": work / max(1, nq * nk), "list_heads": float(hx)}
