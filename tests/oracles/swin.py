"""Swin W-MSA / SW-MSA the way microsoft/Swin-Transformer computes it (``models/swin_transformer.py``,
``SwinTransformerBlock`` + ``WindowAttention``): ``torch.roll`` by ``-shift``, ``window_partition`` by view/permute,
qkv per window, logits + the relative-position bias gathered through ``relative_position_index`` + the region mask
(``-100``, built once from the ``img_mask`` slices as the official ``attn_mask`` buffer), softmax (here fused:
``F.scaled_dot_product_attention`` with that additive mask), proj, ``window_reverse``, roll back.

Extents must be divisible by the (clipped) window, as in the official classification code; the window is clipped
by the module's own ``window_for`` rule. Works for 2D and Video Swin 3D windows.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from nearfar.layers.swin import WindowAttention


def window_partition(x: torch.Tensor, window: tuple[int, ...]) -> torch.Tensor:
    """``(B, *S, C)`` -> ``(B * nW, prod(window), C)``, windows batch-major then row-major (Swin's
    ``window_partition``)."""
    b, *spatial, c = x.shape
    nd = len(spatial)
    x = x.view(b, *itertools.chain.from_iterable((n // w, w) for n, w in zip(spatial, window)), c)
    perm = [0, *(1 + 2 * a for a in range(nd)), *(2 + 2 * a for a in range(nd)), 2 * nd + 1]
    return x.permute(perm).reshape(-1, math.prod(window), c)


def window_reverse(windows: torch.Tensor, window: tuple[int, ...], spatial: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``window_partition``."""
    nd, c = len(spatial), windows.shape[-1]
    x = windows.view(-1, *(n // w for n, w in zip(spatial, window)), *window, c)
    perm = [0, *itertools.chain.from_iterable((1 + a, 1 + nd + a) for a in range(nd)), 2 * nd + 1]
    return x.permute(perm).reshape(-1, *spatial, c)


@lru_cache(maxsize=64)
def relative_position_index(window: tuple[int, ...], table_window: tuple[int, ...]) -> torch.Tensor:
    """The official buffer: query-minus-key coordinates shifted to start at 0, flattened row-major with the
    table's ``2M-1`` strides (a window clipped below ``M`` reads the centre of the table)."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(w) for w in window), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]
    index = torch.zeros(rel.shape[1:], dtype=torch.long)
    for a, m in enumerate(table_window):
        index = index * (2 * m - 1) + rel[a] + m - 1
    return index


@lru_cache(maxsize=64)
def region_mask(spatial: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...]) -> torch.Tensor:
    """The official ``attn_mask`` buffer ``(nW, n, n)``: region labels from the three slices per axis, partitioned,
    0 where two tokens share the label and -100 elsewhere."""
    img = torch.zeros(1, *spatial, 1)
    bands = [(slice(0, -w), slice(-w, -s), slice(-s, None)) if s else (slice(None),) for w, s in zip(window, shift)]
    for cnt, sl in enumerate(itertools.product(*bands)):
        img[(slice(None), *sl)] = cnt
    labels = window_partition(img, window).squeeze(-1)
    diff = labels[:, None, :] - labels[:, :, None]
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def swin_baseline(m: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    b, *spatial, c = x.shape
    spatial = tuple(spatial)
    window, shift = m.window_for(spatial)
    if any(n % w for n, w in zip(spatial, window)):
        raise ValueError(f"the official Swin needs extents {spatial} divisible by the window {window}")
    dims = tuple(range(1, len(spatial) + 1))
    shifted = any(shift)
    if shifted:
        x = torch.roll(x, tuple(-s for s in shift), dims)
    xw = window_partition(x, window)
    n, heads = xw.shape[1], m.num_heads
    qkv = m.qkv(xw).reshape(-1, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    index = relative_position_index(window, m.window_size).to(x.device)
    mask = m.relative_position_bias_table[index.view(-1)].view(n, n, heads).permute(2, 0, 1)  # (heads, n, n)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if shifted:
        region = region_mask(spatial, window, shift).to(device=x.device, dtype=x.dtype)
        nw = region.shape[0]
        mask = mask[None] + region[:, None]  # (nW, heads, n, n)
        q, k, v = (t.view(b, nw, heads, n, -1) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(x.dtype), scale=m.scale)
    o = m.proj(o.reshape(-1, heads, n, c // heads).transpose(1, 2).reshape(-1, n, c))
    out = window_reverse(o, window, spatial)
    if shifted:
        out = torch.roll(out, shift, dims)
    return out


BASELINES = {"swin": swin_baseline, "swin_shifted": swin_baseline}
