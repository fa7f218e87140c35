"""Read and steer attention on fused and sparse engines.

Methods that read an existing model's attention (VL-SAM, VAR, VHD/VHR, AGLA, circuit analysis) or change it (the
diffusion editing methods: Detector Guidance, A-STAR, DesignEdit, DiffUHaul, PrimeComposer, MAKIMA, ...) need the
attention probabilities, which fused kernels never materialise. Every nearfar engine returns the per-row
log-sum-exp, from which exact rows, group masses and column aggregates of ``P`` can be recomputed in bounded memory
(``nearfar.steer.stats``); metrics, aggregations over heads and layers, and masks made from maps live beside them.
"""

from __future__ import annotations

from .stats import group_mass, prob_rows, received

__all__ = ["group_mass", "prob_rows", "received"]
