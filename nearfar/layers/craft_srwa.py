"""CRAFT SRWAB attention: horizontal and vertical rectangle windows on two channel halves, cyclic shift, dynamic
position bias, locality complementary module; channel-last.

Paper: Li et al., "Feature Modulation Transformer: Cross-Refinement and Lightweight Transformer for Efficient Image
Super-Resolution" (CRAFT, ICCV 2023). Official code: AVC2-UESTC/CRAFT-SR ``basicsr/archs/craft_arch.py``
(``SRWAB``, ``Attention_regular``, ``DynamicPosBias``, ``CRFB``, ``CRAFT.calculate_rpi_v_sa``).

``SRWAttention(dim, num_heads, split_size=(4, 16), shift_size=(0, 0), qkv_bias=True, qk_scale=None)`` is the
attention part of ``SRWAB``: ``proj(concat[A_h, A_v] + DW_3(v))`` of ``qkv = Linear(LN(x))`` (the block adds the
residual and the MLP). The first ``C/2`` channels of q, k, v attend in ``s0 x s1`` windows with ``num_heads/2``
heads, the last ``C/2`` in ``s1 x s0`` windows. ``shift_size=(a, b)`` (CRFB's odd blocks: ``(s0//2, s1//2)``) rolls
the first half by ``(-a, -b)`` and the second by ``(-b, -a)`` with no mask (windows wrap around the border): each half
is cut from the fused projection into the windows of ``Blocks(size, grid, shift, wrap=True)`` by one copy and
attended as a batch (``WindowBatch``), and its output is added into ``DW_3(v)``'s channels in place. The dynamic
position bias (``attns.{0,1}.pos``: ``Linear(2, p)`` then three ``LN -> ReLU -> Linear``, ``p = dim // 2 // 4 // 4``)
maps every offset to per-head biases each forward; CRAFT indexes it query-minus-key, so its output (a Swin bias table)
is flipped into the key-minus-query table ``attend`` takes. ``get_v`` is the LCM depth-wise 3x3 conv (with bias) on
the unshifted v of all channels.

Parameter names and shapes equal the official ``SRWAB``'s (``norm1``, ``qkv``, ``proj``, ``get_v``,
``attns.{0,1}.pos.{pos_proj, pos1.{0,2}, pos2.{0,2}, pos3.{0,2}}``), so an SRWAB's weights other than ``norm2``
and ``mlp`` load unchanged (timm does not ship CRAFT). The model's ``biases_*`` / ``relative_position_index_*``
buffers are derived here.

Sizes: ``H`` and ``W`` must each be divisible by ``s0`` and ``s1`` (the official code has no padding: the SR model
reflect-pads the low-resolution image to a multiple of 16 at test time and crops the output). ``num_heads`` must be
even (two halves; the official ``num_heads // 2`` per half silently drops a head when it is odd).

Note (official behaviour, kept): the MLP width ``p = dim // 2 // 4 // 4`` is 1 for CRAFT's ``embed_dim`` 48, and a
LayerNorm over one feature outputs its bias, so there the "dynamic" bias does not depend on the offset at all (width
2: it takes two values); ``dim >= 96`` gives a position-dependent bias (``make(96, 3)``: width 3).

Differences from the official code: none in the computation; a shift is taken modulo the window (equivalent); no
dropout.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

from ..checks import check_bool, check_channels_last, check_dim_heads, check_nonneg_int, check_per_axis, check_scale
from ..functional import WindowBatch
from ..patterns import Blocks
from .position_bias import swin_table_as_offsets
from .registry import Mechanism, image_layer, register
from .sharding import whole_sequence


class DynamicPosBias(nn.Module):
    """CRAFT's (CrossFormer's) dynamic position bias, non-residual mode: ``(L, 2)`` offsets -> ``(L, num_heads)``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.pos_dim = dim // 4
        self.pos_proj = nn.Linear(2, self.pos_dim)
        self.pos1 = nn.Sequential(nn.LayerNorm(self.pos_dim), nn.ReLU(), nn.Linear(self.pos_dim, self.pos_dim))
        self.pos2 = nn.Sequential(nn.LayerNorm(self.pos_dim), nn.ReLU(), nn.Linear(self.pos_dim, self.pos_dim))
        self.pos3 = nn.Sequential(nn.LayerNorm(self.pos_dim), nn.ReLU(), nn.Linear(self.pos_dim, num_heads))

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))


