"""TiC MSA-Conv the way the official ``MSA_Conv_2d`` computes it: channels-first, im2col (``F.unfold`` with zero
padding ``dilation * (k - 1) // 2``) of k and v, dot products and softmax over the ``k*k`` offsets, weighted sum,
residual, ``k x k`` conv, ReLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def msa_conv_baseline(m, x: torch.Tensor) -> torch.Tensor:
    b, h, w, c = x.shape
    xc = x.permute(0, 3, 1, 2)
    q, k, v = m.qkv_conv(xc).chunk(3, dim=1)
    kk = m.kernel_size[0] * m.kernel_size[1]

    def im2col(t):  # (B, C, H, W) -> (B, C, k*k, H*W), zeros outside the image
        return F.unfold(t, m.kernel_size, dilation=m.dilation, padding=m.pad).view(b, c, kk, h * w)

    # broadcast multiply + sum, as the official validation script (faster than einsum's batched matmul here)
    dots = (q.reshape(b, c, 1, h * w) * im2col(k)).sum(1) * m.scale
    attn = dots.softmax(dim=1)
    out = (attn.unsqueeze(1) * im2col(v)).sum(2).view(b, c, h, w)
    return F.relu(m.mlp(out + xc)).permute(0, 2, 3, 1)


BASELINES = {"msa_conv": msa_conv_baseline}
