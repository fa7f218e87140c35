"""Shared machinery of the patterns defined on a 1D/2D/3D token grid (row-major token order)."""

from __future__ import annotations

import torch

from .base import Pattern, Tiles, as_grid, overlaps, spatial_ndim, unravel


class Layout:
    """How the block-sparse engine should order and tile tokens for a spatial pattern.

    Per axis: tokens are grouped by residue ``i % dilation`` (so a dilated pattern becomes a dense one per
    group), then cut into segments of ``tile`` group-local positions starting at ``offset``. A token tile is
    one segment per axis, so tiles are compact boxes instead of raster rows.
    """

    def __init__(self, grid, dilation=None, tile=None, offset=None):
        n = len(grid)
        self.grid = tuple(grid)
        self.dilation = tuple(dilation or (1,) * n)
        self.tile = tuple(tile) if tile else None
        self.offset = tuple(offset or (0,) * n)


class SpatialPattern(Pattern):
    """Base of patterns on a grid. ``grid`` is required for 2D/3D and defaults to ``(N,)`` in 1D."""

    def _init_grid(self, grid, **per_axis_args) -> int:
        self.grid = as_grid(grid)
        return spatial_ndim(self.grid, **per_axis_args)

    def grid_for(self, n: int) -> tuple[int, ...]:
        return self.grid if self.grid is not None else (n,)

    def check(self, nq, nk):
        if nq != nk:
            raise ValueError(f"{type(self).__name__} needs as many queries as keys on one grid, got Nq={nq}, Nk={nk}")
        grid = self.grid_for(nq)
        numel = 1
        for g in grid:
            numel *= g
        if numel != nq:
            raise ValueError(f"grid {grid} has {numel} tokens but the sequence has N={nq}")
        self.check_extents(grid)

    def check_extents(self, grid: tuple[int, ...]) -> None:
        pass

    # per-axis description used by ``allowed`` and ``block_allowed``
    def query_axis(self, a: int, i: torch.Tensor, extent: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """For queries at coordinate ``i`` on axis ``a``: named closed intervals ``(lo, hi)`` that an allowed key's
        ``key_axis`` values must fall in."""
        raise NotImplementedError

    def key_axis(self, a: int, j: torch.Tensor, extent: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def allowed(self, q, k, nq, nk):
        grid = self.grid_for(nq)
        out = None
        for a, (qi, kj) in enumerate(zip(unravel(q, grid), unravel(k, grid))):
            qa, ka = self.query_axis(a, qi, grid[a]), self.key_axis(a, kj, grid[a])
            for name, (lo, hi) in qa.items():
                ok = ka[name] == lo if lo is hi else (ka[name] >= lo) & (ka[name] <= hi)
                out = ok if out is None else out & ok
        return out

    def block_allowed(self, qt: Tiles, kt: Tiles, nq, nk):
        grid = self.grid_for(nq)
        out = None
        qcoords, kcoords = unravel(qt.idx, grid), unravel(kt.idx, grid)
        for a in range(len(grid)):
            qa, ka = self.query_axis(a, qcoords[a], grid[a]), self.key_axis(a, kcoords[a], grid[a])
            for name, (lo, hi) in qa.items():
                qlo, _ = qt.bounds(lo)
                _, qhi = qt.bounds(hi)
                ok = overlaps(qlo, qhi, *kt.bounds(ka[name]))
                out = ok if out is None else out & ok
        return out
