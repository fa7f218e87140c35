"""Non-overlapping windows: Swin / MaxViT block attention (``Blocks``) and MaxViT grid attention (``Grid``).

Swin: Liu et al., "Swin Transformer" (ICCV 2021), microsoft/Swin-Transformer (W-MSA, SW-MSA with the
region mask). MaxViT: Tu et al. (ECCV 2022), google-research/maxvit and timm ``maxxvit.py`` (block and grid
partitions: ``window_partition``, ``grid_partition``). CRAFT and HiDiffusion use the cyclic, unmasked shift.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..checks import check_bool, check_nonneg_int, check_per_axis
from .spatial import Layout, SpatialPattern, grids_are_partial


class Blocks(SpatialPattern):
    """Tokens attend within their window of ``size`` (per axis).

    ``shift`` moves the window boundaries to ``shift + m*size``. ``wrap=False`` is Swin's SW-MSA: the
    roll-and-mask scheme, so the partial windows at both edges never mix (equivalently, window id
    ``floor((t - shift) / size)``); extents not divisible by ``size`` end with a smaller window.
    ``wrap=True`` is the cyclic, unmasked shift (window id ``((t - shift) mod extent) // size``) and
    needs extents divisible by ``size``.

    A relative-position-bias table ``(heads, 2*size-1, ...)`` passed as ``attend(..., rpb=table)`` is indexed
    by the key-minus-query offset of the two tokens inside their window (Swin's bias table is query-minus-key
    and flattened: ``table_swin.T.reshape(heads, 2M-1, 2M-1).flip(1, 2)`` converts it). With ``wrap=True``
    the offset is taken in rolled coordinates, as CRAFT and HiDiffusion compute it after ``torch.roll``.

    Args:
        size: Window size per axis (int or per-axis tuple); must not exceed the extent.
        grid: The spatial shape ``(H, W)`` or ``(T, H, W)``; required in 2D/3D, ``(N,)`` in 1D by default.
        shift: Window offset per axis, ``0 <= shift < size`` (Swin's SW-MSA: ``size // 2``).
        wrap: ``False``: Swin's masked shift; ``True``: cyclic, unmasked shift (extents divisible by ``size``).

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``shift >= size``, ``size`` exceeds an extent, ``wrap=True`` with an extent not divisible by
            ``size``, or 2D/3D without ``grid``.

    Examples:
        >>> import torch, nearfar as nf
        >>> nf.Blocks(2).mask(4, 4).int().tolist()
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
        >>> swin = nf.Blocks(7, grid=(14, 14), shift=3)   # SW-MSA
        >>> x = torch.randn(1, 3, 196, 32)
        >>> nf.attend(x, x, x, swin, rpb=torch.zeros(3, 13, 13)).shape
        torch.Size([1, 3, 196, 32])
    """

    may_partition = True

    def __init__(self, size: int | Sequence[int], grid: int | Sequence[int] | None = None,
                 shift: int | Sequence[int] = 0, wrap: bool = False) -> None:
        ndim = self._init_grid(grid, size=size, shift=shift)
        self.size = check_per_axis(size, ndim, "size")
        self.shift = check_per_axis(shift, ndim, "shift", check=check_nonneg_int)
        check_bool(wrap, "wrap")
        self.wrap = wrap
        for a, (s, m) in enumerate(zip(self.shift, self.size)):
            if s >= m:
                raise ValueError(f"shift[{a}]={s} must be in [0, size[{a}]-1] = [0, {m - 1}]")
        if self.grid is not None and not grids_are_partial():
            self.check_extents(self.grid)

    def check_extents(self, grid: tuple[int, ...]) -> None:
        for a, (m, n) in enumerate(zip(self.size, grid)):
            if m > n:
                raise ValueError(f"size[{a}]={m} exceeds the extent {n} of axis {a}; need size <= {n}")
            if self.wrap and n % m:
                raise ValueError(f"wrap=True needs the extent {n} of axis {a} divisible by size[{a}]={m}")

    def window_id(self, a: int, t: torch.Tensor, extent: int) -> torch.Tensor:
        m, s = self.size[a], self.shift[a]
        if self.wrap:
            return torch.remainder(t - s, extent) // m
        return torch.div(t - s, m, rounding_mode="floor")

    def _rolled(self, a: int, extent: int) -> bool:
        # Swin's shift on a divisible extent: same window implies same rolled window, and the rolled id is
        # what keeps the tile-level test tight on the rolled tiles (whose plain window ids span -1..n/m)
        return not self.wrap and self.shift[a] > 0 and extent % self.size[a] == 0

    def query_axis(self, a: int, i: torch.Tensor, extent: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        w = self.window_id(a, i, extent)
        if self._rolled(a, extent):
            r = torch.remainder(i - self.shift[a], extent) // self.size[a]
            return {"win": (w, w), "roll": (r, r)}
        return {"win": (w, w)}

    def key_axis(self, a: int, j: torch.Tensor, extent: int) -> dict[str, torch.Tensor]:
        if self._rolled(a, extent):
            return {"win": self.window_id(a, j, extent),
                    "roll": torch.remainder(j - self.shift[a], extent) // self.size[a]}
        return {"win": self.window_id(a, j, extent)}

    def rpb_size(self) -> tuple[int, ...]:
        return self.size

    def rel_coord(self, a: int, t: torch.Tensor, extent: int) -> torch.Tensor:
        return torch.remainder(t - self.shift[a], extent) if self.wrap else t

    def layout(self, nq: int, nk: int) -> Layout | None:
        grid = self.grid_for(nq)
        # Swin's shifted windows on a divisible extent: tile the rolled windows (full tiles, the region mask
        # inside), as Swin does, rather than the partial windows at both borders
        wrap = tuple(self.wrap or self._rolled(a, n) for a, n in enumerate(grid))
        return Layout(grid, tile=self.size, offset=self.shift, wrap=wrap)

    def _key(self) -> tuple:
        return ("Blocks", self.size, self.grid, self.shift, self.wrap)


class Grid(SpatialPattern):
    """MaxViT grid attention: ``size`` tokens per axis at stride ``extent / size`` attend each other
    (token ``t`` is in window ``t % (extent // size)``). Extents must be divisible by ``size``. A relative-position
    table ``(heads, 2*size-1, ...)`` is indexed by key-minus-query offsets in grid units (``t // (extent // size)``),
    as in MaxViT.

    Args:
        size: Tokens per window per axis (int or per-axis tuple); extents must be divisible by it.
        grid: The spatial shape ``(H, W)`` or ``(T, H, W)``; required in 2D/3D.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If an extent is not divisible by ``size``, or 2D/3D without ``grid``.

    Examples:
        >>> import nearfar as nf
        >>> nf.Grid(2).mask(6, 6)[0].int().tolist()   # 1D: tokens 0 and 3 share a window
        [1, 0, 0, 1, 0, 0]
    """

    may_partition = True

    def __init__(self, size: int | Sequence[int], grid: int | Sequence[int] | None = None) -> None:
        ndim = self._init_grid(grid, size=size)
        self.size = check_per_axis(size, ndim, "size")
        if self.grid is not None and not grids_are_partial():
            self.check_extents(self.grid)

    def check_extents(self, grid: tuple[int, ...]) -> None:
        for a, (g, n) in enumerate(zip(self.size, grid)):
            if n % g:
                raise ValueError(f"Grid needs the extent {n} of axis {a} divisible by size[{a}]={g}")

    def query_axis(self, a: int, i: torch.Tensor, extent: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        w = i % (extent // self.size[a])
        return {"win": (w, w)}

    def key_axis(self, a: int, j: torch.Tensor, extent: int) -> dict[str, torch.Tensor]:
        return {"win": j % (extent // self.size[a])}

    def layout(self, nq: int, nk: int) -> Layout | None:
        grid = self.grid_for(nq)
        return Layout(grid, dilation=tuple(n // g for n, g in zip(grid, self.size)), tile=self.size)

    def rpb_size(self) -> tuple[int, ...]:
        return self.size

    def rel_coord(self, a: int, t: torch.Tensor, extent: int) -> torch.Tensor:
        return torch.div(t, extent // self.size[a], rounding_mode="floor")

    def _key(self) -> tuple:
        return ("Grid", self.size, self.grid)
