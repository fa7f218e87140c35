"""Shared machinery of the patterns defined on a 1D/2D/3D token grid (row-major token order)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from ..checks import check_grid
from ..contexts import Context
from .base import Pattern, Tiles, overlaps, spatial_ndim, unravel

_PARTIAL_GRIDS: Context[bool] = Context("nearfar_partial_grids", False)


@contextlib.contextmanager
def partial_grids(partial: bool = True) -> Iterator[None]:
    """Inside the block, grids given to spatial patterns are parts of a larger map (a rank's slab of a map split
    across processes): a window or kernel may be larger than such a grid's extents, so the patterns skip their extent
    checks (``nearfar.distributed.sharded`` rebuilds each pattern on the whole map, where they are checked).

    Args:
        partial: False restores the checks inside the block (for calls on the whole map).

    Yields:
        None.
    """
    token = _PARTIAL_GRIDS.set(partial)
    try:
        yield
    finally:
        _PARTIAL_GRIDS.reset(token)


def grids_are_partial() -> bool:
    """Whether this thread is inside ``partial_grids``."""
    return _PARTIAL_GRIDS.get()


class Layout:
    """How the block-sparse engine should order and tile tokens for a spatial pattern.

    Per axis: tokens are grouped by residue ``i % dilation`` (so a dilated pattern becomes a dense one per
    group), then cut into segments of ``tile`` group-local positions starting at ``offset``. A token tile is
    one segment per axis, so tiles are compact boxes instead of raster rows. On a ``wrap`` axis (dilation 1)
    segments are cut cyclically, ``((i - offset) mod extent) // tile``, so a window that wraps around the
    border (cyclic shifts, and Swin's rolled windows) is one tile instead of two partial ones.
    """

    def __init__(self, grid: Sequence[int], dilation: Sequence[int] | None = None, tile: Sequence[int] | None = None,
                 offset: Sequence[int] | None = None, wrap: Sequence[bool] | None = None) -> None:
        n = len(grid)
        self.grid = tuple(grid)
        self.dilation = tuple(dilation or (1,) * n)
        self.tile = tuple(tile) if tile else None
        self.offset = tuple(offset or (0,) * n)
        self.wrap = tuple(wrap or (False,) * n)


class SpatialPattern(Pattern):
    """Base of patterns on a grid. ``grid`` is required for 2D/3D and defaults to ``(N,)`` in 1D."""

    grid: tuple[int, ...] | None

    def _init_grid(self, grid: object, **per_axis_args: object) -> int:
        self.grid = check_grid(grid)
        return spatial_ndim(self.grid, **per_axis_args)

    def grid_for(self, n: int) -> tuple[int, ...]:
        return self.grid if self.grid is not None else (n,)

    def check(self, nq: int, nk: int) -> None:
        if nq != nk:
            raise ValueError(f"{type(self).__name__} needs as many queries as keys on one grid, got Nq={nq}, Nk={nk}")
        grid = self.grid_for(nq)
        numel = 1
        for g in grid:
            numel *= g
        if numel != nq:
            raise ValueError(f"grid {grid} has {numel} tokens but the sequence has N={nq}")
        if not grids_are_partial():
            self.check_extents(grid)

    def check_extents(self, grid: tuple[int, ...]) -> None:
        pass

    # relative-position bias: a table (heads, 2m-1[, 2m-1[, 2m-1]]) indexed per axis by
    # rel_coord(key) - rel_coord(query) + m - 1 ("key minus query", NAT's convention)
    def rpb_size(self) -> tuple[int, ...] | None:
        """Per-axis window extent ``m`` of a relative-position-bias table, or None if the pattern takes none."""
        return None

    def rel_coord(self, a: int, t: torch.Tensor, extent: int) -> torch.Tensor:
        """The coordinate on axis ``a`` whose key-minus-query difference indexes the bias table."""
        return t

    def _table_size(self) -> tuple[int, ...]:
        size = self.rpb_size()
        if size is None:
            raise TypeError(f"{type(self).__name__} takes no relative-position-bias table")
        return size

    def rpb_shape(self, heads: int) -> tuple[int, ...]:
        return (heads, *(2 * m - 1 for m in self._table_size()))

    def rpb_index(self, q: torch.Tensor, k: torch.Tensor, n: int) -> torch.Tensor:
        """Flat index into the spatial part of the table for allowed pairs (clamped elsewhere)."""
        grid = self.grid_for(n)
        flat: torch.Tensor | None = None
        for a, (m, qi, kj) in enumerate(zip(self._table_size(), unravel(q, grid), unravel(k, grid))):
            rel = self.rel_coord(a, kj, grid[a]) - self.rel_coord(a, qi, grid[a])
            idx = (rel + m - 1).clamp(0, 2 * m - 2)
            flat = idx if flat is None else flat * (2 * m - 1) + idx
        assert flat is not None  # grids have at least one axis
        return flat

    def check_rpb(self) -> None:
        """Raise if this configuration cannot take the table ``rpb_shape`` describes."""

    # per-axis description used by ``allowed`` and ``block_allowed``
    def query_axis(self, a: int, i: torch.Tensor, extent: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """For queries at coordinate ``i`` on axis ``a``: named closed intervals ``(lo, hi)`` that an allowed key's
        ``key_axis`` values must fall in."""
        raise NotImplementedError

    def key_axis(self, a: int, j: torch.Tensor, extent: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def allowed(self, q: torch.Tensor, k: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        grid = self.grid_for(nq)
        out: torch.Tensor | None = None
        for a, (qi, kj) in enumerate(zip(unravel(q, grid), unravel(k, grid))):
            qa, ka = self.query_axis(a, qi, grid[a]), self.key_axis(a, kj, grid[a])
            for name, (lo, hi) in qa.items():
                ok = ka[name] == lo if lo is hi else (ka[name] >= lo) & (ka[name] <= hi)
                out = ok if out is None else out & ok
        assert out is not None  # grids have at least one axis, patterns at least one interval per axis
        return out

    def block_allowed(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        grid = self.grid_for(nq)
        out: torch.Tensor | None = None
        qcoords, kcoords = unravel(qt.idx, grid), unravel(kt.idx, grid)
        for a in range(len(grid)):
            qa, ka = self.query_axis(a, qcoords[a], grid[a]), self.key_axis(a, kcoords[a], grid[a])
            for name, (lo, hi) in qa.items():
                qlo, _ = qt.bounds(lo)
                _, qhi = qt.bounds(hi)
                ok = overlaps(qlo, qhi, *kt.bounds(ka[name]))
                out = ok if out is None else out & ok
        assert out is not None  # grids have at least one axis, patterns at least one interval per axis
        return out
