"""A bounded KV cache for Hugging Face generation: the first ``sinks`` and the last ``window`` keys of each layer.

``SinkWindowCache`` is a transformers ``Cache`` whose layers (``SinkWindowLayer``) keep the keys and values at
positions ``< sinks`` and the last ``window - 1`` between calls, so a generation from a prompt of any length holds
at most ``sinks + window`` keys per layer. It serves layers that run a nearfar pattern reaching no other key
(``nearfar.integrations.transformers_patterns.use_pattern``); each such layer checks that before attending.

StreamingLLM: Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024, arXiv
2309.17453). Official code: mit-han-lab/streaming-llm, ``streaming_llm/kv_cache.py`` (``StartRecentKVCache``:
the first ``start_size`` and last ``recent_size`` entries) and ``streaming_llm/pos_shift/modify_llama.py``
(``llama_pos_shift_attention_forward``: rotary positions by slot in the cache).

Positions: keys keep the rotary position of their token (transformers rotates them before the cache sees them)
and the pattern is on token indices, so a generation through ``SinkWindowCache`` equals, token for token, the
forward pass of the whole sequence under the same pattern (the teacher-forced model), however the prompt is
chunked. We chose that over the official position shift because it keeps the model one function (prefill, chunked
prefill and decoding agree, and any pattern, Longformer's or MoA's too, decodes exactly), and it differs from the
official code in three ways:

- the official ``pos_shift`` stores keys unrotated and rotates them by their slot in the cache at every step (the
  query at the slot after the last), so positions never exceed the cache size; here a position grows with the
  context, so the model must be used within the positions it was trained for (``max_position_embeddings``, or
  its RoPE scaling). Under RoPE only relative offsets count, and the two differ only in the offset between a query
  and its sinks (here its true distance, there the distance as if the sinks sat just before the window);
- the official generation attends a whole new prompt densely (``evict_for_space`` makes room for it first); here
  every prompt token already sees only its sinks and window;
- between calls the cache holds ``sinks + window - 1`` keys and a decoding step attends ``sinks + window`` (the
  window counts the query's own key, as transformers' ``sliding_window`` and ``nearfar.StreamingLLMAttention``
  do); the official cache keeps ``start_size + recent_size`` and the next token sees one more.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from ..checks import check_nonneg_int, check_positive_int
from ..patterns import Pattern

__all__ = ["SinkWindowCache", "SinkWindowLayer", "cache_bounds", "unreachable_key"]

_PROBE = 64  # queries past the first eviction that unreachable_key checks


class SinkWindowLayer(CacheLayerMixin):
    """One layer of ``SinkWindowCache``: after each ``update`` it keeps the keys/values at positions ``< sinks`` and
    the last ``window - 1`` (the next token's window, its own key aside); ``update`` returns those plus the new ones.

    Args:
        sinks: Leading positions kept, >= 0.
        window: Keys a query sees in its recent past, its own included, >= 1.
    """

    is_sliding = False  # its masks are sized for the whole sequence (get_mask_sizes); it takes only the padding
    is_compileable = False

    def __init__(self, sinks: int, window: int):
        super().__init__()
        self.sinks, self.window = sinks, window
        self.cumulative_length = 0  # tokens seen
        self.last_update = (0, 0)  # (tokens seen before, tokens added) of the last update

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys, self.values = key_states[:, :, :0].clone(), value_states[:, :, :0].clone()
        self.is_initialized = True

    def kept_positions(self, seen: int) -> torch.Tensor:
        """Positions of the keys held after ``seen`` tokens: ``[0, min(sinks, seen))`` then the last ``window - 1``."""
        s = min(self.sinks, seen)
        return torch.cat([torch.arange(s), torch.arange(max(s, seen - self.window + 1), seen)]).to(self.device)

    def returned_positions(self) -> torch.Tensor:
        """Positions of the keys the last ``update`` returned (held ones, then the new ones)."""
        seen, n = self.last_update
        return torch.cat([self.kept_positions(seen), torch.arange(seen, seen + n, device=self.device)])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None  # set by lazy_initialization
        seen, n = self.cumulative_length, key_states.shape[-2]
        if self.keys.shape[-2]:
            keys, values = torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)
        else:  # nothing held: the new states are the whole answer (no copy of a long prompt)
            keys, values = key_states, value_states
        self.last_update, self.cumulative_length = (seen, n), seen + n
        total, length = seen + n, keys.shape[-2]
        a = min(self.sinks, total)  # every position < sinks is held (never evicted)
        b = min(total - a, self.window - 1)  # and the last window - 1 (held ones and new ones are contiguous)
        if a + b < length:  # cat copies: the stored tensors never keep a long prompt's states alive
            self.keys = torch.cat([keys[:, :, :a], keys[:, :, length - b:]], -2)
            self.values = torch.cat([values[:, :, :a], values[:, :, length - b:]], -2)
        else:
            self.keys, self.values = keys, values
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # masks span the whole sequence: the layer reads the padding of its keys at their positions
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1  # no limit on the sequence: the memory is bounded, not the length

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.cumulative_length, self.last_update = 0, (0, 0)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SinkWindowCache cannot be cropped: evicted keys are gone (assisted or "
                                  "speculative decoding needs a cache that keeps every key)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.keys is not None and self.values is not None:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.keys is not None and self.values is not None:
            self.keys, self.values = self.keys[indices], self.values[indices]

    def __repr__(self) -> str:
        return f"SinkWindowLayer(sinks={self.sinks}, window={self.window}, seen={self.cumulative_length})"


class SinkWindowCache(Cache):
    """A transformers ``Cache`` that holds, per layer, the keys/values at positions ``< sinks`` and the last
    ``window - 1`` (StreamingLLM's ``StartRecentKVCache``): at most ``sinks + window - 1`` between calls, ``sinks +
    window`` during a decoding step, whatever the length of the prompt.

    Pass it to ``model.generate(..., past_key_values=cache)`` (transformers 5: ``cache=cache``) or to the model's
    forward, on a model whose layers run a pattern (``use_pattern``) that reaches no other key; each layer checks that
    before attending. ``get_seq_length()`` counts every token seen (positions go on growing).

    Args:
        sinks: Leading positions every layer keeps, >= 0 (StreamingLLM: 4).
        window: Keys a query sees in its recent past, its own included, >= 1.
        full_layers: Layer indices whose cache keeps every key (layers ``use_pattern`` left alone).

    Raises:
        TypeError: ``sinks``, ``window`` or a layer index is not an int.
        ValueError: ``sinks`` < 0, ``window`` < 1 or a layer index < 0.

    Examples:
        >>> import torch
        >>> from nearfar.integrations.transformers_cache import SinkWindowCache
        >>> cache = SinkWindowCache(sinks=2, window=4)
        >>> k = torch.randn(1, 2, 10, 8)
        >>> cache.update(k, k, 0)[0].shape      # the prefill's keys, all of them, for this call
        torch.Size([1, 2, 10, 8])
        >>> cache.layers[0].keys.shape, cache.get_seq_length()   # then 2 sinks + the last 3
        (torch.Size([1, 2, 5, 8]), 10)
        >>> cache.layers[0].returned_positions().tolist()
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
        >>> cache.update(k[:, :, :1], k[:, :, :1], 0)[0].shape   # a decoding step: sinks + window keys
        torch.Size([1, 2, 6, 8])
        >>> cache.layers[0].returned_positions().tolist()
        [0, 1, 7, 8, 9, 10]
    """

    def __init__(self, sinks: int, window: int, *, full_layers: Iterable[int] = ()):
        self.sinks = check_nonneg_int(sinks, "sinks")
        self.window = check_positive_int(window, "window")
        self.full_layers = frozenset(check_nonneg_int(i, "full_layers[...]") for i in full_layers)
        super().__init__(layers=[])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.layers) <= layer_idx:  # layers are made on first use, as DynamicCache's
            i = len(self.layers)
            self.layers.append(DynamicLayer() if i in self.full_layers else SinkWindowLayer(self.sinks, self.window))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @classmethod
    def for_model(cls, model: nn.Module) -> SinkWindowCache:
        """The smallest ``SinkWindowCache`` for the patterns ``use_pattern`` put on ``model``: the largest sinks and
        window over its layers (read from each pattern), every other layer kept in full.

        Raises:
            ValueError: No layer of ``model`` runs a pattern, or a pattern is not "leading keys plus a recent
                window" (found on a probe of up to 4M positions), so no such cache holds its keys.
        """
        from .transformers_patterns import attention_layers, patterns  # it imports this module

        found = patterns(model)
        if not found:
            raise ValueError("no layer of model runs a nearfar pattern: call use_pattern(model, pattern) first")
        bounds = [cache_bounds(p) for p in found.values()]
        layers = attention_layers(model)
        return cls(max(s for s, _ in bounds), max(w for _, w in bounds),
                   full_layers=[i for i in layers if i not in found])

    def __repr__(self) -> str:
        return f"SinkWindowCache(sinks={self.sinks}, window={self.window}, layers={self.layers})"


def _row(pattern: Pattern, q: torch.Tensor, n: int) -> torch.Tensor:
    """``pattern.allowed`` of the query positions ``q`` over keys ``0..n-1`` on an ``n``-token sequence, the union
    over heads: ``(len(q), n)``."""
    allowed = pattern.allowed(q[:, None], torch.arange(n)[None, :], n, n)
    allowed = allowed.expand(*allowed.shape[:-2], q.numel(), n)
    return allowed.any(0) if allowed.dim() == 3 else allowed


@functools.lru_cache(maxsize=128)
def unreachable_key(pattern: Pattern, sinks: int, window: int) -> str | None:
    """None when every key ``pattern`` lets a query attend is one that a cache of the first ``sinks`` and the last
    ``window`` positions (the query's own included) still holds, else a sentence naming the first query and key
    that break it. Checked on a probe: the 64 queries after the first eviction, on ``sinks + window + 64`` tokens.

    Args:
        pattern: A causal nearfar pattern (per-head patterns: the union of the heads).
        sinks: Leading positions held, >= 0.
        window: Recent positions held, the query's own included, >= 1.

    Returns:
        None, or e.g. ``"query 11 attends key 0, which a cache of the first 0 and last 8 positions no longer holds"``.

    Examples:
        >>> import nearfar as nf
        >>> from nearfar.integrations.transformers_cache import unreachable_key
        >>> streaming = (nf.Sinks(4) | nf.SlidingWindow(left=15)) & nf.Causal()
        >>> unreachable_key(streaming, 4, 16) is None
        True
        >>> unreachable_key(streaming, 0, 16)
        'query 16 attends key 0, which a cache of the first 0 and last 16 positions no longer holds'
    """
    n = sinks + window + _PROBE
    q = torch.arange(n - _PROBE - 1, n)
    k = torch.arange(n)[None, :]
    missing = _row(pattern, q, n) & ~((k < sinks) | ((k > q[:, None] - window) & (k <= q[:, None])))
    if not bool(missing.any()):
        return None
    i, j = (int(x) for x in torch.nonzero(missing)[0])
    return (f"query {int(q[i])} attends key {j}, which a cache of the first {sinks} and last {window} positions "
            f"no longer holds")


@functools.lru_cache(maxsize=128)
def cache_bounds(pattern: Pattern) -> tuple[int, int]:
    """``(sinks, window)`` of the smallest ``SinkWindowCache`` that holds every key ``pattern`` reaches: read from
    the row of a query far from the start (the first length of 256, 1024, ... 4M tokens where that row has a gap),
    then checked with ``unreachable_key``.

    Args:
        pattern: A causal nearfar pattern (per-head patterns: the union of the heads).

    Returns:
        ``(sinks, window)``: leading positions and recent positions (the query's own included).

    Raises:
        ValueError: The pattern reaches keys between its leading ones and its window (e.g. ``Strided``), or every
            key up to 4M tokens (e.g. ``Causal()``): no such cache holds it.

    Examples:
        >>> import nearfar as nf
        >>> from nearfar.integrations.transformers_cache import cache_bounds
        >>> cache_bounds((nf.SlidingWindow(left=1023) | nf.GlobalTokens(2)) & nf.Causal())
        (2, 1024)
    """
    n = 256
    while n <= 1 << 22:
        row = _row(pattern, torch.tensor([n - 1]), n)[0]
        if not bool(row.all()):
            sinks = int(torch.nonzero(~row)[0])
            window = max(1, n - 1 - int(torch.nonzero(~row)[-1]))
            if n - sinks - window > _PROBE:
                if bool(row[sinks:n - window].any()):
                    raise ValueError(f"pattern {pattern!r} is not leading keys plus a recent window (query {n - 1} "
                                     f"attends keys between them): no SinkWindowCache holds its keys")
                err = unreachable_key(pattern, sinks, window)
                if err is not None:
                    raise ValueError(f"pattern {pattern!r}: {err}")
                return sinks, window
        n *= 4
    raise ValueError(f"pattern {pattern!r} reaches every key up to {1 << 22} positions: no bounded cache holds it")
