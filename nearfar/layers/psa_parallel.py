"""Polarized Self-Attention, parallel form (``PSA_p``): channel-last ``(B, H, W, C)`` in and out.

Paper: Liu, Xu, Huang, Yang, Xu & Tao, "Polarized Self-Attention: Towards High-quality Pixel-wise Regression"
(arXiv 2107.00782, 2021). Official code: DeLightCMU/PSA, ``semantic-segmentation/network/PSA.py`` (``PSA_p``,
``PSA_s``); the sequential form lives in ``nearfar/layers/psa_sequential.py`` and shares the pieces defined here.

Two gates, each computed from global pooling over all ``N = H*W`` pixels (internal width ``C_i = C // 2``):

* channel-only gate (official ``spatial_pool``): a one-channel query ``conv_q_right`` is softmaxed over the
  pixels and pools the ``C_i``-channel values ``conv_v_right``; ``conv_up`` maps the pooled ``C_i`` vector to
  ``C`` logits, and ``x`` is multiplied by their sigmoid (one weight per channel);
* spatial-only gate (official ``channel_pool``): the pixel-mean of ``conv_q_left(x)`` (``C_i`` values) is dotted
  with ``conv_v_left(x)`` at every pixel, softmaxed over the pixels, and ``x`` is multiplied by its sigmoid (one
  weight per pixel).

``PSAParallel(x) = x * A_ch + x * A_sp``. The official code, not the paper's equations, is followed where they
disagree (the paper puts a LayerNorm in the channel branch and a softmax on the pooled query).

Parameter names equal the official module's (``conv_q_right``, ``conv_v_right``, ``conv_up``, ``conv_q_left``,
``conv_v_left``, all 1x1 ``nn.Conv2d`` without bias), so a ``PSA_p(C, C)`` state dict loads with ``strict=True``.
Init as the official code: kaiming-normal (fan_in, ReLU gain) for the four q/v convs, PyTorch's default for
``conv_up``.

Differences from the official code: input and output are channel-last; only ``inplanes == planes`` (one ``dim``)
is offered, and the unused ``kernel_size``/``stride`` arguments are dropped (a stride other than 1 breaks the
official forward anyway). The 1x1 convs run as matrix products on the last axis, and the pooled products are
reassociated (pool ``x`` first, then project), which is exact in real arithmetic and keeps the cost ``O(N C)``
for the parallel form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_channels_last, check_positive_int
from .registry import Mechanism, image_layer, register
from .sharding import whole_sequence


def check_psa_dim(dim: object, low: int) -> int:
    """``dim`` as an int ``>= low``, else ``TypeError``/``ValueError`` naming ``dim``."""
    dim = check_positive_int(dim, "dim")
    if dim < low:
        raise ValueError(f"dim must be >= {low} (the internal widths must be >= 1), got {dim}")
    return dim


def pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 ``nn.Conv2d`` applied to the last (channel) axis of ``x``."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def init_psa_convs(*convs: nn.Conv2d) -> None:
    """The official ``reset_parameters``: kaiming-normal, fan_in, ReLU gain, zero bias."""
    for conv in convs:
        nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)


def channel_gate_input(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled ``C_i`` vector of the channel-only branch: ``sum_n softmax_n(q) v_n``, shape ``(B, C_i)``.

    ``m`` holds ``conv_q_right`` and ``conv_v_right``; ``x`` is ``(B, H, W, C)``."""
    b, c = x.shape[0], x.shape[-1]
    flat = x.reshape(b, -1, c)
    conv_q, conv_v = m.conv_q_right, m.conv_v_right
    assert isinstance(conv_q, nn.Conv2d) and isinstance(conv_v, nn.Conv2d)
    weights = pointwise(conv_q, flat).squeeze(-1).softmax(dim=-1)  # (B, N)
    return pointwise(conv_v, torch.einsum("bn,bnc->bc", weights, flat))


@whole_sequence()
class PSAParallel(nn.Module):
    """``PSAParallel(dim)``: x ``(B, H, W, dim)`` -> same shape; ``x * A_ch + x * A_sp`` (official ``PSA_p``).

    Args:
        dim: Channels (official ``inplanes = planes``), >= 2 (the internal width is ``dim // 2``).

    Raises:
        TypeError: ``dim`` is not an int.
        ValueError: ``dim`` < 2.

    Examples:
        >>> import torch
        >>> from nearfar import PSAParallel
        >>> PSAParallel(16)(torch.randn(2, 7, 5, 16)).shape
        torch.Size([2, 7, 5, 16])
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = check_psa_dim(dim, 2)
        self.inter_planes = dim // 2
        ci = self.inter_planes
        self.conv_q_right = nn.Conv2d(dim, 1, 1, bias=False)
        self.conv_v_right = nn.Conv2d(dim, ci, 1, bias=False)
        self.conv_up = nn.Conv2d(ci, dim, 1, bias=False)
        self.conv_q_left = nn.Conv2d(dim, ci, 1, bias=False)  # g
        self.conv_v_left = nn.Conv2d(dim, ci, 1, bias=False)  # theta
        init_psa_convs(self.conv_q_right, self.conv_v_right, self.conv_q_left, self.conv_v_left)

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``A_ch``, shape ``(B, 1, 1, dim)``."""
        return pointwise(self.conv_up, channel_gate_input(self, x)).sigmoid()[:, None, None, :]

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``A_sp = sigmoid(softmax_n(mean(g) . theta_n))``, shape ``(B, H, W, 1)``."""
        b, c = x.shape[0], x.shape[-1]
        flat = x.reshape(b, -1, c)
        g = pointwise(self.conv_q_left, flat.mean(dim=1))  # (B, C_i)
        u = g @ self.conv_v_left.weight.flatten(1)  # (B, C): g . theta_n = u . x_n
        logits = torch.einsum("bc,bnc->bn", u, flat).softmax(dim=-1)
        return logits.sigmoid().reshape(*x.shape[:-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Both gates from ``x``, summed.

        Args:
            x: Input ``(B, H, W, dim)``, any size.

        Returns:
            ``x * A_ch + x * A_sp``, ``(B, H, W, dim)``.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` is not ``(B, H, W, dim)`` or is empty.
        """
        check_channels_last(x, 2, self.dim)
        return x * self.channel_gate(x) + x * self.spatial_gate(x)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, inter_planes={self.inter_planes}"


register(Mechanism(
    name="psa_parallel",
    paper="Polarized Self-Attention: Towards High-quality Pixel-wise Regression (arXiv 2107.00782, 2021)",
    repo="DeLightCMU/PSA", family="dense", dims=("2d",), **image_layer(),
    make=lambda dim, num_heads, **kw: PSAParallel(dim, **kw), cls=PSAParallel,
    notes="No heads: num_heads is ignored. A gate: returns x times sigmoid weights, used in place (y = "
          "layer(x)) as in the paper, not as a residual branch. Family dense: both gates pool over every pixel "
          "of the image (a softmax over all H*W positions), so every output depends on every input pixel. "
          "Parameter names equal the official PSA_p, so its checkpoints load unchanged."))
