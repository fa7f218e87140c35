"""MAFormer MAF mixer (PROVISIONAL design from the paper's abstract, no official code found) computed the Swin way: pad
to whole windows, window partition, explicit ``q @ k^T`` softmax with the relative-position bias gathered through Swin's
``relative_position_index`` (padded keys masked), window reverse and crop; the GLD branch and the fusion as plain
channels-first conv and explicit softmax attention. No official MAFormer code exists; this is the straightforward
implementation of the same design with the module's own weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _relative_position_index(m: int) -> torch.Tensor:
    """Swin's (m*m, m*m) index into the ((2m-1)^2, heads) table, query-minus-key."""
    coords = torch.stack(torch.meshgrid(torch.arange(m), torch.arange(m), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (m - 1)
    return rel[..., 0] * (2 * m - 1) + rel[..., 1]


def _softmax_attention(q, k, v, scale, bias=None):
    attn = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    return attn.softmax(-1) @ v


def _window_attention(loc, x):
    b, h, w, c = x.shape
    heads, full = loc.num_heads, loc.window_size[0]  # square windows
    mh, mw = min(full, h), min(full, w)
    ph, pw = -h % mh, -w % mw
    xp = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    nh, nw = hp // mh, wp // mw
    win = xp.view(b, nh, mh, nw, mw, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, mh * mw, c)
    qkv = loc.qkv(win).reshape(win.shape[0], mh * mw, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    # the table of the largest window; a smaller window uses its centre (offset 0 stays at index full - 1)
    idx = _relative_position_index(full).view(full, full, full, full)[:mh, :mw, :mh, :mw].reshape(mh * mw, -1)
    bias = loc.relative_position_bias_table[idx.to(x.device)].permute(2, 0, 1)  # (heads, n, n)
    if ph or pw:
        valid = torch.zeros(hp, wp, dtype=torch.bool, device=x.device)
        valid[:h, :w] = True
        valid = valid.view(nh, mh, nw, mw).permute(0, 2, 1, 3).reshape(nh * nw, 1, 1, mh * mw)
        pad_mask = torch.zeros(valid.shape, dtype=x.dtype, device=x.device).masked_fill(~valid, float("-inf"))
        bias = (bias[None] + pad_mask).repeat(b, 1, 1, 1)  # windows are batch-major
    out = _softmax_attention(qkv[0], qkv[1], qkv[2], loc.scale, bias)
    out = loc.proj(out.transpose(1, 2).reshape(-1, mh * mw, c))
    out = out.view(b, nh, nw, mh, mw, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    return out[:, :h, :w]


def _self_attention(att, t):
    b, n, c = t.shape
    qkv = att.qkv(t).reshape(b, n, 3, att.num_heads, c // att.num_heads).permute(2, 0, 3, 1, 4)
    out = _softmax_attention(qkv[0], qkv[1], qkv[2], att.scale)
    return att.proj(out.transpose(1, 2).reshape(b, n, c))


def _cross_attention(att, t, ctx):
    b, n, c = t.shape
    q = att.q(t).reshape(b, n, att.num_heads, -1).transpose(1, 2)
    k, v = att.kv(ctx).reshape(b, ctx.shape[1], 2, att.num_heads, -1).permute(2, 0, 3, 1, 4)
    out = _softmax_attention(q, k, v, att.scale)
    return att.proj(out.transpose(1, 2).reshape(b, n, c))


def maformer_baseline(module, x: torch.Tensor) -> torch.Tensor:
    b, h, w, c = x.shape
    r = module.down_ratio
    y_l = _window_attention(module.local, x).reshape(b, h * w, c)
    xc = F.pad(x.permute(0, 3, 1, 2).contiguous(), (0, -w % r, 0, -h % r))
    y_g = _self_attention(module.global_attn, module.gld(xc).flatten(2).transpose(1, 2))
    return (y_l + _cross_attention(module.fusion, y_l, y_g)).reshape(b, h, w, c)


BASELINES = {"maformer": maformer_baseline}
