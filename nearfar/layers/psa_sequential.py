"""Polarized Self-Attention, sequential form (``PSA_s``): channel-last ``(B, H, W, C)`` in and out.

Paper: Liu, Xu, Huang, Yang, Xu & Tao, "Polarized Self-Attention: Towards High-quality Pixel-wise Regression"
(arXiv 2107.00782, 2021). Official code: DeLightCMU/PSA, ``semantic-segmentation/network/PSA.py`` (``PSA_s``, the
form used in its HRNetV2 as ``PSA_s(planes, planes)``). The parallel form is in ``nearfar/layers/psa_parallel.py``.

The channel-only gate is applied first, then the spatial-only gate is computed from (and applied to) its output:
``y = x * A_ch(x)``, ``out = y * A_sp(y)``. Against the parallel form (internal width ``C_i = C // 2``):

* ``conv_up`` is a bottleneck ``Conv2d(C_i, C_i // 4) -> LayerNorm([C_i // 4, 1, 1]) -> ReLU -> Conv2d(C_i // 4,
  C)``, both convs with bias (indices 0, 1, 3 of an ``nn.Sequential``, as in the official module);
* the spatial gate softmaxes ``conv_v_left`` over the pixels per channel *before* the product with the pooled
  query, and applies no softmax after: ``A_sp = sigmoid(sum_i mean(g)_i softmax_n(theta)_{n,i})``.

Parameter names equal the official module's, so a ``PSA_s(C, C)`` state dict loads with ``strict=True``.

Differences from the official code: input and output are channel-last; only ``inplanes == planes`` (one ``dim``)
is offered and the unused ``kernel_size``/``stride`` arguments are dropped; 1x1 convs run as matrix products on
the last axis, and the channel branch pools ``x`` before projecting it (exact in real arithmetic). The
LayerNorm keeps the official ``[C_i // 4, 1, 1]`` parameter shape and is applied to the pooled vector directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_channels_last
from .psa_parallel import channel_gate_input, check_psa_dim, init_psa_convs, pointwise
from .registry import Mechanism, image_layer, register
from .sharding import whole_sequence

RATIO = 4  # the official bottleneck ratio of conv_up


@whole_sequence()
class PSASequential(nn.Module):
    """``PSASequential(dim)``: x ``(B, H, W, dim)`` -> same shape; ``y = x * A_ch(x)``, ``y * A_sp(y)`` (``PSA_s``).

    Args:
        dim: Channels (official ``inplanes = planes``), >= 8 (the bottleneck width is ``dim // 2 // 4``).

    Raises:
        TypeError: ``dim`` is not an int.
        ValueError: ``dim`` < 8.

    Examples:
        >>> import torch
        >>> from nearfar import PSASequential
        >>> PSASequential(16)(torch.randn(2, 7, 5, 16)).shape
        torch.Size([2, 7, 5, 16])
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = check_psa_dim(dim, 2 * RATIO)
        self.inter_planes = dim // 2
        ci, cb = self.inter_planes, self.inter_planes // RATIO
        self.conv_q_right = nn.Conv2d(dim, 1, 1, bias=False)
        self.conv_v_right = nn.Conv2d(dim, ci, 1, bias=False)
        self.conv_up = nn.Sequential(nn.Conv2d(ci, cb, 1), nn.LayerNorm([cb, 1, 1]), nn.ReLU(inplace=True),
                                     nn.Conv2d(cb, dim, 1))
        self.conv_q_left = nn.Conv2d(dim, ci, 1, bias=False)  # g
        self.conv_v_left = nn.Conv2d(dim, ci, 1, bias=False)  # theta
        init_psa_convs(self.conv_q_right, self.conv_v_right, self.conv_q_left, self.conv_v_left)

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``A_ch``, shape ``(B, 1, 1, dim)``."""
        first, norm, last = self.conv_up[0], self.conv_up[1], self.conv_up[3]
        assert isinstance(first, nn.Conv2d) and isinstance(norm, nn.LayerNorm) and isinstance(last, nn.Conv2d)
        z = pointwise(first, channel_gate_input(self, x))
        z = F.relu(F.layer_norm(z, z.shape[-1:], norm.weight.flatten(), norm.bias.flatten(), norm.eps))
        return pointwise(last, z).sigmoid()[:, None, None, :]

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``A_sp = sigmoid(sum_i mean(g)_i softmax_n(theta)_{n,i})``, shape ``(B, H, W, 1)``."""
        b, c = x.shape[0], x.shape[-1]
        flat = x.reshape(b, -1, c)
        g = pointwise(self.conv_q_left, flat.mean(dim=1))  # (B, C_i)
        theta = pointwise(self.conv_v_left, flat).softmax(dim=1)  # (B, N, C_i), softmax over pixels
        return torch.einsum("bi,bni->bn", g, theta).sigmoid().reshape(*x.shape[:-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Channel gate, then the spatial gate of its output.

        Args:
            x: Input ``(B, H, W, dim)``, any size.

        Returns:
            ``y * A_sp(y)`` with ``y = x * A_ch(x)``, ``(B, H, W, dim)``.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` is not ``(B, H, W, dim)`` or is empty.
        """
        check_channels_last(x, 2, self.dim)
        y = x * self.channel_gate(x)
        return y * self.spatial_gate(y)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, inter_planes={self.inter_planes}"


register(Mechanism(
    name="psa_sequential",
    paper="Polarized Self-Attention: Towards High-quality Pixel-wise Regression (arXiv 2107.00782, 2021)",
    repo="DeLightCMU/PSA", family="dense", dims=("2d",), **image_layer(),
    make=lambda dim, num_heads, **kw: PSASequential(dim, **kw), cls=PSASequential,
    notes="No heads: num_heads is ignored. A gate: returns x times sigmoid weights, used in place (y = "
          "layer(x)) as in the paper, not as a residual branch. Family dense: both gates pool over every pixel "
          "(softmax over all H*W positions). dim >= 8 (official bottleneck dim // 2 // 4). Parameter names "
          "equal the official PSA_s."))
