"""DaViT channel group attention: channel-last ``(B, H, W, C)`` in and out.

Paper: Ding, Xiao, Codella, Luo, Wang, Yuan, "DaViT: Dual Attention Vision Transformers" (ECCV 2022,
arXiv 2204.03645). Official code: dingmyu/davit ``timm/models/davit.py`` (``ChannelAttention``, ``ChannelBlock``);
timm ships the same module as ``timm/models/davit.py`` (``ChannelAttention``), whose parameter names this module
uses: ``qkv`` (Linear C -> 3C, output split ``[3, heads, head_dim]``) and ``proj`` (Linear C -> C). A timm DaViT
channel block's ``attn.*`` weights load unchanged (strict).

Attention runs over channels instead of tokens: the ``C`` channels are split into ``num_heads`` groups of
``C_g = C / num_heads`` channels; in each group the ``H*W`` tokens are the features. As in the official code, the
``C_g x C_g`` affinity is built from keys and values, ``A = softmax((s K)^T V)`` (softmax over the last index,
``s = C_g ** -0.5``), and aggregates the queries, ``out = Q A^T`` (``out[n, i] = sum_j A[i, j] Q[n, j]``). The
paper writes ``softmax(Q^T K / sqrt(C_g)) V^T``; both are the same family up to renaming the learned projections,
and the code's order is kept so that checkpoints mean the same thing. Cost ``O(N C C_g)``, memory
``B * heads * C_g^2``: linear in the number of tokens.

Registry family "dense": the mechanism has no token mask at all; every output channel of every token depends on
all ``H*W`` tokens (through the channel affinity), so in the token sense its receptive field is the whole map.

Differences from the official code: none in the computation (the ``ConvPosEnc``, norms and MLP of
``ChannelBlock`` are not part of this module); the input is a channel-last map instead of a token sequence plus
its size (the module is position-free, so the map is simply flattened). The default ``qkv_bias=False`` is the
official class default; DaViT models pass ``qkv_bias=True``. timm's later ``ChannelAttentionV2`` (the
Florence-2 DaViT: ``q^T k`` affinity applied to ``v``, scale ``N ** -0.5``) is a different module, not this one.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_bool, check_channels_last, check_dim_heads
from .projections import PointwiseLinear
from .registry import Mechanism, image_layer, register
from .sharding import whole_sequence


@whole_sequence()
class DaViTChannelAttention(nn.Module):
    """``DaViTChannelAttention(dim, num_heads=8, qkv_bias=False)``: x ``(B, H, W, dim)`` -> same shape.

    Channel group attention: heads are channel groups; each group's ``C_g x C_g`` channel affinity (from keys and
    values over all tokens) mixes the group's query channels.

    Args:
        dim: Channels, a positive multiple of ``num_heads``.
        num_heads: Number of channel groups, >= 1 (default 8).
        qkv_bias: Bias on the fused ``qkv`` projection (default False, the official class default).

    Raises:
        TypeError: ``qkv_bias`` is not a bool.
        ValueError: ``dim`` is not a positive multiple of ``num_heads``.

    Examples:
        >>> import torch
        >>> from nearfar import DaViTChannelAttention
        >>> DaViTChannelAttention(96, 3, qkv_bias=True)(torch.randn(2, 13, 11, 96)).shape
        torch.Size([2, 13, 11, 96])
    """

    dim: int
    num_heads: int
    head_dim: int
    scale: float

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False):
        super().__init__()
        self.head_dim = check_dim_heads(dim, num_heads)
        check_bool(qkv_bias, "qkv_bias")
        self.dim, self.num_heads = dim, num_heads
        self.scale = self.head_dim ** -0.5  # channels per group, not tokens (official)
        self.qkv = PointwiseLinear(dim, dim * 3, bias=qkv_bias)
        self.proj = PointwiseLinear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Channel group attention of a channel-last map, then ``proj``.

        Args:
            x: Input ``(B, H, W, dim)``, any size.

        Returns:
            The output ``(B, H, W, dim)``.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` is not ``(B, H, W, dim)`` or is empty.
        """
        b, spatial, n = check_channels_last(x, 2, self.dim)
        # (B, N, 3, G, C_g) -> three (B, G, C_g, N): channels as rows, tokens as features
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 4, 1)
        q, k, v = qkv[0], qkv[1], qkv[2]
        affinity = ((k * self.scale) @ v.transpose(-1, -2)).softmax(dim=-1)  # (B, G, C_g, C_g)
        out = affinity @ q  # (B, G, C_g, N): out[i, n] = sum_j A[i, j] q[j, n]
        return self.proj(out.reshape(b, self.dim, n).transpose(1, 2).reshape(b, *spatial, self.dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"


register(Mechanism(
    name="davit_channel", paper="DaViT: Dual Attention Vision Transformers (ECCV 2022)", repo="dingmyu/davit",
    family="dense", dims=("2d",), **image_layer(), cls=DaViTChannelAttention,
    make=lambda dim, num_heads, **kw: DaViTChannelAttention(dim, num_heads, **kw),
    notes="Channel group attention (heads = channel groups, tokens as features, scale C_g**-0.5); no token "
          "mask: every channel reads all tokens. timm ChannelAttention parameter names (qkv, proj)."))
