"""HiLo attention (LITv2): channel-last ``(B, H, W, C)`` in and out.

Paper: Pan, Cai, Zhuang, "Fast Vision Transformers with HiLo Attention" (NeurIPS 2022). Official code:
ziplab/LITv2, ``hilo.py`` (the module, whose defaults are ours: ``window_size=2, alpha=0.5, qkv_bias=False``),
``classification/models/litv2.py`` (requires ``H, W`` divisible by ``window_size``) and
``detection/mmdet/models/backbones/litv2.py`` (zero-pads bottom/right to a multiple of ``window_size``).

The heads are split: ``l_heads = int(num_heads * alpha)`` Lo-Fi heads attend from every token to the
``window_size``-average-pooled map (global, coarse); the other ``h_heads`` Hi-Fi heads attend inside
non-overlapping ``window_size x window_size`` windows (local, fine). Outputs are concatenated Hi-Fi first, with
no joint projection. ``window_size == 1`` makes every head Lo-Fi without pooling (standard MHSA), as in LITv2.
Hi-Fi runs as a batch of one-window sequences (window partition, then ``attend`` without a pattern): measured
faster than ``Blocks(window_size, grid=(H, W))`` on the full sequence (28 vs 46 ms at 8x56x56 with 2 heads of 32,
3 vs 6 ms at 8x14x14 with 6 heads; CPU, one thread), since windows of 4 tokens are far smaller than a tile.
LITv2's own models pass ``qkv_bias=True, alpha=0.9`` and ``window_size`` 2 in stage 3 and 1 in stage 4 (stages 1-2
have no attention); the 3x3-DW-conv MLP and the block are not part of this module.

Parameter names and shapes equal the official module's (``l_q``, ``l_kv``, ``l_proj``, ``h_qkv``, ``h_proj``), so
LITv2 attention weights load unchanged (timm does not ship HiLo). Differences from the official code:

- Sizes not divisible by ``window_size`` follow the detection code (zero-pad bottom/right before both branches,
  crop after): the padded zeros dilute the border pooled tokens and are unmasked Hi-Fi keys. With
  ``mask_padding=True`` they are ignored instead: Hi-Fi masks padded keys and Lo-Fi pools only real pixels.
- The Lo-Fi queries are computed for the real tokens only (the official code also computes them for the padded
  tokens and crops the result; same output). Pooling is ``F.avg_pool2d`` (the official ``sr`` module has no
  parameters, so state dicts are unchanged).
- Attention and projection dropout are not implemented (LITv2 uses 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_bool, check_channels_last, check_dim_heads, check_positive_int, check_real_range, check_scale
from ..functional import attend, merge_heads, split_heads
from .registry import Mechanism, image_layer, register
from .sharding import whole_sequence


@whole_sequence()
class HiLo(nn.Module):
    """``HiLo(dim, num_heads=8, qkv_bias=False, qk_scale=None, window_size=2, alpha=0.5, mask_padding=False)``:
    x ``(B, H, W, dim)`` -> same shape. Any ``H, W >= 1`` (see the module docstring for the padding).

    Args:
        dim: Channels, a positive multiple of ``num_heads``.
        num_heads: Number of heads, >= 1 (default 8); ``int(num_heads * alpha)`` of them are Lo-Fi heads, the rest
            Hi-Fi (all Lo-Fi when ``window_size == 1``).
        qkv_bias: Biases on the q/kv/qkv projections (default False).
        qk_scale: Score scale, a positive finite number; None (default): ``head_dim ** -0.5``.
        window_size: Hi-Fi window size and Lo-Fi pooling size, >= 1 (default 2).
        alpha: Fraction of Lo-Fi heads, a number in ``[0, 1]`` (default 0.5).
        mask_padding: Ignore the zero padding of sizes not divisible by ``window_size`` (default False: attend it,
            as LITv2's detection code).

    Raises:
        TypeError: ``window_size`` is not an int, ``alpha`` or ``qk_scale`` not a number, ``mask_padding`` not a
            bool.
        ValueError: ``dim`` is not a positive multiple of ``num_heads``; ``window_size`` < 1; ``alpha`` outside
            ``[0, 1]``; ``qk_scale`` <= 0 or not finite.

    Examples:
        >>> import torch
        >>> from nearfar import HiLo
        >>> layer = HiLo(64, 4, window_size=2, alpha=0.5)
        >>> layer(torch.randn(2, 13, 13, 64)).shape   # 13 is zero-padded to 14 inside
        torch.Size([2, 13, 13, 64])
    """

    dim: int
    num_heads: int
    alpha: float
    mask_padding: bool
    l_heads: int
    h_heads: int
    scale: float
    l_q: nn.Linear
    l_kv: nn.Linear
    l_proj: nn.Linear
    h_qkv: nn.Linear
    h_proj: nn.Linear

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 window_size: int = 2, alpha: float = 0.5, mask_padding: bool = False):
        super().__init__()
        self.head_dim = check_dim_heads(dim, num_heads)
        self.ws = check_positive_int(window_size, "window_size")
        check_real_range(alpha, "alpha", 0, 1)
        qk_scale = check_scale(qk_scale)
        check_bool(mask_padding, "mask_padding")
        self.dim, self.num_heads, self.alpha, self.mask_padding = dim, num_heads, alpha, mask_padding
        self.l_heads = num_heads if self.ws == 1 else int(num_heads * alpha)
        self.h_heads = num_heads - self.l_heads
        self.l_dim, self.h_dim = self.l_heads * self.head_dim, self.h_heads * self.head_dim
        # official: ``qk_scale or head_dim ** -0.5``
        self.scale = qk_scale if qk_scale is not None else self.head_dim ** -0.5
        if self.l_heads:
            self.l_q = nn.Linear(dim, self.l_dim, bias=qkv_bias)
            self.l_kv = nn.Linear(dim, 2 * self.l_dim, bias=qkv_bias)
            self.l_proj = nn.Linear(self.l_dim, self.l_dim)
        if self.h_heads:
            self.h_qkv = nn.Linear(dim, 3 * self.h_dim, bias=qkv_bias)
            self.h_proj = nn.Linear(self.h_dim, self.h_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Hi-Fi window attention and Lo-Fi pooled attention of a channel-last map, concatenated on the channels.

        Args:
            x: Input ``(B, H, W, dim)``, any ``H, W >= 1``.

        Returns:
            The output ``(B, H, W, dim)``.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` is not ``(B, H, W, dim)`` or is empty.
        """
        _, (h, w), _ = check_channels_last(x, 2, self.dim)
        pads = (-h % self.ws, -w % self.ws)
        parts = []
        if self.h_heads:
            parts.append(self.hifi(x, pads))
        if self.l_heads:
            parts.append(self.lofi(x, pads))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def hifi(self, x: torch.Tensor, pads: tuple[int, int]) -> torch.Tensor:
        """Attention inside non-overlapping ``ws x ws`` windows, on the bottom/right zero-padded map."""
        b, h, w, _ = x.shape
        s, heads, d = self.ws, self.h_heads, self.head_dim
        if any(pads):
            x = F.pad(x, (0, 0, 0, pads[1], 0, pads[0]))
        hg, wg = x.shape[1] // s, x.shape[2] // s
        # partition the input (dim channels, fewer than the 3 * h_dim of qkv): one sequence per window
        xw = x.reshape(b, hg, s, wg, s, -1).transpose(2, 3).reshape(b * hg * wg, s * s, -1)
        qkv = self.h_qkv(xw).view(b * hg * wg, s * s, 3, heads, d).permute(2, 0, 3, 1, 4)
        keep = None
        if self.mask_padding and any(pads):
            keep = torch.zeros(hg * s, wg * s, dtype=torch.bool, device=x.device)
            keep[:h, :w] = True
            keep = keep.view(hg, s, wg, s).transpose(1, 2).reshape(1, hg * wg, s * s)
            keep = keep.expand(b, -1, -1).reshape(b * hg * wg, s * s)
        out = attend(qkv[0], qkv[1], qkv[2], scale=self.scale, key_padding_mask=keep)
        out = self.h_proj(out.transpose(1, 2).reshape(b * hg * wg, s * s, heads * d))
        out = out.view(b, hg, wg, s, s, -1).transpose(2, 3).reshape(b, hg * s, wg * s, -1)
        return out[:, :h, :w] if any(pads) else out

    def lofi(self, x: torch.Tensor, pads: tuple[int, int]) -> torch.Tensor:
        """Every token attends to the ``ws``-average-pooled map (keys and values from the pooled raw input)."""
        b, h, w, _ = x.shape
        q = split_heads(self.l_q(x), self.l_heads)
        src = x
        if self.ws > 1:
            xc = x.permute(0, 3, 1, 2)  # a view: pooling runs on the channels-last memory as it is
            if any(pads) and not self.mask_padding:
                xc = F.pad(xc, (0, pads[1], 0, pads[0]))
            # ceil_mode: the border cells average only their real pixels (only reached with mask_padding)
            src = F.avg_pool2d(xc, self.ws, self.ws, ceil_mode=True).permute(0, 2, 3, 1)
        kv = self.l_kv(src).reshape(b, -1, 2, self.l_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = attend(q, kv[0], kv[1], scale=self.scale)
        return self.l_proj(merge_heads(out, (h, w)))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.ws}, alpha={self.alpha}, "
                f"l_heads={self.l_heads}, h_heads={self.h_heads}, mask_padding={self.mask_padding}")


register(Mechanism(
    name="hilo", paper="Fast Vision Transformers with HiLo Attention (LITv2, NeurIPS 2022)", repo="ziplab/LITv2",
    family="local+global", dims=("2d",), **image_layer(),
    make=lambda dim, num_heads, **kw: HiLo(dim, num_heads, **kw), cls=HiLo,
    notes="Defaults of the official module (window_size=2, alpha=0.5, qkv_bias=False); LITv2 models use "
          "alpha=0.9, qkv_bias=True. Sizes not divisible by window_size are zero-padded as in LITv2's detection "
          "code (mask_padding=True ignores the padding instead)."))
