"""DaViT attention the way dingmyu/davit (and timm ``timm/models/davit.py``) computes it: tokens ``(B, N, C)``,
``ChannelAttention`` with ``k * scale``, ``k^T v`` softmax and ``(A q^T)^T``; ``WindowAttention`` on windows cut
from the zero-padded map (padded tokens unmasked), cropped after."""

from __future__ import annotations

import torch


def davit_channel_baseline(m, x: torch.Tensor) -> torch.Tensor:
    b, h, w, c = x.shape
    n = h * w
    qkv = m.qkv(x.reshape(b, n, c)).reshape(b, n, 3, m.num_heads, c // m.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attention = ((k * m.scale).transpose(-1, -2) @ v).softmax(dim=-1)
    out = (attention @ q.transpose(-1, -2)).transpose(-1, -2)
    return m.proj(out.transpose(1, 2).reshape(b, n, c)).reshape(b, h, w, c)


BASELINES = {"davit_channel": davit_channel_baseline}
