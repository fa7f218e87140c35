"""Non-overlapping windows: Swin / MaxViT block attention (``Blocks``) and MaxViT grid attention (``Grid``).

Swin: Liu et al., "Swin Transformer" (ICCV 2021), microsoft/Swin-Transformer (W-MSA, SW-MSA with the
region mask). MaxViT: Tu et al. (ECCV 2022), google-research/maxvit and timm ``maxxvit.py`` (block and grid
partitions: ``window_partition``, ``grid_partition``). CRAFT and HiDiffusion use the cyclic, unmasked shift.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import as_nonneg_int, per_axis
from .spatial import Layout, SpatialPattern


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
    """

    is_partition = True

    def __init__(self, size: int | Sequence[int], grid: int | Sequence[int] | None = None,
                 shift: int | Sequence[int] = 0, wrap: bool = False) -> None:
        ndim = self._init_grid(grid, size=size, shift=shift)
        self.size = per_axis(size, ndim, "size")
        self.shift = per_axis(shift, ndim, "shift", check=as_nonneg_int)
        if not isinstance(wrap, bool):
            raise TypeError(f"wrap must be a bool, got {wrap!r}")
        self.wrap = wrap
        for a, (s, m) in enumerate(zip(self.shift, self.size)):
            if s >= m:
                raise ValueError(f"shift[{a}]={s} must be in [0, size[{a}]-1] = [0, {m - 1}]")
        if self.grid is not None:
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
    as in MaxViT."""

    is_partition = True

    def __init__(self, size: int | Sequence[int], grid: int | Sequence[int] | None = None) -> None:
        ndim = self._init_grid(grid, size=size)
        self.size = per_axis(size, ndim, "size")
        if self.grid is not None:
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
