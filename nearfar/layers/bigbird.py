"""BigBird: block window, global blocks and random blocks, as a sequence layer (causal or bidirectional).

Paper: Zaheer et al., "Big Bird: Transformers for Longer Sequences" (NeurIPS 2020). Official code:
google-research/bigbird (``bigbird/core/attention.py``); the block pattern as MoA's ``gen_bigbird_pattern``
generates it.

Differences from the official code: random blocks come from a fixed hash of ``(seed, query block, draw)`` (the
same on every call and device), drawn among past blocks when causal; global blocks are the first
``global_blocks`` blocks (ITC). Its cache keeps every key, since random blocks reach anywhere in the past.
"""

from __future__ import annotations

from ..checks import check_bool, check_nonneg_int, check_positive_int
from ..patterns import BlockWindow, Causal, GlobalTokens, Pattern, RandomBlocks
from .pattern_attention import PatternAttention
from .registry import ENCODER_DECODER_DENSE, Mechanism, register


class BigBirdAttention(PatternAttention):
    """``BigBirdAttention(dim, num_heads, block=64, global_blocks=2, random_blocks=3, seed=0, causal=True,
    num_kv_heads=None)``: each query block sees its neighbour blocks (causal: the previous one and itself),
    ``global_blocks`` global blocks and ``random_blocks`` random blocks (``nearfar.RandomBlocks``).

    Zaheer et al., "Big Bird: Transformers for Longer Sequences" (NeurIPS 2020); official code:
    google-research/bigbird. ``forward`` and ``new_cache`` are ``PatternAttention``'s.

    Args:
        dim: Model width, a positive multiple of ``num_heads`` with an even head dim (RoPE).
        num_heads: Number of query heads, >= 1.
        block: Block size in tokens, >= 1 (default 64).
        global_blocks: Leading global blocks, >= 0 (default 2).
        random_blocks: Random key blocks per query block, >= 0 (default 3; 0: none).
        seed: Seed of the random blocks (default 0): the same blocks on every call.
        causal: Causal (CS, default True) or bidirectional (NS, False).
        num_kv_heads: Number of key/value heads (GQA), dividing ``num_heads``; None (default): ``num_heads``.

    Raises:
        TypeError: ``block``, ``global_blocks`` or ``random_blocks`` is not an int, or ``causal`` not a bool.
        ValueError: ``block`` < 1, ``global_blocks`` or ``random_blocks`` < 0; ``dim`` is not a positive multiple of
            ``num_heads``; ``num_kv_heads`` does not divide ``num_heads``.

    Examples:
        >>> import torch
        >>> from nearfar import BigBirdAttention
        >>> layer = BigBirdAttention(64, 4, block=4, global_blocks=1, random_blocks=1)
        >>> layer(torch.randn(2, 32, 64)).shape
        torch.Size([2, 32, 64])
    """

    def __init__(self, dim: int, num_heads: int, block: int = 64, global_blocks: int = 2, random_blocks: int = 3,
                 seed: int = 0, causal: bool = True, num_kv_heads: int | None = None):
        block = check_positive_int(block, "block")
        g = check_nonneg_int(global_blocks, "global_blocks")
        causal = check_bool(causal, "causal")
        pattern: Pattern = BlockWindow(block, 1, 0 if causal else 1)
        if g:
            pattern = pattern | GlobalTokens(g * block)
        if random_blocks:
            pattern = pattern | RandomBlocks(block, check_positive_int(random_blocks, "random_blocks"), seed, causal)
        if causal:
            pattern = pattern & Causal()
        super().__init__(dim, num_heads, pattern, num_kv_heads, causal=causal)
        self.block, self.global_blocks, self.random_blocks, self.seed = block, g, random_blocks, seed


register(Mechanism(
    name="bigbird", paper="Big Bird: Transformers for Longer Sequences (NeurIPS 2020)",
    repo="google-research/bigbird", cls=BigBirdAttention,
    make=lambda dim, num_heads, **kw: BigBirdAttention(dim, num_heads, **kw),
    notes="block 64: neighbour blocks + 2 global blocks + 3 seeded random blocks; the decode cache keeps every key "
          "(random blocks reach the whole past)",
    patterns={"NS": {"causal": False}, "CS": {"causal": True}}, why_not=ENCODER_DECODER_DENSE,
    family="local+global", dims=("1d",)))
