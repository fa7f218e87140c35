"""Swin W-MSA / SW-MSA (2D) and Video Swin 3D window attention: channel-last ``(B, H, W, C)`` / ``(B, T, H, W, C)``.

Paper: Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows" (ICCV 2021); Liu et
al., "Video Swin Transformer" (CVPR 2022). Official code: microsoft/Swin-Transformer ``models/swin_transformer.py``
(``WindowAttention``, ``SwinTransformerBlock``: roll, ``window_partition``, region mask); SwinTransformer/
Video-Swin-Transformer ``mmaction/models/backbones/swin_transformer.py`` (``WindowAttention3D``, ``get_window_size``).

The module is the block's token mixer: (shift) + window partition + attention with relative position bias +
reverse, through ``window_attention`` with a ``Blocks`` pattern (Swin's roll and region mask are the pattern): the
input is cut into windows (one gather with the roll), the windows attend as a batch with the bias table and region
mask added inside the score GEMM, and partial edge windows go to ``attend`` on the whole map.

Parameter names and shapes equal timm's ``WindowAttention`` (``timm/models/swin_transformer.py``) and the official
modules: ``qkv`` (Linear C -> 3C, split ``[3, heads, head_dim]``), ``proj`` (Linear C -> C) and
``relative_position_bias_table`` (``prod(2M-1)`` x heads, query-minus-key, the official indexing). A timm Swin block's
``attn.*`` weights load unchanged; official checkpoints also hold the derived ``relative_position_index`` buffer,
which is dropped on load (timm's checkpoint filter does the same).

Differences from the official code:
- sizes not divisible by the window: the official classification code requires divisibility and the
  detection/segmentation forks zero-pad and let the padded tokens take part as keys (with k/v equal to the
  projection biases); here padded positions are masked out, so edge windows are simply smaller (this equals the
  padded computation with the padded keys removed);
- an input no larger than the window on an axis gets the window clipped to it and shift 0 on that axis, per axis
  (Video Swin's ``get_window_size``), using the centre of the bias table. 2D Swin differs on non-square small
  inputs: at construction it sets the window to ``min(H, W)`` on both axes and drops the shift on both (e.g. a
  7x14 map with window 7, shift 3: Swin shifts neither axis, this module shifts W);
- masked pairs of shifted windows are excluded exactly (official: -100 added to the logit);
- no attention/projection dropout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..checks import check_channels_last, check_dim_heads, check_nonneg_int, check_per_axis, check_scale
from ..functional import window_attention
from ..patterns import Blocks
from .position_bias import crop_offsets, swin_table_as_offsets, trunc_normal_
from .registry import Mechanism, image_layer, register
from .sharding import shards_natively, whole_extent


@shards_natively
class WindowAttention(nn.Module):
    """``WindowAttention(dim, num_heads, window_size=7, shift_size=0, qkv_bias=True, qk_scale=None, ndim=2)``.

    W-MSA with ``shift_size=0``, SW-MSA with ``shift_size=window_size // 2`` (Swin's odd blocks). ``ndim=3`` is
    Video Swin (window e.g. ``(8, 7, 7)``). Input ``(B, *spatial, dim)`` channel-last, any spatial size.

    Args:
        dim: Channels, a positive multiple of ``num_heads``.
        num_heads: Number of heads, >= 1.
        window_size: Window size, an int or one positive int per spatial axis (default 7).
        shift_size: Cyclic shift, an int or one per axis, each in ``[0, window_size - 1]`` (default 0: W-MSA).
        qkv_bias: Bias on the fused ``qkv`` projection (default True).
        qk_scale: Score scale, a positive finite number; None (default): ``head_dim ** -0.5``.
        ndim: Spatial axes, 2 (Swin, default) or 3 (Video Swin).

    Raises:
        TypeError: A window or shift entry is not an int; ``qk_scale`` is not a number.
        ValueError: ``ndim`` not 2 or 3; ``dim`` is not a positive multiple of ``num_heads``; a window entry < 1, a
            shift entry < 0 or >= its window, a tuple of another length than ``ndim``; ``qk_scale`` <= 0 or not
            finite.

    Examples:
        >>> import torch
        >>> from nearfar import WindowAttention
        >>> WindowAttention(64, 4, window_size=7, shift_size=3)(torch.randn(2, 14, 14, 64)).shape
        torch.Size([2, 14, 14, 64])
        >>> video = WindowAttention(64, 4, window_size=(2, 7, 7), ndim=3)   # Video Swin
        >>> video(torch.randn(1, 4, 14, 14, 64)).shape
        torch.Size([1, 4, 14, 14, 64])
    """

    def __init__(self, dim: int, num_heads: int, window_size: int | Sequence[int] = 7,
                 shift_size: int | Sequence[int] = 0, qkv_bias: bool = True,
                 qk_scale: float | None = None, ndim: int = 2):
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 (Swin) or 3 (Video Swin), got {ndim!r}")
        head_dim = check_dim_heads(dim, num_heads)
        qk_scale = check_scale(qk_scale)
        self.dim, self.num_heads, self.ndim = dim, num_heads, ndim
        self.window_size = check_per_axis(window_size, ndim, "window_size")
        self.shift_size = check_per_axis(shift_size, ndim, "shift_size", check=check_nonneg_int)
        for a, (s, m) in enumerate(zip(self.shift_size, self.window_size)):
            if s >= m:
                raise ValueError(f"shift_size[{a}]={s} must be in [0, window_size[{a}]-1] = [0, {m - 1}]")
        self.scale = qk_scale if qk_scale is not None else head_dim ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros(math.prod(2 * m - 1 for m in self.window_size), num_heads))
        trunc_normal_(self.relative_position_bias_table)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def window_for(self, spatial: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Window and shift used on an input of this spatial size (clipped per axis, Video Swin's rule)."""
        window = tuple(min(m, n) for m, n in zip(self.window_size, spatial))
        shift = tuple(0 if n <= m else s for s, m, n in zip(self.shift_size, self.window_size, spatial))
        return window, shift

    def offset_table(self, window: tuple[int, ...]) -> torch.Tensor:
        """The bias table as ``attend`` takes it: ``(heads, 2m-1, ...)``, key-minus-query, for ``window``."""
        return crop_offsets(swin_table_as_offsets(self.relative_position_bias_table, self.window_size),
                            self.window_size, window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Window attention of a channel-last map (windows larger than the input are clipped, and then not shifted).

        Args:
            x: Input ``(B, *spatial, dim)`` with ``ndim`` spatial axes, any size.

        Returns:
            The output, the shape of ``x``.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` has another rank or channel count, or is empty.
        """
        _, spatial, _ = check_channels_last(x, self.ndim, self.dim)
        window, shift = self.window_for(whole_extent(spatial))  # a rank's slab inside sharded: the whole map's
        out = window_attention(x, Blocks(window, grid=spatial, shift=shift), self.qkv, self.num_heads, self.scale,
                               self.offset_table(window))
        return self.proj(out)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "relative_position_index", None)  # derived; official checkpoints carry it
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"shift_size={self.shift_size}")


def _half(window_size):
    return window_size // 2 if isinstance(window_size, int) else tuple(m // 2 for m in window_size)


_SWIN = "Swin Transformer (ICCV 2021); Video Swin Transformer (CVPR 2022)"
register(Mechanism(
    name="swin", paper=_SWIN, repo="microsoft/Swin-Transformer", family="window", dims=("2d", "3d"),
    **image_layer(), cls=WindowAttention,
    make=lambda dim, num_heads, **kw: WindowAttention(dim, num_heads, **kw),
    notes="W-MSA (window 7, no shift); timm WindowAttention parameter names"))
register(Mechanism(
    name="swin_shifted", paper=_SWIN, repo="microsoft/Swin-Transformer", family="window", dims=("2d", "3d"),
    **image_layer(), cls=WindowAttention,
    make=lambda dim, num_heads, window_size=7, **kw: WindowAttention(
        dim, num_heads, window_size, shift_size=_half(window_size), **kw),
    notes="SW-MSA (window 7, shift 3): Swin's roll + region mask, masked pairs excluded exactly"))
