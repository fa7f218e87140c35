"""WAU, window attention upsample (PROVISIONAL design from the paper's abstract, no official code found), computed the
straightforward way: norms and projections on the whole maps, Swin-style ``window_partition`` of q, k and v each,
explicit ``q @ k^T`` softmax (padded keys masked with -inf, the relative-position bias gathered through its index),
``window_reverse``, crop, output projection and FFN on the whole map, bilinear residual. No official WAU code exists;
this is the plain implementation of the same design with the module's own weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import nn_linear


def _window_partition(x: torch.Tensor, m: int) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B * H/m * W/m, m*m, C)``, windows batch-major (Swin's ``window_partition``)."""
    b, h, w, c = x.shape
    return x.view(b, h // m, m, w // m, m, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, m * m, c)


def _window_reverse(win: torch.Tensor, m: int, b: int, h: int, w: int) -> torch.Tensor:
    c = win.shape[-1]
    return win.view(b, h // m, w // m, m, m, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def wau_baseline(module, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
    """``module(x, skip)`` the straightforward way (``skip=None``: the one-input form, deep map = pooled ``x``)."""
    s, m, heads = module.scale_factor, module.window_size, module.num_heads
    if skip is None:
        skip = x
        x = x if s == 1 else F.avg_pool2d(x.permute(0, 3, 1, 2), s, s, ceil_mode=True).permute(0, 2, 3, 1)
    b, h, w, c = x.shape
    hs, ws = skip.shape[1:3]
    hp, wp = -(-h // m) * m, -(-w // m) * m
    d = c // heads
    q = nn_linear(module.q, module.norm_q(skip))
    kv = nn_linear(module.kv, module.norm_kv(x))
    q = F.pad(q, (0, 0, 0, s * wp - ws, 0, s * hp - hs))
    kv = F.pad(kv, (0, 0, 0, wp - w, 0, hp - h))
    qw = _window_partition(q.contiguous(), s * m)  # (Bw, Nq, C)
    kvw = _window_partition(kv.contiguous(), m)  # (Bw, Nk, 2C)
    nwin, nq, nk = qw.shape[0], qw.shape[1], kvw.shape[1]
    qh = qw.reshape(nwin, nq, heads, d).transpose(1, 2)
    kvh = kvw.reshape(nwin, nk, 2, heads, d).permute(2, 0, 3, 1, 4)
    attn = (qh * module.scale) @ kvh[0].transpose(-2, -1)  # (Bw, heads, Nq, Nk)
    if module.relative_position_bias_table is not None:
        index = module.relative_position_index
        attn = attn + module.relative_position_bias_table[index.reshape(-1)].reshape(nq, nk, heads).permute(2, 0, 1)
    if (hp, wp) != (h, w):
        valid = torch.zeros(1, hp, wp, 1, device=x.device)
        valid[:, :h, :w] = 1
        keep = _window_partition(valid.expand(b, hp, wp, 1).contiguous(), m)[..., 0]  # (Bw, Nk)
        attn = attn.masked_fill(keep[:, None, None, :] == 0, float("-inf"))
    out = (attn.softmax(-1) @ kvh[1]).transpose(1, 2).reshape(nwin, nq, c)
    out = _window_reverse(out, s * m, b, s * hp, s * wp)[:, :hs, :ws]
    z = nn_linear(module.proj, out)
    if module.skip_proj is not None:
        z = z + nn_linear(module.skip_proj, skip)
    if module.ffn:
        z = z + nn_linear(module.mlp.fc2, F.gelu(nn_linear(module.mlp.fc1, module.norm_ffn(z))))
    if module.bilinear_residual:
        up = x if s == 1 else F.interpolate(x.permute(0, 3, 1, 2), scale_factor=s, mode="bilinear",
                                            align_corners=False).permute(0, 2, 3, 1)
        z = z + up[:, :hs, :ws]
    return z


BASELINES = {"wau": wau_baseline}
