"""SHViT single-head self-attention on partial channels (``SHSA``): channel-last ``(B, H, W, C)`` in and out.

Paper: Yun & Ro, "SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design" (CVPR 2024).
Official code: ysj9909/SHViT, ``model/shvit.py`` (``SHSA``, ``Conv2d_BN``, ``GroupNorm``); timm ships it as
``timm/models/shvit.py`` (``SHSA``, ``Conv2dNorm``, ``GroupNorm1``), whose parameter names this module uses.

The first ``pdim`` channels are normalised (GroupNorm with one group: statistics over all ``pdim x H x W``
values of a sample), projected by a 1x1 conv + BatchNorm to ``q, k`` (``qk_dim`` each) and ``v`` (``pdim``), and
mixed by one dense single-head attention (scale ``qk_dim ** -0.5``); the other ``dim - pdim`` channels bypass it.
Then ``ReLU`` and a 1x1 conv + BatchNorm over all ``dim`` channels, whose BatchNorm weight starts at 0 (so the
residual ``x + SHSA(x)`` is the identity at init). BatchNorms behave as ``nn.BatchNorm2d`` (batch statistics in
training, running statistics in eval), exactly as in timm.

timm parameter names and shapes (``SHSA(dim, qk_dim, pdim)`` in timm = ``SHSA(dim, qk_dim=qk_dim, pdim=pdim)`` here):
``pre_norm.{weight,bias}`` ``(pdim,)``; ``qkv.c.weight`` ``(2*qk_dim+pdim, pdim, 1, 1)``; ``qkv.bn.*``
``(2*qk_dim+pdim,)``; ``proj.1.c.weight`` ``(dim, dim, 1, 1)``; ``proj.1.bn.*`` ``(dim,)`` (``proj.0`` is the ReLU).
A timm checkpoint's ``stages.i.blocks.j.mixer.m.*`` entries load unchanged. The official repo names the same
tensors ``qkv.c``/``qkv.bn`` and ``proj.1.c``/``proj.1.bn`` too.

Differences from the official code: ``pdim`` defaults to ``int(3 * dim / 14)``, which reproduces the partial
dimension of every attention stage of SHViT-S1..S4 (224->48, 320->68, 308->66, 352->75, 336->72, 448->96);
the official module has no default. No fused (``fuse()``) inference variant: fuse offline if needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_channels_last, check_int_range, check_positive_int
from ..functional import attend
from .registry import Mechanism, image_layer, register
from .sharding import whole_sequence


class ConvNorm(nn.Sequential):
    """timm's ``Conv2dNorm`` for a 1x1 conv: ``c`` (conv without bias) then ``bn`` (weight init ``bn_weight_init``).

    Applied to a channel-last tensor: the conv is a ``Linear`` on the last axis; in training the BatchNorm runs on
    the channels-first view (no copy), in eval it is folded into the ``Linear``."""

    c: nn.Conv2d
    bn: nn.BatchNorm2d

    def __init__(self, in_channels: int, out_channels: int, bn_weight_init: float = 1.0):
        super().__init__()
        self.add_module("c", nn.Conv2d(in_channels, out_channels, 1, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_channels))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.constant_(self.bn.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, bn = self.c.weight.flatten(1), self.bn
        if bn.training or not bn.track_running_stats:  # batch statistics: the BatchNorm itself
            return bn(F.linear(x, w).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        # running statistics: an affine map, folded into the conv weight (timm's ``fuse()``) to save a pass
        assert bn.running_var is not None and bn.running_mean is not None  # track_running_stats
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        return F.linear(x, w * scale[:, None], bn.bias - bn.running_mean * scale)


@whole_sequence()
class SHSA(nn.Module):
    """``SHSA(dim, qk_dim=16, pdim=None)``: x ``(B, H, W, dim)`` -> same shape; single head over all H*W tokens.

    ``pdim`` (attended channels) defaults to ``int(3 * dim / 14)`` (the official variants' ratio); ``pdim = dim``
    attends every channel.

    Args:
        dim: Channels, >= 1.
        qk_dim: Query/key width of the single head, >= 1 (default 16).
        pdim: Attended channels (the first ``pdim``; the rest pass through), in ``[1, dim]``; None (default):
            ``max(1, 3 * dim // 14)``.

    Raises:
        TypeError: ``dim``, ``qk_dim`` or ``pdim`` is not an int.
        ValueError: ``dim`` or ``qk_dim`` < 1; ``pdim`` outside ``[1, dim]``.

    Examples:
        >>> import torch
        >>> from nearfar import SHSA
        >>> SHSA(64, qk_dim=16).eval()(torch.randn(2, 14, 14, 64)).shape
        torch.Size([2, 14, 14, 64])
    """

    def __init__(self, dim: int, qk_dim: int = 16, pdim: int | None = None):
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        self.qk_dim = check_positive_int(qk_dim, "qk_dim")
        if pdim is None:
            pdim = max(1, 3 * dim // 14)
        self.pdim = check_int_range(pdim, "pdim", 1, dim)
        self.scale = qk_dim ** -0.5
        self.pre_norm = nn.GroupNorm(1, pdim)  # timm GroupNorm1 / official GroupNorm: one group, eps 1e-5
        self.qkv = ConvNorm(pdim, 2 * qk_dim + pdim)
        self.proj = nn.Sequential(nn.ReLU(inplace=True), ConvNorm(dim, dim, bn_weight_init=0))  # on the cat output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Single-head attention over all ``H*W`` tokens on the first ``pdim`` channels, then ``proj``.

        Args:
            x: Input ``(B, H, W, dim)``, any size.

        Returns:
            The output ``(B, H, W, dim)``.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` is not ``(B, H, W, dim)`` or is empty.
        """
        b, spatial, n = check_channels_last(x, 2, self.dim)
        x1, x2 = x.split([self.pdim, self.dim - self.pdim], dim=-1)
        x1 = self.pre_norm(x1.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        q, k, v = self.qkv(x1).reshape(b, 1, n, -1).split([self.qk_dim, self.qk_dim, self.pdim], dim=-1)
        x1 = attend(q, k, v, scale=self.scale).reshape(b, *spatial, self.pdim)
        return self.proj(torch.cat([x1, x2], dim=-1))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, qk_dim={self.qk_dim}, pdim={self.pdim}"


register(Mechanism(
    name="shvit", paper="SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design (CVPR 2024)",
    repo="ysj9909/SHViT", family="dense", dims=("2d",), **image_layer(),
    make=lambda dim, num_heads, **kw: SHSA(dim, **kw), cls=SHSA,
    notes="Single head: num_heads is ignored. qk_dim=16, pdim=int(3*dim/14) (the official variants' partial "
          "dims); parameter names/shapes equal timm's SHSA, so timm checkpoints load unchanged."))
