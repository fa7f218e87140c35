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
"""

from __future__ import annotations

import torch
from torch import nn

from ..attend import attend
from ..patterns import Neighborhood
from ..patterns.base import per_axis
from ..patterns.neighborhood import as_bool


class NeighborhoodAttention(nn.Module):
    """``NeighborhoodAttention(dim, num_heads, kernel_size, dilation=1, is_causal=False, rel_pos_bias=True,
    qkv_bias=True, qk_scale=None, ndim=2)``: x ``(B, *spatial, dim)`` -> same shape.

    ``ndim`` is the number of spatial axes (1, 2 or 3); ``kernel_size``/``dilation``/``is_causal`` are ints or
    per-axis tuples. With ``rel_pos_bias`` the NAT relative-position bias is learned (non-causal only).
    """

    def __init__(self, dim: int, num_heads: int, kernel_size, dilation=1, is_causal=False, rel_pos_bias: bool = True,
                 qkv_bias: bool = True, qk_scale: float | None = None, ndim: int = 2):
        super().__init__()
        if ndim not in (1, 2, 3):
            raise ValueError(f"ndim must be 1, 2 or 3, got {ndim!r}")
        if not isinstance(dim, int) or not isinstance(num_heads, int) or num_heads <= 0 or dim <= 0 \
                or dim % num_heads:
            raise ValueError(f"dim ({dim!r}) must be a positive multiple of num_heads ({num_heads!r})")
        self.dim, self.num_heads, self.ndim = dim, num_heads, ndim
        self.kernel_size = per_axis(kernel_size, ndim, "kernel_size")
        self.dilation = per_axis(dilation, ndim, "dilation")
        self.is_causal = per_axis(is_causal, ndim, "is_causal", check=as_bool)
        if rel_pos_bias and any(self.is_causal):
            raise ValueError("rel_pos_bias needs a non-causal neighbourhood (as in NAT/DiNAT); pass rel_pos_bias=False")
        self.scale = qk_scale if qk_scale is not None else (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, *(2 * k - 1 for k in self.kernel_size)))
            nn.init.trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)

    def pattern(self, spatial: tuple[int, ...]) -> Neighborhood:
        return Neighborhood(self.kernel_size, self.dilation, self.is_causal, grid=spatial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.ndim + 2 or x.shape[-1] != self.dim:
            axes = ", ".join(f"S{i}" for i in range(self.ndim))
            raise ValueError(f"x must be (B, {axes}, {self.dim}) "
                             f"channel-last, got {tuple(x.shape)}")
        b, *spatial, c = x.shape
        n = 1
        for s in spatial:
            n *= s
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = attend(qkv[0], qkv[1], qkv[2], self.pattern(tuple(spatial)), scale=self.scale, bias=self.rpb)
        return self.proj(out.transpose(1, 2).reshape(b, *spatial, c))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, is_causal={self.is_causal}, rel_pos_bias={self.rpb is not None}")

