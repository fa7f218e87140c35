"""The pattern algebra: a pattern says which (query, key) pairs may attend.

A pattern is a small function of indices, as in FlexAttention's ``mask_mod``: ``allowed(q, k, nq, nk)``
takes broadcastable int64 tensors of *original* token indices and returns a bool tensor.
Every pattern also answers a conservative tile-level question, ``block_allowed``: may any query of a
query tile attend any key of a key tile? The block-sparse engine uses it to skip tiles without ever
evaluating all N² pairs; a superset is always safe because the exact ``allowed`` is applied inside.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .spatial import Layout

_BIG = 1 << 60


class Tiles:
    """Token tiles: ``idx[..., s]`` is the original index of slot ``s`` of a tile (``-1`` = empty slot).

    Query tiles are ``(nTq, T)``. Key tiles are ``(nTk, T)`` for the all-pairs question ``(nTq, nTk)``, or
    ``(nTq, M, T)`` for the paired question "may query tile t attend key tile (t, m)" ``(nTq, M)``; patterns
    write ``qvalue[:, None] OP kvalue`` so one expression serves both.
    """

    def __init__(self, idx: torch.Tensor) -> None:
        self.idx = idx
        self.valid = idx >= 0

    def bounds(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-tile (min, max) of ``values`` (same shape as ``idx``) over the occupied slots."""
        if values.shape[-1] == 1:  # one token per tile (key-by-key tests): no reduction needed
            v, ok = values[..., 0], self.valid[..., 0]
            return torch.where(ok, v, _BIG), torch.where(ok, v, -_BIG)
        lo = torch.where(self.valid, values, _BIG).amin(-1)
        hi = torch.where(self.valid, values, -_BIG).amax(-1)
        return lo, hi


def overlaps(alo: torch.Tensor, ahi: torch.Tensor, blo: torch.Tensor, bhi: torch.Tensor) -> torch.Tensor:
    """Closed interval ``[alo, ahi]`` of a query tile (nTq,) meets ``[blo, bhi]`` of a key tile ((nTk,) or (nTq, M))."""
    return (alo[:, None] <= bhi) & (blo <= ahi[:, None])


def per_query_tile(keyside: torch.Tensor, qt: Tiles) -> torch.Tensor:
    """Broadcast a key-tile-only answer to ``(nTq, nTk)`` (or keep a paired ``(nTq, M)`` answer)."""
    return keyside.expand(qt.idx.shape[0], keyside.shape[-1]) if keyside.dim() == 1 else keyside


def spatial_ndim(grid: tuple | None, **per_axis_args: object) -> int:
    """Dimensionality implied by ``grid`` or by the per-axis tuple arguments (1D when neither)."""
    tuples = {name: len(a) for name, a in per_axis_args.items() if isinstance(a, (tuple, list))}
    lengths = set(tuples.values())
    if grid is not None:
        return len(grid)
    if len(lengths) > 1:
        said = ", ".join(f"{name} has {n}" for name, n in tuples.items())
        raise ValueError(f"per-axis arguments disagree on the number of axes ({said}); give tuples of one length")
    ndim = lengths.pop() if lengths else 1
    if ndim > 1:
        raise ValueError(f"grid is required for a {ndim}D pattern: pass grid=(extent, ...) with {ndim} values")
    return ndim


def unravel(idx: torch.Tensor, grid: Sequence[int]) -> list[torch.Tensor]:
    """Row-major coordinates of flat indices (last axis fastest)."""
    coords = []
    for extent in reversed(grid[1:]):
        coords.append(idx % extent)
        idx = idx // extent
    coords.append(idx)
    return coords[::-1]


