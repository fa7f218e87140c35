"""The global queries of ``GlobalTokens`` that read past their shard: partials on every rank, merged on the owner.

Their owner broadcasts the few queries ``[0, m)``; each rank computes their partial attention ``(O, L)`` over its own
keys with plain torch ops (differentiable through the LSE) and sends it to the owner, which merges the partials by
their log-sum-exp (``merge``; the query/output exchange of MagiAttention, SandAI-org/MagiAttention
``docs/source/blog/magi_attn.md``). Everything a single-process score of such a pair sees is applied to the partial:

- ``score_mod(score, b, h, q_idx, kv_idx)`` on the global indices (every rank holds the function and what it
  captures: its gradient there is each rank's part, summed over the ranks like a parameter's);
- run-time ``blocks`` (replicated lists): the selected blocks of the global queries' query blocks, cut by
  ``within``, added to the pattern's pairs;
- ``bias``: the global queries' rows live on their owner, so the owner sends each rank the entries of those rows at
  that rank's own keys (``m_o x n_r`` per broadcast batch/head, ``"bias.rows"``; the gradients come back the same
  way). A bias without a query axis (``(n_real,)``) is the same on every rank: each reads its own columns, no
  message. A bias of ``(..., 1, n)`` (shared rows, same on every rank) still sends: a rank holding one query cannot
  tell it from a per-row bias, and every rank must post the same messages; the values it sends are the same.

A relative-position table cannot come here: ``rpb`` needs a single spatial pattern, never a union with
``GlobalTokens`` (on one process too).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from ..functional import SelectedBlocks
from ..mods import call_score_mod, index_grid
from ..patterns import Pattern, PerHead
from .gather import broadcast_tokens
from .halo import exchange
from .layout import Layout, Ranges
from .merge import merge, partial
from .plan import CommPlan, rs_intersect, rs_size


def local_index(layout: Layout, rank: int, ranges: Ranges, device: torch.device) -> torch.Tensor:
    """Local positions (on ``rank``) of the global ``ranges``, concatenated."""
    loc = [r for lo, hi in ranges for r in layout.local(rank, lo, hi)]
    parts = [torch.arange(a, b, device=device) for a, b in loc]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def _index(ranges: Ranges, device: torch.device) -> torch.Tensor:
    parts = [torch.arange(lo, hi, device=device) for lo, hi in ranges]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def _owners(plan: CommPlan) -> dict[int, tuple[tuple[int, int], ...]]:
    """Each owner of global queries and its rows (global ranges, in order)."""
    out: dict[int, tuple[tuple[int, int], ...]] = {}
    for b in plan.q_bcasts:
        out[b.src] = out.get(b.src, ()) + ((b.lo, b.hi),)
    return dict(sorted(out.items()))


def _keys(layout: Layout, rank: int, n: int) -> Ranges:
    return rs_intersect(layout.ranges[rank], ((0, n),))


def _bias_rows(bias: torch.Tensor, plan: CommPlan, layout: Layout, me: int, group: dist.ProcessGroup | None,
               own: Ranges, after: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The bias of the global queries at this rank's own keys ``(B', H', m, own keys or 1)`` (None without own
    keys), and the exchange's output to tie into the backward pass (None without a message)."""
    b4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    dev, c = bias.device, b4.shape[3]
    cols = _index(own, dev)
    if bias.dim() < 2:  # no query axis: the same tensor on every rank, read in place
        return (b4.index_select(3, cols) if c > 1 else b4) if own else None, None
    n, owners = plan.n, _owners(plan)
    bb, hb = b4.shape[:2]

    def wanted(r: int) -> Ranges:
        keys = _keys(layout, r, n)
        return keys if c > 1 else (((0, 1),) if keys else ())

    mine = owners.get(me, ())
    if mine:
        rows = b4.index_select(2, local_index(layout, me, mine, dev)) if b4.shape[2] > 1 else \
            b4.expand(bb, hb, rs_size(mine), c)
        x = rows.reshape(bb, hb, -1, 1)
        sends = tuple((r, tuple((i * c + a, i * c + b) for i in range(rs_size(mine)) for a, b in wanted(r)))
                      for r in range(layout.world) if r != me and wanted(r))
    else:
        rows, x, sends = None, b4.new_zeros(bb, hb, 0, 1), ()
    width = rs_size(wanted(me))
    recvs = tuple((o, rs_size(rs) * width) for o, rs in owners.items() if o != me and width)
    got = exchange(x, sends, recvs, group, "bias.rows", after)
    if not width:
        return None, got
    parts, order, pos = [], [], 0
    for o, rs in owners.items():
        m_o = rs_size(rs)
        if o == me:
            assert rows is not None
            parts.append(rows.index_select(3, cols) if c > 1 else rows)
        else:
            parts.append(got[:, :, pos:pos + m_o * width].reshape(bb, hb, m_o, width))
            pos += m_o * width
        order.append(_index(rs, dev))
    parts.append(got[:, :, pos:].reshape(bb, hb, 0, width))  # ties the exchange into the graph on every rank
    perm = torch.argsort(torch.cat(order))
    return torch.cat(parts, 2).index_select(2, perm), got


