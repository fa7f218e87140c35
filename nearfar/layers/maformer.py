"""MAFormer's Multi-scale Attention Fusion (MAF) token mixer: channel-last ``(B, H, W, C)`` in and out.

**PROVISIONAL / UNVERIFIED DESIGN.** Paper: Wang, Sun et al., "MAFormer: A Transformer Network with
Multi-scale Attention Fusion for Visual Recognition" (arXiv 2209.01620; Neurocomputing 2024). No official code
was found (searched the code/issue indexes again for this module: ``bistuxlf/MAFormer`` and ``bocaix/MAFormer``
are unrelated projects), so this is our own provisional design, built from the abstract only; it reproduces no
checkpoint and its parameter names are our own:

- local branch ``y_l = W-MSA_M(x)`` (Swin window attention, no shift, Swin relative-position bias; submodule
  ``local`` with Swin's names ``qkv``, ``relative_position_bias_table`` ``((2M-1)^2, heads)``, ``proj``, so Swin's
  ``attn.*`` weights load into ``local.*``; Swin's ``relative_position_index`` buffer is not used);
- GLD branch ``y_g = MHSA(Conv_{r x r, stride r}(x))`` (``gld`` then ``global_attn``), with ``r = down_ratio``
  chosen so the map becomes 7x7 (``r = H/7``);
- fusion ``y = y_l + CrossAttn(q = y_l, kv = y_g)`` (``fusion``).

Open choices made here (the paper's operators may differ): all three attentions use all ``dim`` channels and
``num_heads`` heads (no channel split between branches); GLD is one strided conv without a norm; fusion is a
residual cross-attention rather than a gated sum. Size handling: windows shrink to ``min(window_size, extent)``
per axis (the centre of the bias table is used), and extents that are not multiples of the window end with a
smaller window (Swin's detection code zero-pads instead and lets the padded keys in); the GLD conv zero-pads
bottom/right to a multiple of ``r`` (ceil mode), so the global map is ``ceil(H/r) x ceil(W/r)``. Attention and
projection dropout are not implemented. The module is the attention part of a MAF block: the caller adds the
outer residual, norms and MLP.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_channels_last, check_dim_heads, check_positive_int, check_scale
from ..functional import attend, merge_heads, split_heads, split_qkv
from .registry import Mechanism, image_layer, register
from .sharding import whole_sequence
from .swin import WindowAttention


class TokenAttention(nn.Module):
    """Dense multi-head attention over token lists ``(B, N, C)``, through ``nearfar.attend``.

    Self-attention (``cross=False``): fused ``qkv`` (C -> 3C, split ``[3, heads, d]``), optionally keeping only
    the first ``num_queries`` outputs. Cross-attention (``cross=True``): ``q`` (C -> C) on the queries, fused
    ``kv`` (C -> 2C, split ``[2, heads, d]``) on the context. Then ``proj`` (C -> C).
    """

    def __init__(self, dim: int, num_heads: int, cross: bool = False, qkv_bias: bool = True,
                 qk_scale: float | None = None):
        super().__init__()
        head_dim = check_dim_heads(dim, num_heads)
        qk_scale = check_scale(qk_scale)
        self.dim, self.num_heads, self.cross = dim, num_heads, cross
        self.scale = qk_scale if qk_scale is not None else head_dim ** -0.5
        if cross:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                num_queries: int | None = None) -> torch.Tensor:
        if self.cross:
            assert context is not None  # the cross layers of this module always get their context
            q = split_heads(self.q(x), self.num_heads)
            kv = self.kv(context).reshape(context.shape[0], context.shape[1], 2, self.num_heads, -1)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = split_qkv(self.qkv(x), self.num_heads)
            if num_queries is not None:
                q = q[:, :, :num_queries]
        out = attend(q, k, v, scale=self.scale)
        return self.proj(merge_heads(out, (out.shape[2],)))


@whole_sequence()
class MAFAttention(nn.Module):
    """``MAFAttention(dim, num_heads, window_size=7, down_ratio=8, qkv_bias=True, qk_scale=None)``: x
    ``(B, H, W, dim)`` -> same shape. PROVISIONAL design (see the module docstring): local window attention,
    GLD (``down_ratio x down_ratio`` strided conv, then MHSA over the down-sampled tokens), fused by a residual
    cross-attention ``y = y_l + CrossAttn(y_l, y_g)``. ``down_ratio`` should make the map 7x7 (``H / 7``).

    Args:
        dim: Channels, a positive multiple of ``num_heads``.
        num_heads: Number of heads, >= 1.
        window_size: Local window size, >= 1 (default 7).
        down_ratio: Stride and kernel of the GLD conv, >= 1 (default 8).
        qkv_bias: Biases on the attention projections (default True).
        qk_scale: Score scale, a positive finite number; None (default): ``head_dim ** -0.5``.

    Raises:
        TypeError: ``window_size`` or ``down_ratio`` is not an int; ``qk_scale`` is not a number.
        ValueError: ``dim`` is not a positive multiple of ``num_heads``; ``window_size`` or ``down_ratio`` < 1;
            ``qk_scale`` <= 0 or not finite.

    Examples:
        >>> import torch
        >>> from nearfar import MAFAttention
        >>> MAFAttention(64, 4, window_size=7, down_ratio=2)(torch.randn(2, 14, 14, 64)).shape
        torch.Size([2, 14, 14, 64])
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, down_ratio: int = 8, qkv_bias: bool = True,
                 qk_scale: float | None = None):
        super().__init__()
        check_dim_heads(dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.down_ratio = check_positive_int(down_ratio, "down_ratio")
        window_size = check_positive_int(window_size, "window_size")
        self.local = WindowAttention(dim, num_heads, window_size, 0, qkv_bias, qk_scale)
        self.gld = nn.Conv2d(dim, dim, down_ratio, stride=down_ratio)
        self.global_attn = TokenAttention(dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.fusion = TokenAttention(dim, num_heads, cross=True, qkv_bias=qkv_bias, qk_scale=qk_scale)

    def global_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """GLD input tokens: ``(B, H, W, C)`` -> ``(B, ceil(H/r) * ceil(W/r), C)`` (zero-padded bottom/right)."""
        r = self.down_ratio
        h, w = x.shape[1:3]
        t = x.permute(0, 3, 1, 2)  # a channels_last view: the conv reads it without a copy
        if h % r or w % r:
            t = F.pad(t, (0, -w % r, 0, -h % r))
        return self.gld(t).flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Local window attention fused with the down-sampled global tokens by a residual cross-attention.

        Args:
            x: Input ``(B, H, W, dim)``, any size (the GLD input is zero-padded to a multiple of ``down_ratio``).

        Returns:
            The output ``(B, H, W, dim)``.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` is not ``(B, H, W, dim)`` or is empty.
        """
        b, spatial, n = check_channels_last(x, 2, self.dim)
        y_l = self.local(x)
        y_g = self.global_attn(self.global_tokens(x))
        tokens = y_l.reshape(b, n, self.dim)
        return (tokens + self.fusion(tokens, y_g)).reshape(b, *spatial, self.dim)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.local.window_size}, "
                f"down_ratio={self.down_ratio}")


def default_down_ratio(dim: int) -> int:
    """GLD ratio for a stage of width ``dim`` in the Swin-T/MAFormer layout at 224x224 input (width 96 * 2^s on
    a 56 / 2^s map): ``r = 768 / dim`` makes the map 7x7; other widths take the power of two at or below it
    (a global map of at least 7x7), at least 1."""
    return 2 ** max(0, math.floor(math.log2(768 / dim)))


register(Mechanism(
    name="maformer",
    paper="MAFormer: A Transformer Network with Multi-scale Attention Fusion for Visual Recognition "
          "(arXiv 2209.01620, Neurocomputing 2024)",
    repo="(no official code found)", family="local+global", dims=("2d",), **image_layer(),
    make=lambda dim, num_heads, down_ratio=None, **kw: MAFAttention(
        dim, num_heads, down_ratio=default_down_ratio(dim) if down_ratio is None else down_ratio, **kw),
    cls=MAFAttention,
    notes="PROVISIONAL, UNVERIFIED design from the paper abstract only (no official code found): Swin W-MSA 7x7 + RPB, "
          "GLD = strided r x r conv + MHSA, residual cross-attention fusion. make() picks down_ratio = 768/dim "
          "(8 for dim 96 on 56x56, 2 for dim 384 on 14x14: a 7x7 global map at the Swin-T stage sizes); pass "
          "down_ratio=H/7 for other sizes. Windows shrink to the extent; edge windows are smaller (not padded)."))
