"""TiC MSA-Conv: single-head self-attention inside each pixel's (dilated) convolution window, then a k x k conv.

Paper: Zhang et al., "TiC: Exploring Vision Transformer in Convolution" (arXiv 2310.04134). Official code:
zs670980918/MSA-Conv, ``core/op/Transformer_in_Convolution.py`` (``MSA_Conv_2d``) with the im2col kernels of
``core/op/msa_conv_cuda.cu`` and the padding rule of ``core/op/msa_conv_v1_1.py``.

Computation (official): ``q, k, v = qkv_conv(x)`` (1x1 conv ``C_in -> 3 C_in`` with bias, chunked q, k, v); for
every pixel, one head over all ``C_in`` channels attends to the ``k x k`` offsets ``(a * dilation - pad)``,
``pad = dilation * (k - 1) // 2``, of a zero-padded map: keys outside the image are zero vectors that *stay in the
softmax* (logit 0, value 0), unlike NATTEN's neighbourhood, which slides inward at the borders; scale
``C_in ** -0.5``. Then ``y = attn + x`` and ``out = ReLU(mlp(y))`` with ``mlp`` a ``k x k`` conv ``C_in -> C_out``
(``stride``, ``padding``, no bias by default).

How it runs here: k and v are zero-padded by ``pad`` on every side and ``nearfar.attend`` runs
``Neighborhood(k, dilation, grid=padded)`` on the padded grid; only the interior queries are kept. An interior
query is ``pad`` away from every border, so its NATTEN window is exactly the centred ``k x k`` (dilated) window of
the official im2col, with the padded zeros as real keys. On CPU this is about 3x faster than the unfold (im2col)
formulation (``tests/oracles/msa_conv.py``) on 8x56x56x96 and about 1.5x on 8x14x14x384.

Parameter names and shapes equal the official module's (``qkv_conv`` Conv2d 1x1 ``(3C, C, 1, 1)`` + bias,
``mlp`` Conv2d ``(C_out, C_in, k, k)``), so its checkpoints load unchanged.

Differences from the official code:

- channel-last ``(B, H, W, C_in)`` in and ``(B, H', W', C_out)`` out (the official module is channels-first);
- attention dropout is not implemented (``nearfar.attend`` has none): the official default ``dropout=0.1`` acts in
  training only; here ``dropout`` must be 0 (the default), so eval outputs match the official module;
- q, k, v are not up-cast to float32 (the official casts them); the attention runs in the input dtype;
- the kernel must be odd per axis (the official padding rule misaligns even kernels); ``im2col_step`` (a CUDA
  batching knob) is not accepted; ``kernel_size`` and ``dilation`` may be per-axis pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_bool, check_channels_last, check_nonneg_int, check_pair, check_positive_int
from ..functional import attend
from ..patterns import Neighborhood
from .registry import Mechanism, image_layer, register
from .sharding import whole_sequence


@whole_sequence()
class MSAConv2d(nn.Module):
    """``MSAConv2d(input_channel, output_channel, kernel_size, stride=1, dilation=1, dropout=0.0, padding=1,
    bias=False)``: x ``(B, H, W, input_channel)`` -> ``(B, H', W', output_channel)``, ``H' = (H + 2 padding -
    k) // stride + 1`` (the final conv's size rule).

    Args:
        input_channel: Input channels ``C_in``, >= 1 (one head over all of them).
        output_channel: Output channels of the final conv, >= 1.
        kernel_size: Attention window and final conv kernel, an odd int or a pair of odd positive ints.
        stride: Stride of the final conv, an int or a pair of positive ints (default 1).
        dilation: Dilation of the attention window, an int or a pair of positive ints (default 1).
        dropout: Must be 0 (default; the official 0.1 acts in training only and is not implemented).
        padding: Zero padding of the final conv, an int or a pair of ints >= 0 (default 1).
        bias: Bias of the final conv (default False).

    Raises:
        TypeError: A kernel, stride, dilation or padding entry is not an int; ``bias`` is not a bool.
        ValueError: A channel count, kernel, stride or dilation entry < 1, a padding entry < 0, an even kernel size;
            ``dropout`` != 0.

    Examples:
        >>> import torch
        >>> from nearfar import MSAConv2d
        >>> layer = MSAConv2d(64, 32, kernel_size=3, stride=2)
        >>> layer(torch.randn(2, 14, 14, 64)).shape   # (14 + 2 * 1 - 3) // 2 + 1 = 7
        torch.Size([2, 7, 7, 32])
    """

    def __init__(self, input_channel: int, output_channel: int, kernel_size: int | Sequence[int],
                 stride: int = 1, dilation: int | Sequence[int] = 1, dropout: float = 0.0, padding: int = 1,
                 bias: bool = False):
        super().__init__()
        check_positive_int(input_channel, "input_channel")
        check_positive_int(output_channel, "output_channel")
        self.kernel_size = check_pair(kernel_size, "kernel_size")
        for a, k in enumerate(self.kernel_size):
            if k % 2 == 0:
                raise ValueError(f"kernel_size[{a}]={k} must be odd (the window is centred on its pixel)")
        self.dilation = check_pair(dilation, "dilation")
        self.stride = check_pair(stride, "stride")
        self.padding = check_pair(padding, "padding", check=check_nonneg_int)
        if dropout != 0:
            raise ValueError(f"dropout must be 0 (nearfar.attend has no attention dropout; the official 0.1 acts "
                             f"in training only), got {dropout!r}")
        check_bool(bias, "bias")
        self.input_channel, self.output_channel = input_channel, output_channel
        self.scale = input_channel ** -0.5
        # the window's reach on each side (official padding rule, exact for odd kernels)
        self.pad = tuple(d * (k - 1) // 2 for k, d in zip(self.kernel_size, self.dilation))
        self.qkv_conv = nn.Conv2d(input_channel, input_channel * 3, kernel_size=1)
        self.mlp = nn.Conv2d(input_channel, output_channel, self.kernel_size, self.stride, self.padding, bias=bias)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The MSA part, ``(B, H, W, C_in) -> (B, H, W, C_in)`` (before the residual and the conv); any size."""
        b, (h, w), _ = check_channels_last(x, 2, self.input_channel)
        c = self.input_channel
        (ph, pw), (kh, kw), (dh, dw) = self.pad, self.kernel_size, self.dilation
        # pad past the window's reach only when the map is smaller than one dilation step: NATTEN needs
        # kernel * dilation <= extent; the extra zero keys lie outside every interior query's window
        eh, ew = max(0, kh * dh - h - 2 * ph), max(0, kw * dw - w - 2 * pw)
        qkv = F.linear(x, self.qkv_conv.weight.view(3 * c, c), self.qkv_conv.bias)
        qkv = F.pad(qkv, (0, 0, pw, pw + ew, ph, ph + eh))  # zero k, v (and q: those queries are dropped)
        grid = (h + 2 * ph + eh, w + 2 * pw + ew)
        qkv = qkv.view(b, 1, grid[0] * grid[1], 3 * c)
        q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
        out = attend(q, k, v, Neighborhood(self.kernel_size, self.dilation, grid=grid), scale=self.scale)
        return out.view(b, *grid, c)[:, ph:ph + h, pw:pw + w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``ReLU(conv(x + MSA(x)))``: window self-attention with a residual, then the strided convolution.

        Args:
            x: Input ``(B, H, W, input_channel)``; each extent + 2 * padding >= the kernel size.

        Returns:
            The output ``(B, H', W', output_channel)``, ``H' = (H + 2 padding - kernel_size) // stride + 1``.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` is not ``(B, H, W, dim)`` or is empty, or an axis too small for the final conv.
        """
        _, spatial, _ = check_channels_last(x, 2, self.input_channel)
        for a, (n, k, p) in enumerate(zip(spatial, self.kernel_size, self.padding)):
            if n + 2 * p < k:
                raise ValueError(f"spatial extent {n} of axis {a} is too small for the final conv: need "
                                 f"extent + 2 * padding[{a}] >= kernel_size[{a}] = {k}")
        y = self.attention(x) + x
        # channels-last strides all the way: the conv reads and writes NHWC memory, no copies
        out = self.mlp(y.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last))
        return F.relu(out).permute(0, 2, 3, 1)

    def extra_repr(self) -> str:
        return (f"{self.input_channel}, {self.output_channel}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, stride={self.stride}, padding={self.padding}")


register(Mechanism(
    name="msa_conv", paper="TiC: Exploring Vision Transformer in Convolution (arXiv 2310.04134)",
    repo="zs670980918/MSA-Conv", family="local", dims=("2d",), **image_layer(),
    make=lambda dim, num_heads, kernel_size=3, **kw: MSAConv2d(dim, dim, kernel_size, **kw), cls=MSAConv2d,
    notes="Single head over all channels (num_heads is ignored); make() builds dim -> dim channels with a 3x3 "
          "window and the official padding 1 (same spatial size). Keys outside the image are zero and stay in "
          "the softmax. The attention dropout (official 0.1, training only) is not implemented."))
