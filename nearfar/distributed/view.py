"""The offset view: a pattern asked about local indices answers for the global ones they stand for.

A rank computes its queries (global ranges ``q_ranges``) against the keys it holds or fetched (global ranges
``k_ranges``, concatenated in global order) with one ordinary ``attend`` call. Called on those tensors directly, a
pattern would see a short sequence: positional patterns would align the last query with the last key and a
neighborhood would clamp its windows at the shard edge. ``GlobalView`` maps local query and key indices to global
ones and asks the wrapped pattern at the global length ``n``, so every engine (dense, block-sparse, Flex) runs the
exact global pattern on the local tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..calls import AttendCall
from ..patterns import Pattern, PerHead, Tiles
from ..patterns.spatial import Layout, SpatialPattern
from ..selection import SelectedBlocks
from .layout import Ranges


def _whole_rows(ranges: Ranges, row: int, count: int) -> int | None:
    """How many grid rows ``ranges`` hold when they are one contiguous run of ``count`` tokens starting and ending
    on row boundaries; None otherwise."""
    spans = [(lo, hi) for lo, hi in ranges if hi > lo]
    if not spans or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        return None
    lo, hi = spans[0][0], spans[-1][1]
    if hi - lo != count or lo % row or hi % row:
        return None
    return count // row


def _index(ranges: Ranges, device: torch.device) -> torch.Tensor:
    parts = [torch.arange(lo, hi, device=device) for lo, hi in ranges]
    return torch.cat(parts) if parts else torch.zeros(1, dtype=torch.long, device=device)


class GlobalView(Pattern):
    """``pattern`` at global length ``n`` seen through local indices: local query ``i`` is the ``i``-th index of
    ``q_ranges``, local key ``j`` the ``j``-th index of ``k_ranges``.

    Args:
        pattern: A (non-``PerHead``) pattern on the global sequence.
        q_ranges: Global half-open ranges of the local queries, in local order.
        k_ranges: Global half-open ranges of the local keys, in local order.
        n: The global length the pattern is evaluated at.

    Examples:
        >>> import nearfar as nf
        >>> from nearfar.distributed.view import GlobalView
        >>> v = GlobalView(nf.Causal(), ((4, 6),), ((0, 2), (4, 6)), 8)
        >>> v.mask(2, 4).int().tolist()   # global queries 4, 5; keys 0, 1, 4, 5
        [[1, 1, 1, 0], [1, 1, 1, 1]]
    """

    def __init__(self, pattern: Pattern, q_ranges: Ranges, k_ranges: Ranges, n: int) -> None:
        if isinstance(pattern, PerHead):
            raise TypeError("GlobalView wraps one pattern; use global_view() for a PerHead pattern")
        self.pattern, self.q_ranges, self.k_ranges, self.n = pattern, q_ranges, k_ranges, n
        self._maps: dict[tuple[str, torch.device], torch.Tensor] = {}

    def _map(self, which: str, idx: torch.Tensor) -> torch.Tensor:
        key = (which, idx.device)
        m = self._maps.get(key)
        if m is None:
            m = _index(self.q_ranges if which == "q" else self.k_ranges, idx.device)
            m = self._maps[key] = m.clamp(max=max(self.n - 1, 0))  # whole-block padding past the end
        return m[idx.clamp(0, m.numel() - 1)]

    def _tiles(self, which: str, t: Tiles) -> Tiles:
        return Tiles(torch.where(t.valid, self._map(which, t.idx), -1))

    def check(self, nq: int, nk: int) -> None:
        pass  # the global pattern is checked once, at the global length

    def layouts(self, nq: int, nk: int) -> tuple[Layout, Layout] | None:
        """Box tiles for a rank's slab and the key rows around it: on a 2D/3D grid, when the local queries and the
        local keys are each one run of whole rows of the global grid, their layouts are the global pattern's on
        those rows (so the engine tiles them in compact boxes, as on one process, instead of raster rows: 13x13
        neighbourhoods on a 96x96 map split in two ran 4x slower in raster tiles); None otherwise (any tiling is
        exact: the pattern is asked about the global pairs either way)."""
        lay = self.pattern.layout(self.n, self.n)
        if lay is None or len(lay.grid) < 2 or math.prod(lay.grid) != self.n:
            return None
        row = math.prod(lay.grid[1:])
        rows_q, rows_k = _whole_rows(self.q_ranges, row, nq), _whole_rows(self.k_ranges, row, nk)
        if rows_q is None or rows_k is None:
            return None

        def on(rows: int) -> Layout:  # the row axis starts at the run's first row: no global offset, no wrap
            return Layout((rows, *lay.grid[1:]), lay.dilation, lay.tile, (0, *lay.offset[1:]),
                          (False, *lay.wrap[1:]))

        return on(rows_q), on(rows_k)

    def allowed(self, q: torch.Tensor, k: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        return self.pattern.allowed(self._map("q", q), self._map("k", k), self.n, self.n)

    def block_allowed(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        return self.pattern.block_allowed(self._tiles("q", qt), self._tiles("k", kt), self.n, self.n)

    def block_full(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        return self.pattern.block_full(self._tiles("q", qt), self._tiles("k", kt), self.n, self.n)

    def _key(self) -> tuple:
        return ("GlobalView", self.pattern, self.q_ranges, self.k_ranges, self.n)


class TableView(GlobalView):
    """``GlobalView`` of a spatial pattern that takes a relative-position table: the table's index of a local pair
    is the wrapped pattern's index of the global pair, so ``attend(..., rpb=table)`` on the local tensors reads the
    table tile by tile as on one process (no dense bias)."""

    def __init__(self, pattern: SpatialPattern, q_ranges: Ranges, k_ranges: Ranges, n: int) -> None:
        super().__init__(pattern, q_ranges, k_ranges, n)
        self.spatial = pattern

    def rpb_size(self) -> tuple[int, ...] | None:
        return self.spatial.rpb_size()

    def rpb_shape(self, heads: int) -> tuple[int, ...]:
        return self.spatial.rpb_shape(heads)

    def rpb_index(self, q: torch.Tensor, k: torch.Tensor, n: int) -> torch.Tensor:
        return self.spatial.rpb_index(self._map("q", q), self._map("k", k), self.n)

    def check_rpb(self) -> None:
        self.spatial.check_rpb()

    def _key(self) -> tuple:
        return ("TableView", *super()._key()[1:])


def global_view(pattern: Pattern, q_ranges: Ranges, k_ranges: Ranges, n: int) -> Pattern:
    """``GlobalView`` of ``pattern``; a ``PerHead`` pattern becomes a ``PerHead`` of views (one per head).

    Args:
        pattern: The global pattern.
        q_ranges: Global ranges of the local queries.
        k_ranges: Global ranges of the local keys.
        n: The global length.

    Returns:
        The view.
    """
    if isinstance(pattern, PerHead):
        return PerHead([GlobalView(p, q_ranges, k_ranges, n) for p in pattern.patterns])
    return GlobalView(pattern, q_ranges, k_ranges, n)


def global_mod(score_mod: Callable, q_ranges: Ranges, k_ranges: Ranges, n: int) -> Callable:
    """``score_mod`` seen through local indices: it gets the global query and key indices they stand for (as
    ``GlobalView`` gives the pattern), so a score_mod that reads positions (ALiBi, a table indexed by ``q_idx -
    kv_idx``) sees the positions of the whole sequence. Indices past the ranges (whole-block padding, masked) map to
    the last one, clamped below ``n``, so a captured tensor of the global length is never indexed out of range."""
    maps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor,
            ki: torch.Tensor) -> torch.Tensor:
        if qi.device not in maps:
            maps[qi.device] = (_index(q_ranges, qi.device).clamp(max=max(n - 1, 0)),
                               _index(k_ranges, qi.device).clamp(max=max(n - 1, 0)))
        mq, mk = maps[qi.device]
        return score_mod(score, b, h, mq[qi.clamp(0, mq.numel() - 1)], mk[ki.clamp(0, mk.numel() - 1)])

    return mod


def local_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern | None, scale: float,
                 key_padding_mask: torch.Tensor | None, engine: str, return_lse: bool = True,
                 bias: torch.Tensor | None = None, blocks: SelectedBlocks | None = None,
                 rpb: torch.Tensor | None = None,
                 score_mod: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``nearfar.attend`` on this rank's tensors, past this thread's interceptors (the local step of a distributed
    call is not itself a call to distribute or to steer); ``(out, lse)``, ``lse`` None unless ``return_lse``.
    ``score_mod`` must already see global indices (``global_mod``)."""
    res = AttendCall(q, k, v, pattern, scale, bias, rpb, key_padding_mask, engine, return_lse, blocks,
                     score_mod).run()
    if isinstance(res, tuple):
        return res
    return res, None
