"""``sharded(layout)``: run unmodified layers and models on this rank's part of a split sequence.

Inside the block, every ``nearfar.attend`` call of this thread (so every layer built on it) becomes
``nearfar.distributed.attend`` over the group, and ``nearfar.functional.token_positions`` (the positions RoPE reads
in the sequence layers, ``rotary_qkv``) returns the global positions of this rank's tokens. Per-token work
(projections, norms, MLPs, the output head) needs nothing else. Spatial layers on a map split into slabs
(``Layout.slabs``) build their patterns on the rank's slab; each call's pattern is rebuilt on the whole map
(``whole_map``), the slab's own extents are not checked against the kernel or window (``partial_grids``), and layers
that clip windows to the map ask for the whole map's extents (``nearfar.layers.sharding.whole_extent``).

Every registered layer class declares how it runs here (``nearfar.layers.sharding``): natively, as above, when
``attend`` is its only work across tokens; on the whole sequence (``@whole_sequence``) when it also pools,
convolves, routes or scans over tokens: its inputs are all-gathered, it runs on every token with local ``attend``
calls and plain positions, and this rank's tokens of its output are kept (``whole.py``); or not at all
(``@not_sharded``: a clear error). Decoding with caches is not sharded.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
import torch.distributed as dist

from ..contexts import Context
from ..functional import AttendCall, intercept_calls, positions_override
from ..layers.sharding import layer_hook
from ..patterns import Intersection, Pattern, PerHead, Union
from ..patterns.spatial import SpatialPattern, partial_grids
from .attention import attend
from .layout import Layout
from .whole import make_extent, make_hook

#: True while a whole-sequence layer runs inside ``sharded``: its attend calls stay local, its positions are plain
_SUSPENDED: Context[bool] = Context("nearfar_sharded_suspended", False)


@contextlib.contextmanager
def _suspend() -> Iterator[None]:
    token = _SUSPENDED.set(True)
    try:
        with partial_grids(False):  # the whole map: the patterns' own checks apply
            yield
    finally:
        _SUSPENDED.reset(token)


def whole_map(pattern: Pattern | None, layout: Layout, n_local: int) -> Pattern | None:
    """``pattern`` rebuilt on the whole map: a spatial pattern whose grid is this rank's slab (``n_local`` tokens,
    whole rows of the map) gets the grid of all ``layout.n_real`` tokens (same trailing extents), extents checked."""
    if isinstance(pattern, (Union, Intersection)):
        group = copy.copy(pattern)
        group.parts = tuple(whole_map(p, layout, n_local) for p in pattern.parts)  # type: ignore[misc]
        return group
    if isinstance(pattern, PerHead):
        heads = copy.copy(pattern)
        heads.patterns = tuple(whole_map(p, layout, n_local) for p in pattern.patterns)
        return heads
    if not isinstance(pattern, SpatialPattern) or pattern.grid is None:
        return pattern
    grid = pattern.grid
    row = 1
    for g in grid[1:]:
        row *= g
    if row * grid[0] != n_local:
        return pattern  # a grid of another sequence: attend's own checks answer for it
    ok = layout.n_real % row == 0 and all(x % row == 0 for rs in layout.ranges for r in rs for x in r)
    if not ok:
        raise ValueError(f"nearfar.distributed.sharded: {pattern!r} is on a grid with rows of {row} tokens, but the "
                         "layout does not split the map into whole rows (use Layout.slabs(grid, world))")
    out = copy.copy(pattern)
    out.grid = (layout.n_real // row, *grid[1:])
    out.check_extents(out.grid)
    return out


@contextlib.contextmanager
def sharded(layout: Layout, group: dist.ProcessGroup | None = None, method: str = "auto",
            overlap: bool = False) -> Iterator[None]:
    """Inside the block, layers built on ``nearfar.attend`` compute this rank's tokens of the split sequence.

    Args:
        layout: How the sequence is split (the same on every rank); the layers' inputs are this rank's tokens,
            ``layout.size(rank)`` of them, in the layout's order.
        group: The process group (None: the default group).
        method: As in ``nearfar.distributed.attend``.
        overlap: As in ``nearfar.distributed.attend``.

    Yields:
        None.

    Layers whose only cross-token work is ``attend`` (``PatternAttention`` and its subclasses: ``dense``,
    ``streaming_llm``, ``longformer``, ``bigbird``, ``s2_attention``, ``moa``; ``NeighborhoodAttention``, Swin,
    GC ViT's local windows, MaxViT, UniFormer's global MHRA) run natively: halo or ring messages only. Every other
    registered layer (pooling, convolutions, routing, scans) runs on the whole sequence: its input is all-gathered
    (each rank receives the other ranks' tokens), it runs on every rank over all tokens (``P`` times the one-process
    compute in all), and the backward pass all-reduces the input's gradient. ``BlockTransformer`` raises.

    Raises:
        ValueError: (from the calls inside) an ``attend`` call with a bias not over the global keys, or a sequence
            length other than this rank's share; a layer asking for positions of a decoding step, or given a
            decoding cache; a whole-sequence layer given an argument it cannot split, or a map not split into whole
            rows; a layer declared ``@not_sharded``. (A ``score_mod`` is passed on: it sees global indices.)
    """
    rank = dist.get_rank(group) if layout.world > 1 else 0
    mine = layout.size(rank)

    def positions(start: int, n: int, device: torch.device) -> torch.Tensor:
        if _SUSPENDED.get():
            return torch.arange(start, start + n, device=device)
        if start != 0 or n != mine:
            raise ValueError(f"inside nearfar.distributed.sharded a layer must see this rank's {mine} tokens of the "
                             f"whole sequence (start 0), got {n} tokens from position {start}: decoding with caches "
                             "is not sharded")
        return layout.positions(rank, device)

    def run(call: AttendCall) -> object:
        if _SUSPENDED.get():
            return call.run()
        if call.q.shape[2] != mine or call.k.shape[2] != mine:
            raise ValueError(f"nearfar.distributed.sharded: attend got Nq={call.q.shape[2]}, Nk={call.k.shape[2]}; "
                             f"each must be this rank's {mine} tokens")
        with partial_grids(False):  # the call is on the whole map: its checks apply
            pattern = whole_map(call.pattern, layout, mine)
            return attend(call.q, call.k, call.v, pattern, layout=layout, group=group, scale=call.scale,
                          bias=call.bias, rpb=call.rpb, key_padding_mask=call.key_padding_mask, engine=call.engine,
                          return_lse=call.return_lse, method=method, blocks=call.blocks, overlap=overlap,
                          score_mod=call.score_mod)

    token = _SUSPENDED.set(False)
    try:
        with positions_override(positions), intercept_calls(run), partial_grids(), \
                layer_hook(make_hook(layout, group, rank, _suspend), make_extent(layout, rank)):
            yield
    finally:
        _SUSPENDED.reset(token)
