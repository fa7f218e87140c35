"""Neighborhood attention modules (NAT, DiNAT, MedViTV2's DiNA): channel-last ``(B, *spatial, C)`` in and out.

Papers: Hassani et al., "Neighborhood Attention Transformer" (CVPR 2023); Hassani & Shi, "Dilated
Neighborhood Attention Transformer" (2022). Official code: SHI-Labs/NATTEN (legacy ``natten2d.py`` /
``natten1d.py`` / ``natten3d.py`` at tag v0.14.6 for the module with a relative-position bias) and
SHI-Labs/Neighborhood-Attention-Transformer (``classification/nat.py``, ``dinat.py``).

Parameter names and shapes follow NATTEN's legacy module, so its checkpoints load unchanged: ``qkv``
(Linear C -> 3C, split ``[3, heads, head_dim]``), ``rpb`` (heads, 2k-1[, 2k-1[, 2k-1]]), ``proj`` (Linear C -> C).
Differences from the official code: no zero-padding of inputs smaller than ``kernel_size * dilation``
(NATTEN <= 0.14 padded them and let the padded tokens attend unmasked; we raise a clear error instead, as
NATTEN >= 0.20 does); attention and projection dropout are not implemented (NAT uses 0).

Schedules (official ``nat.py``, ``dinat.py``): NAT uses ``kernel_size=7, dilation=1`` everywhere. DiNAT alternates
``dilation=1`` and ``dilation = resolution // kernel_size`` inside each stage (224 input: 56 -> 8, 28 -> 4,
14 -> 2, 7 -> 1); ``dinat_dilations(depth, resolution)`` gives that list. MedViTV2 ("DiNA", Omid-Nejati/MedViTV2
``MedViT.py``, block ``LFP``) uses NATTEN's module with ``kernel_size=7``, ``dilation=None`` (= 1), heads = C/32,
qkv bias and the relative-position bias, i.e. ``NeighborhoodAttention(C, C // 32, 7)`` here. Its block reshapes the
channels-first feature map to ``(B, H, W, C)`` without a permute before the attention (so channels and positions
are mixed up); that quirk is the caller's and is not reproduced.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..checks import check_bool, check_channels_last, check_dim_heads, check_per_axis, check_scale
from ..functional import attend, merge_heads, split_qkv
from ..patterns import Neighborhood
from .position_bias import trunc_normal_
from .registry import Mechanism, image_layer, register
from .sharding import shards_natively


def dinat_dilations(depth: int, resolution: int, kernel_size: int = 7) -> list[int]:
    """DiNAT's per-block dilations in a stage: 1, r, 1, r, ... with ``r = max(1, resolution // kernel_size)``."""
    r = max(1, resolution // kernel_size)
    return [1 if i % 2 == 0 else r for i in range(depth)]


@shards_natively
class NeighborhoodAttention(nn.Module):
    """``NeighborhoodAttention(dim, num_heads, kernel_size, dilation=1, is_causal=False, rel_pos_bias=True,
    qkv_bias=True, qk_scale=None, ndim=2)``: x ``(B, *spatial, dim)`` -> same shape.

    ``ndim`` is the number of spatial axes (1, 2 or 3); ``kernel_size``/``dilation``/``is_causal`` are ints or
    per-axis tuples. With ``rel_pos_bias`` the NAT relative-position bias is learned (non-causal only).

    Args:
        dim: Channels, a positive multiple of ``num_heads``.
        num_heads: Number of heads, >= 1.
        kernel_size: Neighbourhood size, an int or one positive int per spatial axis (no default; NAT uses 7).
        dilation: Dilation, an int or one positive int per axis (default 1; DiNAT's sparse global context).
        is_causal: Causal neighbourhood (only keys up to the query), a bool or one per axis (default False).
        rel_pos_bias: Learned NAT relative-position bias (default True; needs a non-causal neighbourhood).
        qkv_bias: Bias on the fused ``qkv`` projection (default True).
        qk_scale: Score scale, a positive finite number; None (default): ``head_dim ** -0.5``.
        ndim: Spatial axes, 1, 2 (default) or 3.

    Raises:
        TypeError: ``rel_pos_bias`` or an ``is_causal`` entry is not a bool; a kernel or dilation entry is not an
            int; ``qk_scale`` is not a number.
        ValueError: ``ndim`` not 1, 2 or 3; ``dim`` is not a positive multiple of ``num_heads``; a kernel or
            dilation entry < 1, or a tuple of another length than ``ndim``; ``rel_pos_bias`` with a causal axis;
            ``qk_scale`` <= 0 or not finite.

    Examples:
        >>> import torch
        >>> from nearfar import NeighborhoodAttention
        >>> NeighborhoodAttention(64, 4, kernel_size=7)(torch.randn(2, 14, 14, 64)).shape
        torch.Size([2, 14, 14, 64])
        >>> causal_1d = NeighborhoodAttention(64, 4, 5, is_causal=True, rel_pos_bias=False, ndim=1)
        >>> causal_1d(torch.randn(2, 32, 64)).shape
        torch.Size([2, 32, 64])
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: int | Sequence[int], dilation: int | Sequence[int] = 1,
                 is_causal: bool | Sequence[bool] = False, rel_pos_bias: bool = True,
                 qkv_bias: bool = True, qk_scale: float | None = None, ndim: int = 2):
        super().__init__()
        if ndim not in (1, 2, 3):
            raise ValueError(f"ndim must be 1, 2 or 3, got {ndim!r}")
        head_dim = check_dim_heads(dim, num_heads)
        check_bool(rel_pos_bias, "rel_pos_bias")
        qk_scale = check_scale(qk_scale)
        self.dim, self.num_heads, self.ndim = dim, num_heads, ndim
        self.kernel_size = check_per_axis(kernel_size, ndim, "kernel_size")
        self.dilation = check_per_axis(dilation, ndim, "dilation")
        self.is_causal = check_per_axis(is_causal, ndim, "is_causal", check=check_bool)
        if rel_pos_bias and any(self.is_causal):
            raise ValueError("rel_pos_bias needs a non-causal neighbourhood (as in NAT/DiNAT); pass rel_pos_bias=False")
        self.scale = qk_scale if qk_scale is not None else head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, *(2 * k - 1 for k in self.kernel_size)))
            trunc_normal_(self.rpb)
        else:
            self.register_parameter("rpb", None)

    def pattern(self, spatial: tuple[int, ...]) -> Neighborhood:
        return Neighborhood(self.kernel_size, self.dilation, self.is_causal, grid=spatial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Neighbourhood attention of a channel-last input.

        Args:
            x: Input ``(B, *spatial, dim)`` with ``ndim`` spatial axes, each extent >= ``kernel_size * dilation``.

        Returns:
            The output, the shape of ``x``.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` has another rank or channel count, is empty, or an axis is shorter than
                ``kernel_size * dilation``.
        """
        _, spatial, _ = check_channels_last(x, self.ndim, self.dim)
        q, k, v = split_qkv(self.qkv(x), self.num_heads)
        out = attend(q, k, v, self.pattern(spatial), scale=self.scale, rpb=self.rpb)
        return self.proj(merge_heads(out, spatial))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, is_causal={self.is_causal}, rel_pos_bias={self.rpb is not None}")



register(Mechanism(
    name="neighborhood", paper="Neighborhood Attention Transformer (CVPR 2023); Dilated NAT (2022)",
    repo="SHI-Labs/NATTEN", family="local", dims=("1d", "2d", "3d"),
    **image_layer(causal={"is_causal": True, "rel_pos_bias": False}),
    make=lambda dim, num_heads, kernel_size=7, **kw: NeighborhoodAttention(dim, num_heads, kernel_size, **kw),
    cls=NeighborhoodAttention))
