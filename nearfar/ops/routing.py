"""Routing ops of content-routed block-sparse attention, in plain torch (``nearfar.functional`` exports them).

The pieces that NSA, MoBA, SeerAttention and the Routing Transformer share, batched over batch, heads and blocks,
in three modules by concern; this module gathers their public names, so ``nearfar.ops.routing.topk_blocks`` and
the like stay where they were:

- ``nearfar.ops.block_scoring``: ``pool_blocks`` (one summary vector per block of tokens), ``block_scores``
  (query rows against pooled key blocks, block-causal, GQA group reduction) and ``block_attention_stat`` (the
  block max-pool or block mass of the exact softmax map: SeerAttention's distillation target); its docstring
  defines the rows of a score map and their current block.
- ``nearfar.ops.block_selection``: ``topk_blocks``, ``threshold_blocks``, ``nz_ratio_blocks`` (which key blocks
  each row keeps, with forced blocks) and ``kv_blocks_from_mask``, in FlexAttention's block-list format (defined
  in its docstring).
- ``nearfar.ops.kmeans_routing``: ``kmeans_route`` and ``ema_update_centroids``, the Routing Transformer's
  balanced top-w cluster assignment and its EMA k-means centroid update.

Papers and official code: MoBA (Lu et al., 2025) -- MoonshotAI/MoBA; NSA (Yuan et al., 2025) --
fla-org/flash-linear-attention; SeerAttention (Gao et al., 2024) -- microsoft/SeerAttention; Routing Transformer
(Roy et al., 2021) -- lucidrains/routing-transformer (the files and functions read are named in each module).
"""

from __future__ import annotations

from .block_scoring import block_attention_stat, block_scores, pool_blocks
from .block_selection import BlockSelection, kv_blocks_from_mask, nz_ratio_blocks, threshold_blocks, topk_blocks
from .kmeans_routing import ema_update_centroids, kmeans_route

__all__ = [
    "BlockSelection",
    "block_attention_stat",
    "block_scores",
    "ema_update_centroids",
    "kmeans_route",
    "kv_blocks_from_mask",
    "nz_ratio_blocks",
    "pool_blocks",
    "threshold_blocks",
    "topk_blocks",
]
