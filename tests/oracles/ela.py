"""ELA the way the paper describes it and its third-party ports compute it (Xu & Wan, arXiv 2403.01123; no
official repository): channels-first ``(B, C, H, W)``, strip means, the shared ``Conv1d`` and ``GroupNorm``
called once per axis, two broadcast products. Used for the vision benchmark's baseline and as a test oracle."""

from __future__ import annotations

import torch

from nearfar.layers.ela import ELA


def ela_baseline(m: ELA, x: torch.Tensor) -> torch.Tensor:
    xc = x.permute(0, 3, 1, 2)
    a_h = m.gn(m.conv(xc.mean(dim=3))).sigmoid()[..., None]  # (B, C, H, 1)
    a_w = m.gn(m.conv(xc.mean(dim=2))).sigmoid()[..., None, :]  # (B, C, 1, W)
    return (xc * a_h * a_w).permute(0, 2, 3, 1)


BASELINES = {"ela": ela_baseline}
