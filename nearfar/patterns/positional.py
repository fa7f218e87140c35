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

    def allowed(self, q: torch.Tensor, k: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        return k <= q + (nk - nq)

    def block_allowed(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        _, phi = _positions(qt, nq, nk)
        klo, _ = kt.bounds(kt.idx)
        return klo <= phi[:, None]

    def _key(self) -> tuple:
        return ("Causal",)


class SlidingWindow(Pattern):
    """Clipped band (Mistral / Longformer / StreamingLLM): key ``j`` allowed iff ``p - left <= j <= p + right``.

    Unlike ``Neighborhood`` the window does not slide inward at the borders: edge queries see fewer keys.
    """

    def __init__(self, left: int, right: int = 0):
        self.left = as_nonneg_int(left, "left")
        self.right = as_nonneg_int(right, "right")

    def allowed(self, q: torch.Tensor, k: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        p = q + (nk - nq)
        return (k >= p - self.left) & (k <= p + self.right)

    def block_allowed(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        plo, phi = _positions(qt, nq, nk)
        klo, khi = kt.bounds(kt.idx)
        return overlaps(plo - self.left, phi + self.right, klo, khi)

    def _key(self) -> tuple:
        return ("SlidingWindow", self.left, self.right)


class Strided(Pattern):
    """Key ``j`` allowed iff ``(j - offset) % stride == 0`` (every query sees the same strided keys)."""

    def __init__(self, stride: int, offset: int = 0):
        self.stride = as_positive_int(stride, "stride")
        self.offset = as_nonneg_int(offset, "offset")

    def allowed(self, q: torch.Tensor, k: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        return torch.remainder(k - self.offset, self.stride) == 0

    def block_allowed(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        klo, khi = kt.bounds(kt.idx)
        s, o = self.stride, self.offset
        hits = torch.div(khi - o, s, rounding_mode="floor") - torch.div(klo - 1 - o, s, rounding_mode="floor")
        return per_query_tile(hits > 0, qt)

    def _key(self) -> tuple:
        return ("Strided", self.stride, self.offset)


class Sinks(Pattern):
    """Every query may attend the first ``n`` keys (attention sinks, StreamingLLM)."""

    def __init__(self, n: int):
        self.n = as_positive_int(n, "n")

    def allowed(self, q: torch.Tensor, k: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        return (k < self.n) & (q >= 0)

    def block_allowed(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        klo, _ = kt.bounds(kt.idx)
        return per_query_tile(klo < self.n, qt)

    def _key(self) -> tuple:
        return ("Sinks", self.n)


class GlobalTokens(Pattern):
    """The first ``n`` tokens are global (Longformer / BigBird ITC): they attend every key and every
    query attends them. With ``Nq != Nk`` the first ``n`` queries and the first ``n`` keys are global."""

    def __init__(self, n: int):
        self.n = as_positive_int(n, "n")

    def allowed(self, q: torch.Tensor, k: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        return (q < self.n) | (k < self.n)

    def block_allowed(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        qlo, _ = qt.bounds(qt.idx)
        klo, _ = kt.bounds(kt.idx)
        return (qlo < self.n)[:, None] | (klo < self.n)

    def _key(self) -> tuple:
        return ("GlobalTokens", self.n)


class BlockWindow(Pattern):
    """BigBird's sliding blocks: the query in block ``b = p // block`` attends every key in blocks
    ``b - before .. b + after`` (block-aligned, unlike ``SlidingWindow``)."""

    def __init__(self, block: int, before: int = 1, after: int = 1):
        self.block = as_positive_int(block, "block")
        self.before = as_nonneg_int(before, "before")
        self.after = as_nonneg_int(after, "after")

    def allowed(self, q: torch.Tensor, k: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        qb, kb = torch.div(q + (nk - nq), self.block, rounding_mode="floor"), k // self.block
        return (kb >= qb - self.before) & (kb <= qb + self.after)

    def block_allowed(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        plo, phi = _positions(qt, nq, nk)
        klo, khi = kt.bounds(kt.idx)
        b = self.block
        return overlaps(torch.div(plo, b, rounding_mode="floor") - self.before,
                        torch.div(phi, b, rounding_mode="floor") + self.after, klo // b, khi // b)

    def _key(self) -> tuple:
        return ("BlockWindow", self.block, self.before, self.after)


def _mix(seed: int, qb: torch.Tensor, i: int) -> torch.Tensor:
    """A fixed integer hash of (seed, query block, draw): the same random blocks on every call and device."""
    h = (qb * 0x85EBCA6B + (seed * 0x9E3779B1 + i * 0xC2B2AE35)) & 0x7FFFFFFF
    h = h ^ (h >> 13)
    h = (h * 0x5BD1E995) & 0x7FFFFFFF
    return h ^ (h >> 15)


class RandomBlocks(Pattern):
    """BigBird's random attention: the query in block ``b`` attends ``r`` key blocks drawn from a fixed hash of
    ``(seed, b, draw)``: among blocks ``0 .. b-1`` when ``causal`` (block 0 draws none), else among all blocks.
    Draws may repeat or coincide with window/global blocks (then fewer distinct blocks are added)."""

    def __init__(self, block: int, r: int = 3, seed: int = 0, causal: bool = False):
        self.block = as_positive_int(block, "block")
        self.r = as_positive_int(r, "r")
        self.seed = as_nonneg_int(seed, "seed")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        self.causal = causal

    def drawn(self, qb: torch.Tensor, nk: int) -> torch.Tensor:
        """Random key blocks ``(..., r)`` of query blocks ``qb`` (-1 = none)."""
        space = qb if self.causal else torch.full_like(qb, -(-nk // self.block))
        draws = [torch.where(space > 0, _mix(self.seed, qb, i) % space.clamp(min=1), -1) for i in range(self.r)]
        return torch.stack(draws, -1)

    def allowed(self, q: torch.Tensor, k: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        qb = torch.div(q + (nk - nq), self.block, rounding_mode="floor")
        return (self.drawn(qb, nk) == (k // self.block)[..., None]).any(-1)

    def block_allowed(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        plo, phi = _positions(qt, nq, nk)
        b = self.block
        first, last = torch.div(plo, b, rounding_mode="floor"), torch.div(phi, b, rounding_mode="floor")
        span = int((last - first).max()) + 1 if last.numel() else 1
        qb = first[:, None] + torch.arange(span, device=first.device)  # (nTq, span) blocks the tile touches
        cand = torch.where((qb <= last[:, None])[..., None], self.drawn(qb, nk), -1).flatten(1)  # (nTq, span*r)
        klo, khi = kt.bounds(kt.idx)
        lo, hi = klo // b, khi // b
        if lo.dim() == 1:
            lo, hi = lo[None, None, :], hi[None, None, :]
        else:  # paired key tiles (nTq, M)
            lo, hi = lo[:, None, :], hi[:, None, :]
        c = cand[:, :, None]
        return ((c >= 0) & (c >= lo) & (c <= hi)).any(1)

    def _key(self) -> tuple:
        return ("RandomBlocks", self.block, self.r, self.seed, self.causal)


class BlockStrided(Pattern):
    """S2-Attention's vertical stride: key ``j`` allowed iff ``(j // block + offset) % stride == 0`` (whole key
    blocks at absolute block indices, so a head keeps the same blocks as the sequence grows)."""

    def __init__(self, block: int, stride: int, offset: int = 0):
        self.block = as_positive_int(block, "block")
        self.stride = as_positive_int(stride, "stride")
        self.offset = as_nonneg_int(offset, "offset")

    def allowed(self, q: torch.Tensor, k: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        return (torch.remainder(k // self.block + self.offset, self.stride) == 0) & (q >= 0)

    def block_allowed(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        klo, khi = kt.bounds(kt.idx)
        b, s, o = self.block, self.stride, self.offset
        first, last = klo // b + o, khi // b + o  # blocks the key tile touches, shifted by the offset
        hits = torch.div(last, s, rounding_mode="floor") - torch.div(first - 1, s, rounding_mode="floor")
        return per_query_tile(hits > 0, qt)

    def _key(self) -> tuple:
        return ("BlockStrided", self.block, self.stride, self.offset)
