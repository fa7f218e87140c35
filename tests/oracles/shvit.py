"""SHViT ``SHSA`` the way ysj9909/SHViT (and timm) computes it: channels-first, ``Conv2d`` + ``BatchNorm2d`` modules
and an explicit ``(q^T k) * scale`` softmax over the ``N x N`` map. The channel-last input is only permuted (a view)."""

from __future__ import annotations

import torch

from nearfar.layers.shvit import SHSA


def shsa_baseline(m: SHSA, x: torch.Tensor) -> torch.Tensor:
    x = x.permute(0, 3, 1, 2)
    b, _, h, w = x.shape
    x1, x2 = torch.split(x, [m.pdim, m.dim - m.pdim], dim=1)
    x1 = m.pre_norm(x1)
    qkv = m.qkv.bn(m.qkv.c(x1))
    q, k, v = torch.split(qkv, [m.qk_dim, m.qk_dim, m.pdim], dim=1)
    q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
    attn = ((q.transpose(-2, -1) @ k) * m.scale).softmax(dim=-1)
    x1 = (v @ attn.transpose(-2, -1)).reshape(b, m.pdim, h, w)
    proj = m.proj[1]
    y = proj.bn(proj.c(m.proj[0](torch.cat([x1, x2], dim=1))))
    return y.permute(0, 2, 3, 1)


BASELINES = {"shvit": shsa_baseline}
