"""MaxViT block / grid attention the way timm computes it (``timm/models/maxxvit.py``: ``window_partition`` /
``grid_partition`` by view/permute, ``AttentionCl`` on every window with the ``RelPosBiasTf`` / ``RelPosBias`` bias
as the additive mask of ``F.scaled_dot_product_attention``, then ``window_reverse`` / ``grid_reverse``), which ports
google-research/maxvit ``maxvit/models/maxvit.py``. The bias is gathered from the table through a precomputed index
(timm: one-hot einsum lookups; the same entries). Extents must be divisible by the partition size, as there.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from nearfar.layers.maxvit import MaxViTAttention


def block_partition(x: torch.Tensor, p: tuple[int, int]) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B * nW, p_h * p_w, C)``: window ``(r // p_h, c // p_w)``, slot ``(r % p_h, c % p_w)``."""
    b, h, w, c = x.shape
    return x.view(b, h // p[0], p[0], w // p[1], p[1], c).permute(0, 1, 3, 2, 4, 5).reshape(-1, p[0] * p[1], c)


def block_reverse(t: torch.Tensor, p: tuple[int, int], spatial: tuple[int, int]) -> torch.Tensor:
    h, w = spatial
    c = t.shape[-1]
    return t.view(-1, h // p[0], w // p[1], p[0], p[1], c).permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def grid_partition(x: torch.Tensor, g: tuple[int, int]) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B * nW, g_h * g_w, C)``: window ``(r % t_h, c % t_w)``, slot ``(r // t_h, c // t_w)``
    with ``t = H / g``."""
    b, h, w, c = x.shape
    return x.view(b, g[0], h // g[0], g[1], w // g[1], c).permute(0, 2, 4, 1, 3, 5).reshape(-1, g[0] * g[1], c)


def grid_reverse(t: torch.Tensor, g: tuple[int, int], spatial: tuple[int, int]) -> torch.Tensor:
    h, w = spatial
    c = t.shape[-1]
    return t.view(-1, h // g[0], w // g[1], g[0], g[1], c).permute(0, 3, 1, 4, 2, 5).reshape(-1, h, w, c)


@lru_cache(maxsize=64)
def _slot_offsets(window: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Key-minus-query slot offsets ``(n, n)`` per axis of a row-major window."""
    ys, xs = torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    return ys[None, :] - ys[:, None], xs[None, :] - xs[:, None]


def relative_bias(m: MaxViTAttention, window: tuple[int, int]) -> torch.Tensor | None:
    """``(heads, n, n)`` as timm's ``rel_pos.get_bias()``: TF table ``R[h, dy + P - 1, dx + P - 1]`` (key minus
    query) or the Swin table ``T[(-dy + P - 1) * (2P - 1) + (-dx + P - 1), h]`` (query minus key)."""
    if m.rel_pos is None:
        return None
    table, (ph, pw) = m.rel_pos.relative_position_bias_table, m.partition_size
    dy, dx = (t.to(table.device) for t in _slot_offsets(window))
    if m.rel_pos.kind == "bias_tf":
        return table[:, dy + ph - 1, dx + pw - 1]
    return table[(ph - 1 - dy) * (2 * pw - 1) + (pw - 1 - dx)].permute(2, 0, 1)


def maxvit_baseline(m: MaxViTAttention, x: torch.Tensor) -> torch.Tensor:
    b, h, w, c = x.shape
    spatial = (h, w)
    if m.partition == "grid":
        window, part, rev = m.partition_size, grid_partition, grid_reverse
    else:
        window, part, rev = tuple(min(p, n) for p, n in zip(m.partition_size, spatial)), block_partition, block_reverse
    if h % window[0] or w % window[1]:
        raise ValueError(f"timm/official MaxViT needs {spatial} divisible by the partition size {window}")
    t = part(x, window)
    heads, d = m.num_heads, m.dim_head
    n = t.shape[1]
    if m.head_first:
        q, k, v = m.qkv(t).view(-1, n, heads, 3 * d).transpose(1, 2).chunk(3, dim=3)
    else:
        q, k, v = m.qkv(t).reshape(-1, n, 3, heads, d).transpose(1, 3).unbind(2)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=relative_bias(m, window), scale=m.scale)
    o = m.proj(o.transpose(1, 2).reshape(-1, n, heads * d))
    return rev(o, window, spatial)


BASELINES = {"maxvit_block": maxvit_baseline, "maxvit_grid": maxvit_baseline}
