"""``PatternAttention``: the base of the sequence layers, ``q/k/v/o`` Linears around ``nearfar.attend`` with one
pattern, rotary positions, GQA and a KV cache that keeps only the keys a future query can still reach.

StreamingLLM, Longformer, BigBird, MoA, S2-Attention, the dense layer and the models' blocks are this class with
their pattern (see ``streaming_llm.py``, ``longformer.py``, ``bigbird.py``, ...).
"""

from __future__ import annotations

import torch

from ..functional import attend, merge_heads
from ..patterns import Pattern
from .kv_cache import DecodeState, KeepFn, KVCache
from .projections import ProjectedAttention, add_projections
from .rotary import rotary_qkv
from .sharding import shards_natively


@shards_natively
class PatternAttention(ProjectedAttention):
    """Multi-head attention of ``x (B, N, dim)`` restricted to ``pattern`` (on token indices), with rotary
    positions, GQA (``num_kv_heads``) and a KV cache that keeps what ``keep(positions, next_position)`` says.

    ``pattern`` must be causal to decode (``causal=True`` says so; it is checked by the decode tests).

    Args:
        dim: Model width, a positive multiple of ``num_heads``.
        num_heads: Number of query heads, >= 1. With ``rope=True`` the head dim ``dim // num_heads`` must be even.
        pattern: The ``nearfar.patterns.Pattern`` of allowed (query, key) pairs on token indices.
        num_kv_heads: Number of key/value heads (grouped-query attention), >= 1 and dividing ``num_heads``;
            None (default): ``num_heads``.
        causal: Whether ``pattern`` is causal, so that the layer can decode through ``new_cache`` (default True;
            not checked against the pattern here).
        keep: ``keep(positions, next_position) -> bool mask`` of the cached keys a future query can still reach
            (e.g. a window and sinks); None (default): the cache keeps every key.
        rope: Rotary position embeddings on queries and keys (default True).
        qkv_bias: Biases on the q/k/v projections (default False; ``o_proj`` has none).

    Raises:
        TypeError: ``pattern`` is not a ``Pattern``, or ``num_kv_heads`` is not an int.
        ValueError: ``dim`` is not a positive multiple of ``num_heads``; ``num_kv_heads`` < 1 or not dividing
            ``num_heads``; an odd head dim with ``rope=True``.

    Examples:
        >>> import torch, nearfar as nf
        >>> from nearfar.layers import PatternAttention
        >>> layer = PatternAttention(64, 4, nf.SlidingWindow(left=7) & nf.Causal(), num_kv_heads=2,
        ...                          keep=lambda p, nxt: p > nxt - 8)
        >>> layer(torch.randn(2, 32, 64)).shape
        torch.Size([2, 32, 64])
        >>> cache = layer.new_cache(2)   # decoding: the cache keeps the last 8 keys
        >>> layer(torch.randn(2, 20, 64), cache=cache).shape
        torch.Size([2, 20, 64])
        >>> layer(torch.randn(2, 1, 64), cache=cache).shape
        torch.Size([2, 1, 64])
    """

    def __init__(self, dim: int, num_heads: int, pattern: Pattern, num_kv_heads: int | None = None,
                 causal: bool = True, keep: KeepFn | None = None, rope: bool = True, qkv_bias: bool = False):
        super().__init__()
        if not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a nearfar Pattern, got {type(pattern).__name__}")
        add_projections(self, dim, num_heads, num_kv_heads, qkv_bias, rope)
        self.pattern, self.causal, self.keep = pattern, causal, keep

    def new_cache(self, batch: int = 1, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> DecodeState:
        """An empty decoding cache for ``batch`` sequences (causal layers only).

        Args:
            batch: Number of sequences, >= 1; every call with the cache must have this batch.
            device: The cache's device; None (default): fixed by the first call.
            dtype: The cache's dtype; None (default): fixed by the first call.

        Returns:
            A ``KVCache`` that keeps the keys ``keep`` says a future query can still reach (all keys without ``keep``).

        Raises:
            ValueError: The layer is not causal, or ``batch`` < 1, or ``device``/``dtype`` is not one.
            TypeError: ``batch`` is not an int.
        """
        if not self.causal:
            raise ValueError(f"{type(self).__name__} is not causal: it has no decoding cache")
        return KVCache(batch, keep=self.keep, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend ``x`` under the layer's pattern, or continue each sequence through ``cache``.

        Args:
            x: Input ``(B, N, dim)``: whole sequences, or with ``cache`` the next ``N`` tokens of each sequence.
            cache: A decoding state from ``new_cache`` (None, the default: no state, ``x`` is the whole sequence).
                The outputs equal the matching rows of the forward over the whole sequence.
            key_padding_mask: Optional bool ``(B, N)``, True = a real token (whole sequences only, not with ``cache``).

        Returns:
            The output ``(B, N, dim)``.

        Raises:
            ValueError: ``x`` is not ``(B, N, dim)``; ``cache`` was made for another batch, device or dtype; a
                ``key_padding_mask`` together with ``cache``.
            TypeError: ``cache`` does not come from this layer's ``new_cache``.
        """
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
