"""Selected key blocks read block by block, for selections made per query (or per few queries).

``pb`` and ``st`` below are the engine's ``_Problem`` and the plan's ``Stream`` (``backends.selected``).

When every key list serves only a few query rows (``q_block`` 1: MoBA's and LongHeads' per-token choices, HiP's
single-query search), gathering each list's blocks copies ``kv_block`` keys per query row and block. Here the
(query, block) pairs are grouped by key block instead, as MoBA's efficient kernel does: a tile is one key block
(read whole, by index) and up to ``ROWS`` query rows that chose it, so keys are read once per tile and queries
once per pair. Each pair's softmax part comes back with its log-sum-exp, and a query's parts are merged by their
LSE (scatter max and scatter sums), which is exact since the blocks of a list are distinct; the backward pass runs
each tile's backward with the merged output and LSE of its rows. Partial blocks get their token mask per tile.
"""

from __future__ import annotations

from typing import Any

import torch

from .kernels import index_add, matmul_backward, matmul_forward

#: query rows per tile (pairs of one key block)
ROWS = 64


def pair_tiles(valid: torch.Tensor, blk: torch.Tensor, base: torch.Tensor, per_entry: int,
               flags: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Tiles of (entry, key block) pairs: ``entries (NT, M)`` (-1 empty), the flat key-block row of each tile, and
    ``flags`` of each pair (``(NT, M)``, when given).

    Args:
        valid: Bool ``(c, B, H, S)``: the chunk's list slots in use.
        blk: Key-block index of each slot ``(c, B, H, S)``.
        base: First flat key-block row of each ``(B, H)`` list.
        per_entry: Query rows of one entry (``(Hq / H) * q_block``).
        flags: Bool ``(c, B, H, S)`` per slot, carried to its pair (the selected blocks the pattern reads partly).

    Returns:
        ``(entries, rows, flags)``: entry ``e = (query block * B + b) * H + h`` of each tile slot, each tile's
        row, the pairs' flags (None when not given).
    """
    c, b, h, s = blk.shape
    kr = (base[None, :, :, None] + blk)[valid]
    ent = torch.arange(c * b * h, device=blk.device).view(c, b, h, 1).expand(c, b, h, s)[valid]
    order = torch.argsort(kr, stable=True)
    kr, ent = kr[order], ent[order]
    fl = flags.expand(c, b, h, s)[valid][order] if flags is not None else None
    m = max(1, ROWS // per_entry)
    uniq, counts = torch.unique_consecutive(kr, return_counts=True)
    tiles_per = (counts + m - 1) // m
    pos = torch.arange(kr.numel(), device=kr.device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    tile = torch.repeat_interleave(torch.cumsum(tiles_per, 0) - tiles_per, counts) + torch.div(pos, m,
                                                                                              rounding_mode="floor")
    entries = torch.full((int(tiles_per.sum()), m), -1, dtype=torch.long, device=blk.device)
    entries[tile, pos % m] = ent
    tile_flags = None
    if fl is not None:
        tile_flags = torch.zeros(entries.shape, dtype=torch.bool, device=blk.device)
        tile_flags[tile, pos % m] = fl
    return entries, torch.repeat_interleave(uniq, tiles_per), tile_flags


def _tile_mask(pb: Any, st: Any, r0: int, entries: torch.Tensor, rows: torch.Tensor,
               flags: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Each tile's additive mask ``(NT, 1, M * g * T or 1, kv_block)`` (key padding; the token mask of a partial
    stream) and its rows that have a key (None: no mask)."""
    nt, m = entries.shape
    kpos = (rows % pb.nkb)[:, None] * pb.kb + torch.arange(pb.kb, device=rows.device)  # (NT, kb)
    mask = None
    if st.token is not None:
        heads = st.heads
        qblk = torch.div(entries.clamp(min=0), pb.b * heads, rounding_mode="floor") + r0  # (NT, M)
        qpos = pb.qpos[qblk]  # (NT, M, T), -1 past the end
        qp, kp = qpos.clamp(min=0)[..., None], kpos[:, None, None, :]
        ok = (qpos >= 0)[..., None] & (entries >= 0)[:, :, None, None]
        if st.token == "static":
            ok = ok & pb.pattern.allowed(qp, kp, pb.nq, pb.nk)
        else:
            if pb.sel.within is not None:
                ok = ok & pb.sel.within.allowed(qp, kp, pb.nq, pb.nk)
            if pb.pattern is not None and flags is not None:
                ok = ok & ~(flags[:, :, None, None] & pb.pattern.allowed(qp, kp, pb.nq, pb.nk))
        g = pb.hq // heads
        ok = ok[:, :, None].expand(nt, m, g, pb.t, pb.kb).reshape(nt, 1, m * g * pb.t, pb.kb)
        mask = torch.where(ok, 0.0, float("-inf")).to(pb.acc)
    if pb.kpm is not None:
        kp = pb.kpm[torch.div(rows, pb.hkv * pb.nkb, rounding_mode="floor")[:, None], kpos][:, None, None]
        mask = kp.to(pb.acc) if mask is None else mask + kp.to(pb.acc)
    if mask is None:
        return None, None
    return mask, (mask > float("-inf")).any(-1)


def _tiles(pb: Any, st: Any, r0: int, r1: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    heads = st.heads
    return pair_tiles(st.valid[r0:r1].expand(-1, pb.b, heads, -1), st.blk[r0:r1].expand(-1, pb.b, heads, -1),
                      pb.base[heads] // pb.kb, rows, st.overlap[r0:r1] if st.overlap is not None else None)


def pairs_forward(pb: Any, st: Any, r0: int, r1: int, qb: torch.Tensor, kblk: torch.Tensor,
                  vblk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stream's output and LSE for query blocks ``r0:r1``, ``(c, B, Hq, T, dv)`` and ``(c, B, Hq, T)``."""
    c, heads = r1 - r0, st.heads
    rows = (pb.hq // heads) * pb.t
    entries, tkr, flags = _tiles(pb, st, r0, r1, rows)
    nt, m = entries.shape
    qe = qb[r0:r1].reshape(c * pb.b * heads, rows, pb.d)
    qt = qe.index_select(0, entries.clamp(min=0).reshape(-1)).view(nt, 1, m * rows, pb.d)
    kt, vt = kblk.index_select(0, tkr)[:, None], vblk.index_select(0, tkr)[:, None]
    mask, live = _tile_mask(pb, st, r0, entries, tkr, flags)
    if pb.fused:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, attn_mask=mask,
                                                                           scale=pb.scale)
        if live is not None:  # a row without keys: the fused operator reports lse = 0
            lse = lse.masked_fill(~live, float("-inf"))
    else:
        o, lse = matmul_forward(qt, kt, vt, mask if mask is not None else torch.zeros((), dtype=pb.acc), pb.scale)
    keep = entries.reshape(-1) >= 0
    ent = entries.reshape(-1)[keep]
    o = o.reshape(nt * m, rows, pb.dv)[keep]
    lse = lse.reshape(nt * m, rows)[keep].to(pb.acc)
    n_ent = c * pb.b * heads
    top = torch.full((n_ent, rows), float("-inf"), dtype=pb.acc, device=qb.device)
    top = top.scatter_reduce(0, ent[:, None].expand(-1, rows), lse, "amax")
    safe = torch.where(torch.isneginf(top), 0.0, top)
    w = torch.exp(lse - safe[ent])
    total = torch.zeros_like(top).index_add_(0, ent, w)
    out = torch.zeros(n_ent, rows, pb.dv, dtype=o.dtype, device=qb.device)
    out.index_add_(0, ent, o * (w / total[ent].clamp(min=1e-30))[..., None].to(o.dtype))
    lse_e = safe + torch.log(total)  # -inf for an entry without pairs (or only padded keys)
    return out.view(c, pb.b, pb.hq, pb.t, pb.dv), lse_e.view(c, pb.b, pb.hq, pb.t)


def pairs_backward(pb: Any, st: Any, r0: int, r1: int, qb: torch.Tensor, ob: torch.Tensor, lb: torch.Tensor,
                   dob: torch.Tensor, dqb: torch.Tensor, kblk: torch.Tensor, vblk: torch.Tensor,
                   dkblk: torch.Tensor, dvblk: torch.Tensor) -> None:
    """The stream's share of the gradients for query blocks ``r0:r1``, from the merged output and LSE."""
    c, heads = r1 - r0, st.heads
    rows = (pb.hq // heads) * pb.t
    entries, tkr, flags = _tiles(pb, st, r0, r1, rows)
    nt, m = entries.shape
    flat = entries.clamp(min=0).reshape(-1)
    empty = (entries.reshape(-1) < 0)[:, None, None]

    def take(x: torch.Tensor, e: int) -> torch.Tensor:
        return x[r0:r1].reshape(c * pb.b * heads, rows, e).index_select(0, flat)

    qt = take(qb, pb.d).view(nt, 1, m * rows, pb.d)
    ot = take(ob, pb.dv).view(nt, 1, m * rows, pb.dv)
    dot = take(dob, pb.dv).masked_fill(empty, 0.0).view(nt, 1, m * rows, pb.dv)  # empty slots add nothing
    # an empty slot reads another query's row against this block: its lse could sit below these scores, and
    # exp(s - lse) = inf times its zero output gradient is NaN; +inf makes its probabilities 0
    lt = take(lb[..., None], 1).masked_fill(empty, float("inf")).view(nt, 1, m * rows)
    kt, vt = kblk.index_select(0, tkr)[:, None], vblk.index_select(0, tkr)[:, None]
    mask, _ = _tile_mask(pb, st, r0, entries, tkr, flags)
    if pb.fused:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dot, qt, kt, vt, ot, lt, 0.0, False, attn_mask=mask, scale=pb.scale)
    else:
        dq, dk, dv, _ = matmul_backward(dot, qt, kt, vt, ot, lt, mask if mask is not None else
                                        torch.zeros((), dtype=pb.acc), pb.scale)
    keep = ~empty[:, 0, 0]
    dqe = dqb[r0:r1].view(c * pb.b * heads, rows, pb.d)
    index_add(dqe, 0, entries.reshape(-1)[keep], dq.reshape(nt * m, rows, pb.d)[keep].to(dqe.dtype))
    index_add(dkblk, 0, tkr, dk[:, 0].to(dkblk.dtype))
    index_add(dvblk, 0, tkr, dv[:, 0].to(dvblk.dtype))
