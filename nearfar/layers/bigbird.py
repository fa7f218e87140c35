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
    ``global_blocks`` global blocks and ``random_blocks`` random blocks (``nearfar.RandomBlocks``)."""

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
