"""HiLo the way ziplab/LITv2 computes it (detection ``litv2.py``): zero-pad to a multiple of the window, Hi-Fi by
reshaping into windows and an explicit ``q @ k^T`` softmax, Lo-Fi by ``AvgPool2d`` and an explicit softmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nearfar.layers.hilo import HiLo


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1) @ v


def _hifi(m: HiLo, x: torch.Tensor) -> torch.Tensor:
    b, h, w, c = x.shape
    s, heads, d = m.ws, m.h_heads, m.head_dim
    hg, wg = h // s, w // s
    t = x.reshape(b, hg, s, wg, s, c).transpose(2, 3)
    qkv = m.h_qkv(t).reshape(b, hg * wg, s * s, 3, heads, d).permute(3, 0, 1, 4, 2, 5)
    o = _softmax_attention(qkv[0], qkv[1], qkv[2], m.scale)  # (B, windows, heads, s*s, d)
    o = o.transpose(2, 3).reshape(b, hg, wg, s, s, heads * d).transpose(2, 3).reshape(b, h, w, heads * d)
    return m.h_proj(o)


def _lofi(m: HiLo, x: torch.Tensor) -> torch.Tensor:
    b, h, w, c = x.shape
    heads, d = m.l_heads, m.head_dim
    q = m.l_q(x).reshape(b, h * w, heads, d).permute(0, 2, 1, 3)
    src = x
    if m.ws > 1:
        src = F.avg_pool2d(x.permute(0, 3, 1, 2), m.ws, m.ws).reshape(b, c, -1).permute(0, 2, 1)
    kv = m.l_kv(src).reshape(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4)
    o = _softmax_attention(q, kv[0], kv[1], m.scale)
    return m.l_proj(o.transpose(1, 2).reshape(b, h, w, heads * d))


def hilo_baseline(m: HiLo, x: torch.Tensor) -> torch.Tensor:
    if m.mask_padding:
        raise NotImplementedError("the official code has no mask_padding; use mask_padding=False")
    h, w = x.shape[1:3]
    pad_b, pad_r = -h % m.ws, -w % m.ws
    xp = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    parts = []
    if m.h_heads:
        parts.append(_hifi(m, xp)[:, :h, :w])
    if m.l_heads:
        parts.append(_lofi(m, xp)[:, :h, :w])
    return torch.cat(parts, dim=-1)


BASELINES = {"hilo": hilo_baseline}
