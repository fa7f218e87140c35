"""Rotary position embeddings (RoPE) and the projection of a sequence layer's rotated q, k, v."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..functional import split_heads

if TYPE_CHECKING:
    from .projections import ProjectedAttention


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al.), the "rotate half" layout of GPT-NeoX/LLaMA: ``(B, H, N, d)`` at given positions."""

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dim, got {head_dim}")
        self.register_buffer("inv_freq", base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim),
                             persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # (N, d/2)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)



def rotary_qkv(layer: ProjectedAttention, x: torch.Tensor,
               start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v heads ``(B, H, N, d)`` of ``x (B, N, dim)`` at positions ``start .. start+N-1``, RoPE applied, for a
    layer with ``q_proj``/``k_proj``/``v_proj``, ``num_heads``, ``num_kv_heads`` and ``rope`` (None: no RoPE)."""
    pos = torch.arange(start, start + x.shape[1], device=x.device)
    q = split_heads(layer.q_proj(x), layer.num_heads)
    k = split_heads(layer.k_proj(x), layer.num_kv_heads)
    v = split_heads(layer.v_proj(x), layer.num_kv_heads)
    if layer.rope is not None:
        q, k = layer.rope(q, pos), layer.rope(k, pos)
    return q, k, v, pos
