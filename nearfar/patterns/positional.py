"""1D positional patterns on the flat token index: causal, sliding window, strided, sinks, global tokens.

With ``Nq != Nk``, query ``i`` sits at key position ``i + (Nk - Nq)`` (bottom-right alignment, as in
FlashAttention and xformers), so decode and chunked prefill work unchanged.
"""

from __future__ import annotations

import torch

from .base import Pattern, Tiles, as_nonneg_int, as_positive_int, overlaps, per_query_tile


def _positions(qt: Tiles, nq: int, nk: int) -> tuple[torch.Tensor, torch.Tensor]:
    return qt.bounds(qt.idx + (nk - nq))


class Causal(Pattern):
    """Key ``j`` allowed for the query at position ``p`` iff ``j <= p``."""

    def allowed(self, q, k, nq, nk):
        return k <= q + (nk - nq)

    def block_allowed(self, qt, kt, nq, nk):
        _, phi = _positions(qt, nq, nk)
        klo, _ = kt.bounds(kt.idx)
        return klo <= phi[:, None]

    def _key(self):
        return ("Causal",)


class SlidingWindow(Pattern):
    """Clipped band (Mistral / Longformer / StreamingLLM): key ``j`` allowed iff ``p - left <= j <= p + right``.

    Unlike ``Neighborhood`` the window does not slide inward at the borders: edge queries see fewer keys.
    """

    def __init__(self, left: int, right: int = 0):
        self.left = as_nonneg_int(left, "left")
        self.right = as_nonneg_int(right, "right")

    def allowed(self, q, k, nq, nk):
        p = q + (nk - nq)
        return (k >= p - self.left) & (k <= p + self.right)

    def block_allowed(self, qt, kt, nq, nk):
        plo, phi = _positions(qt, nq, nk)
        klo, khi = kt.bounds(kt.idx)
        return overlaps(plo - self.left, phi + self.right, klo, khi)

    def _key(self):
        return ("SlidingWindow", self.left, self.right)


class Strided(Pattern):
    """Key ``j`` allowed iff ``(j - offset) % stride == 0`` (every query sees the same strided keys)."""

    def __init__(self, stride: int, offset: int = 0):
        self.stride = as_positive_int(stride, "stride")
        self.offset = as_nonneg_int(offset, "offset")

    def allowed(self, q, k, nq, nk):
        return torch.remainder(k - self.offset, self.stride) == 0

    def block_allowed(self, qt, kt, nq, nk):
        klo, khi = kt.bounds(kt.idx)
        s, o = self.stride, self.offset
        hits = torch.div(khi - o, s, rounding_mode="floor") - torch.div(klo - 1 - o, s, rounding_mode="floor")
        return per_query_tile(hits > 0, qt)

    def _key(self):
        return ("Strided", self.stride, self.offset)


class Sinks(Pattern):
    """Every query may attend the first ``n`` keys (attention sinks, StreamingLLM)."""

    def __init__(self, n: int):
        self.n = as_positive_int(n, "n")

    def allowed(self, q, k, nq, nk):
        return (k < self.n) & (q >= 0)

    def block_allowed(self, qt, kt, nq, nk):
        klo, _ = kt.bounds(kt.idx)
        return per_query_tile(klo < self.n, qt)

    def _key(self):
        return ("Sinks", self.n)


class GlobalTokens(Pattern):
    """The first ``n`` tokens are global (Longformer / BigBird ITC): they attend every key and every
    query attends them. With ``Nq != Nk`` the first ``n`` queries and the first ``n`` keys are global."""

    def __init__(self, n: int):
        self.n = as_positive_int(n, "n")

    def allowed(self, q, k, nq, nk):
        return (q < self.n) | (k < self.n)

    def block_allowed(self, qt, kt, nq, nk):
        qlo, _ = qt.bounds(qt.idx)
        klo, _ = kt.bounds(kt.idx)
        return (qlo < self.n)[:, None] | (klo < self.n)

    def _key(self):
        return ("GlobalTokens", self.n)
