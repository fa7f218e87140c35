"""Longformer: a sliding window plus global tokens, as a sequence layer (causal or bidirectional).

Paper: Beltagy et al., "Longformer: The Long-Document Transformer" (2020). Official code: allenai/longformer
(``longformer/longformer.py``, ``LongformerSelfAttention``).

Differences from the official code: one set of projections for local and global attention (the paper's separate
global q/k/v projections are not implemented); global tokens are the first ``global_tokens`` positions; no
dilation. A window of ``window`` keys in the causal form is ``SlidingWindow(left=window - 1) & Causal()``.
"""

from __future__ import annotations

from ..checks import check_bool, check_positive_int
from ..patterns import Causal, GlobalTokens, SlidingWindow
from .pattern_attention import PatternAttention
from .registry import ENCODER_DECODER_DENSE, Mechanism, register


class LongformerAttention(PatternAttention):
    """``LongformerAttention(dim, num_heads, window=512, global_tokens=1, causal=True, num_kv_heads=None)``: a
    sliding window (causal: ``window`` keys back; else ``window // 2`` each side) plus the first
    ``global_tokens`` tokens, which attend and are attended by all. Causal cache: globals + the window.

    Beltagy et al., "Longformer: The Long-Document Transformer" (2020); official code: allenai/longformer.
    ``forward`` and ``new_cache`` are ``PatternAttention``'s.

    Args:
        dim: Model width, a positive multiple of ``num_heads`` with an even head dim (RoPE).
        num_heads: Number of query heads, >= 1.
        window: Sliding-window size, >= 1 (default 512): causal, ``window`` keys back (itself included); else
            ``window // 2`` keys on each side.
        global_tokens: Number of leading global tokens, >= 1 (default 1).
        causal: Causal (CS, default True) or bidirectional (NS, False).
        num_kv_heads: Number of key/value heads (GQA), dividing ``num_heads``; None (default): ``num_heads``.

    Raises:
        TypeError: ``window``, ``global_tokens`` or ``num_kv_heads`` is not an int, or ``causal`` not a bool.
        ValueError: ``window`` or ``global_tokens`` < 1; ``dim`` is not a positive multiple of ``num_heads``;
            ``num_kv_heads`` does not divide ``num_heads``.

    Examples:
        >>> import torch
        >>> from nearfar import LongformerAttention
        >>> layer = LongformerAttention(64, 4, window=8, global_tokens=2, causal=False)
        >>> layer(torch.randn(2, 32, 64)).shape
        torch.Size([2, 32, 64])
    """

    def __init__(self, dim: int, num_heads: int, window: int = 512, global_tokens: int = 1, causal: bool = True,
                 num_kv_heads: int | None = None):
        window, g = check_positive_int(window, "window"), check_positive_int(global_tokens, "global_tokens")
        causal = check_bool(causal, "causal")
        local = SlidingWindow(left=window - 1) if causal else SlidingWindow(left=window // 2, right=window // 2)
        pattern = (local | GlobalTokens(g)) & Causal() if causal else local | GlobalTokens(g)
        super().__init__(dim, num_heads, pattern, num_kv_heads, causal=causal,
                         keep=lambda p, nxt: (p < g) | (p > nxt - window))
        self.window, self.global_tokens = window, g


register(Mechanism(
    name="longformer", paper="Longformer: The Long-Document Transformer (2020)", repo="allenai/longformer",
    cls=LongformerAttention, make=lambda dim, num_heads, **kw: LongformerAttention(dim, num_heads, **kw),
    notes="window 512 (causal: left only) + first token global; causal=False for the bidirectional form",
    patterns={"NS": {"causal": False}, "CS": {"causal": True}},
    why_not=ENCODER_DECODER_DENSE, family="local+global", dims=("1d",)))
