"""``PatternAttention``: the base of the sequence layers, ``q/k/v/o`` Linears around ``nearfar.attend`` with one
pattern, rotary positions, GQA and a KV cache that keeps only the keys a future query can still reach.

StreamingLLM, Longformer, BigBird, MoA, S2-Attention, the dense layer and the models' blocks are this class with
their pattern (see ``streaming_llm.py``, ``longformer.py``, ``bigbird.py``, ...).
"""

from __future__ import annotations

import torch
from torch import nn

from ..functional import attend, merge_heads
from ..patterns import Pattern
from .kv_cache import DecodeState, KeepFn, KVCache
from .projections import add_projections
from .rotary import RotaryEmbedding, rotary_qkv


class PatternAttention(nn.Module):
    """Multi-head attention of ``x (B, N, dim)`` restricted to ``pattern`` (on token indices), with rotary
    positions, GQA (``num_kv_heads``) and a KV cache that keeps what ``keep(positions, next_position)`` says.

    ``pattern`` must be causal to decode (``causal=True`` says so; it is checked by the decode tests)."""

    # set by add_projections
    dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    rope: RotaryEmbedding | None

    def __init__(self, dim: int, num_heads: int, pattern: Pattern, num_kv_heads: int | None = None,
                 causal: bool = True, keep: KeepFn | None = None, rope: bool = True, qkv_bias: bool = False):
        super().__init__()
        if not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a nearfar Pattern, got {type(pattern).__name__}")
        add_projections(self, dim, num_heads, num_kv_heads, qkv_bias, rope)
        self.pattern, self.causal, self.keep = pattern, causal, keep

    def new_cache(self, batch: int = 1, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> DecodeState:
        if not self.causal:
            raise ValueError(f"{type(self).__name__} is not causal: it has no decoding cache")
        return KVCache(batch, keep=self.keep, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, N, {self.dim}), got {getattr(x, 'shape', type(x).__name__)}")
        cache = KVCache.checked(cache, x)
        n = x.shape[1]
        q, k, v, pos = rotary_qkv(self, x, 0 if cache is None else cache.length)
        if cache is None:
            out = attend(q, k, v, self.pattern, key_padding_mask=key_padding_mask)
        else:
            if key_padding_mask is not None:
                raise ValueError("key_padding_mask is for whole sequences; decode each sequence's real tokens")
            cache.append(k, v)
            total = cache.length
            # queries sit at their absolute positions of a total-long sequence: the same pairs as the forward
            ck, cv, kpos = cache.k, cache.v, cache.positions
            assert ck is not None and cv is not None and kpos is not None  # appended to just now
            allowed = self.pattern.allowed(pos[:, None], kpos[None, :], total, total)
            used = allowed.reshape(-1, allowed.shape[-1]).any(0)
            if 2 * int(used.sum()) < used.numel():  # few of the kept keys are reachable now: attend only those
                idx = torch.nonzero(used)[:, 0]
                ck, cv, allowed = ck.index_select(2, idx), cv.index_select(2, idx), allowed.index_select(-1, idx)
            bias = torch.zeros(allowed.shape, dtype=torch.float32, device=x.device).masked_fill_(~allowed,
                                                                                                 float("-inf"))
            out = attend(q, ck, cv, bias=bias)
            cache.evict()
        return self.o_proj(merge_heads(out, (n,)))
