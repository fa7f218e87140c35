"""Which keys each rank's queries can reach, and the messages that bring them: computed from global metadata only.

Every rank builds the same ``CommPlan`` from ``(pattern, layout)`` alone (never from local data), so every rank
issues the same collectives in the same order and knows the size of every message it takes part in.

The reach of a query range is the union of the keys its queries may attend, as sorted half-open global ranges:
exact for the local patterns (``Neighborhood`` from its own window function on the first axis, ``SlidingWindow``,
``BlockWindow``, ``Blocks``/``Grid`` on the first axis, ``Causal``, ``Sinks``, ``GlobalTokens``), combined by union
for ``|`` and by intersection for ``&``; a pattern without a rule reaches every key (always correct: the exact
pattern is applied inside the local call, only the bytes grow). The keys of ``Sinks``/``GlobalTokens`` go to
every rank by broadcast from their owner; all other remote keys come point to point from their owners. The global
queries of ``GlobalTokens`` read every key: instead of pulling all keys to their owner, the owner broadcasts those
few queries, every rank computes their partial attention over its own keys, and the owner merges the partials
(the query/output exchange MagiAttention describes, SandAI-org/MagiAttention ``docs/source/blog/magi_attn.md``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..functional import SelectedBlocks
from ..patterns import (
    BlockWindow,
    Causal,
    Dense,
    GlobalTokens,
    Intersection,
    Neighborhood,
    Pattern,
    PerHead,
    Sinks,
    SlidingWindow,
    Union,
)
from ..patterns.spatial import SpatialPattern
from .layout import Layout, Ranges

#: brute-force the first-axis reach of a spatial pattern up to this many (query row, key row) pairs
_BRUTE = 1 << 22


# ---- sets of half-open ranges ---------------------------------------------------------------------------------
def rs_union(*sets: Ranges) -> Ranges:
    """Union of range sets, as sorted disjoint half-open ranges."""
    items = sorted(r for s in sets for r in s if r[1] > r[0])
    out: list[tuple[int, int]] = []
    for lo, hi in items:
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def rs_intersect(a: Ranges, b: Ranges) -> Ranges:
    """Intersection of two range sets."""
    out = []
    for lo, hi in rs_union(a):
        for lo2, hi2 in rs_union(b):
            s, e = max(lo, lo2), min(hi, hi2)
            if s < e:
                out.append((s, e))
    return rs_union(tuple(out))


def rs_subtract(a: Ranges, b: Ranges) -> Ranges:
    """``a`` minus ``b``."""
    out = []
    cut = rs_union(b)
    for lo, hi in rs_union(a):
        pos = lo
        for lo2, hi2 in cut:
            if hi2 <= pos or lo2 >= hi:
                continue
            if lo2 > pos:
                out.append((pos, lo2))
            pos = max(pos, hi2)
        if pos < hi:
            out.append((pos, hi))
    return tuple(out)


def rs_size(a: Ranges) -> int:
    """Number of indices in a range set."""
    return sum(hi - lo for lo, hi in a)


def _merge(lo: torch.Tensor, hi: torch.Tensor) -> Ranges:
    """Union of the half-open intervals ``[lo_i, hi_i)`` (vectorised)."""
    if lo.numel() == 0:
        return ()
    order = torch.argsort(lo)
    lo, hi = lo[order], hi[order]
    run = torch.cummax(hi, 0).values
    new = torch.ones_like(lo, dtype=torch.bool)
    new[1:] = lo[1:] > run[:-1]
    starts = torch.nonzero(new).flatten()
    ends = torch.cat([starts[1:] - 1, starts.new_tensor([lo.numel() - 1])])
    return tuple(zip(lo[starts].tolist(), run[ends].tolist()))


def _mask_ranges(mask: torch.Tensor) -> Ranges:
    """Runs of True in a 1D bool tensor, as ranges."""
    m = torch.cat([mask.new_zeros(1), mask, mask.new_zeros(1)]).to(torch.int8)
    d = m[1:] - m[:-1]
    return tuple(zip(torch.nonzero(d == 1).flatten().tolist(), torch.nonzero(d == -1).flatten().tolist()))


# ---- reach ----------------------------------------------------------------------------------------------------
def _parts(p: Pattern) -> list[Pattern]:
    if isinstance(p, (Union, Intersection)):
        return [x for q in p.parts for x in _parts(q)]
    if isinstance(p, PerHead):
        return [x for q in p.patterns for x in _parts(q)]
    return [p]


def global_rows(pattern: Pattern) -> int:
    """The largest ``GlobalTokens(n)`` in the pattern (0 if none): queries below it may read every key."""
    return max([p.n for p in _parts(pattern) if isinstance(p, GlobalTokens)], default=0)


def sink_keys(pattern: Pattern) -> int:
    """The largest ``Sinks(n)``/``GlobalTokens(n)``: keys below it that every query may read."""
    return max([p.n for p in _parts(pattern) if isinstance(p, (Sinks, GlobalTokens))], default=0)


def reach(pattern: Pattern, queries: Ranges, n: int) -> Ranges:
    """Keys (global, within ``[0, n)``) that the queries ``queries`` may attend under ``pattern`` at length ``n``:
    a superset of the exact union, exact for the patterns named in the module docstring."""
    cuts = sorted({p.n for p in _parts(pattern) if isinstance(p, GlobalTokens)})
    pieces = []
    for lo, hi in rs_union(queries):
        edges = [lo] + [c for c in cuts if lo < c < hi] + [hi]
        pieces += [_reach(pattern, a, b, n) for a, b in zip(edges[:-1], edges[1:])]
    return rs_intersect(rs_union(*pieces), ((0, n),))


def _reach(p: Pattern, lo: int, hi: int, n: int) -> Ranges:
    """Reach of the non-empty query range ``[lo, hi)``."""
    if isinstance(p, Union):
        return rs_union(*(_reach(x, lo, hi, n) for x in p.parts))
    if isinstance(p, Intersection):
        out = _reach(p.parts[0], lo, hi, n)
        for x in p.parts[1:]:
            out = rs_intersect(out, _reach(x, lo, hi, n))
        return out
    if isinstance(p, PerHead):
        return rs_union(*(_reach(x, lo, hi, n) for x in p.patterns))
    if isinstance(p, Causal):
        return ((0, hi),)
    if isinstance(p, SlidingWindow):
        return ((max(0, lo - p.left), min(n, hi + p.right)),)
    if isinstance(p, Sinks):
        return ((0, min(p.n, n)),)
    if isinstance(p, GlobalTokens):
        return ((0, n),) if lo < p.n else ((0, min(p.n, n)),)
    if isinstance(p, BlockWindow):
        b = p.block
        return ((max(0, (lo // b - p.before) * b), min(n, ((hi - 1) // b + p.after + 1) * b)),)
    if isinstance(p, SpatialPattern):
        grid = p.grid_for(n)
        w = n // grid[0] if grid[0] else 1
        rows = _spatial_rows(p, lo // w, (hi - 1) // w + 1, grid[0])
        return tuple((a * w, b * w) for a, b in rows)
    return ((0, n),)  # Dense, Strided, random blocks, ...: every key


def _spatial_rows(p: SpatialPattern, r0: int, r1: int, x0: int) -> Ranges:
    """Rows (first-axis coordinates) of keys that query rows ``[r0, r1)`` may reach."""
    i = torch.arange(r0, r1)
    if isinstance(p, Neighborhood):
        d, edge = p.dilation[0], 2 * p.dilation[0] * p.stride[0] + 4
        if r1 - r0 > 2 * edge:
            # window starts and ends grow with the query row within a dilation group, and consecutive rows'
            # windows overlap or touch: the reach is the hull of the first and last rows' windows
            i = torch.cat([i[:edge], i[-edge:]])
            g, start, end = p.window(0, i, x0)
            return ((int((start * d + g).min()), int((end * d + g).max()) + 1),)
        g, start, end = p.window(0, i, x0)
        return _merge(start * d + g, end * d + g + 1)  # one interval per query row (other residues included)
    j = torch.arange(x0)
    qa, ka = p.query_axis(0, i, x0), p.key_axis(0, j, x0)
    if (r1 - r0) * x0 <= _BRUTE:
        ok = torch.ones(r1 - r0, x0, dtype=torch.bool)
        for name, (a, b) in qa.items():
            ok &= (ka[name][None, :] >= a[:, None]) & (ka[name][None, :] <= b[:, None])
        return _mask_ranges(ok.any(0))
    ok1 = torch.ones(x0, dtype=torch.bool)  # too large: per-name hull (a superset)
    for name, (a, b) in qa.items():
        ok1 &= (ka[name] >= a.min()) & (ka[name] <= b.max())
    return _mask_ranges(ok1)


def _interior(pattern: Pattern, queries: Ranges, own: Ranges, n: int, chunks: int = 16) -> Ranges:
    """The queries whose reach lies in ``own``, found chunk by chunk (``chunks`` per query range)."""
    out = []
    for lo, hi in queries:
        step = max(1, -(-(hi - lo) // chunks))
        for a in range(lo, hi, step):
            b = min(hi, a + step)
            if not rs_subtract(reach(pattern, ((a, b),), n), own):
                out.append((a, b))
    return rs_union(tuple(out))


# ---- the plan -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Message:
    """Point-to-point: ``src`` sends its keys in the global ``ranges`` to ``dst`` (one packed buffer)."""

    src: int
    dst: int
    ranges: Ranges


@dataclass(frozen=True)
class Bcast:
    """``src`` broadcasts its tokens ``[lo, hi)`` to every rank."""

    src: int
    lo: int
    hi: int


@dataclass(frozen=True)
class RankPlan:
    """One rank's part: the query rows its main call computes, the keys it reads (sorted, own ones included) and
    where each key range comes from: ``("own", -1)``, ``("p2p", message index)`` or ``("bcast", bcast index)``;
    ``interior``: queries (a subset of ``queries``, in chunks) that read only the rank's own keys, which can run
    while the halo is in flight."""

    queries: Ranges
    keys: Ranges
    pieces: tuple[tuple[int, int, str, int], ...]
    interior: Ranges = ()


@dataclass(frozen=True)
class CommPlan:
    """The whole exchange for one (pattern, layout): per-rank key sets and every message.

    ``global_rows > 0`` means the queries ``[0, global_rows)`` are computed by partial attention on every rank and
    merged on their owners (``q_bcasts`` broadcast them; each rank sends the owners its partials).
    """

    n: int
    world: int
    ranks: tuple[RankPlan, ...]
    messages: tuple[Message, ...]
    bcasts: tuple[Bcast, ...]
    global_rows: int
    q_bcasts: tuple[Bcast, ...]
    own: tuple[int, ...] = ()  # real tokens (so own keys) per rank

    def traffic(self, rank: int) -> dict[str, tuple[int, int]]:
        """Tokens ``(sent, received)`` by ``rank`` in the forward pass, per kind: ``"p2p"`` and ``"bcast"`` (K/V
        tokens), ``"q"`` (global query tokens), ``"partial"`` (global-query output rows sent to their owners) and
        ``"bias_rows"`` ((global query, key) pairs of a bias with query and key axes, per batch item and head of
        the bias: the owners send each rank the global rows at its own keys; only when a bias is given).
        The backward pass sends the same amounts the other way (gradients)."""
        p2p_s = sum(rs_size(m.ranges) for m in self.messages if m.src == rank)
        p2p_r = sum(rs_size(m.ranges) for m in self.messages if m.dst == rank)

        def bc(items: tuple[Bcast, ...]) -> tuple[int, int]:
            sent = sum((b.hi - b.lo) * (self.world - 1) for b in items if b.src == rank)
            return sent, sum(b.hi - b.lo for b in items if b.src != rank)

        part, rows = (0, 0), (0, 0)
        if self.global_rows:
            mine = sum(b.hi - b.lo for b in self.q_bcasts if b.src == rank)
            part = (self.global_rows - mine, mine * (self.world - 1))
            rows = (mine * (sum(self.own) - self.own[rank]), self.own[rank] * (self.global_rows - mine))
        return {"p2p": (p2p_s, p2p_r), "bcast": bc(self.bcasts), "q": bc(self.q_bcasts), "partial": part,
                "bias_rows": rows}


def selected_keys(blocks: SelectedBlocks, layout: Layout, skip: int = 0) -> tuple[Ranges, ...]:
    """Per rank, the global keys of the blocks that ``blocks`` (global query and key blocks, the same on every rank)
    selects for the query blocks holding that rank's real tokens (past the ``skip`` global queries, which are
    computed from partials over every rank's own keys), in any batch item and head; cut to the reach of
    ``blocks.within`` when it has one."""
    n, qb, kb = layout.n_real, blocks.q_block, blocks.k_block
    nkb = (n + kb - 1) // kb
    num, idx = blocks.kv_num_blocks, blocks.kv_indices.long()
    used = (torch.arange(idx.shape[-1], device=idx.device) < num[..., None]) & (idx >= 0) & (idx < nkb)
    idx = torch.where(used, idx, nkb)
    out: list[Ranges] = []
    for r in range(layout.world):
        real = rs_subtract(rs_intersect(rs_union(layout.ranges[r]), ((0, n),)), ((0, skip),))
        if not real:
            out.append(())
            continue
        rows = torch.cat([torch.arange(lo // qb, (hi - 1) // qb + 1) for lo, hi in real]).unique().to(idx.device)
        hit = torch.zeros(nkb + 1, dtype=torch.bool, device=idx.device)
        hit[idx.index_select(2, rows).flatten()] = True
        keys = tuple((a * kb, min(b * kb, n)) for a, b in _mask_ranges(hit[:nkb].cpu()))
        if blocks.within is not None:
            keys = rs_intersect(keys, reach(blocks.within, real, n))
        out.append(keys)
    return tuple(out)


def make_plan(pattern: Pattern | None, layout: Layout, blocks: SelectedBlocks | None = None) -> CommPlan:
    """The ``CommPlan`` of ``pattern`` over ``layout`` (cached; every rank computes the same one).

    Args:
        pattern: The pattern at the global length ``layout.n_real`` (None = dense, or no static pairs with
            ``blocks``).
        layout: How the tokens are split.
        blocks: Run-time selected key blocks over the global sequence (the same on every rank), read beside the
            pattern.

    Returns:
        The plan.
    """
    if blocks is None:
        return _make_plan(pattern, layout, None)
    return _make_plan(pattern, layout, selected_keys(blocks, layout, _merged_rows(pattern, layout)))


@functools.lru_cache(maxsize=64)
def _merged_rows(pattern: Pattern | None, layout: Layout) -> int:
    """How many global queries ``[0, m)`` are merged from partials (0: none): those of ``GlobalTokens(m)`` when a
    rank owning some would otherwise fetch more than ``m`` keys for them."""
    n, world = layout.n_real, layout.world
    pat = pattern if pattern is not None else Dense()
    real = [rs_intersect(rs_union(layout.ranges[r]), ((0, n),)) for r in range(world)]
    m_g = min(global_rows(pat), n)
    for r in range(world):
        g = rs_intersect(real[r], ((0, m_g),))
        if g:
            base = rs_union(real[r], reach(pat, rs_subtract(real[r], g), n))
            if rs_size(rs_subtract(reach(pat, g, n), base)) > m_g:
                return m_g
    return 0


@functools.lru_cache(maxsize=64)
def _make_plan(pattern: Pattern | None, layout: Layout, selected: tuple[Ranges, ...] | None) -> CommPlan:
    n, world = layout.n_real, layout.world
    pat = pattern if pattern is not None else Dense()
    real = [rs_intersect(rs_union(layout.ranges[r]), ((0, n),)) for r in range(world)]
    m_g = _merged_rows(pattern, layout)
    qo = m_g > 0
    queries = [rs_subtract(real[r], ((0, m_g),)) for r in range(world)]
    static = pattern is not None or selected is None
    keys = [reach(pat, queries[r], n) if queries[r] and static else () for r in range(world)]
    if selected is not None:
        keys = [rs_union(keys[r], selected[r]) if queries[r] else () for r in range(world)]
    m_s = min(sink_keys(pat), n)
    bcasts = tuple(Bcast(src, lo, hi) for src, lo, hi in layout.owners(0, m_s)
                   if any(rs_intersect(keys[r], ((lo, hi),)) for r in range(world) if r != src))
    messages: list[Message] = []
    ranks = []
    for r in range(world):
        pieces: list[tuple[int, int, str, int]] = [(lo, hi, "own", -1) for lo, hi in rs_intersect(keys[r], real[r])]
        rest = rs_subtract(keys[r], real[r])
        for i, bc in enumerate(bcasts):
            for lo, hi in rs_intersect(rest, ((bc.lo, bc.hi),)):
                pieces.append((lo, hi, "bcast", i))
            rest = rs_subtract(rest, ((bc.lo, bc.hi),))
        by_src: dict[int, list[tuple[int, int]]] = {}
        for lo, hi in rest:
            for src, a, b in layout.owners(lo, hi):
                by_src.setdefault(src, []).append((a, b))
        for src in sorted(by_src):
            messages.append(Message(src, r, rs_union(tuple(by_src[src]))))
            pieces += [(a, b, "p2p", len(messages) - 1) for a, b in messages[-1].ranges]
        inner = _interior(pat, queries[r], real[r], n) if static and selected is None else ()
        ranks.append(RankPlan(queries[r], keys[r], tuple(sorted(pieces)), inner))
    q_bcasts = tuple(Bcast(src, lo, hi) for src, lo, hi in layout.owners(0, m_g)) if qo else ()
    return CommPlan(n, world, tuple(ranks), tuple(messages), bcasts, m_g, q_bcasts, tuple(rs_size(x) for x in real))
