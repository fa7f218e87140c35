"""DLGSANet MHDLSA the way NeonLeexiang/DLGSANet computes it (``IDynamicDWConvBlock``): channels-first 1x1 convs,
the ``IDynamicDWConv`` hyper-network, kernels viewed ``(B, groups, k, k, H, W)``, and the per-pixel filtering of
the official CUDA kernel ``_idynamic`` written with ``F.unfold`` (the usual PyTorch form of that kernel: every
pixel's ``k x k`` neighbourhood copied out, weighted, summed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nearfar.layers.dlgsa_local import MHDLSA


def mhdlsa_baseline(m: MHDLSA, x: torch.Tensor) -> torch.Tensor:
    u = m.conv0(x.permute(0, 3, 1, 2))
    weight = m.conv.conv2(m.conv.conv1(u))
    b, c, h, w = u.shape
    k, groups = m.window_size, m.num_heads
    weight = weight.view(b, groups, 1, k * k, h, w)
    cols = F.unfold(u, k, padding=(k - 1) // 2).view(b, groups, c // groups, k * k, h, w)
    out = (cols * weight).sum(dim=3).view(b, c, h, w)
    return m.conv1(out).permute(0, 2, 3, 1)


BASELINES = {"dlgsa_local": mhdlsa_baseline}