def _selected(blocks: SelectedBlocks, qi: torch.Tensor, kg: torch.Tensor, n: int, hq: int,
              hkv: int) -> torch.Tensor:
    """The pairs ``blocks`` allows between global queries ``qi (m, 1)`` and keys ``kg (1, nk)``: ``(B', H', m, nk)``
    with ``H'`` 1 or ``Hq``."""
    table = blocks.block_table(n).to(qi.device)
    if table.shape[1] not in (1, hq):
        table = table.repeat_interleave(hq // hkv, dim=1)
    pairs = table[:, :, qi[:, 0] // blocks.q_block][..., kg[0] // blocks.k_block]
    if blocks.within is not None:
        pairs = pairs & blocks.within.allowed(qi, kg, n, n)
    return pairs


def global_queries(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: torch.Tensor | None, pattern: Pattern,
                   plan: CommPlan, layout: Layout, me: int, group: dist.ProcessGroup | None, scale: float,
                   acc: torch.dtype, after: torch.Tensor, bias: torch.Tensor | None = None,
                   blocks: SelectedBlocks | None = None, score_mod: Callable | None = None
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None, tuple[torch.Tensor, ...]]:
    """Outputs ``(O, L)`` of the global queries this rank owns (None if none), and the communication outputs to
    tie into the backward pass."""
    n = plan.n
    pieces = tuple((b.src, layout.local(me, b.lo, b.hi)[0][0] if b.src == me else -1, b.hi - b.lo)
                   for b in plan.q_bcasts)
    qg = broadcast_tokens(q, pieces, group, "q.bcast", after)
    own = _keys(layout, me, n)
    idx = local_index(layout, me, own, q.device)
    kown, vown = k.index_select(2, idx), v.index_select(2, idx)
    deps: tuple[torch.Tensor, ...] = (qg,)
    brows = None
    if bias is not None:  # before the partials on every rank: the same message order everywhere
        brows, link = _bias_rows(bias, plan, layout, me, group, own, qg)
        deps += (link,) if link is not None else ()
    d = k.shape[-1]
    if own:
        qi = torch.arange(plan.global_rows, device=q.device)[:, None]
        kg = _index(own, q.device)[None, :]
        shape = (plan.global_rows, kg.shape[1])
        allowed = pattern.allowed(qi, kg, n, n)
        per_head = isinstance(pattern, PerHead)
        allowed = allowed.expand(-1, *shape)[None] if per_head else allowed.expand(shape)[None, None]
        if blocks is not None:
            allowed = allowed | _selected(blocks, qi, kg, n, q.shape[1], k.shape[1])
        if kpm is not None:
            allowed = allowed & kpm.index_select(1, idx)[:, None, None, :]
        mod = None
        if score_mod is not None:
            bi, hi, _, _ = index_grid(q.shape[0], q.shape[1], 1, 1, q.device)
            qx, kx = qi.view(1, 1, -1, 1), kg.view(1, 1, 1, -1)
            mod = lambda s: call_score_mod(score_mod, s, bi, hi, qx, kx)  # noqa: E731
        o, lse = partial(qg, kown, vown, allowed, scale, acc, mod, brows)
    else:  # no own keys: an empty partial that still depends on the queries (fixes the backward order)
        o = torch.matmul(qg.to(acc), qg.new_zeros(d, v.shape[-1], dtype=acc))
        lse = torch.full(o.shape[:-1], -torch.inf, dtype=acc, device=q.device)
    part = torch.cat([o, lse[..., None]], -1)
    mine = tuple((b.lo, b.hi) for b in plan.q_bcasts if b.src == me)
    sends = tuple((src, tuple((b.lo, b.hi) for b in plan.q_bcasts if b.src == src))
                  for src in sorted({b.src for b in plan.q_bcasts}) if src != me)
    recvs = tuple((r, rs_size(mine)) for r in range(layout.world) if r != me and mine)
    got = exchange(part, sends, recvs, group, "partial")
    deps += (got,)
    if not mine:
        return None, None, deps
    rows = torch.cat([part[:, :, lo:hi] for lo, hi in mine], 2)
    stack = torch.stack([rows, *got.split(rs_size(mine), 2)])
    o_g, l_g = merge(stack[..., :-1], stack[..., -1])
    return o_g, l_g, deps
