"""Super token attention computed the way the official ``stvit.py`` ``StokenAttention`` does it.

Channels-first ``(B, C, H, W)``: zero-pad to the cell, ``adaptive_avg_pool2d`` for the initial super tokens,
3x3 neighbour gather as a conv with a frozen identity kernel (``Unfold``), scatter as the transposed conv
(``Fold``), refine as 1x1-conv qkv with an explicit ``(kᵀ q)`` softmax over keys; the module's own weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nearfar.layers.super_token import SuperTokenAttention

_EYE = torch.eye(9).reshape(9, 1, 3, 3)


def _unfold(s: torch.Tensor) -> torch.Tensor:
    b, c, hh, ww = s.shape
    return F.conv2d(s.reshape(b * c, 1, hh, ww), _EYE.to(s), padding=1).reshape(b, c * 9, hh * ww)


def _fold(t: torch.Tensor) -> torch.Tensor:
    return F.conv_transpose2d(t, _EYE.to(t), padding=1)


def _refine(m: SuperTokenAttention, x: torch.Tensor) -> torch.Tensor:
    r = m.stoken_refine
    b, c, hgt, wid = x.shape
    qkv = F.conv2d(x, r.qkv.weight[:, :, None, None], r.qkv.bias)
    q, k, v = qkv.reshape(b, r.num_heads, 3 * c // r.num_heads, hgt * wid).chunk(3, dim=2)
    attn = ((k.transpose(-1, -2) @ q) * r.scale).softmax(dim=-2)
    out = (v @ attn).reshape(b, c, hgt, wid)
    return F.conv2d(out, r.proj.weight[:, :, None, None], r.proj.bias)


def super_token_official(m: SuperTokenAttention, x: torch.Tensor) -> torch.Tensor:
    x = x.permute(0, 3, 1, 2)
    b, c, h0, w0 = x.shape
    h, w = m.cell_size(h0, w0)
    if (h, w) == (1, 1):
        return (_refine(m, x) if m.refine else x).permute(0, 2, 3, 1)
    pad_r, pad_b = (w - w0 % w) % w, (h - h0 % h) % h
    if pad_r or pad_b:
        x = F.pad(x, (0, pad_r, 0, pad_b))
    hgt, wid = x.shape[2:]
    hh, ww = hgt // h, wid // w
    stoken = F.adaptive_avg_pool2d(x, (hh, ww))
    pixel = x.reshape(b, c, hh, h, ww, w).permute(0, 2, 4, 3, 5, 1).reshape(b, hh * ww, h * w, c)
    with torch.no_grad():
        for idx in range(m.n_iter):
            stoken = _unfold(stoken).transpose(1, 2).reshape(b, hh * ww, c, 9)
            affinity = (pixel @ stoken * m.scale).softmax(-1)
            affinity_sum = _fold(affinity.sum(2).transpose(1, 2).reshape(b, 9, hh, ww))
            if idx < m.n_iter - 1:
                stoken = pixel.transpose(-1, -2) @ affinity
                stoken = _fold(stoken.permute(0, 2, 3, 1).reshape(b * c, 9, hh, ww)).reshape(b, c, hh, ww)
                stoken = stoken / (affinity_sum + 1e-12)
    stoken = pixel.transpose(-1, -2) @ affinity
    stoken = _fold(stoken.permute(0, 2, 3, 1).reshape(b * c, 9, hh, ww)).reshape(b, c, hh, ww)
    stoken = stoken / (affinity_sum.detach() + 1e-12)
    if m.refine:
        stoken = _refine(m, stoken)
    stoken = _unfold(stoken).transpose(1, 2).reshape(b, hh * ww, c, 9)
    pixel = stoken @ affinity.transpose(-1, -2)
    out = pixel.reshape(b, hh, ww, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(b, c, hgt, wid)
    return out[:, :, :h0, :w0].permute(0, 2, 3, 1)


BASELINES = {"super_token": super_token_official}
