"""Rotary position embeddings (RoPE) and the projection of a sequence layer's rotated q, k, v."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..functional import split_heads, token_positions

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
        return self.rotate(x, angles.cos().to(x.dtype), angles.sin().to(x.dtype))

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos`` and ``sin`` ``(N, d/2)`` of the angles at ``positions (N,)``, in ``dtype``: computed once, they can
        rotate several tensors (e.g. q and k), and autograd then saves one pair for all of them."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # (N, d/2)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x (B, H, N, d)`` rotated by the ``tables`` of its positions."""
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)



def rotary_qkv(layer: ProjectedAttention, x: torch.Tensor, start: int,
               shared_tables: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v heads ``(B, H, N, d)`` of ``x (B, N, dim)`` at positions ``start .. start+N-1``, RoPE applied, for a
    layer with ``q_proj``/``k_proj``/``v_proj``, ``num_heads``, ``num_kv_heads`` and ``rope`` (None: no RoPE).
    ``shared_tables``: one cos/sin pair rotates both q and k (the same values; autograd saves one pair instead of
    two, and the unrotated q is released before k is projected)."""
    pos = token_positions(start, x.shape[1], x.device)  # global positions on a rank of a split sequence
    if shared_tables and layer.rope is not None:
        cos, sin = layer.rope.tables(pos, x.dtype)
        q = layer.rope.rotate(split_heads(layer.q_proj(x), layer.num_heads), cos, sin)
        k = layer.rope.rotate(split_heads(layer.k_proj(x), layer.num_kv_heads), cos, sin)
        return q, k, split_heads(layer.v_proj(x), layer.num_kv_heads), pos
    q = split_heads(layer.q_proj(x), layer.num_heads)
    k = split_heads(layer.k_proj(x), layer.num_kv_heads)
    v = split_heads(layer.v_proj(x), layer.num_kv_heads)
    if layer.rope is not None:
        q, k = layer.rope(q, pos), layer.rope(k, pos)
    return q, k, v, pos
