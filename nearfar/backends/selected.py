"""The block-sparse engine of run-time key blocks: ``SelectedBlocks`` joined with a static pattern.

``selected_plan`` splits the union of the pattern's pairs and the selection's pairs into streams of disjoint
pairs (strided runs of keys, cached static blocks, gathered selected blocks). Each chunk of query blocks runs one
fused-kernel call per stream, batched over batch items and heads, and merges the streams' results by their
log-sum-exp, which is exact since their pairs are disjoint; the backward pass runs each stream's backward with the
merged output and LSE (as FlashAttention splits keys), which gives its share of the gradients. No Python loop runs
over blocks, heads or batch items: only over chunks of query blocks, whose size bounds the memory of gathered keys
and masks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from ..bias import DenseBias
from ..patterns import Pattern
from ..plan import get_plan
from ..selection import SelectedBlocks
from .kernels import acc_dtype, equal_head_dims, fused_available, index_add, matmul_backward, matmul_forward, unit_last
from .native import supports as native_supports
from .native_selected import native_selected
from .selected_pairs import pairs_backward, pairs_forward
from .selected_plan import Stream, plan_streams

#: elements (gathered keys and values, masks, a chunk's queries and outputs) per chunk of query blocks
_CHUNK = 1 << 24
#: a list serving at most this many query rows is read pair by pair (``selected_pairs``)
PAIR_ROWS = 16


class _Problem:
    """Shapes, layouts and masks of one call. Queries live as ``(QB, B, Hq, T, e)`` blocks, so a chunk of query
    blocks is a view ``(c, B * H, (Hq / H) * T, e)`` for a stream whose key lists belong to ``H`` heads (a GQA
    group's queries stacked on one list); keys as flat tokens ``(B * Hkv * Nk, e)`` for gathers, or padded rows
    ``(B * Hkv, front + Nk + back, e)`` for runs."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern | None,
                 sel: SelectedBlocks, scale: float, kpm: torch.Tensor | None, bias: DenseBias | None) -> None:
        self.b, self.hq, self.nq, self.d = q.shape
        self.hkv, self.nk, self.dv = k.shape[1], k.shape[2], v.shape[-1]
        self.pattern, self.sel, self.scale, self.kpm, self.bias = pattern, sel, scale, kpm, bias
        self.t, self.kb = sel.q_block, sel.k_block
        self.qb, self.nkb = -(-self.nq // self.t), -(-self.nk // self.kb)
        plan = plan_streams(pattern, sel, self.b, self.hq, self.hkv, self.nq, self.nk)
        self.run, self.streams, self.hx = plan.run, plan.gathered, plan.hx
        half = q.dtype in (torch.float16, torch.bfloat16)
        self.compute_dtype = torch.float32 if half and q.device.type == "cpu" else q.dtype
        self.acc = acc_dtype(self.compute_dtype)
        self.grad_dtype = self.acc if half else self.compute_dtype  # dK/dV accumulate over chunks
        need_bias_grad = bias is not None and bias.requires_grad and torch.is_grad_enabled()
        self.fused = fused_available(q.device) and self.d == self.dv and not need_bias_grad
        qpos = torch.arange(self.qb * self.t, device=q.device)
        self.qpos = torch.where(qpos < self.nq, qpos, -1).view(self.qb, self.t)
        dev = q.device
        group = self.hq // self.hkv
        sel_kvh = torch.arange(self.hx, device=dev) // (group if self.hx == self.hq and self.hq != self.hkv else 1)
        bidx = torch.arange(self.b, device=dev)[:, None] * self.hkv
        self.base = {self.hkv: (bidx + torch.arange(self.hkv, device=dev)) * self.nk}  # (B, H) first flat key
        if self.hx != self.hkv:
            self.base[self.hx] = (bidx + sel_kvh) * self.nk
        self.whole_blocks = self.nk % self.kb == 0
        # lists that serve few query rows (per-token selections) are read key block by key block (selected_pairs)
        self.pair_streams = {st.name for st in self.streams if self.whole_blocks and bias is None
                             and (self.hq // st.heads) * self.t <= PAIR_ROWS}
        self.chunk_list = self._chunks()
        # block-level masks of the selected full blocks, for every chunk at once (few ops, however many chunks)
        self.block_masks = {st.name: self._block_mask(st) for st in self.streams if st.token is None}
        self.block_full_rows = {st.name: st.valid.flatten(1).all(-1) for st in self.streams if st.token is None}

    def _chunks(self) -> list[tuple[int, int]]:
        """One chunking for every stream (their results merge chunk by chunk)."""
        b, gt, e = self.b, self.hq * self.t, self.d + 2 * self.dv
        per_block = b * gt * (e + 2 * self.dv)  # the chunk's queries, outputs and each stream's output
        for st in self.streams:
            w = st.blocks * self.kb
            if st.name in self.pair_streams:  # per pair: the query rows, their output (and mask rows); keys per tile
                per_block += b * gt * st.blocks * (e + (self.kb if st.token or self.kpm is not None else 0))
                continue
            per_block += b * st.heads * w * (self.d + self.dv) + (b * gt * w if st.token or self.bias is not None
                                                                   else b * st.heads * w)
        if self.run is not None:
            per_block += b * gt * self.run.width if self.kpm is not None or self.bias is not None else self.run.width
        c = max(1, min(self.qb, _CHUNK // max(1, per_block)))
        return [(r0, min(self.qb, r0 + c)) for r0 in range(0, self.qb, c)]

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

    def rows(self, xb: torch.Tensor, r0: int, r1: int, heads: int) -> torch.Tensor:
        """A chunk of a ``(QB, B, Hq, T, ...)`` tensor as ``(c, B * heads, (Hq / heads) * T, ...)`` (a view)."""
        return xb[r0:r1].view(r1 - r0, self.b * heads, (self.hq // heads) * self.t, *xb.shape[4:])

    def k_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, Nk, e) -> (B * Hkv * Nk, e): a view of a contiguous cache (decoding copies nothing O(Nk))."""
        return x.to(self.compute_dtype).contiguous().view(-1, x.shape[-1])

    def k_rows(self, x: torch.Tensor) -> torch.Tensor:
        assert self.run is not None
        x = x.to(self.compute_dtype)
        if self.run.front or self.run.back:
            x = torch.nn.functional.pad(x, (0, 0, self.run.front, self.run.back))
        return x.contiguous().view(self.b * self.hkv, x.shape[2], x.shape[-1])  # as_strided assumes contiguity

    def keys(self, k: torch.Tensor, v: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        if self.run is not None:
            out["run"] = (self.k_rows(k), self.k_rows(v))
        if self.streams:
            out["blocks"] = (self.k_tokens(k), self.k_tokens(v))
        return out

    def run_view(self, xr: torch.Tensor, r0: int, r1: int, j: int = 0, width: int | None = None) -> torch.Tensor:
        """Keys ``first + r * step + [j, j + width)`` of query blocks ``r0:r1``, as a (c, B*Hkv, width, e) view."""
        run = self.run
        assert run is not None
        n, e = xr.shape[1], xr.shape[2]
        width = run.width if width is None else width
        start = run.front + run.first + r0 * run.step + j
        return xr.as_strided((r1 - r0, xr.shape[0], width, e), (run.step * e, n * e, e, 1),
                             xr.storage_offset() + start * e)

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

    def flat_rows(self, st: Stream, r0: int, r1: int) -> torch.Tensor:
        """Rows of the chunk's keys in ``k_tokens`` (B * Hkv * Nk, e): whole blocks (rows of ``kv_block`` tokens)
        when ``Nk`` is a multiple of ``kv_block``, else token by token, where past the end (the last short block)
        a slot reads the head's last key, which the mask drops."""
        if self.whole_blocks:
            blk = torch.where(st.valid[r0:r1], st.blk[r0:r1], 0).expand(-1, self.b, st.heads, -1)
            return (self.base[st.heads][None, :, :, None] // self.kb + blk).reshape(-1)
        pos = self.kpos(st, r0, r1).clamp(0, self.nk - 1).expand(-1, self.b, st.heads, -1)
        return (self.base[st.heads][None, :, :, None] + pos).reshape(-1)

    def gather(self, kt: torch.Tensor, rows: torch.Tensor, st: Stream, c: int, buf: torch.Tensor) -> torch.Tensor:
        """Key (or value) tokens of a chunk as (c, B*H, S*kv_block, e), into ``buf``."""
        e = kt.shape[-1]
        if self.whole_blocks:  # one row per block: fewer, longer copies
            out = buf[:rows.numel() * self.kb].view(-1, self.kb * e)
            torch.index_select(kt.view(-1, self.kb * e), 0, rows, out=out)
        else:
            out = buf[:rows.numel()]
            torch.index_select(kt, 0, rows, out=out)
        return out.view(c, self.b * st.heads, st.blocks * self.kb, e)

    def scatter(self, dkt: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """Add a chunk's key (or value) gradient back to the rows it was gathered from."""
        e = dkt.shape[-1]
        if self.whole_blocks:
            index_add(dkt.view(-1, self.kb * e), 0, rows, grad.reshape(-1, self.kb * e).to(dkt.dtype))
        else:
            index_add(dkt, 0, rows, grad.reshape(-1, e).to(dkt.dtype))

    def buffers(self, e: int, device: torch.device) -> dict[str, torch.Tensor]:
        c = max(r1 - r0 for r0, r1 in self.chunk_list)
        return {st.name: torch.empty(c * self.b * st.heads * st.blocks * self.kb, e, dtype=self.compute_dtype,
                                     device=device) for st in self.streams if st.name not in self.pair_streams}

    # ----- masks -----
    def _block_mask(self, st: Stream) -> tuple[torch.Tensor, torch.Tensor]:
        """(QB, B|1, H|1, 1, W) additive validity of a block-level stream's slots, and (QB, B|1, H|1, 1) rows with
        a key."""
        ok = st.valid[:, :, :, None, :, None].expand(-1, -1, -1, -1, -1, self.kb).flatten(-2)
        return torch.where(ok, 0.0, float("-inf")).to(self.acc), st.valid.any(-1)[..., None]

    def kpos(self, st: Stream, r0: int, r1: int) -> torch.Tensor:
        """Key positions (c, B|1, H|1, W), -1 where the slot is empty."""
        pos = st.blk[r0:r1, :, :, :, None] * self.kb + torch.arange(self.kb, device=st.blk.device)
        return torch.where(st.valid[r0:r1, :, :, :, None], pos, -1).flatten(-2)

    def mask(self, st: Stream | None, r0: int, r1: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A chunk's additive mask ``(c, B*H or 1, rows, W)`` (rows = 1 when a block-level mask is enough) and its
        rows that have a key (broadcastable to the kernel's LSE ``(c, B*H, (Hq / H) * T)``); ``st`` None: the run."""
        c = r1 - r0
        if st is None:
            run = self.run
            assert run is not None
            heads = self.hkv
            kpos = run.keys(r0, r1)[:, None, None]  # (c, 1, 1, W)
            m5: torch.Tensor | None
            if run.tok is not None:  # the run holds partial blocks: a token mask
                assert run.uniform is not None and run.shared is not None and run.shared_live is not None
                if self.kpm is None and self.bias is None and bool(run.uniform[r0:r1].all()):
                    return run.shared.to(self.acc), run.shared_live  # one mask for the whole chunk
                m5 = torch.where(run.tok[r0:r1], 0.0, float("-inf")).to(self.acc)[:, None, None]  # (c, 1, 1, T, W)
            else:
                m5 = None if bool(run.all_ok[r0:r1].all()) else run.mask[r0:r1, :, :, None].to(self.acc)
        else:
            heads = st.heads
            if st.token is None and self.kpm is None and self.bias is None:  # precomputed, block level
                if bool(self.block_full_rows[st.name][r0:r1].all()):  # every slot of the chunk in use: no mask
                    return None, None
                m5, live = (x[r0:r1] for x in self.block_masks[st.name])
                return self._expand(m5, heads), self._expand(live[..., None], heads)[..., 0]
            kpos = self.kpos(st, r0, r1)
            if st.token == "static" and self.kpm is None and self.bias is None:  # cached, as the kernel takes it
                assert st.mask is not None and st.live is not None
                return st.mask[r0:r1].to(self.acc), st.live[r0:r1]
            if st.token == "static":
                assert st.mask is not None
                m5 = st.mask[r0:r1, :, None, :self.t].to(self.acc)  # (c, 1, 1, T, W): the first head's rows
            elif st.token == "sel":
                m5 = self._sel_token_mask(st, kpos, r0, r1)
            else:
                m5 = self.block_masks[st.name][0][r0:r1]
        if self.kpm is not None:
            kpe = kpos.clamp(0, self.nk - 1).expand(c, self.b, kpos.shape[2], kpos.shape[3])
            kp = self.kpm[torch.arange(self.b, device=kpos.device).view(1, -1, 1, 1), kpe]  # (c, B, H|1, W)
            m5 = kp[:, :, :, None].to(self.acc) + (0.0 if m5 is None else m5)
        if self.bias is not None:
            m5 = torch.zeros((), dtype=self.acc, device=kpos.device) if m5 is None else m5
            m6 = m5[:, :, :, None] + self._bias_values(kpos, r0, r1, heads)
            m = m6.reshape(c, self.b * heads, (self.hq // heads) * self.t, -1)
            return m, (m > float("-inf")).any(-1)
        if m5 is None:
            return None, None
        live5 = (m5 > float("-inf")).any(-1)  # (c, B|1, H|1, rows)
        return self._expand(m5, heads), self._expand(live5[..., None], heads)[..., 0]

    def _expand(self, m5: torch.Tensor, heads: int) -> torch.Tensor:
        """(c, B|1, H|1, rows, W) -> (c, B*H or 1, g*rows or 1, W) with g = Hq / heads (broadcast dims kept)."""
        c, bb, hh, rows, w = m5.shape
        g = self.hq // heads
        if rows > 1 and g > 1:  # a broadcasting add writes the repeated rows in one pass (expand + copy is slower)
            m5 = (m5[:, :, :, None] + torch.zeros(g, 1, 1, dtype=m5.dtype, device=m5.device)).view(c, bb, hh, g * rows,
                                                                                                     w)
        if bb == 1 and hh == 1:
            return m5.reshape(c, 1, m5.shape[3], w)
        return m5.expand(c, self.b, heads, m5.shape[3], w).reshape(c, self.b * heads, m5.shape[3], w)

    def _sel_token_mask(self, st: Stream, kpos: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """``within & ~(overlap & pattern)`` on the selected partial blocks, (c, B|1, H, T, W)."""
        qpos = self.qpos[r0:r1].clamp(min=0)[:, None, None, :, None]
        kp = kpos[:, :, :, None]
        ok = (kp >= 0) & (kp < self.nk) & (self.qpos[r0:r1] >= 0)[:, None, None, :, None]
        within = self.sel.within
        if within is not None:
            ok = ok & within.allowed(qpos, kp, self.nq, self.nk)
        if self.pattern is not None and st.overlap is not None:
            flag = st.overlap[r0:r1, :, :, :, None].expand(-1, -1, -1, -1, self.kb).flatten(-2)[:, :, :, None]
            ok = ok & ~(flag & self.pattern.allowed(qpos, kp, self.nq, self.nk))
        return torch.where(ok, 0.0, float("-inf")).to(self.acc)

    def _bias_index(self, kpos: torch.Tensor, r0: int, r1: int, heads: int) -> tuple[torch.Tensor, ...]:
        """Indices into the bias ``(B', H', Nq', Nk')`` of a chunk's pairs, broadcast to (c, B, H, g, T, W)."""
        assert self.bias is not None
        b4, dev, g, c = self.bias.b4, kpos.device, self.hq // heads, r1 - r0
        bi = torch.arange(self.b, device=dev).view(1, -1, 1, 1, 1, 1) * (b4.shape[0] > 1)
        hd = torch.arange(heads, device=dev)[:, None] * g + torch.arange(g, device=dev)
        hi = hd.view(1, 1, heads, g, 1, 1) * (b4.shape[1] > 1)
        qi = self.qpos[r0:r1].clamp(min=0).view(c, 1, 1, 1, self.t, 1) * (b4.shape[2] > 1)
        ki = kpos.clamp(0, self.nk - 1)[:, :, :, None, None, :] * (b4.shape[3] > 1)
        return bi, hi, qi, ki

    def _bias_values(self, kpos: torch.Tensor, r0: int, r1: int, heads: int) -> torch.Tensor:
        assert self.bias is not None
        return self.bias.b4.detach()[self._bias_index(kpos, r0, r1, heads)].to(self.acc)

    def bias_grad(self, grad: torch.Tensor, st: Stream | None, r0: int, r1: int, ds: torch.Tensor) -> None:
        run = self.run
        heads = self.hkv if st is None else st.heads
        if st is None:
            assert run is not None
            kpos = run.keys(r0, r1)[:, None, None]
        else:
            kpos = self.kpos(st, r0, r1)
        c, g = r1 - r0, self.hq // heads
        ds = ds.view(c, self.b, heads, g, self.t, -1)
        keep = (self.qpos[r0:r1] >= 0).view(c, 1, 1, 1, self.t, 1) & ((kpos >= 0) & (kpos < self.nk))[:, :, :, None,
                                                                                                        None]
        ds = torch.where(keep, ds, 0.0)
        idx = tuple(x.expand(ds.shape) for x in self._bias_index(kpos, r0, r1, heads))
        grad.index_put_(idx, ds.to(grad.dtype), accumulate=True)


def _kernel_forward(pb: _Problem, qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, mask: torch.Tensor | None,
                    live: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    qc, kc, vc = unit_last(qc), unit_last(kc), unit_last(vc)
    if pb.fused:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qc, kc, vc, attn_mask=mask,
                                                                               scale=pb.scale)
        if live is None:
            return out, lse
        return out, lse.masked_fill(~live, float("-inf"))  # the fused operator reports lse = 0 for a row with no key
    m = mask if mask is not None else torch.zeros((), dtype=pb.acc, device=qc.device)
    return matmul_forward(qc, kc, vc, m, pb.scale)


def _kernel_backward(pb: _Problem, doc: torch.Tensor, qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                     oc: torch.Tensor, lc: torch.Tensor,
                     mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    qc, kc, vc = unit_last(qc), unit_last(kc), unit_last(vc)
    if pb.fused:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            doc, qc, kc, vc, oc, lc, 0.0, False, attn_mask=mask, scale=pb.scale)
        return dq, dk, dv, None
    m = mask if mask is not None else torch.zeros((), dtype=pb.acc, device=qc.device)
    return matmul_backward(doc, qc, kc, vc, oc, lc, m, pb.scale)


def _sources(pb: _Problem, keys: dict, r0: int, r1: int,
             bufs: dict | None) -> Iterator[tuple[Stream | None, int, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(stream or None for the run, heads, k chunk, v chunk, flat rows or None) of every stream of a chunk."""
    if pb.run is not None:
        kr, vr = keys["run"]
        yield None, pb.hkv, pb.run_view(kr, r0, r1), pb.run_view(vr, r0, r1), None
    for st in pb.streams:
        if st.name in pb.pair_streams:
            continue
        kb, vb = keys["blocks"]
        rows = pb.flat_rows(st, r0, r1)
        assert bufs is not None
        yield (st, st.heads, pb.gather(kb, rows, st, r1 - r0, bufs["k"][st.name]),
               pb.gather(vb, rows, st, r1 - r0, bufs["v"][st.name]), rows)


def _forward(pb: _Problem, qb: torch.Tensor, keys: dict) -> tuple[torch.Tensor, torch.Tensor]:
    ob = qb.new_empty(*qb.shape[:-1], pb.dv)
    lse = torch.empty(qb.shape[:-1], dtype=pb.acc, device=qb.device)
    bufs = {"k": pb.buffers(pb.d, qb.device), "v": pb.buffers(pb.dv, qb.device)}
    for r0, r1 in pb.chunk_list:
        c = r1 - r0
        outs, lses = [], []
        for st, heads, kc, vc, _ in _sources(pb, keys, r0, r1, bufs):
            mask, live = pb.mask(st, r0, r1)
            o, lc = _kernel_forward(pb, pb.rows(qb, r0, r1, heads), kc, vc, mask, live)
            outs.append(o.reshape(c, pb.b, pb.hq, pb.t, pb.dv))
            lses.append(lc.reshape(c, pb.b, pb.hq, pb.t))
        for st in pb.streams:
            if st.name in pb.pair_streams:
                kt, vt = keys["blocks"]
                o, lc = pairs_forward(pb, st, r0, r1, qb, kt.view(-1, pb.kb, pb.d), vt.view(-1, pb.kb, pb.dv))
                outs.append(o)
                lses.append(lc)
        if not outs:
            ob[r0:r1] = 0.0
            lse[r0:r1] = float("-inf")
            continue
        if len(outs) == 1:
            ob[r0:r1], lse[r0:r1] = outs[0], lses[0]
            continue
        total = torch.logsumexp(torch.stack(lses), 0)
        safe = torch.where(torch.isneginf(total), 0.0, total)
        dst = ob[r0:r1]
        torch.mul(outs[0], torch.exp(lses[0] - safe)[..., None], out=dst)
        for o, lc in zip(outs[1:], lses[1:]):
            dst.addcmul_(o, torch.exp(lc - safe)[..., None])
        lse[r0:r1] = total
    return ob, lse


def _backward(pb: _Problem, qb: torch.Tensor, ob: torch.Tensor, lb: torch.Tensor, dob: torch.Tensor, keys: dict,
              dbias: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    dqb = torch.zeros_like(qb)
    grads = {name: tuple(torch.zeros_like(x, dtype=pb.grad_dtype) for x in pair) for name, pair in keys.items()}
    bufs = {"k": pb.buffers(pb.d, qb.device), "v": pb.buffers(pb.dv, qb.device)}
    for r0, r1 in pb.chunk_list:
        for st, heads, kc, vc, rows in _sources(pb, keys, r0, r1, bufs):
            mask, _ = pb.mask(st, r0, r1)
            dq, dk, dv, ds = _kernel_backward(pb, pb.rows(dob, r0, r1, heads), pb.rows(qb, r0, r1, heads), kc, vc,
                                              pb.rows(ob, r0, r1, heads), pb.rows(lb[..., None], r0, r1, heads)[..., 0],
                                              mask)
            if dbias is not None and ds is not None:
                pb.bias_grad(dbias, st, r0, r1, ds)
            pb.rows(dqb, r0, r1, heads).add_(dq)
            if st is None:
                dkr, dvr = grads["run"]
                pb.run_scatter(dkr, r0, r1, dk)
                pb.run_scatter(dvr, r0, r1, dv)
            else:
                dkb, dvb = grads["blocks"]  # slots past the end carry zero gradient (masked)
                assert rows is not None
                pb.scatter(dkb, rows, dk)
                pb.scatter(dvb, rows, dv)
        for st in pb.streams:
            if st.name in pb.pair_streams:
                (kt, vt), (dkt, dvt) = keys["blocks"], grads["blocks"]
                pairs_backward(pb, st, r0, r1, qb, ob, lb, dob, dqb, kt.view(-1, pb.kb, pb.d),
                               vt.view(-1, pb.kb, pb.dv), dkt.view(-1, pb.kb, pb.d), dvt.view(-1, pb.kb, pb.dv))
    return dqb, grads


class _Selected(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_tensor: torch.Tensor | None,
                pb: _Problem) -> tuple[torch.Tensor, torch.Tensor]:
        qb = pb.q_blocks(q)
        ob, lse = _forward(pb, qb, pb.keys(k, v))
        ctx.pb = pb
        ctx.save_for_backward(q, k, v, ob, lse)
        out = pb.q_unblocks(ob).to(q.dtype)
        lse_out = pb.q_unblocks(lse)
        ctx.mark_non_differentiable(lse_out)
        ctx.set_materialize_grads(False)  # no zeros tensor for lse_out's gradient: it has none
        return out, lse_out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, _grad_lse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        pb: _Problem = ctx.pb
        q, k, v, ob, lse = ctx.saved_tensors
        qb, dob = pb.q_blocks(q), pb.q_blocks(grad_out)
        lb = torch.where(torch.isneginf(lse), float("inf"), lse)  # no key: p = exp(s - inf) = 0
        dbias = None
        if pb.bias is not None and pb.bias.requires_grad:
            dbias = torch.zeros(pb.bias.b4.shape, dtype=pb.acc, device=q.device)
        dqb, grads = _backward(pb, qb, ob, lb, dob, pb.keys(k, v), dbias)
        dk = torch.zeros(k.shape, dtype=pb.grad_dtype, device=k.device)
        dv = torch.zeros(v.shape, dtype=pb.grad_dtype, device=v.device)
        if "run" in grads:
            assert pb.run is not None
            lo, hi = pb.run.front, pb.run.front + pb.nk
            dk += grads["run"][0][:, lo:hi].view(dk.shape)
            dv += grads["run"][1][:, lo:hi].view(dv.shape)
        if "blocks" in grads:
            dk += grads["blocks"][0].view(dk.shape)
            dv += grads["blocks"][1].view(dv.shape)
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

    ``kpm`` is an additive (B, Nk) float mask, ``bias`` a dense bias source. Returns ``(out, lse or None)``.
    Without a bias, on CPU with the compiled kernel loaded, the kernel runs it (``native_selected``)."""
    if bias is None and native_supports(q):
        plan = get_plan(pattern, q.shape[2], k.shape[2], device=q.device) if pattern is not None else None
        out, lse = native_selected(q, k, v, pattern, blocks, scale, plan, kpm)
        return out, (lse if return_lse else None)
    padded = equal_head_dims(q, k, v)
    if padded is not None:
        out, lse = selected_attention(*padded, pattern, blocks, scale, kpm, bias, return_lse)
        return out[..., :v.shape[-1]], lse
    pb = _Problem(q, k, v, pattern, blocks, scale, kpm, bias)
    out, lse = _Selected.apply(q, k, v, bias.tensor if bias is not None else None, pb)
    return out, (lse if return_lse else None)


def selection_work(pattern: Pattern | None, blocks: SelectedBlocks, b: int, hq: int, hkv: int, nq: int,
                   nk: int) -> dict[str, float]:
    """What a call does: key blocks per query block in each stream (the run's width in blocks), and the fraction of
    the dense ``Nq x Nk`` scores computed (for benchmarks and tests)."""
    plan = plan_streams(pattern, blocks, b, hq, hkv, nq, nk)
    work = {"run": plan.run.width / blocks.k_block if plan.run is not None else 0.0}
    work |= {st.name: float(st.blocks) for st in plan.gathered}
    qb = math.ceil(nq / blocks.q_block)
    work["density"] = sum(work.values()) * blocks.k_block * blocks.q_block * qb / max(1, nq * nk)
    return work
