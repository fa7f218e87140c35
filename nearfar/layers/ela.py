"""ELA, Efficient Local Attention: channel-last ``(B, H, W, C)`` in and out.

Paper: Xu & Wan, "ELA: Efficient Local Attention for Deep Convolutional Neural Networks" (arXiv 2403.01123,
2024). The authors published no official code (we searched the stored public repositories and found only
third-party ports, which agree with the form below); this module is written from the paper. timm's
``timm/layers/coord_attn.py`` ``EfficientLocalAttn`` is a different variant (separate convs per axis, SiLU,
GroupNorm with one group) and is not followed here.

Each channel gets a gate along the height and one along the width, both from strip pooling and one shared 1D conv:

* ``z_h = mean over W of x`` (``(B, H, C)``), ``z_w = mean over H of x`` (``(B, W, C)``);
* ``a_h = sigmoid(GN(conv(z_h)))``, ``a_w = sigmoid(GN(conv(z_w)))`` with one ``Conv1d(C, C, k, padding k // 2,
  groups, bias=False)`` (``conv``) and one ``GroupNorm(num_groups, C)`` (``gn``) shared by the two axes;
* ``out[b, i, j, c] = x[b, i, j, c] * a_h[b, i, c] * a_w[b, j, c]``.

The paper names variants ELA-T/B/S/L by kernel size, conv groups and GroupNorm groups. The defaults here
(``kernel_size=7``, depth-wise conv, ``num_groups=16``) are the form the ports label ELA-B; the others are reachable
through the arguments, but without code we could not confirm the paper's table values, so no variant presets are
offered. Parameter names ``conv.weight`` ``(C, C / groups, k)``, ``gn.weight``/``gn.bias`` ``(C,)`` are the ones
the ports use, so their state dicts load unchanged.

What differs from the paper's description: input and output are channel-last (the 1D conv runs on the
channels-first view of each pooled strip); ``num_groups`` and ``groups`` are arguments; for square inputs both
strips go through the conv and the norm in one batched call (the GroupNorm statistics are still per strip).
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_channels_last, check_int_range, check_positive_int
from .registry import Mechanism, image_layer, register
from .sharding import whole_sequence


@whole_sequence()
class ELA(nn.Module):
    """``ELA(dim, kernel_size=7, groups=None, num_groups=16)``: x ``(B, H, W, dim)`` -> same shape, gated per channel
    along each axis.

    Args:
        dim: Channels, >= 1.
        kernel_size: Length of the shared 1D conv, odd, >= 1 (default 7).
        groups: Conv groups, must divide ``dim``; None (default): ``dim`` (depth-wise).
        num_groups: GroupNorm groups, must divide ``dim``; None: ``min(16, dim)`` rounded down to a divisor of
            ``dim`` (default 16; an int is used as given).

    Raises:
        TypeError: an argument is not an int.
        ValueError: ``dim`` < 1; ``kernel_size`` even or < 1; ``groups`` or ``num_groups`` outside ``[1, dim]`` or
            not dividing ``dim``.

    Examples:
        >>> import torch
        >>> from nearfar import ELA
        >>> ELA(32)(torch.randn(2, 7, 5, 32)).shape
        torch.Size([2, 7, 5, 32])
    """

    def __init__(self, dim: int, kernel_size: int = 7, groups: int | None = None, num_groups: int | None = 16):
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        self.kernel_size = check_positive_int(kernel_size, "kernel_size")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same-length 'k // 2' padding), got {kernel_size}")
        groups = dim if groups is None else check_int_range(groups, "groups", 1, dim)
        if dim % groups:
            raise ValueError(f"groups must divide dim={dim}, got {groups}")
        if num_groups is None:
            num_groups = max(g for g in range(1, min(16, dim) + 1) if dim % g == 0)
        num_groups = check_int_range(num_groups, "num_groups", 1, dim)
        if dim % num_groups:
            raise ValueError(f"num_groups must divide dim={dim}, got {num_groups}")
        self.groups, self.num_groups = groups, num_groups
        self.conv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=groups, bias=False)
        self.gn = nn.GroupNorm(num_groups, dim)

    def gate(self, z: torch.Tensor) -> torch.Tensor:
        """``sigmoid(GN(conv(z)))`` for pooled strips ``z`` ``(S, L, dim)`` -> ``(S, L, dim)``."""
        y = self.gn(self.conv(z.transpose(1, 2)))
        return y.sigmoid().transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Strip-pool, shared conv + GroupNorm + sigmoid per axis, multiply.

        Args:
            x: Input ``(B, H, W, dim)``, any size.

        Returns:
            ``x * a_h * a_w``, ``(B, H, W, dim)``.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` is not ``(B, H, W, dim)`` or is empty.
        """
        b, (h, w), _ = check_channels_last(x, 2, self.dim)
        z_h, z_w = x.mean(dim=2), x.mean(dim=1)  # (B, H, C), (B, W, C)
        if h == w:  # one batched call for both strips
            a_h, a_w = self.gate(torch.cat([z_h, z_w])).split(b)
        else:
            a_h, a_w = self.gate(z_h), self.gate(z_w)
        return x * a_h[:, :, None, :] * a_w[:, None, :, :]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}, groups={self.groups}, num_groups={self.num_groups}"


register(Mechanism(
    name="ela", paper="ELA: Efficient Local Attention for Deep Convolutional Neural Networks (arXiv 2403.01123, 2024)",
    repo="none (no official code; written from the paper)", family="local", dims=("2d",), **image_layer(),
    make=lambda dim, num_heads, **kw: ELA(dim, **{"num_groups": None, **kw}), cls=ELA,
    notes="No heads: num_heads is ignored. A gate: returns x times sigmoid weights, used in place (y = "
          "layer(x)) as in the paper, not as a residual branch. Family local: the gates come from 1D convs of "
          "kernel_size along each axis over strip means, so they mix a local band of rows/columns (plus the "
          "strip mean over the other axis and GroupNorm statistics over the whole strip); no token-to-token "
          "attention. ELA-B defaults (k=7, depth-wise, 16 GroupNorm groups)."))
