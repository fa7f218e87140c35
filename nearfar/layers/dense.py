"""Dense multi-head attention as a sequence layer: the full-attention control in every CAB pattern.

Paper: Vaswani et al., "Attention Is All You Need" (2017); the fused kernel is ``torch.nn.functional.
scaled_dot_product_attention`` through ``nearfar.attend``. This is the ceiling in every benchmark table and the
baseline every efficient mechanism is timed against.

    layer = DenseAttention(dim, num_heads, causal=True)                  # CS; causal=False: NS
    layer = DenseAttention(dim, num_heads, causal=True, cross=True)      # CC; causal=False: NC
    y = layer(x, context=source)                                         # cross: keys/values from source (B, M, dim)

Differences from the official (Transformer) layer: pre-norm and residual are the caller's (``tiny_lm.Block``);
self-attention uses RoPE (LLaMA-style) instead of sinusoidal absolute positions; cross-attention has no positions on
either side (as T5/BART), and a causal cross layer's decode cache holds the source's keys and values, projected
once at the first call (later calls may leave ``context`` out: the cached source is used).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_bool
from ..functional import attend, intercepted, merge_heads, split_heads
from ..patterns import Causal, Dense
from .kv_cache import DecodeState, KVCache
from .pattern_attention import PatternAttention
from .registry import Mechanism, register
from .rotary import rotary_qkv


class SourceCache(DecodeState):
    """A causal cross layer's decoding state: the source's projected keys/values and padding mask (set at the
    first call) and the number of target tokens seen."""

    def __init__(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(batch, device, dtype)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.length = 0

    def nbytes(self) -> int:
        return 0 if self.k is None or self.v is None else self.k.nbytes + self.v.nbytes


class DenseAttention(PatternAttention):
    """``DenseAttention(dim, num_heads, causal=True, cross=False, num_kv_heads=None, qkv_bias=False)``: x
    ``(B, N, dim)`` -> ``(B, N, dim)``; with ``cross=True`` call ``layer(x, context=(B, M, dim))``.

    Args:
        dim: Model width, a positive multiple of ``num_heads`` (an even head dim for self-attention, which uses RoPE).
        num_heads: Number of query heads, >= 1.
        causal: Causal self-attention (CS) or, with ``cross``, causal cross-attention (CC) (default True); False:
            NS / NC.
        cross: Cross-attention: keys and values from ``context (B, M, dim)``, every query sees the whole source
            (default False).
        num_kv_heads: Number of key/value heads (GQA), dividing ``num_heads``; None (default): ``num_heads``.
        qkv_bias: Biases on the q/k/v projections (default False).

    Raises:
        TypeError: ``causal`` or ``cross`` is not a bool; ``num_kv_heads`` is not an int.
        ValueError: ``dim`` is not a positive multiple of ``num_heads``; ``num_kv_heads`` does not divide
            ``num_heads``; an odd head dim for self-attention.

    Examples:
        >>> import torch
        >>> from nearfar import DenseAttention
        >>> DenseAttention(64, 4)(torch.randn(2, 16, 64)).shape
        torch.Size([2, 16, 64])
        >>> cross = DenseAttention(64, 4, causal=False, cross=True)
        >>> cross(torch.randn(2, 16, 64), context=torch.randn(2, 24, 64)).shape
        torch.Size([2, 16, 64])
    """

    def __init__(self, dim: int, num_heads: int, causal: bool = True, cross: bool = False,
                 num_kv_heads: int | None = None, qkv_bias: bool = False):
        check_bool(causal, "causal")
        check_bool(cross, "cross")
        pattern = Causal() if causal and not cross else Dense()
        super().__init__(dim, num_heads, pattern, num_kv_heads, causal=causal, rope=not cross, qkv_bias=qkv_bias)
        self.cross = cross

    def new_cache(self, batch: int = 1, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache | SourceCache:
        """An empty decoding cache for ``batch`` sequences (causal layers only).

        Args:
            batch: Number of sequences, >= 1.
            device: The cache's device; None (default): fixed by the first call.
            dtype: The cache's dtype; None (default): fixed by the first call.

        Returns:
            A ``KVCache`` of every key (self-attention), or a ``SourceCache`` (cross-attention) that holds the source's
            projected keys and values from the first call on (later calls may leave ``context`` out).

        Raises:
            ValueError: The layer is not causal (``causal=False``).
        """
        if not self.causal:
            raise ValueError("DenseAttention(causal=False) is not causal: it has no decoding cache")
        return (SourceCache if self.cross else KVCache)(batch, device=device, dtype=dtype)

    # PatternAttention.forward(x, cache, key_padding_mask) plus the cross layers' context, second as in the registry's
    # cross interface: an incompatible override by design (the sequence-layer interface passes cache by keyword)
    def forward(  # type: ignore[override]
            self, x: torch.Tensor, context: torch.Tensor | None = None, cache: KVCache | SourceCache | None = None,
            key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Dense attention of ``x``: self-attention, or cross-attention to ``context`` (``cross=True``).

        Args:
            x: Queries ``(B, N, dim)``: whole sequences, or with ``cache`` the next ``N`` tokens of each sequence.
            context: The source ``(B, M, dim)``, ``M >= 1`` (cross layers only; with a cache, needed at the first call
                only).
            cache: A decoding state from ``new_cache`` (None, the default: whole sequences).
            key_padding_mask: Optional bool mask of the keys, True = real: ``(B, N)`` for self-attention (not with
                ``cache``), ``(B, M)`` of the source for cross-attention.

        Returns:
            The output ``(B, N, dim)``.

        Raises:
            ValueError: ``x`` is not ``(B, N, dim)``; a ``context`` given to a self-attention layer, or a cross layer's
                ``context`` of another batch or width; ``cache`` made for another batch, device or dtype; a
                self-attention ``key_padding_mask`` with ``cache``.
            TypeError: ``cache`` does not come from this layer's ``new_cache``.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, N, {self.dim}), got {getattr(x, 'shape', type(x).__name__)}")
        if not self.cross:
            if context is not None:
                raise ValueError("context is for cross-attention layers: build DenseAttention(..., cross=True)")
            return self._self_attention(x, KVCache.checked(cache, x), key_padding_mask)
        cache = SourceCache.checked(cache, x)
        if cache is None or cache.k is None or cache.v is None:
            k, v = self.project_source(x, context, key_padding_mask)
            if cache is not None:
                cache.k, cache.v, cache.mask = k, v, key_padding_mask
        else:
            k, v, key_padding_mask = cache.k, cache.v, cache.mask
        q = split_heads(self.q_proj(x), self.num_heads)
        out = attend(q, k, v, key_padding_mask=key_padding_mask)
        if cache is not None:
            cache.length += x.shape[1]
        return self.o_proj(merge_heads(out, (x.shape[1],)))

    def _self_attention(self, x: torch.Tensor, cache: KVCache | None,
                        key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        n = x.shape[1]
        q, k, v, _ = rotary_qkv(self, x, 0 if cache is None else cache.length)
        if cache is not None:
            if key_padding_mask is not None:
                raise ValueError("key_padding_mask is for whole sequences; decode each sequence's real tokens")
            cache.append(k, v)
            ck, cv = cache.k, cache.v
            assert ck is not None and cv is not None  # appended to just now
            k, v = ck, cv
        if key_padding_mask is None and (cache is None or n == 1 or not self.causal) and not intercepted():
            # the fused kernel itself (this layer is the baseline others are timed against)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and cache is None,
                                                 enable_gqa=self.num_kv_heads != self.num_heads)
        else:  # padding, or a chunk of new tokens over a cache (causal, aligned at the last key)
            out = attend(q, k, v, self.pattern, key_padding_mask=key_padding_mask)
        return self.o_proj(merge_heads(out, (n,)))

    def project_source(self, x: torch.Tensor, context: object,
                       key_padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(context, torch.Tensor) or context.dim() != 3 or context.shape[-1] != self.dim \
                or context.shape[0] != x.shape[0] or context.shape[1] == 0:
            raise ValueError(f"context must be (B, M, {self.dim}) with x's batch {x.shape[0]} and M >= 1, got "
                             f"{getattr(context, 'shape', type(context).__name__)}")
        return split_heads(self.k_proj(context), self.num_kv_heads), split_heads(self.v_proj(context),
                                                                                 self.num_kv_heads)


_ALL = {"NS": {"causal": False}, "CS": {"causal": True}, "NC": {"causal": False, "cross": True},
        "CC": {"causal": True, "cross": True}}
register(Mechanism(
    name="dense", paper="Attention Is All You Need (NeurIPS 2017)",
    repo="pytorch/pytorch (scaled_dot_product_attention)",
    family="dense", dims=("1d",), cls=DenseAttention, patterns=_ALL, why_not={},
    make=lambda dim, num_heads, **kw: DenseAttention(dim, num_heads, **kw),
    notes="the full-attention control and timing baseline: fused SDPA, RoPE on self-attention, no positions on "
          "cross-attention; decode cache: every key (self) or the projected source (cross)"))
