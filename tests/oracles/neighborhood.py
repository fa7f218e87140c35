"""NA/DiNA the straightforward way: the neighbourhood as a dense boolean mask, one masked SDPA call."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nearfar.functional import merge_heads, split_qkv
from nearfar.layers.neighborhood import NeighborhoodAttention


def masked_sdpa(module: NeighborhoodAttention, x: torch.Tensor) -> torch.Tensor:
    spatial = tuple(x.shape[1:-1])
    n = x[0, ..., 0].numel()
    q, k, v = split_qkv(module.qkv(x), module.num_heads)
    pattern = module.pattern(spatial)
    mask = torch.where(pattern.mask(n, n), 0.0, float("-inf"))
    if module.rpb is not None:
        i = torch.arange(n)
        mask = mask + module.rpb.reshape(module.num_heads, -1)[:, pattern.rpb_index(i[:, None], i[None, :], n)]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=module.scale)
    return module.proj(merge_heads(out, spatial))


BASELINES = {"neighborhood": masked_sdpa}
