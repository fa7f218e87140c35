"""Polarized Self-Attention the way DeLightCMU/PSA computes it (``semantic-segmentation/network/PSA.py``,
``PSA_p`` / ``PSA_s``): channels-first, the module's own ``nn.Conv2d``/``nn.Sequential`` called on ``(B, C, H, W)``,
projection before pooling, ``matmul`` and ``softmax(dim=2)`` on flattened maps. Written from the official code's
structure, not copied; used for the vision benchmark's baseline and as a test oracle."""

from __future__ import annotations

import torch
from torch import nn


def official_channel_branch(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Official ``spatial_pool`` on ``x`` ``(B, C, H, W)``: ``x * sigmoid(conv_up(v @ softmax(q)^T))``."""
    b, _, h, w = x.shape
    v = m.conv_v_right(x).reshape(b, -1, h * w)
    q = m.conv_q_right(x).reshape(b, 1, h * w).softmax(dim=2)
    context = torch.matmul(v, q.transpose(1, 2)).unsqueeze(-1)  # (B, C_i, 1, 1)
    return x * m.conv_up(context).sigmoid()


def official_spatial_branch(m: nn.Module, x: torch.Tensor, sequential: bool) -> torch.Tensor:
    """Official ``channel_pool`` on ``x`` ``(B, C, H, W)``; ``sequential`` selects ``PSA_s`` (softmax on theta)."""
    b, _, h, w = x.shape
    g = m.conv_q_left(x).mean(dim=(2, 3))[:, None, :]  # (B, 1, C_i): AdaptiveAvgPool2d(1)
    theta = m.conv_v_left(x).reshape(b, -1, h * w)
    if sequential:
        context = torch.matmul(g, theta.softmax(dim=2))
    else:
        context = torch.matmul(g, theta).softmax(dim=2)
    return x * context.reshape(b, 1, h, w).sigmoid()


def psa_parallel_baseline(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    xc = x.permute(0, 3, 1, 2)
    return (official_spatial_branch(m, xc, False) + official_channel_branch(m, xc)).permute(0, 2, 3, 1)


def psa_sequential_baseline(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    xc = x.permute(0, 3, 1, 2)
    return official_spatial_branch(m, official_channel_branch(m, xc), True).permute(0, 2, 3, 1)


BASELINES = {"psa_parallel": psa_parallel_baseline}
