"""1D positional patterns on the flat token index: causal, sliding window, strided, sinks, global tokens.

With ``Nq != Nk``, query ``i`` sits at key position ``i + (Nk - Nq)`` (bottom-right alignment, as in
FlashAttention and xformers), so decode and chunked prefill work unchanged.
"""

from __future__ import annotations

import torch

from ..checks import check_bool, check_nonneg_int, check_positive_int
from .base import Pattern, Tiles, overlaps, per_query_tile


def _positions(qt: Tiles, nq: int, nk: int) -> tuple[torch.Tensor, torch.Tensor]:
    return qt.bounds(qt.idx + (nk - nq))


class Causal(Pattern):
    """Key ``j`` allowed for the query at position ``p`` iff ``j <= p``.

    With ``Nq != Nk`` query ``i`` sits at position ``p = i + (Nk - Nq)`` (bottom-right alignment).

    Examples:
        >>> import nearfar as nf
        >>> nf.Causal().mask(2, 4).int().tolist()   # two new queries after two cached keys
        [[1, 1, 1, 0], [1, 1, 1, 1]]
    """

    def allowed(self, q: torch.Tensor, k: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        return k <= q + (nk - nq)

    def block_allowed(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        _, phi = _positions(qt, nq, nk)
        klo, _ = kt.bounds(kt.idx)
        return klo <= phi[:, None]

    def block_full(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        plo, _ = _positions(qt, nq, nk)
        _, khi = kt.bounds(kt.idx)
        return khi <= plo[:, None]

    def _key(self) -> tuple:
        return ("Causal",)


class SlidingWindow(Pattern):
    """Clipped band (Mistral / Longformer / StreamingLLM): key ``j`` allowed iff ``p - left <= j <= p + right``.

    Unlike ``Neighborhood`` the window does not slide inward at the borders: edge queries see fewer keys.

    A query sees ``left + right + 1`` keys (itself included) away from the borders, so the conventions of other
    libraries are off by one from ``left``: Hugging Face's ``sliding_window=W`` (Mistral, Qwen2, Gemma: W keys
    including the token itself) is ``SlidingWindow(left=W-1) & Causal()``; Longformer's ``attention_window=w`` is
    ``SlidingWindow(w // 2, w // 2)``; StreamingLLM with ``S`` sinks and ``R`` recent tokens is
    ``(SlidingWindow(left=R-1) | Sinks(S)) & Causal()``.

    Args:
        left: Keys before the query's position (>= 0), not counting the query itself.
        right: Keys after it (>= 0); 0 for a causal window.

    Raises:
        TypeError: If ``left`` or ``right`` is not an int.
        ValueError: If ``left`` or ``right`` is negative.

    Examples:
        >>> import nearfar as nf
        >>> mistral = nf.SlidingWindow(left=4096 - 1) & nf.Causal()   # HF sliding_window=4096
        >>> nf.SlidingWindow(left=2).mask(4, 4).sum(1).tolist()
        [1, 2, 3, 3]
    """

    def __init__(self, left: int, right: int = 0):
        self.left = check_nonneg_int(left, "left")
        self.right = check_nonneg_int(right, "right")

    def allowed(self, q: torch.Tensor, k: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        p = q + (nk - nq)
        return (k >= p - self.left) & (k <= p + self.right)

    def block_allowed(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        plo, phi = _positions(qt, nq, nk)
        klo, khi = kt.bounds(kt.idx)
        return overlaps(plo - self.left, phi + self.right, klo, khi)

    def block_full(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        plo, phi = _positions(qt, nq, nk)
        klo, khi = kt.bounds(kt.idx)
        return (klo >= (phi - self.left)[:, None]) & (khi <= (plo + self.right)[:, None])

    def _key(self) -> tuple:
        return ("SlidingWindow", self.left, self.right)


class Strided(Pattern):
    """Key ``j`` allowed iff ``(j - offset) % stride == 0`` (every query sees the same strided keys).

    Args:
        stride: Distance between the allowed keys (>= 1).
        offset: Index of the first allowed key (>= 0).

    Raises:
        TypeError: If an argument is not an int.
        ValueError: If ``stride < 1`` or ``offset < 0``.

    Examples:
        >>> import nearfar as nf
        >>> nf.Strided(3, offset=1).mask(1, 8).int().tolist()
        [[0, 1, 0, 0, 1, 0, 0, 1]]
    """

    def __init__(self, stride: int, offset: int = 0):
        self.stride = check_positive_int(stride, "stride")
        self.offset = check_nonneg_int(offset, "offset")

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
    """Every query may attend the first ``n`` keys (attention sinks, StreamingLLM).

    Args:
        n: Number of sink keys (>= 1).

    Raises:
        TypeError: If ``n`` is not an int.
        ValueError: If ``n < 1``.

    Examples:
        >>> import nearfar as nf
        >>> streaming = (nf.SlidingWindow(left=1023) | nf.Sinks(4)) & nf.Causal()   # 1024 recent keys + 4 sinks
        >>> nf.Sinks(2).mask(1, 4).int().tolist()
        [[1, 1, 0, 0]]
    """

    def __init__(self, n: int):
        self.n = check_positive_int(n, "n")

    def allowed(self, q: torch.Tensor, k: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        return (k < self.n) & (q >= 0)

    def block_allowed(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        klo, _ = kt.bounds(kt.idx)
        return per_query_tile(klo < self.n, qt)

    def block_full(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        _, khi = kt.bounds(kt.idx)
        return per_query_tile(khi < self.n, qt)

    def _key(self) -> tuple:
        return ("Sinks", self.n)


class GlobalTokens(Pattern):
    """The first ``n`` tokens are global (Longformer / BigBird ITC): they attend every key and every
    query attends them. With ``Nq != Nk`` the first ``n`` queries and the first ``n`` keys are global.

    Args:
        n: Number of global tokens (>= 1).

    Raises:
        TypeError: If ``n`` is not an int.
        ValueError: If ``n < 1``.

    Examples:
        >>> import nearfar as nf
        >>> longformer = nf.SlidingWindow(256, 256) | nf.GlobalTokens(1)   # attention_window=512, one global token
        >>> nf.GlobalTokens(1).mask(3, 3).int().tolist()
        [[1, 1, 1], [1, 0, 0], [1, 0, 0]]
    """

    def __init__(self, n: int):
        self.n = check_positive_int(n, "n")

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
    ``b - before .. b + after`` (block-aligned, unlike ``SlidingWindow``).

    Args:
        block: Block size in tokens (>= 1).
        before: Blocks before the query's block (>= 0).
        after: Blocks after it (>= 0); 0 for a causal block window (intersect with ``Causal()``).

    Raises:
        TypeError: If an argument is not an int.
        ValueError: If ``block < 1`` or ``before``/``after`` is negative.

    Examples:
        >>> import nearfar as nf
        >>> nf.BlockWindow(2, before=1, after=0).mask(6, 6)[4].int().tolist()
        [0, 0, 1, 1, 1, 1]
    """

    def __init__(self, block: int, before: int = 1, after: int = 1):
        self.block = check_positive_int(block, "block")
        self.before = check_nonneg_int(before, "before")
        self.after = check_nonneg_int(after, "after")

    def allowed(self, q: torch.Tensor, k: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        qb, kb = torch.div(q + (nk - nq), self.block, rounding_mode="floor"), k // self.block
        return (kb >= qb - self.before) & (kb <= qb + self.after)

    def block_allowed(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        plo, phi = _positions(qt, nq, nk)
        klo, khi = kt.bounds(kt.idx)
        b = self.block
        return overlaps(torch.div(plo, b, rounding_mode="floor") - self.before,
                        torch.div(phi, b, rounding_mode="floor") + self.after, klo // b, khi // b)

    def block_full(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        plo, phi = _positions(qt, nq, nk)
        klo, khi = kt.bounds(kt.idx)
        b = self.block
        first = torch.div(phi, b, rounding_mode="floor") - self.before
        last = torch.div(plo, b, rounding_mode="floor") + self.after
        return (torch.div(klo, b, rounding_mode="floor") >= first[:, None]) & \
            (torch.div(khi, b, rounding_mode="floor") <= last[:, None])

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
    Draws may repeat or coincide with window/global blocks (then fewer distinct blocks are added).

    Args:
        block: Block size in tokens (>= 1).
        r: Random key blocks drawn per query block (>= 1).
        seed: Seed of the fixed hash (>= 0): the same blocks on every call and device.
        causal: Draw only among earlier blocks (``0 .. b-1``).

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``block``/``r`` is < 1 or ``seed`` is negative.

    Examples:
        >>> import nearfar as nf
        >>> bigbird = nf.BlockWindow(64) | nf.GlobalTokens(128) | nf.RandomBlocks(64, r=3)
        >>> m = nf.RandomBlocks(4, r=1, causal=True).mask(16, 16)
        >>> bool(m[:4].any())   # block 0 has no earlier block to draw
        False
    """

    def __init__(self, block: int, r: int = 3, seed: int = 0, causal: bool = False):
        self.block = check_positive_int(block, "block")
        self.r = check_positive_int(r, "r")
        self.seed = check_nonneg_int(seed, "seed")
        check_bool(causal, "causal")
        self.causal = causal

    def drawn(self, qb: torch.Tensor, nk: int) -> torch.Tensor:
        """Random key blocks ``(..., r)`` of query blocks ``qb`` (-1 = none).

        Args:
            qb: Query block indices (any shape).
            nk: Number of keys (the non-causal draws range over ``ceil(nk / block)`` blocks).

        Returns:
            An int tensor ``(*qb.shape, r)`` of key block indices, ``-1`` where none is drawn.
        """
        space = qb if self.causal else torch.full_like(qb, (nk + self.block - 1) // self.block)
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
    blocks at absolute block indices, so a head keeps the same blocks as the sequence grows).

    Args:
        block: Block size in tokens (>= 1).
        stride: Every ``stride``-th key block is allowed (>= 1).
        offset: Shifts which blocks (>= 0): give each head its own offset with ``PerHead``.

    Raises:
        TypeError: If an argument is not an int.
        ValueError: If ``block``/``stride`` is < 1 or ``offset`` is negative.

    Examples:
        >>> import nearfar as nf
        >>> nf.BlockStrided(2, 3).mask(1, 12).int().tolist()
        [[1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0]]
    """

    def __init__(self, block: int, stride: int, offset: int = 0):
        self.block = check_positive_int(block, "block")
        self.stride = check_positive_int(stride, "stride")
        self.offset = check_nonneg_int(offset, "offset")

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