class Pattern:
    """Base class. Subclasses implement ``allowed`` and ``block_allowed`` and describe themselves by ``_key``.

    ``allowed(q, k, nq, nk)`` is the exact predicate on broadcastable int64 index tensors and
    ``block_allowed(qt, kt, nq, nk)`` a conservative tile-level answer; combine patterns with ``|`` and ``&``.

    Examples:
        >>> import nearfar as nf
        >>> p = (nf.SlidingWindow(left=1) | nf.Sinks(1)) & nf.Causal()
        >>> p.mask(4, 4).int().tolist()
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 1, 1]]
    """

    #: a hint that the pattern's token tiles may attend exactly to themselves (windows); whether they do for a
    #: given size is decided once, by the plan (``Plan.partition``), and then the ``partition`` engine can run it
    #: (a property here so that a combination can compute it; subclasses may set a plain class attribute)
    @property
    def may_partition(self) -> bool:
        return False

    #: spatial layout hint ``(grid, dilation)`` for token ordering, or None (1D order is kept)
    def layout(self, nq: int, nk: int) -> Layout | None:
        return None

    def check(self, nq: int, nk: int) -> None:
        """Raise ValueError if the pattern cannot be applied to ``nq`` queries and ``nk`` keys.

        Args:
            nq: Number of queries.
            nk: Number of keys.

        Raises:
            ValueError: If the pattern cannot be applied to these sizes (e.g. a grid whose size is not ``nq``).
        """

    def allowed(self, q: torch.Tensor, k: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        raise NotImplementedError

    def block_allowed(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        return per_query_tile(torch.ones(kt.idx.shape[:-1], dtype=torch.bool, device=qt.idx.device), qt)

    def block_full(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        """Conservative tile-level answer to "may every occupied query slot of the tile attend every occupied key
        slot": True only where that is certain, and False is always safe (the pairs are then masked one by one).
        Same shapes as ``block_allowed``. The engine of run-time key blocks (``SelectedBlocks``) uses it to skip
        the token mask of whole blocks."""
        return torch.zeros_like(self.block_allowed(qt, kt, nq, nk))

    @property
    def heads(self) -> int | None:
        """Number of heads for a per-head pattern, None when the same for every head."""
        return None

    def mask(self, nq: int, nk: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Dense bool mask ``(nq, nk)`` (``(H, nq, nk)`` for per-head patterns); True = may attend.

        Args:
            nq: Number of queries (rows).
            nk: Number of keys (columns); with ``nq != nk`` positional patterns align the last query with the last key.
            device: Device of the mask (default: CPU).

        Returns:
            A bool tensor ``(nq, nk)``, or ``(H, nq, nk)`` for a ``PerHead`` pattern; True = may attend.

        Raises:
            ValueError: If the pattern cannot be applied to ``nq`` queries and ``nk`` keys (see ``check``).

        Examples:
            >>> import nearfar as nf
            >>> nf.Causal().mask(3, 3).int().tolist()
            [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
        """
        self.check(nq, nk)
        q = torch.arange(nq, device=device)[:, None]
        k = torch.arange(nk, device=device)[None, :]
        return self.allowed(q, k, nq, nk).expand(nq, nk).clone()

    def _key(self) -> tuple:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pattern) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        name, *args = self._key()
        return f"{name}({', '.join(map(repr, args))})"

    def __or__(self, other: Pattern) -> Pattern:
        return _combine(Union, self, other)

    def __and__(self, other: Pattern) -> Pattern:
        return _combine(Intersection, self, other)


def _combine(cls: type[_Binary], a: Pattern, b: Pattern) -> Pattern:
    if not isinstance(b, Pattern):
        return NotImplemented
    if isinstance(a, PerHead) or isinstance(b, PerHead):
        ha = a.patterns if isinstance(a, PerHead) else None
        hb = b.patterns if isinstance(b, PerHead) else None
        if ha is not None and hb is not None and len(ha) != len(hb):
            raise ValueError(f"PerHead patterns have different head counts: {len(ha)} and {len(hb)}")
        heads = ha if ha is not None else hb
        assert heads is not None  # a or b is a PerHead
        n = len(heads)
        return PerHead([cls((ha[h] if ha else a), (hb[h] if hb else b)) for h in range(n)])
    return cls(a, b)


class _Binary(Pattern):
    parts: tuple[Pattern, ...]
    _op: str

    def __init__(self, a: Pattern, b: Pattern) -> None:
        self.parts = tuple(p for x in (a, b) for p in (x.parts if type(x) is type(self) else (x,)))

    def layout(self, nq: int, nk: int) -> Layout | None:
        for p in self.parts:
            lay = p.layout(nq, nk)
            if lay is not None:
                return lay
        return None

    def check(self, nq: int, nk: int) -> None:
        for p in self.parts:
            p.check(nq, nk)

    def _key(self) -> tuple:
        return (type(self).__name__, *self.parts)

    def __repr__(self) -> str:
        return "(" + f" {self._op} ".join(map(repr, self.parts)) + ")"


class Union(_Binary):
    """``a | b``: a pair is allowed when either pattern allows it.

    Built by ``a | b``; nested unions flatten into one.

    Args:
        a: The first pattern.
        b: The second pattern.

    Examples:
        >>> import nearfar as nf
        >>> u = nf.SlidingWindow(left=1) | nf.Sinks(1)
        >>> u.mask(4, 4)[3].int().tolist()
        [1, 0, 1, 1]
    """

    _op = "|"

    def allowed(self, q: torch.Tensor, k: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        out = self.parts[0].allowed(q, k, nq, nk)
        for p in self.parts[1:]:
            out = out | p.allowed(q, k, nq, nk)
        return out

    def block_allowed(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        out = self.parts[0].block_allowed(qt, kt, nq, nk)
        for p in self.parts[1:]:
            out = out | p.block_allowed(qt, kt, nq, nk)
        return out

    def block_full(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:  # conservative: one part full
        out = self.parts[0].block_full(qt, kt, nq, nk)
        for p in self.parts[1:]:
            out = out | p.block_full(qt, kt, nq, nk)
        return out


class Intersection(_Binary):
    """``a & b``: a pair is allowed when both patterns allow it.

    Built by ``a & b``; nested intersections flatten into one.

    Args:
        a: The first pattern.
        b: The second pattern.

    Examples:
        >>> import nearfar as nf
        >>> p = nf.SlidingWindow(left=1, right=1) & nf.Causal()
        >>> p.mask(3, 3).int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """

    _op = "&"

    @property
    def may_partition(self) -> bool:  # windows of windows are windows (e.g. Swin's region mask, rolled)
        return any(p.may_partition for p in self.parts)

    def allowed(self, q: torch.Tensor, k: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        out = self.parts[0].allowed(q, k, nq, nk)
        for p in self.parts[1:]:
            out = out & p.allowed(q, k, nq, nk)
        return out

    def block_allowed(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        out = self.parts[0].block_allowed(qt, kt, nq, nk)
        for p in self.parts[1:]:
            out = out & p.block_allowed(qt, kt, nq, nk)
        return out

    def block_full(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        out = self.parts[0].block_full(qt, kt, nq, nk)
        for p in self.parts[1:]:
            out = out & p.block_full(qt, kt, nq, nk)
        return out


class PerHead(Pattern):
    """A different pattern for each query head: ``PerHead([p_0, ..., p_{H-1}])``.

    ``len(patterns)`` must equal the number of query heads passed to ``attend``.

    Combining a ``PerHead`` with ``|``/``&`` applies the other pattern to every head.

    Args:
        patterns: A non-empty list or tuple of (non-``PerHead``) patterns, one per query head.

    Raises:
        TypeError: If ``patterns`` is not a non-empty list/tuple of non-``PerHead`` patterns.
        ValueError: When combined with another ``PerHead`` of a different head count.

    Examples:
        >>> import torch, nearfar as nf
        >>> heads = nf.PerHead([nf.SlidingWindow(left=3), nf.SlidingWindow(left=7)]) & nf.Causal()
        >>> q = torch.randn(1, 2, 16, 8)
        >>> nf.attend(q, q, q, heads).shape
        torch.Size([1, 2, 16, 8])
    """

    def __init__(self, patterns: Sequence[Pattern]) -> None:
        if isinstance(patterns, Pattern) or not isinstance(patterns, (list, tuple)) or not patterns:
            raise TypeError("PerHead takes a non-empty list of patterns, one per query head")
        for i, p in enumerate(patterns):
            if not isinstance(p, Pattern) or isinstance(p, PerHead):
                raise TypeError(f"PerHead patterns[{i}] must be a (non-PerHead) Pattern, got {type(p).__name__}")
        self.patterns = tuple(patterns)

    @property
    def heads(self) -> int:
        return len(self.patterns)

    def layout(self, nq: int, nk: int) -> Layout | None:
        return self.patterns[0].layout(nq, nk)

    def check(self, nq: int, nk: int) -> None:
        for p in self.patterns:
            p.check(nq, nk)

    def allowed(self, q: torch.Tensor, k: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        return torch.stack([torch.broadcast_to(p.allowed(q, k, nq, nk), torch.broadcast_shapes(q.shape, k.shape))
                            for p in self.patterns])

    def block_allowed(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        return torch.stack([p.block_allowed(qt, kt, nq, nk) for p in self.patterns])

    def block_full(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        return torch.stack([p.block_full(qt, kt, nq, nk) for p in self.patterns])

    def mask(self, nq: int, nk: int, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.stack([p.mask(nq, nk, device) for p in self.patterns])

    def _key(self) -> tuple:
        return ("PerHead", self.patterns)

    def __repr__(self) -> str:
        return f"PerHead({list(self.patterns)!r})"


class Dense(Pattern):
    """Every query attends every key.

    The same as ``pattern=None`` in ``attend``.

    Examples:
        >>> import nearfar as nf
        >>> bool(nf.Dense().mask(3, 5).all())
        True
    """

    def allowed(self, q: torch.Tensor, k: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        return torch.ones(torch.broadcast_shapes(q.shape, k.shape), dtype=torch.bool, device=q.device)

    def block_full(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        return self.block_allowed(qt, kt, nq, nk)

    def _key(self) -> tuple:
        return ("Dense",)