class RectWindowBranch(nn.Module):
    """One orientation (official ``Attention_regular``): ``window`` rows x cols, its ``pos`` bias MLP and the
    offsets it is evaluated on (``(2r-1)(2c-1)`` rows ``(dy, dx)``, row-major: a Swin bias table's order)."""

    def __init__(self, dim: int, num_heads: int, window: tuple[int, int]):
        super().__init__()
        self.window = window
        self.pos = DynamicPosBias(dim // 4, num_heads)
        dy = torch.arange(1 - window[0], window[0], dtype=torch.float32)
        dx = torch.arange(1 - window[1], window[1], dtype=torch.float32)
        self.register_buffer("offsets", torch.cartesian_prod(dy, dx), persistent=False)

    def table(self) -> torch.Tensor:
        """``(heads, 2r-1, 2c-1)``, key-minus-query, as ``attend`` takes it with ``Blocks(window)``."""
        return swin_table_as_offsets(self.pos(self.offsets), self.window)


@whole_sequence()
class SRWAttention(nn.Module):
    """CRAFT's shift rectangle window attention (SRWAB without residual and MLP), input ``(B, H, W, dim)``.

    Li et al., "Feature Modulation Transformer: Cross-Refinement and Lightweight Transformer for Efficient Image
    Super-Resolution" (CRAFT, ICCV 2023); official code: AVC2-UESTC/CRAFT-SR. Half the heads attend inside
    ``split_size`` rectangles, the other half inside the transposed ones.

    Args:
        dim: Channels, a positive multiple of ``num_heads``, >= 32.
        num_heads: Number of heads, even and >= 2.
        split_size: The rectangle ``(rows, cols)``, an int or a pair of positive ints (default ``(4, 16)``).
        shift_size: Cyclic shift ``(rows, cols)``, an int or a pair of ints >= 0 (default ``(0, 0)``).
        qkv_bias: Bias on the ``qkv`` projection (default True).
        qk_scale: Score scale, a positive finite number; None (default): ``head_dim ** -0.5``.

    Raises:
        TypeError: ``qkv_bias`` is not a bool; a split or shift entry is not an int; ``qk_scale`` is not a number.
        ValueError: ``dim`` is not a positive multiple of ``num_heads`` or < 32; an odd ``num_heads``; a split entry
            < 1 or a shift entry < 0; ``qk_scale`` <= 0 or not finite.

    Examples:
        >>> import torch
        >>> from nearfar import SRWAttention
        >>> layer = SRWAttention(64, 4, split_size=(4, 8), shift_size=(2, 4))
        >>> layer(torch.randn(2, 16, 16, 64)).shape
        torch.Size([2, 16, 16, 64])
    """

    def __init__(self, dim: int, num_heads: int, split_size: tuple[int, int] = (4, 16),
                 shift_size: tuple[int, int] = (0, 0), qkv_bias: bool = True,
                 qk_scale: float | None = None):
        super().__init__()
        check_dim_heads(dim, num_heads)
        if num_heads % 2:
            raise ValueError(f"num_heads ({num_heads}) must be even: half the heads per window orientation")
        if dim // 2 // 4 // 4 < 1:
            raise ValueError(f"dim ({dim}) must be >= 32: the position-bias MLP width is dim // 2 // 4 // 4")
        check_bool(qkv_bias, "qkv_bias")
        qk_scale = check_scale(qk_scale)
        self.dim, self.num_heads = dim, num_heads
        self.split_size = check_per_axis(split_size, 2, "split_size")
        self.shift_size = check_per_axis(shift_size, 2, "shift_size", check=check_nonneg_int)
        self.head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim ** -0.5
        s0, s1 = self.split_size
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.get_v = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.attns = nn.ModuleList([RectWindowBranch(dim // 2, num_heads // 2, (s0, s1)),
                                    RectWindowBranch(dim // 2, num_heads // 2, (s1, s0))])

    def _check_size(self, h: int, w: int) -> None:
        s0, s1 = self.split_size
        step = math.lcm(s0, s1)
        if h % step or w % step:
            raise ValueError(f"x must have H and W divisible by split_size {self.split_size} (multiples of {step}), "
                             f"got H={h}, W={w}; pad the input (CRAFT reflect-pads images to a multiple of 16)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``proj(rectangle-window attention + LCM(v))`` of a channel-last map (no residual, no MLP).

        Args:
            x: Input ``(B, H, W, dim)``, ``H`` and ``W`` multiples of ``lcm(*split_size)``.

        Returns:
            The output ``(B, H, W, dim)``.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` is not ``(B, H, W, dim)`` or is empty, or ``H``/``W`` not a multiple of
                ``lcm(*split_size)``.
        """
        b, (h, w), n = check_channels_last(x, 2, self.dim)
        self._check_size(h, w)
        qkv = self.qkv(self.norm1(x))
        # (B, H, W, [3, half, C/2]) -> one (B, H, W, 3, C/2) view per half (unbind: one backward stack, no fills)
        halves = qkv.view(b, h, w, 3, 2, self.dim // 2).unbind(4)
        v = qkv[..., 2 * self.dim:].permute(0, 3, 1, 2)  # the unshifted v of all channels, channel-last memory
        y = self.get_v(v).permute(0, 2, 3, 1)  # LCM(v); each half's attention output is added into its channels
        a, c = self.shift_size
        branches = cast("Iterable[RectWindowBranch]", self.attns)
        for i, (half, branch, shift) in enumerate(zip(halves, branches, ((a, c), (c, a)))):
            r, s = branch.window
            pattern = Blocks((r, s), grid=(h, w), shift=(shift[0] % r, shift[1] % s), wrap=True)
            # the half's q, k, v cut into its (cyclically shifted) windows by one copy, attended as a batch
            wb = WindowBatch.of(pattern, (h, w), x.device)
            assert wb is not None  # H, W are multiples of both window sides: the windows are whole
            wb.attend_map(half, self.num_heads // 2, self.scale, branch.table(),
                          add_to=y[..., i * (self.dim // 2):(i + 1) * (self.dim // 2)])
        return self.proj(y)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, split_size={self.split_size}, "
                f"shift_size={self.shift_size}")


def _make(dim: int, num_heads: int, **kw: Any) -> SRWAttention:
    return SRWAttention(dim, max(2, num_heads - num_heads % 2), **{"split_size": (7, 14), **kw})


register(Mechanism(
    name="craft_srwa",
    paper="Feature Modulation Transformer: Cross-Refinement and Lightweight Transformer for Efficient Image "
          "Super-Resolution (CRAFT, ICCV 2023)",
    repo="AVC2-UESTC/CRAFT-SR", family="window", dims=("2d",), **image_layer(),
    make=_make, cls=SRWAttention,
    notes="SRWAB's attention (LN, qkv, H-/V-rectangle windows on the two channel halves with a dynamic position "
          "bias, LCM, proj). H and W must be divisible by both split sizes. make() uses split_size (7, 14) "
          "(official (4, 16) needs multiples of 16; 7 x 14 rectangles divide the 56x56 and 14x14 benchmark maps, "
          "aspect 1:2, 98 tokens vs 64) and an even head count (num_heads - 1 when odd: what the official "
          "num_heads // 2 per half computes); shift_size=(s0//2, s1//2) is CRFB's odd block."))
