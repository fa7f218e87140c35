"""Read and steer attention on fused and sparse engines.

Methods that read an existing model's attention (VL-SAM, VAR, VHD/VHR, AGLA, circuit analysis) or change it (the
diffusion editing methods: Detector Guidance, A-STAR, DesignEdit, DiffUHaul, PrimeComposer, MAKIMA, ...) need the
attention probabilities, which fused kernels never materialise. Every nearfar engine returns the per-row
log-sum-exp, from which exact rows, group masses and column aggregates of ``P`` can be recomputed in bounded memory
(``nearfar.steer.stats``); metrics, aggregations over heads and layers, and masks made from maps live beside them.
"""

from __future__ import annotations

from .aggregate import attention_flow, head_weights, rollout
from .masks import (
    PointPrompts,
    TopTokens,
    argmax_masks,
    attention_gradcam,
    mask_from_map,
    sample_points,
    smooth_map,
    topk_tokens,
)
from .metrics import (
    entropy,
    head_divergence,
    map_overlap,
    map_retention,
    mass_on,
    massive_dims,
    sink_tokens,
    spatial_entropy,
)
from .tokens import TokenSelection, token_mask

__all__: list[str] = []
__all__ += [
    "PointPrompts",
    "TokenSelection",
    "TopTokens",
    "argmax_masks",
    "attention_flow",
    "attention_gradcam",
    "entropy",
    "head_divergence",
    "head_weights",
    "map_overlap",
    "map_retention",
    "mask_from_map",
    "mass_on",
    "massive_dims",
    "rollout",
    "sample_points",
    "sink_tokens",
    "smooth_map",
    "spatial_entropy",
    "token_mask",
    "topk_tokens",
]
