"""Neighborhood attention (NA) and dilated NA (DiNA), 1D/2D/3D, causal and strided.

Papers: Hassani et al., "Neighborhood Attention Transformer" (CVPR 2023); Hassani & Shi, "Dilated
Neighborhood Attention Transformer" (2022); stride from "Generalized Neighborhood Attention" (2025).
Official code: SHI-Labs/NATTEN (``get_na_flex_mask`` in ``src/natten/backends/flex.py`` is the reference
predicate; legacy ``natten_cpu_commons.h`` holds the window/rpb start rules).

Semantics follow NATTEN exactly (``get_na_flex_mask``): per axis, keys of the query's dilation
group only; non-causal windows slide inward at the borders so every query sees exactly ``kernel_size``
keys; even kernels put the extra key on the left; causal windows are truncated, not shifted; with
``stride`` a run of ``stride`` queries shares the window of its leader. What differs from NATTEN: we keep
the relative-position bias (NATTEN ≥ 0.20 removed it) and accept any head dim, dtype and a padding mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..checks import check_bool, check_per_axis
from .spatial import Layout, SpatialPattern, grids_are_partial


class Neighborhood(SpatialPattern):
    """``Neighborhood(kernel_size, dilation=1, is_causal=False, grid=None, stride=1)``.

    Every argument is an int (bool for ``is_causal``) or a per-axis tuple. ``grid`` is the spatial shape
    in row-major token order, required for 2D/3D. ``kernel_size * dilation`` must not exceed any extent.

    Semantics are NATTEN's (``get_na_flex_mask``): non-causal windows slide inward at the borders so every query sees
    exactly ``kernel_size`` keys per axis; with ``dilation`` only keys of the query's dilation group count; causal
    windows are truncated, not shifted; with ``stride`` a run of ``stride`` queries shares its leader's window.

    Args:
        kernel_size: Window size per axis (int or per-axis tuple, >= 1).
        dilation: Dilation per axis (>= 1).
        is_causal: Causal per axis (bool or per-axis tuple).
        grid: The spatial shape ``(H, W)`` or ``(T, H, W)`` in row-major token order; required in 2D/3D, defaults
            to ``(N,)`` in 1D.
        stride: Query stride per axis (``1 <= stride <= kernel_size``).

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If a value is out of range, per-axis tuples disagree on the number of axes, 2D/3D is given without
            ``grid``, ``stride > kernel_size`` or ``kernel_size * dilation`` exceeds an extent.

    Examples:
        >>> import torch, nearfar as nf
        >>> nf.Neighborhood(3).mask(5, 5)[0].int().tolist()   # the border window slides inward
        [1, 1, 1, 0, 0]
        >>> na = nf.Neighborhood(7, dilation=2, grid=(16, 16))   # 2D DiNA
        >>> x = torch.randn(1, 2, 256, 32)
        >>> nf.attend(x, x, x, na).shape
        torch.Size([1, 2, 256, 32])
    """

    def __init__(self, kernel_size: int | Sequence[int], dilation: int | Sequence[int] = 1,
                 is_causal: bool | Sequence[bool] = False, grid: int | Sequence[int] | None = None,
                 stride: int | Sequence[int] = 1) -> None:
        ndim = self._init_grid(grid, kernel_size=kernel_size, dilation=dilation, is_causal=is_causal, stride=stride)
        self.kernel_size = check_per_axis(kernel_size, ndim, "kernel_size")
        self.dilation = check_per_axis(dilation, ndim, "dilation")
        self.is_causal = check_per_axis(is_causal, ndim, "is_causal", check=check_bool)
        self.stride = check_per_axis(stride, ndim, "stride")
        for a, (k, s) in enumerate(zip(self.kernel_size, self.stride)):
            if s > k:
                raise ValueError(f"stride[{a}]={s} must be <= kernel_size[{a}]={k}")
        if self.grid is not None and not grids_are_partial():
            self.check_extents(self.grid)

    def check_extents(self, grid: tuple[int, ...]) -> None:
        for a, (k, d, n) in enumerate(zip(self.kernel_size, self.dilation, grid)):
            if k * d > n:
                raise ValueError(
                    f"kernel_size[{a}] * dilation[{a}] = {k}*{d} = {k * d} exceeds the extent {n} of axis {a}; "
                    f"need kernel_size * dilation <= {n}")

    def layout(self, nq: int, nk: int) -> Layout | None:
        return Layout(self.grid_for(nq), self.dilation)

    def window(self, a: int, i: torch.Tensor, extent: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dilation group, and the group-local key range ``[start, end]`` (closed) of queries ``i`` on axis ``a``."""
        k, d, s, causal = self.kernel_size[a], self.dilation[a], self.stride[a], self.is_causal[a]
        g = i % d
        ip = i // d
        group_len = (extent - g + d - 1) // d
        if s > 1:
            leader = (ip // s) * s + (s - 1 if causal else s // 2)
            leader = torch.minimum(leader, group_len - 1)
        else:
            leader = ip
        if causal:
            return g, (leader - k + 1).clamp(min=0), ip
        start = torch.minimum((leader - k // 2).clamp(min=0), group_len - k)
        return g, start, start + k - 1

    def query_axis(self, a: int, i: torch.Tensor, extent: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        g, start, end = self.window(a, i, extent)
        return {"group": (g, g), "pos": (start, end)} if self.dilation[a] > 1 else {"pos": (start, end)}

    def key_axis(self, a: int, j: torch.Tensor, extent: int) -> dict[str, torch.Tensor]:
        return {"group": j % self.dilation[a], "pos": j // self.dilation[a]}

    # relative-position bias (NAT): table (heads, 2k-1[, 2k-1[, 2k-1]]), index (j - i)/dilation + k - 1 per axis
    def rpb_size(self) -> tuple[int, ...]:
        return self.kernel_size

    def rel_coord(self, a: int, t: torch.Tensor, extent: int) -> torch.Tensor:
        return torch.div(t, self.dilation[a], rounding_mode="floor")

    def check_rpb(self) -> None:
        if any(self.is_causal) or any(s > 1 for s in self.stride):
            raise ValueError("a relative-position-bias table needs a non-causal Neighborhood with stride=1 "
                             "(as in NAT/DiNAT)")

    def _key(self) -> tuple:
        return ("Neighborhood", self.kernel_size, self.dilation, self.is_causal, self.grid, self.stride)

