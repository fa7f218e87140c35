"""Read and steer attention on fused and sparse engines.

Methods that read an existing model's attention (VL-SAM, VAR, VHD/VHR, AGLA, circuit analysis) or change it (the
diffusion editing methods: Detector Guidance, A-STAR, DesignEdit, DiffUHaul, PrimeComposer, MAKIMA, ...) need the
attention probabilities, which fused kernels never materialise. Every nearfar engine returns the per-row
log-sum-exp, from which exact rows, group masses and column aggregates of ``P`` can be recomputed in bounded memory;
edits compile to what fused engines take (a bias, a pattern, changed K/V, changed head outputs).

- sites and token groups: ``find_sites``, ``Site``, ``TokenGroups``;
- ``control(model, [(selector, edit, when)])``: edits and captures at chosen sites and steps (``steps``,
  ``layers``);
- edits: ``Bias``, ``KeyMask``, ``Temperature``, ``Rescale``, ``ScaleHeads``, ``AblateHeads``; ``Capture``.
"""

from __future__ import annotations

from .edits import AblateHeads, Bias, Edit, KeyMask, Rescale, ScaleHeads, State, Temperature
from .sites import Site, TokenGroups, find_sites
from .steering import Capture, Control, control, layers, steps

__all__ = [
    "AblateHeads",
    "Bias",
    "Capture",
    "Control",
    "Edit",
    "KeyMask",
    "Rescale",
    "ScaleHeads",
    "Site",
    "State",
    "Temperature",
    "TokenGroups",
    "control",
    "find_sites",
    "layers",
    "steps",
]
