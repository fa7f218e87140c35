"""What every sequence mechanism shares: the layer interface, its decoding state, and rotary positions.

A sequence mechanism is an ``nn.Module`` on ``x (B, N, dim)`` with

- ``forward(x, cache=None, key_padding_mask=None) -> (B, N, dim)``: with ``cache=None`` a whole sequence
  (teacher forcing / prefill from nothing); with a cache from ``new_cache``, ``x`` holds the next tokens of each
  sequence, the layer reads and updates the cache, and the outputs equal those rows of the teacher-forced forward
  over the whole sequence (what ``tests`` check for every mechanism);
- ``new_cache(batch, device=None, dtype=None) -> state``: an empty decoding state whose memory is bounded by what
  the mechanism needs (a window of keys, a d x d matrix, ...), never by the sequence length unless it must be;
- ``causal`` (attribute): whether token ``i`` only sees tokens ``<= i``.

Positions for rotary embeddings count from 0 at the first token of a sequence; a cache knows its position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class KVCache:
    """Keys and values a softmax layer keeps for decoding, with the absolute position of each kept key.

    ``keep(positions, next_position) -> bool mask`` decides which keys stay after every step (None: all), so
    a sliding window with sinks keeps ``sinks + window`` keys however long the sequence gets."""

    k: torch.Tensor | None = None  # (B, Hkv, L, d), rotated
    v: torch.Tensor | None = None  # (B, Hkv, L, dv)
    positions: torch.Tensor | None = None  # (L,) absolute positions, increasing
    length: int = 0  # tokens seen so far (the next token's position)
    keep: object = field(default=None, repr=False)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[2]
        pos = torch.arange(self.length, self.length + n, device=k.device)
        if self.k is None:
            self.k, self.v, self.positions = k, v, pos
        else:
            self.k = torch.cat([self.k, k], 2)
            self.v = torch.cat([self.v, v], 2)
            self.positions = torch.cat([self.positions, pos])
        self.length += n

    def evict(self) -> None:
        if self.keep is None or self.k is None:
            return
        kept = self.keep(self.positions, self.length)
        if not bool(kept.all()):
            idx = torch.nonzero(kept)[:, 0]
            self.k, self.v, self.positions = self.k[:, :, idx], self.v[:, :, idx], self.positions[idx]

    @property
    def size(self) -> int:
        return 0 if self.k is None else self.k.shape[2]


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al.), the "rotate half" layout of GPT-NeoX/LLaMA: ``(B, H, N, d)`` at given positions."""

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
