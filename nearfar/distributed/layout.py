"""How a sequence (or a spatial map, along its first axis) is split across the ranks of a process group.

A ``Layout`` gives each rank an ordered list of half-open ranges of the flat (row-major) token index; every tensor
with a token axis (q, k, v, the output, their gradients, a key padding mask, position ids) is split the same way.
Shard sizes follow ``torch.tensor_split`` (the first ``n % world`` shards get one more), never ``torch.chunk``, which
makes the last shard short and can return fewer than ``world`` pieces (9 tokens over 4 ranks: 3 chunks).

``head_tail`` is the load-balanced causal split of PyTorch's context parallelism (``_HeadTailLoadBalancer`` in
``torch/distributed/tensor/experimental/_context_parallel/_load_balancer.py``): ``2 * world`` chunks, rank ``r``
holding chunks ``r`` and ``2 * world - 1 - r``, so every rank gets about the same number of causal pairs. What
differs from PyTorch: any length works (PyTorch needs ``n % (2 * world) == 0`` and skips the balancing otherwise),
and the layout stays a list of global ranges instead of an index permutation of the buffers.

Padding: tokens at flat index ``>= n_real`` are padding. They are never keys, their outputs are 0, and the pattern
is evaluated at length ``n_real`` (a neighborhood's border windows depend on the true extent).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..checks import check_grid, check_nonneg_int, check_positive_int

Ranges = tuple[tuple[int, int], ...]


def split_sizes(n: int, parts: int) -> list[int]:
    """``torch.tensor_split`` sizes: ``parts`` pieces, the first ``n % parts`` one longer."""
    base, extra = divmod(n, parts)
    return [base + (i < extra) for i in range(parts)]


def _bounds(sizes: Sequence[int]) -> list[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


@dataclass(frozen=True)
class Layout:
    """Global token ranges per rank; build one with ``contiguous``, ``slabs`` or ``head_tail``.

    Args:
        ranges: Per rank, its ordered half-open global ranges ``((lo, hi), ...)``; together they tile ``[0, n)``.
        n: Tokens in all (padding included).
        n_real: Tokens that are not padding (the flat indices ``[0, n_real)``); the pattern is evaluated at this
            length.
        grid: The spatial shape of the real tokens for a map split along its first axis (``slabs``), else None.

    Raises:
        ValueError: If the ranges do not tile ``[0, n)`` or ``n_real`` is out of ``[0, n]``.

    Examples:
        >>> from nearfar.distributed import Layout
        >>> Layout.contiguous(10, 4).sizes()
        [3, 3, 2, 2]
        >>> Layout.head_tail(16, 2).ranges[0]
        ((0, 4), (12, 16))
    """

    ranges: tuple[Ranges, ...]
    n: int
    n_real: int
    grid: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        covered = sorted(r for rs in self.ranges for r in rs if r[1] > r[0])
        pos = 0
        for lo, hi in covered:
            if lo != pos:
                raise ValueError(f"layout ranges must tile [0, {self.n}) without gaps or overlaps; "
                                 f"got {covered}")
            pos = hi
        if pos != self.n:
            raise ValueError(f"layout ranges cover [0, {pos}) but n={self.n}")
        if not 0 <= self.n_real <= self.n:
            raise ValueError(f"n_real must be in [0, n] = [0, {self.n}], got {self.n_real}")

    @property
    def world(self) -> int:
        """Number of ranks."""
        return len(self.ranges)

    @classmethod
    def contiguous(cls, n: int, world: int, *, align: int = 1, n_real: int | None = None) -> Layout:
        """Rank ``r`` holds one contiguous range; sizes as ``torch.tensor_split`` (in units of ``align`` tokens).

        Args:
            n: Tokens in all (padding included), >= 0.
            world: Number of ranks, >= 1.
            align: Shard boundaries fall on multiples of ``align`` (a block size), except the end.
            n_real: Real tokens (default ``n``); flat indices ``>= n_real`` are padding.

        Returns:
            The layout.

        Raises:
            TypeError: If an argument is not an int.
            ValueError: If an argument is out of range.
        """
        check_nonneg_int(n, "n")
        check_positive_int(world, "world")
        check_positive_int(align, "align")
        blocks = _bounds(split_sizes(-(-n // align), world))
        edges = [min(b * align, n) for b in blocks]
        return cls(tuple(((edges[r], edges[r + 1]),) for r in range(world)), n, _real(n, n_real))

    @classmethod
    def slabs(cls, grid: Sequence[int], world: int) -> Layout:
        """A 2D/3D map split along its first axis: rank ``r`` holds whole rows (one contiguous flat range).

        Args:
            grid: The spatial shape ``(X0, X1[, X2])`` in row-major token order.
            world: Number of ranks, >= 1.

        Returns:
            The layout (``grid`` recorded; ``rows(rank)`` gives each rank's rows).

        Raises:
            TypeError: If an argument has the wrong type.
            ValueError: If an argument is out of range.
        """
        g = check_grid(grid)
        if g is None:
            raise ValueError("slabs needs a grid (X0, X1[, X2])")
        row = math.prod(g[1:])
        n = g[0] * row
        return cls(cls.contiguous(n, world, align=row).ranges, n, n, g)  # whole rows: boundaries on row multiples

    @classmethod
    def head_tail(cls, n: int, world: int, *, n_real: int | None = None) -> Layout:
        """Load-balanced causal split: ``2 * world`` chunks (``tensor_split`` sizes), rank ``r`` holding chunks
        ``r`` and ``2 * world - 1 - r`` (PyTorch's head-tail balancing, for any ``n``).

        Args:
            n: Tokens in all (padding included), >= 0.
            world: Number of ranks, >= 1.
            n_real: Real tokens (default ``n``).

        Returns:
            The layout.

        Raises:
            TypeError: If an argument is not an int.
            ValueError: If an argument is out of range.
        """
        check_nonneg_int(n, "n")
        check_positive_int(world, "world")
        e = _bounds(split_sizes(n, 2 * world))
        rs = tuple(((e[r], e[r + 1]), (e[2 * world - 1 - r], e[2 * world - r])) for r in range(world))
        return cls(rs, n, _real(n, n_real))

    def size(self, rank: int) -> int:
        """Tokens (padding included) rank ``rank`` holds."""
        return sum(hi - lo for lo, hi in self.ranges[rank])

    def sizes(self) -> list[int]:
        """Tokens per rank."""
        return [self.size(r) for r in range(self.world)]

    def positions(self, rank: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Global flat indices of rank ``rank``'s tokens, in local order (for RoPE and absolute embeddings)."""
        parts = [torch.arange(lo, hi, device=device) for lo, hi in self.ranges[rank]]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)

    def local(self, rank: int, lo: int, hi: int) -> Ranges:
        """Local positions on ``rank`` of the global range ``[lo, hi)`` (which it must hold) as local ranges."""
        out, base = [], 0
        for a, b in self.ranges[rank]:
            s, e = max(a, lo), min(b, hi)
            if s < e:
                out.append((base + s - a, base + e - a))
            base += b - a
        return tuple(out)

    def owners(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """``(rank, lo, hi)`` pieces of the global range ``[lo, hi)`` by owner, in global order."""
        out = []
        for r, rs in enumerate(self.ranges):
            for a, b in rs:
                s, e = max(a, lo), min(b, hi)
                if s < e:
                    out.append((r, s, e))
        return sorted(out, key=lambda t: t[1])


def _real(n: int, n_real: int | None) -> int:
    if n_real is None:
        return n
    return check_nonneg_int(n_real, "n_real")


def shard(x: torch.Tensor, layout: Layout, rank: int, dim: int = 2) -> torch.Tensor:
    """Rank ``rank``'s part of the global tensor ``x`` (token axis ``dim``), in local order.

    Args:
        x: The global tensor, ``layout.n`` long on ``dim``.
        layout: The layout.
        rank: Which rank's part.
        dim: The token axis.

    Returns:
        ``x`` restricted to the rank's ranges (a new tensor; differentiable).

    Raises:
        ValueError: If ``x`` is not ``layout.n`` long on ``dim`` or ``rank`` is out of range.
    """
    if x.shape[dim] != layout.n:
        raise ValueError(f"x has {x.shape[dim]} tokens on dim {dim}, the layout {layout.n}")
    if not 0 <= rank < layout.world:
        raise ValueError(f"rank must be in [0, {layout.world - 1}], got {rank}")
    parts = [x.narrow(dim, lo, hi - lo) for lo, hi in layout.ranges[rank]]
    return torch.cat(parts, dim) if parts else x.narrow(dim, 0, 0).clone()


def unshard(x_local: torch.Tensor, layout: Layout, group: dist.ProcessGroup | None = None,
            dim: int = 2) -> torch.Tensor:
    """The global tensor from every rank's part (an all-gather, padded to equal sizes; not differentiable).

    Args:
        x_local: This rank's part, ``layout.size(rank)`` long on ``dim``.
        layout: The layout.
        group: The process group (default: the world).
        dim: The token axis.

    Returns:
        The global tensor, ``layout.n`` long on ``dim``, on every rank.
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if world != layout.world:
        raise ValueError(f"the layout has {layout.world} ranks, the group {world}")
    most = max(layout.sizes()) if layout.world else 0
    x = x_local.detach().movedim(dim, 0)
    pad = x.new_zeros((most - x.shape[0], *x.shape[1:]))
    buf = torch.cat([x, pad]).contiguous()
    bufs = [torch.empty_like(buf) for _ in range(world)]
    if layout.sizes()[rank] != x.shape[0]:
        raise ValueError(f"x_local has {x.shape[0]} tokens on dim {dim}, rank {rank} holds {layout.size(rank)}")
    dist.all_gather(bufs, buf, group=group)
    out = x.new_empty((layout.n, *x.shape[1:]))
    for r in range(world):
        base = 0
        for lo, hi in layout.ranges[r]:
            out[lo:hi] = bufs[r][base:base + hi - lo]
            base += hi - lo
    return out.movedim(0, dim)
