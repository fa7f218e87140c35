"""PT-DiT proxy-token attention the way MindSpeed-MM's ``ProxyTokensTransformerBlock`` computes it: tokens
grouped per window ``(B * windows, tokens, C)``, proxies by reshape + mean, every attention one SDPA call, the
shifted windows by ``torch.roll`` + regrouping + an additive ``-10000`` region mask."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _group(x: torch.Tensor, window: tuple[int, ...]) -> torch.Tensor:
    """(B, *S, C) -> (B * windows, tokens per window, C), windows and tokens row-major."""
    nd, c = len(window), x.shape[-1]
    shape = [x.shape[0]]
    for n, w in zip(x.shape[1:-1], window):
        shape += [n // w, w]
    perm = [0, *range(1, 2 * nd, 2), *range(2, 2 * nd + 1, 2), 2 * nd + 1]
    return x.reshape(*shape, c).permute(perm).reshape(-1, math.prod(window), c)


def _ungroup(g: torch.Tensor, window: tuple[int, ...], spatial: tuple[int, ...]) -> torch.Tensor:
    nd, c = len(window), g.shape[-1]
    counts = [n // w for n, w in zip(spatial, window)]
    t = g.reshape(-1, *counts, *window, c)
    perm = [0]
    for a in range(nd):
        perm += [1 + a, 1 + nd + a]
    return t.permute(*perm, 2 * nd + 1).reshape(-1, *spatial, c)


def _attention(attn, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers ``Attention``: (B', n, C) queries, (B', m, C) context -> (B', n, C)."""
    h = attn.num_heads

    def heads(t):
        return t.reshape(t.shape[0], t.shape[1], h, -1).transpose(1, 2)

    o = F.scaled_dot_product_attention(heads(attn.to_q(x)), heads(attn.to_k(context)), heads(attn.to_v(context)),
                                       attn_mask=mask, scale=attn.scale)
    return attn.to_out[0](o.transpose(1, 2).reshape(x.shape))


def _proxies(m, x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    if m.proxy_mode == "paper_window_mean":
        return _group(x, m.proxy_compress_ratios).mean(1).reshape(b, -1, m.dim)
    g = _group(x, m.compress_ratios)  # (B*P, n, C) -> (B*P, outer..., inner..., C) as get_proxy_token
    shape = []
    for c, r in zip(m.compress_ratios, m.scale_ratio):
        shape += [c // r, r]
    nd = len(m.compress_ratios)
    t = g.reshape(g.shape[0], *shape, m.dim).permute(0, *range(1, 2 * nd, 2), *range(2, 2 * nd + 1, 2), 2 * nd + 1)
    t = t.reshape(g.shape[0], -1, math.prod(m.scale_ratio), m.dim)
    t = t[:, 0] if m.proxy_mode == "first" else t.mean(1)
    return t.reshape(b, -1, m.dim)


def _region_mask(spatial, window, shift, dtype, device) -> torch.Tensor:
    """Swin/PT-DiT shifted-window region mask: 0 for same label, -10000 otherwise, (windows, n, n)."""
    label = torch.zeros(spatial, device=device)
    for a, (n, w, s) in enumerate(zip(spatial, window, shift)):
        t = torch.arange(n, device=device)
        band = (t >= n - w).long() + (t >= n - s).long() if s > 0 else torch.zeros_like(t)
        view = [1] * len(spatial)
        view[a] = n
        label = label * 3 + band.view(view)
    lab = _group(label[None, ..., None], window)[..., 0]
    return ((lab[:, None, :] != lab[:, :, None]).to(dtype) * -10000.0)


def proxy_tokens_baseline(m, x: torch.Tensor) -> torch.Tensor:
    spatial, b, c = tuple(x.shape[1:-1]), x.shape[0], m.compress_ratios
    p = _proxies(m, x)
    p = p + _attention(m.proxy_attn1, m.proxy_norm1(p), m.proxy_norm1(p))
    z = _group(x, c)
    zq = m.norm_before(z).reshape(b, -1, m.dim)
    pk = m.proxy_cross_norm(p)
    z = z + m.linear_1_visual(_attention(m.pvisual_attn2, zq, pk)).reshape(z.shape)
    zn = m.norm1(z)
    z = z + _attention(m.attn1, zn, zn)
    if m.shift_window:
        dims = tuple(range(1, len(spatial) + 1))
        rolled = torch.roll(_ungroup(z, c, spatial), tuple(-s for s in m.shift_size), dims)
        zs = m.shift_window_norm(_group(rolled, c))
        mask = _region_mask(spatial, c, m.shift_size, zs.dtype, zs.device)
        mask = mask.repeat(b, 1, 1)[:, None]  # (B*P, 1, n, n), batch-major like the windows
        o = _attention(m.attn3, zs, zs, mask)
        back = torch.roll(_ungroup(o, c, spatial), m.shift_size, dims)
        z = z + m.linear_2(_group(back, c))
    return _ungroup(z, c, spatial) - x  # the block's update, as nearfar's layer returns it


BASELINES = {"proxy_tokens": proxy_tokens_baseline}
