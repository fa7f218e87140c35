"""StreamingLLM: a sliding window plus attention sinks, as a causal sequence layer with a bounded KV cache.

Paper: Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024). Official code:
mit-han-lab/streaming-llm, ``streaming_llm/kv_cache.py`` (``StartRecentKVCache``).

Differences from the official code: keys keep the rotary position of their token (the teacher-forced model, so
decoding equals the forward pass); the official ``pos_shift`` variant re-rotates keys by their slot in the cache
instead, which changes the function once tokens are evicted. Cache: ``sinks + window`` keys, as the official
``StartRecentKVCache`` (start_size 4, recent_size).
"""

from __future__ import annotations

from ..checks import check_positive_int
from ..patterns import Causal, Sinks, SlidingWindow
from .pattern_attention import PatternAttention
from .registry import POSITIONS_SHARED, Mechanism, register


class StreamingLLMAttention(PatternAttention):
    """``StreamingLLMAttention(dim, num_heads, window=512, sinks=4, num_kv_heads=None)``: causal; query ``i`` sees
    keys ``j <= i`` with ``j < sinks`` or ``i - j < window``. The cache holds at most ``sinks + window - 1`` keys.

    Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024); official code:
    mit-han-lab/streaming-llm. ``forward`` and ``new_cache`` are ``PatternAttention``'s.

    Args:
        dim: Model width, a positive multiple of ``num_heads`` with an even head dim (RoPE).
        num_heads: Number of query heads, >= 1.
        window: Recent keys each query sees, itself included, >= 1 (default 512).
        sinks: Attention-sink tokens at the start that every query sees, >= 1 (default 4).
        num_kv_heads: Number of key/value heads (GQA), dividing ``num_heads``; None (default): ``num_heads``.

    Raises:
        TypeError: ``window``, ``sinks`` or ``num_kv_heads`` is not an int.
        ValueError: ``window`` or ``sinks`` < 1; ``dim`` is not a positive multiple of ``num_heads``;
            ``num_kv_heads`` does not divide ``num_heads``.

    Examples:
        >>> import torch
        >>> from nearfar import StreamingLLMAttention
        >>> layer = StreamingLLMAttention(64, 4, window=8, sinks=2)
        >>> layer(torch.randn(2, 32, 64)).shape
        torch.Size([2, 32, 64])
        >>> cache = layer.new_cache(2)
        >>> layer(torch.randn(2, 32, 64), cache=cache).shape   # prefill; the cache keeps <= 2 + 8 - 1 keys
        torch.Size([2, 32, 64])
    """

    def __init__(self, dim: int, num_heads: int, window: int = 512, sinks: int = 4, num_kv_heads: int | None = None):
        window, sinks = check_positive_int(window, "window"), check_positive_int(sinks, "sinks")
        pattern = (SlidingWindow(left=window - 1) | Sinks(sinks)) & Causal()
        super().__init__(dim, num_heads, pattern, num_kv_heads, causal=True,
                         keep=lambda p, nxt: (p < sinks) | (p > nxt - window))
        self.window, self.sinks = window, sinks


register(Mechanism(
    name="streaming_llm", paper="Efficient Streaming Language Models with Attention Sinks (ICLR 2024)",
    repo="mit-han-lab/streaming-llm", cls=StreamingLLMAttention,
    make=lambda dim, num_heads, **kw: StreamingLLMAttention(dim, num_heads, **kw),
    notes="window 512 + 4 sinks; decode cache <= sinks + window keys; keys keep their own rotary positions",
    patterns={"CS": {}}, why_not={
        "NS": "a decoding-time cache policy of causal LMs (sinks hold the softmax mass of a causal prefix); the "
              "bidirectional window + global tokens is longformer(causal=False)",
        "NC": POSITIONS_SHARED, "CC": POSITIONS_SHARED}, family="local+global", dims=("1d",)))
