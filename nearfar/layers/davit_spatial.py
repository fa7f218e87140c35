"""DaViT spatial window attention: channel-last ``(B, H, W, C)`` in and out.

Paper: Ding, Xiao, Codella, Luo, Wang, Yuan, "DaViT: Dual Attention Vision Transformers" (ECCV 2022,
arXiv 2204.03645). Official code: dingmyu/davit ``timm/models/davit.py`` (``WindowAttention``, ``SpatialBlock``:
zero-pad bottom/right to a multiple of the window, ``window_partition``, attention, ``window_reverse``, crop);
timm ships the same modules as ``timm/models/davit.py``, whose parameter names this module uses: ``qkv`` (Linear
C -> 3C, output split ``[3, heads, head_dim]``) and ``proj`` (Linear C -> C). A timm DaViT spatial block's
``attn.*`` weights load unchanged (strict).

Swin's W-MSA without relative position bias and without shift: every token attends to the tokens of its
non-overlapping ``window_size x window_size`` window, scale ``head_dim ** -0.5``. Windows run through
``nearfar.functional.window_attention`` (one window partition and one batched attention).

Sizes not divisible by ``window_size`` follow the official code by default: the (normalised) map is zero-padded
bottom/right to a multiple of the window and the padded tokens take part as keys (their keys and values are the
projection biases), then the output is cropped. ``mask_padding=True`` ignores the padding instead (edge windows are
simply smaller; on a map smaller than the window, the window is clipped to the map).

Differences from the official code: ``mask_padding`` is an addition (default off = the official computation); the
input is a channel-last map instead of tokens plus their size; the output projection runs on the real tokens only
(the official code projects the padded ones too and crops them; same result); no attention/projection dropout
(DaViT uses none). ``ConvPosEnc``, norms and MLP of ``SpatialBlock`` are not part of this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_bool, check_channels_last, check_dim_heads, check_positive_int
from ..functional import window_attention
from ..patterns import Blocks
from .projections import PointwiseLinear
from .registry import Mechanism, image_layer, register
from .sharding import whole_sequence


@whole_sequence()  # padded windows attend to the zero tokens of the padding: not only attend
class DaViTWindowAttention(nn.Module):
    """``DaViTWindowAttention(dim, num_heads, window_size=7, qkv_bias=True, mask_padding=False)``:
    x ``(B, H, W, dim)`` -> same shape, any ``H, W >= 1``.

    Args:
        dim: Channels, a positive multiple of ``num_heads``.
        num_heads: Number of heads, >= 1.
        window_size: Square window side, >= 1 (default 7).
        qkv_bias: Bias on the fused ``qkv`` projection (default True, as timm's DaViT ``WindowAttention``).
        mask_padding: Ignore the zero padding of sizes not divisible by ``window_size`` (default False: the padded
            tokens are attended, as in the official code).

    Raises:
        TypeError: ``window_size`` is not an int; ``qkv_bias`` or ``mask_padding`` is not a bool.
        ValueError: ``dim`` is not a positive multiple of ``num_heads``; ``window_size`` < 1.

    Examples:
        >>> import torch
        >>> from nearfar import DaViTWindowAttention
        >>> DaViTWindowAttention(96, 3)(torch.randn(2, 13, 11, 96)).shape   # padded to 14 x 14 inside
        torch.Size([2, 13, 11, 96])
    """

    dim: int
    num_heads: int
    window_size: int
    mask_padding: bool
    scale: float

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, qkv_bias: bool = True,
                 mask_padding: bool = False):
        super().__init__()
        head_dim = check_dim_heads(dim, num_heads)
        self.window_size = check_positive_int(window_size, "window_size")
        check_bool(qkv_bias, "qkv_bias")
        self.mask_padding = check_bool(mask_padding, "mask_padding")
        self.dim, self.num_heads = dim, num_heads
        self.scale = head_dim ** -0.5
        self.qkv = PointwiseLinear(dim, dim * 3, bias=qkv_bias)
        self.proj = PointwiseLinear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Window attention of a channel-last map (padded or masked to whole windows), then ``proj``.

        Args:
            x: Input ``(B, H, W, dim)``, any size.

        Returns:
            The output ``(B, H, W, dim)``.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` is not ``(B, H, W, dim)`` or is empty.
        """
        _, (h, w), _ = check_channels_last(x, 2, self.dim)
        m = self.window_size
        pads = (-h % m, -w % m)
        if self.mask_padding or not any(pads):
            window = (min(m, h), min(m, w))
            out = window_attention(x, Blocks(window, grid=(h, w)), self.qkv, self.num_heads, self.scale)
        else:
            xp = F.pad(x, (0, 0, 0, pads[1], 0, pads[0]))
            grid = (h + pads[0], w + pads[1])
            out = window_attention(xp, Blocks(m, grid=grid), self.qkv, self.num_heads, self.scale)[:, :h, :w]
        return self.proj(out)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"mask_padding={self.mask_padding}")


register(Mechanism(
    name="davit_spatial", paper="DaViT: Dual Attention Vision Transformers (ECCV 2022)", repo="dingmyu/davit",
    family="window", dims=("2d",), **image_layer(), cls=DaViTWindowAttention,
    make=lambda dim, num_heads, **kw: DaViTWindowAttention(dim, num_heads, **kw),
    notes="Window attention (window 7, no relative bias, no shift); sizes not divisible by the window are "
          "zero-padded and the padding attended, as the official code (mask_padding=True ignores it). timm "
          "WindowAttention parameter names (qkv, proj)."))
