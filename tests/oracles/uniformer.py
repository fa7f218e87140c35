"""UniFormer's mixers the way Sense-X/UniFormer computes them: the local MHRA as the ``CBlock`` module chain on the
channels-first view, the global MHRA as ``Attention`` does it (explicit ``q @ k^T`` softmax over all tokens)."""

from __future__ import annotations

import torch

from nearfar.layers.uniformer import UniFormerGlobalMHRA, UniFormerLocalMHRA


def local_baseline(m: UniFormerLocalMHRA, x: torch.Tensor) -> torch.Tensor:
    y = x.permute(0, 3, 1, 2)
    return m.conv2(m.attn(m.conv1(m.norm1(y)))).permute(0, 2, 3, 1)


def global_baseline(m: UniFormerGlobalMHRA, x: torch.Tensor) -> torch.Tensor:
    b, h, w, c = x.shape
    t = m.norm1(x.reshape(b, h * w, c))
    qkv = m.attn["qkv"](t).reshape(b, h * w, 3, m.num_heads, c // m.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * m.scale).softmax(dim=-1)
    return m.attn["proj"]((attn @ v).transpose(1, 2).reshape(b, h, w, c))


BASELINES = {"uniformer_local": local_baseline, "uniformer_global": global_baseline}
