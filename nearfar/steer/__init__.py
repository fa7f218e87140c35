"""Read and steer attention on fused and sparse engines.

Methods that read an existing model's attention (VL-SAM, VAR, VHD/VHR, AGLA, circuit analysis) or change it (the
diffusion editing methods: Detector Guidance, A-STAR, DesignEdit, DiffUHaul, PrimeComposer, MAKIMA, ...) need the
attention probabilities, which fused kernels never materialise. Every nearfar engine returns the per-row
log-sum-exp, from which exact rows, group masses and column aggregates of ``P`` can be recomputed in bounded memory;
edits compile to what fused engines take (a bias, a pattern, changed K/V, changed head outputs).

- statistics of ``P`` from q, k and the LSE, without the matrix: ``prob_rows``, ``group_mass``, ``received``
  (and ``score_rows``, the masked scores of chosen rows);
- sites and token groups: ``find_sites``, ``Site``, ``TokenGroups``;
- ``control(model, [(selector, edit, when)])``: edits and captures at chosen sites and steps (``steps``,
  ``layers``);
- edits: ``Bias``, ``KeyMask``, ``PairMask``, ``Modulate``, ``Temperature`` (scores); ``Rescale``,
  ``Redistribute``, ``ReplaceMap`` (probabilities); ``InjectKV`` (keys and values); ``ScaleHeads``,
  ``AblateHeads`` (heads); ``Capture``;
- patching: ``PatchHeads`` (head outputs, q/k/v or maps from ``FromBatch``/``FromRecord`` sources),
  ``ForcePattern``, ``path_patch``;
- branches: ``run_branches`` (several inputs in one batched forward), ``combine_logits`` (contrastive or additive
  logits with the adaptive plausibility constraint);
- aggregation over heads and layers: ``head_weights``, ``rollout``, ``attention_flow``;
- metrics: ``head_divergence``, ``massive_dims``, ``sink_tokens``, ``map_overlap``, ``map_retention``,
  ``entropy``, ``spatial_entropy``, ``mass_on``;
- selection and masks from maps: ``topk_tokens``, ``smooth_map``, ``mask_from_map``, ``argmax_masks``,
  ``sample_points``, ``attention_gradcam``.
"""

from __future__ import annotations

from .aggregate import attention_flow, head_weights, rollout
from .branches import combine_logits, run_branches
from .edits import AblateHeads, Bias, Edit, KeyMask, Modulate, PairMask, Rescale, ScaleHeads, State, Temperature
from .inject import InjectKV
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
from .patching import ForcePattern, PatchHeads, ReplaceMap, path_patch
from .redistribute import Redistribute
from .sites import Site, TokenGroups, find_sites, register_site_rule
from .sources import FromBatch, FromRecord
from .stats import group_mass, prob_rows, received, score_rows
from .steering import Capture, Control, control, layers, steps
from .tokens import TokenSelection, token_mask

__all__ = [
    "AblateHeads",
    "Bias",
    "Capture",
    "Control",
    "Edit",
    "ForcePattern",
    "FromBatch",
    "FromRecord",
    "InjectKV",
    "KeyMask",
    "Modulate",
    "PairMask",
    "PatchHeads",
    "PointPrompts",
    "Redistribute",
    "ReplaceMap",
    "Rescale",
    "ScaleHeads",
    "Site",
    "State",
    "Temperature",
    "TokenGroups",
    "TokenSelection",
    "TopTokens",
    "argmax_masks",
    "attention_flow",
    "attention_gradcam",
    "combine_logits",
    "control",
    "entropy",
    "find_sites",
    "group_mass",
    "head_divergence",
    "head_weights",
    "layers",
    "map_overlap",
    "map_retention",
    "mask_from_map",
    "mass_on",
    "massive_dims",
    "path_patch",
    "prob_rows",
    "received",
    "register_site_rule",
    "rollout",
    "run_branches",
    "sample_points",
    "score_rows",
    "sink_tokens",
    "smooth_map",
    "spatial_entropy",
    "steps",
    "token_mask",
    "topk_tokens",
]
