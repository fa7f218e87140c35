"""DaViT attention the way dingmyu/davit (and timm ``timm/models/davit.py``) computes it: tokens ``(B, N, C)``,
``ChannelAttention`` with ``k * scale``, ``k^T v`` softmax and ``(A q^T)^T``; ``WindowAttention`` on windows cut
from the zero-padded map (padded tokens unmasked), cropped after."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import nn_linear


def davit_channel_baseline(m, x: torch.Tensor) -> torch.Tensor:
    b, h, w, c = x.shape
    n = h * w
    qkv = nn_linear(m.qkv, x.reshape(b, n, c)).reshape(b, n, 3, m.num_heads, c // m.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attention = ((k * m.scale).transpose(-1, -2) @ v).softmax(dim=-1)
    out = (attention @ q.transpose(-1, -2)).transpose(-1, -2)
    return nn_linear(m.proj, out.transpose(1, 2).reshape(b, n, c)).reshape(b, h, w, c)


def davit_spatial_baseline(m, x: torch.Tensor) -> torch.Tensor:
    if m.mask_padding:
        raise NotImplementedError("the official code has no mask_padding; use mask_padding=False")
    b, h, w, c = x.shape
    s, heads = m.window_size, m.num_heads
    xp = F.pad(x, (0, 0, 0, -w % s, 0, -h % s))
    hp, wp = xp.shape[1:3]
    windows = xp.view(b, hp // s, s, wp // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, c)
    qkv = nn_linear(m.qkv, windows).reshape(-1, s * s, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * m.scale, qkv[1], qkv[2]
    o = ((q @ k.transpose(-2, -1)).softmax(dim=-1) @ v).transpose(1, 2).reshape(-1, s * s, c)
    o = nn_linear(m.proj, o).view(b, hp // s, wp // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    return o[:, :h, :w]


BASELINES = {"davit_channel": davit_channel_baseline, "davit_spatial": davit_spatial_baseline}
