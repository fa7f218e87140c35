"""``CoreAndWindow``: the pattern of Core Context Aware attention's fused softmax (Chen et al., "Core Context Aware
Transformers for Long Context Language Modeling", ICML 2025; official code: chenyaofo/CCA-Attention).

Keys are ``[core tokens 0..C-1; raw tokens 0..N-1]``: core token ``c`` summarises token group ``c`` (``g``
tokens), and query ``i`` sees the ``m(i) = max(0, floor((i + 1 - s) / g))`` groups wholly before its local window
plus the raw keys ``m(i)*g .. i``, so the two sets tile the causal context exactly once.
"""

from __future__ import annotations

import torch

from .base import Pattern, Tiles


def core_counts(positions: torch.Tensor, window_size: int, group_size: int) -> torch.Tensor:
    """``m(i)``: how many core tokens query ``i`` sees (the groups wholly before its local window)."""
    return torch.div(positions + 1 - window_size, group_size, rounding_mode="floor").clamp_min(0)



def cca_allowed(q_pos: torch.Tensor, num_core: int, k_pos: torch.Tensor, window_size: int,
                group_size: int) -> torch.Tensor:
    """Bool ``(Nq, num_core + Nk)``: which of ``[core tokens 0..num_core-1; raw keys at k_pos]`` each query sees."""
    m = core_counts(q_pos, window_size, group_size)[:, None]
    core = torch.arange(num_core, device=q_pos.device)[None, :] < m
    raw = (k_pos[None, :] >= m * group_size) & (k_pos[None, :] <= q_pos[:, None])
    return torch.cat([core, raw], dim=1)



class CoreAndWindow(Pattern):
    """The fused softmax's pattern for a whole sequence: keys are ``[core tokens 0..C-1; raw tokens 0..N-1]`` and
    query ``i`` sees core tokens ``c < m(i)`` and raw tokens ``m(i)*g .. i`` (``cca_allowed`` as a pattern, so the
    block-sparse engine never forms the ``N x (C + N)`` mask).

    Args:
        num_core: Number of core tokens ``C`` at the front of the keys.
        window_size: The local window ``s`` in raw tokens.
        group_size: Tokens per core token ``g``.

    Examples:
        >>> import nearfar as nf
        >>> p = nf.CoreAndWindow(num_core=2, window_size=2, group_size=2)
        >>> p.mask(6, 2 + 6)[5].int().tolist()   # query 5: core tokens 0, 1 (raw 0..3), then raw keys 4, 5
        [1, 1, 0, 0, 0, 0, 1, 1]
    """

    def __init__(self, num_core: int, window_size: int, group_size: int):
        self.c, self.s, self.g = num_core, window_size, group_size

    def _m(self, i: torch.Tensor) -> torch.Tensor:
        return core_counts(i, self.s, self.g)

    def allowed(self, q: torch.Tensor, k: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        m = self._m(q)
        raw = k - self.c
        return torch.where(k < self.c, k < m, (raw >= m * self.g) & (raw <= q))

    def block_allowed(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        qlo, qhi = qt.bounds(qt.idx)
        klo, khi = kt.bounds(kt.idx)
        mlo, mhi = self._m(qlo), self._m(qhi)
        mlo, mhi, qhi2 = mlo[:, None], mhi[:, None], qhi[:, None]  # key tiles: (nTk,) or paired (nTq, M)
        core = (klo < self.c) & (klo < mhi)
        raw_lo, raw_hi = klo.clamp(min=self.c) - self.c, khi - self.c
        raw = (khi >= self.c) & (raw_hi >= mlo * self.g) & (raw_lo <= qhi2)
        return core | raw

    def _key(self) -> tuple:
        return ("CoreAndWindow", self.c, self.s, self.g)
