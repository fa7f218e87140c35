"""DLGSANet MHDLSA, multi-head dynamic local self-attention: channel-last ``(B, H, W, C)`` in and out.

Paper: Li, Pan, Tang, Dong, "DLGSANet: Lightweight Dynamic Local and Global Self-Attention Networks for Image
Super-Resolution" (ICCV 2023, arXiv 2301.02031). Official code: NeonLeexiang/DLGSANet,
``basicsr/archs/dlgsanet_arch.py`` (``IDynamicDWConvBlock``, the mixer of ``IDynamicLayerBlock``) and
``basicsr/archs/dlgsanet_idynamicdwconv_util.py`` (``IDynamicDWConv``, the hyper-network, and ``_idynamic``, its
CUDA kernel; both after Han et al., "On the Connection between Local Attention and Dynamic Depth-wise Convolution",
ICLR 2022).

The mixer is ``conv1(DynDW(conv0(x)))`` with two bias-free 1x1 convs ``conv0``, ``conv1`` around a per-pixel dynamic
depth-wise convolution whose ``k x k`` filters are predicted from its own input ``u = conv0(x)``:

* kernels ``K = conv.conv2(conv.conv1(u))``: 1x1 conv ``C -> C // 4``, depth-wise ``k x k`` conv on those ``C // 4``
  channels (zero padding ``k // 2``), 1x1 conv ``C // 4 -> k^2 * heads`` (all three with biases), read as
  ``(heads, k, k)`` per pixel (channel ``g * k^2 + a * k + b``);
* ``out[p, c] = sum_{a, b} K[p, g(c), a, b] * u[p + (a - k // 2, b - k // 2), c]`` with zero padding, where head
  ``g(c) = c // (C / heads)``: the ``C / heads`` channels of a head share one filter per pixel.

The filters are neither normalised nor passed through a softmax (as in the official code): the "attention" is an
unnormalised, content-dependent weighting of the fixed ``k x k`` neighbourhood. Cost ``O(N C (C + k^2))``.

Differences from the official code: ``num_heads`` is the number of filter groups (heads in the usual sense); the
official argument (``heads`` / ``idynamic_num_heads``) is the number of channels per group, 6 by default, so the
official default at ``C = 90`` is ``num_heads = 15`` here, and ``num_heads=None`` takes that rule (``dim // 6``).
The official CUDA kernel is replaced by a loop over the ``k^2`` shifts of the zero-padded channel-last map with a
hand-written backward (the same sums, in another order). The non-dynamic ablation (``idynamic=False``, a static
depth-wise conv) is not offered. The parameter names and shapes are the official ones (``conv0.weight``,
``conv.conv1.0.*``, ``conv.conv1.1.*``, ``conv.conv2.0.*``, ``conv1.weight``), so an official
``IDynamicDWConvBlock`` state dict loads unchanged (strict); the LayerNorm, residual and GDFN of the official layer
are not part of this module.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..checks import check_bool, check_channels_last, check_dim_heads, check_int_range, check_positive_int
from .registry import Mechanism, image_layer, register
from .sharding import whole_sequence


def _images_per_chunk(per_image: int) -> int:
    """Images per chunk of the shift loops: about 2^20 elements (4 MB in fp32), enough work per op to amortise its
    dispatch (and thread start-up), small enough for the accumulator to stay in cache."""
    return max(1, (1 << 20) // per_image)


class _DynamicFilter(torch.autograd.Function):
    """``out[b, y, x, g, :] = sum_{a, c} w[b, y, x, g, a * k + c] * xpad[b, y + a, x + c, g, :]``: the per-pixel
    dynamic depth-wise filter as ``k^2`` fused multiply-adds of shifted views (no unfolded copy), with the matching
    backward (scatter of ``w * grad`` for the input, per-shift channel dot products for the kernels)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
        b, h, wd, c = x.shape
        heads, p, kk = w.shape[-1] // (k * k), k // 2, k * k
        xp = F.pad(x, (0, 0, p, p, p, p)).view(b, h + 2 * p, wd + 2 * p, heads, c // heads)
        wt = w.reshape(b, h, wd, heads, kk).permute(0, 4, 1, 2, 3).contiguous().unsqueeze(-1)  # (B, k^2, H, W, G, 1)
        out = x.new_zeros(b, h, wd, heads, c // heads)
        step = _images_per_chunk(h * wd * c)
        for i in range(0, b, step):  # a few images at a time: their accumulator stays in cache over the shifts
            for j in range(kk):
                a, s = divmod(j, k)
                out[i:i + step].addcmul_(xp[i:i + step, a:a + h, s:s + wd], wt[i:i + step, j])
        ctx.save_for_backward(xp, wt)
        ctx.k = k
        return out.view(b, h, wd, c)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        xp, wt = ctx.saved_tensors
        k = ctx.k
        p, kk = k // 2, k * k
        b, _, h, wd, heads, _ = wt.shape
        g = grad.contiguous().view(b, h, wd, heads, -1)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            gxp = torch.zeros_like(xp)
            step = _images_per_chunk(g[0].numel())
            for i in range(0, b, step):
                for j in range(kk):
                    a, s = divmod(j, k)
                    gxp[i:i + step, a:a + h, s:s + wd].addcmul_(g[i:i + step], wt[i:i + step, j])
            grad_x = gxp[:, p:p + h, p:p + wd].reshape(b, h, wd, -1)
        if ctx.needs_input_grad[1]:
            gwt = g.new_empty(kk, b, h, wd, heads)
            tmp = torch.empty_like(g)
            for j in range(kk):
                a, s = divmod(j, k)
                torch.mul(g, xp[:, a:a + h, s:s + wd], out=tmp)
                torch.sum(tmp, dim=-1, out=gwt[j])
            grad_w = gwt.permute(1, 2, 3, 4, 0).reshape(b, h, wd, heads * kk)
        return grad_x, grad_w, None


def dynamic_filter(x: torch.Tensor, kernels: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-pixel dynamic depth-wise filtering of a channel-last map (zero padding ``kernel_size // 2``).

    Args:
        x: Input ``(B, H, W, C)``.
        kernels: ``(B, H, W, G * k^2)``: per pixel, ``G`` filters of ``k x k`` (index ``g * k^2 + a * k + b``);
            channel ``c`` uses filter ``c // (C / G)``.
        kernel_size: ``k``, odd.

    Returns:
        ``(B, H, W, C)``.
    """
    return _DynamicFilter.apply(x, kernels, kernel_size)


class _HyperNet(nn.Module):
    """The kernel generator (official ``IDynamicDWConv``'s parameters): ``conv1`` = [1x1 ``C -> C // 4``, depth-wise
    ``k x k``], ``conv2`` = [1x1 ``C // 4 -> k^2 * heads``], all with biases."""

    def __init__(self, dim: int, kernel_size: int, heads: int, bias: bool):
        super().__init__()
        r = dim // 4
        self.conv1 = nn.Sequential(nn.Conv2d(dim, r, 1, bias=bias),
                                   nn.Conv2d(r, r, kernel_size, padding=kernel_size // 2, groups=r, bias=bias))
        self.conv2 = nn.Sequential(nn.Conv2d(r, kernel_size ** 2 * heads, 1, bias=bias))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Kernels ``(B, H, W, heads * k^2)`` of a channel-last map ``u``."""
        pw1, dw = cast(nn.Conv2d, self.conv1[0]), self.conv1[1]
        t = F.linear(u, pw1.weight.flatten(1), pw1.bias)
        # the channels-first view of a channel-last tensor is channels_last memory: the depth-wise conv runs on it
        t = dw(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        pw2 = cast(nn.Conv2d, self.conv2[0])
        return F.linear(t, pw2.weight.flatten(1), pw2.bias)


@whole_sequence()
class MHDLSA(nn.Module):
    """``MHDLSA(dim, num_heads=None, window_size=7, bias=True)``: x ``(B, H, W, dim)`` -> same shape.

    Multi-head dynamic local self-attention: ``conv1(DynDW(conv0(x)))``, where ``DynDW`` filters every pixel's
    ``window_size x window_size`` neighbourhood with kernels predicted from the features, one kernel per head
    shared by the head's ``dim / num_heads`` channels.

    Args:
        dim: Channels, >= 4 (the hyper-network works on ``dim // 4`` channels), a multiple of ``num_heads``.
        num_heads: Number of filter groups (heads); None (default): ``dim // 6``, the official six channels per
            group.
        window_size: Filter side ``k``, odd, in ``[1, 63]`` (default 7, official).
        bias: Biases in the hyper-network's convs (default True, official).

    Raises:
        TypeError: ``bias`` is not a bool; ``window_size`` is not an int.
        ValueError: ``dim`` < 4 or not a multiple of ``num_heads``; ``window_size`` even or outside ``[1, 63]``.

    Examples:
        >>> import torch
        >>> from nearfar import MHDLSA
        >>> MHDLSA(96, 3)(torch.randn(2, 13, 11, 96)).shape
        torch.Size([2, 13, 11, 96])
        >>> MHDLSA(90).num_heads  # the official 6 channels per group
        15
    """

    dim: int
    num_heads: int
    window_size: int

    def __init__(self, dim: int, num_heads: int | None = None, window_size: int = 7, bias: bool = True):
        super().__init__()
        check_positive_int(dim, "dim")
        if dim < 4:
            raise ValueError(f"dim must be >= 4 (the hyper-network has dim // 4 channels), got {dim}")
        if num_heads is None:
            if dim % 6:
                raise ValueError(f"num_heads=None takes the official 6 channels per head: dim must be a multiple "
                                 f"of 6, got {dim}; pass num_heads")
            num_heads = dim // 6
        check_dim_heads(dim, num_heads)
        check_int_range(window_size, "window_size", 1, 63)
        if window_size % 2 == 0:
            raise ValueError(f"window_size must be odd (size-preserving zero padding), got {window_size}")
        check_bool(bias, "bias")
        self.dim, self.num_heads, self.window_size = dim, num_heads, window_size
        self.conv0 = nn.Conv2d(dim, dim, 1, bias=False)
        self.conv = _HyperNet(dim, window_size, num_heads, bias)
        self.conv1 = nn.Conv2d(dim, dim, 1, bias=False)

    def kernels(self, u: torch.Tensor) -> torch.Tensor:
        """The per-pixel filters ``(B, H, W, num_heads * window_size^2)`` predicted from ``u = conv0(x)``."""
        return self.conv(u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``conv1(DynDW(conv0(x)))`` of a channel-last map.

        Args:
            x: Input ``(B, H, W, dim)``, any size.

        Returns:
            The output ``(B, H, W, dim)``.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` is not ``(B, H, W, dim)`` or is empty.
        """
        check_channels_last(x, 2, self.dim)
        u = F.linear(x, self.conv0.weight.flatten(1))
        out = dynamic_filter(u, self.kernels(u), self.window_size)
        return F.linear(out, self.conv1.weight.flatten(1))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}"


register(Mechanism(
    name="dlgsa_local",
    paper="DLGSANet: Lightweight Dynamic Local and Global Self-Attention Networks for Image Super-Resolution "
          "(ICCV 2023, arXiv 2301.02031)",
    repo="NeonLeexiang/DLGSANet", family="local", dims=("2d",), **image_layer(), cls=MHDLSA,
    make=lambda dim, num_heads, **kw: MHDLSA(dim, num_heads, **kw),
    notes="MHDLSA: per-pixel dynamic depth-wise filters over a fixed window_size x window_size neighbourhood "
          "(default 7), predicted by a small conv hyper-network from the features, one filter per head shared by "
          "its dim / num_heads channels; unnormalised (no softmax). num_heads = filter groups (the official "
          "argument counts channels per group, 6). Official IDynamicDWConvBlock parameter names."))
