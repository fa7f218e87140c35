"""A pattern from a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``: ``MaskMod``.

FlexAttention (PyTorch, ``torch.nn.attention.flex_attention``) describes a sparse attention by a function of the
batch item, the head and the query and key indices, and finds the blocks worth computing by evaluating it on every
pair once (``create_block_mask``). ``MaskMod`` does the same: the first ``attend`` call of a shape *scans* the
function over the whole ``(B, H, Nq, Nk)`` problem in row chunks, vectorised over index tensors, and keeps two small
tables per (batch item, head) that depends on them: which ``g x g`` blocks hold an allowed pair, and which hold only
allowed pairs (``g`` = 16 tokens, coarser above 16K tokens). Every tile-level question an engine asks (the
block-sparse plan, the compiled kernel, Flex's block lists, run-time blocks) is answered from those tables in O(1)
per tile pair (2D prefix sums over the tile's index range); the exact function is evaluated only on the pairs of
the kept tiles. Scans are cached (``nearfar.cache``) per (function, B, H, Nq, Nk, device).

Batch and head dependence is found by the scan, not declared: the function is called with ``b`` of shape
``(B, 1, 1, 1)`` and ``h`` of shape ``(1, H, 1, 1)``, so a function that ignores them returns a ``(1, 1, rows, Nk)``
result and costs one scan of ``Nq x Nk`` pairs, not ``B x H`` of them; a function that uses them is checked for
whether its answer actually varies. ``attend`` then runs a head-dependent mask as one pattern per query head
(``PerHead``) and a batch-dependent one as one call per batch item (each item has its own sparsity, as with Flex's
``BlockMask`` of batch size ``B``). Outside ``attend`` (``pattern.mask``, ``SelectedBlocks(within=...)``), a
``MaskMod`` is the mask of batch item 0 and head 0.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..cache import CACHE, nbytes_of
from ..mods import call_mask_mod, check_mod, index_grid
from .base import Intersection, Pattern, PerHead, Tiles, Union

#: pairs (bool mask entries) evaluated per chunk of the scan; the function's temporaries are a few times this
_SCAN_ELEMS = 1 << 22
#: the scan tables have at most about this many blocks per axis (the block grows with the sequence above 16K)
_MAX_BLOCKS = 1024


def grain(nq: int, nk: int) -> int:
    """Block size (tokens per axis) of the scan tables: 16, or the power of two that keeps them under
    ``_MAX_BLOCKS`` blocks per axis."""
    g = 16
    while -(-max(nq, nk) // g) > _MAX_BLOCKS:
        g *= 2
    return g


@dataclass
class Scan:
    """What one scan of a mask function found: 2D prefix sums ``(B', H', QB + 1, KB + 1)`` int32 of the blocks
    with an allowed pair (``any``) and of the blocks whose pairs are all allowed (``full``; padding past the ends
    counts as allowed), ``B' = B`` when the mask varies over the batch (else 1), ``H'`` likewise over heads."""

    grain: int
    any: torch.Tensor
    full: torch.Tensor
    by_batch: bool
    by_head: bool

    def _rect(self, table: torch.Tensor, qt: Tiles, kt: Tiles, b: int,
              h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sum of ``table`` over the blocks each (query tile, key tile) pair's index ranges cover, the covered
        area in blocks, and whether both tiles hold a token."""
        t = table[b if self.by_batch else 0, h if self.by_head else 0]
        g = self.grain
        qlo, qhi = qt.bounds(qt.idx)
        klo, khi = kt.bounds(kt.idx)
        live = (qlo <= qhi)[:, None] & (klo <= khi)
        a0, a1 = (qlo.clamp(min=0) // g)[:, None], (qhi.clamp(min=0) // g + 1)[:, None]
        c0, c1 = klo.clamp(min=0) // g, khi.clamp(min=0) // g + 1
        a1, c1 = a1.clamp(max=t.shape[0] - 1), c1.clamp(max=t.shape[1] - 1)
        a0, c0 = torch.minimum(a0, a1), torch.minimum(c0, c1)
        s = t[a1, c1] - t[a0, c1] - t[a1, c0] + t[a0, c0]
        return s, (a1 - a0) * (c1 - c0), live

    def block_any(self, qt: Tiles, kt: Tiles, b: int = 0, h: int = 0) -> torch.Tensor:
        s, _, live = self._rect(self.any, qt, kt, b, h)
        return (s > 0) & live

    def block_full(self, qt: Tiles, kt: Tiles, b: int = 0, h: int = 0) -> torch.Tensor:
        s, area, live = self._rect(self.full, qt, kt, b, h)
        return (s == area) & live


def _prefix(blocks: torch.Tensor) -> torch.Tensor:
    """``(..., QB, KB)`` bool -> ``(..., QB + 1, KB + 1)`` int32 2D prefix sums."""
    p = torch.nn.functional.pad(blocks.to(torch.int32), (1, 0, 1, 0))
    return p.cumsum(-1, dtype=torch.int32).cumsum(-2, dtype=torch.int32)


def scan(fn: Callable, b: int, h: int, nq: int, nk: int, device: torch.device | str) -> Scan:
    """Evaluate ``fn`` on every (item, head, query, key) of the problem, in row chunks, into a ``Scan``."""
    g = grain(nq, nk)
    qb, kb = -(-nq // g), -(-nk // g)
    bi, hi, _, ki = index_grid(b, h, 1, nk, device)
    rows = max(g, _SCAN_ELEMS // max(1, nk) // g * g)
    anys, fulls, by_b, by_h = [], [], False, False
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        qi = torch.arange(r0, r1, device=device).view(1, 1, -1, 1)
        m = call_mask_mod(fn, bi, hi, qi, ki)
        m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
        if m.shape[0] > 1:
            by_b = by_b or not bool((m == m[:1]).all())
        if m.shape[1] > 1:
            by_h = by_h or not bool((m == m[:, :1]).all())
        m = m.expand(m.shape[0], m.shape[1], r1 - r0, nk)
        pad = (0, kb * g - nk, 0, -(-(r1 - r0) // g) * g - (r1 - r0))
        rows_first = (m.shape[0], m.shape[1], -1, g, kb * g)  # rows first: 16 long slices, then a 16x smaller tensor
        cols = (m.shape[0], m.shape[1], -1, kb, g)
        padded = any(pad)  # (a copy each, so only where the ends are not whole blocks)
        m_any = torch.nn.functional.pad(m, pad, value=False) if padded else m.contiguous()
        m_all = torch.nn.functional.pad(m, pad, value=True) if padded else m_any
        anys.append(m_any.view(rows_first).any(3).view(cols).any(4))
        fulls.append(m_all.view(rows_first).all(3).view(cols).all(4))
    bb, hh = (b if by_b else 1), (h if by_h else 1)

    def whole(parts: list[torch.Tensor]) -> torch.Tensor:
        t = torch.cat([p[:bb, :hh].expand(bb, hh, -1, -1) for p in parts], 2)
        assert t.shape[2] == qb
        return _prefix(t)

    return Scan(g, whole(anys), whole(fulls), by_b, by_h)


class MaskMod(Pattern):
    """A pattern from a FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx)`` returning a bool tensor (True = may
    attend), with its block lists found by scanning the function once per shape, as ``create_block_mask`` does.

    ``fn`` is called with broadcastable int64 index tensors (write it with tensor operations; a captured tensor
    indexed by them, e.g. per-item document ids ``doc[b, q_idx] == doc[b, kv_idx]``, is fine). The indices are those
    of the ``q`` and ``k`` tensors, as in Flex (unlike nearfar's positional patterns, nothing aligns the last query
    with the last key when ``Nq != Nk``: a decoding step's mask_mod adds the offset itself, as for Flex). ``b`` and
    ``h`` may be used: a mask that varies over the batch runs as one call per batch item, over heads as one pattern
    per query head (see the module). The function must be pure: the scan is cached per (function, B, H, Nq, Nk,
    device), so build one ``MaskMod`` per mask (a new one when captured data such as document ids change, as you
    would call ``create_block_mask`` again), not one per call. Combine it with ``|`` and ``&`` like any pattern.
    Scanning costs ``Nq x Nk`` evaluations (times ``B x H`` for a mask that uses them) per shape; when that is too
    slow, write a ``Pattern`` with a tile-level test instead (see "Coming from FlexAttention" in the docs).

    Args:
        fn: ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``.
        name: Shown in ``repr`` (default: the function's ``__name__``).

    Raises:
        TypeError: If ``fn`` is not a hashable callable of four positional arguments; when a call of ``attend``
            finds that it does not return a bool tensor.
        ValueError: When its result does not broadcast to the shape of its index arguments.

    Examples:
        >>> import torch, nearfar as nf
        >>> def causal_window(b, h, q_idx, kv_idx):
        ...     return (q_idx >= kv_idx) & (q_idx - kv_idx < 3)
        >>> p = nf.MaskMod(causal_window)
        >>> p.mask(4, 4).int().tolist()
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]]
        >>> q = torch.randn(2, 4, 64, 16)
        >>> nf.attend(q, q, q, p).shape
        torch.Size([2, 4, 64, 16])
    """

    def __init__(self, fn: Callable, name: str | None = None) -> None:
        self.fn = check_mod(fn, "mask_mod", "mask_mod")
        try:
            hash(fn)
        except TypeError:
            raise TypeError(f"mask_mod must be hashable (its scans are cached by it), got an unhashable "
                            f"{type(fn).__name__}") from None
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {type(name).__name__}")
        self.name = name if name is not None else getattr(fn, "__name__", type(fn).__name__)

    @torch.compiler.disable  # data-dependent: run eagerly inside compiled graphs, as plans are built
    def scan(self, b: int, h: int, nq: int, nk: int, device: torch.device | str) -> Scan:
        """The cached scan of this mask over ``b`` items, ``h`` heads, ``nq`` queries and ``nk`` keys.

        Args:
            b: Batch size.
            h: Query heads.
            nq: Queries.
            nk: Keys.
            device: Where to evaluate the function.

        Returns:
            The ``Scan`` (block tables and whether the mask varies over items and heads).
        """
        key = ("maskmod_scan", self.fn, b, h, nq, nk, str(device))
        hit = CACHE.get(key)
        if hit is None:
            hit = scan(self.fn, b, h, nq, nk, device)
            CACHE.put(key, hit, nbytes_of(hit))
            if not hit.by_batch and not hit.by_head and (b, h) != (1, 1):  # item 0, head 0 is every item and head
                CACHE.put(("maskmod_scan", self.fn, 1, 1, nq, nk, str(device)), hit, nbytes_of(hit))
        return hit

    def at(self, b: int, h: int, batch: int, heads: int) -> MaskModAt:
        """This mask at batch item ``b`` and head ``h`` (of a problem of ``batch`` items and ``heads`` heads)."""
        return MaskModAt(self, b, h, batch, heads)

    def allowed(self, q: torch.Tensor, k: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        zero = torch.zeros((), dtype=torch.long, device=q.device)
        return call_mask_mod(self.fn, zero, zero, q, k)

    def block_allowed(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        return self.scan(1, 1, nq, nk, qt.idx.device).block_any(qt, kt)

    def block_full(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        return self.scan(1, 1, nq, nk, qt.idx.device).block_full(qt, kt)

    def _key(self) -> tuple:
        return ("MaskMod", self.fn)

    def __repr__(self) -> str:
        return f"MaskMod({self.name})"


class MaskModAt(Pattern):
    """A ``MaskMod`` at one batch item and head (of a scan over ``batch`` items and ``heads`` heads): what
    ``attend`` runs for a mask that varies over them."""

    def __init__(self, parent: MaskMod, b: int, h: int, batch: int, heads: int) -> None:
        self.parent, self.b, self.h, self.batch, self.heads_of_scan = parent, b, h, batch, heads

    def _scan(self, nq: int, nk: int, device: torch.device | str) -> Scan:
        return self.parent.scan(self.batch, self.heads_of_scan, nq, nk, device)

    def allowed(self, q: torch.Tensor, k: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        b, h = (torch.tensor(i, dtype=torch.long, device=q.device) for i in (self.b, self.h))
        return call_mask_mod(self.parent.fn, b, h, q, k)

    def block_allowed(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        return self._scan(nq, nk, qt.idx.device).block_any(qt, kt, self.b, self.h)

    def block_full(self, qt: Tiles, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
        return self._scan(nq, nk, qt.idx.device).block_full(qt, kt, self.b, self.h)

    def _key(self) -> tuple:
        return ("MaskModAt", self.parent.fn, self.b, self.h, self.batch, self.heads_of_scan)

    def __repr__(self) -> str:
        return f"{self.parent!r}.at(b={self.b}, h={self.h})"


def mask_mods(pattern: Pattern | None) -> list[MaskMod]:
    """The ``MaskMod`` nodes of a pattern tree (unions, intersections, ``PerHead``)."""
    if isinstance(pattern, MaskMod):
        return [pattern]
    if isinstance(pattern, (Union, Intersection)):
        return [m for p in pattern.parts for m in mask_mods(p)]
    if isinstance(pattern, PerHead):
        return [m for p in pattern.patterns for m in mask_mods(p)]
    return []


def _bind(pattern: Pattern, scans: dict, b: int, h: int | None, batch: int, heads: int) -> Pattern:
    """``pattern`` with each ``MaskMod`` that varies replaced by its value at item ``b`` (and head ``h``, or one
    pattern per head when ``h`` is None)."""
    if isinstance(pattern, MaskMod):
        found = scans[pattern]
        if not found.by_batch and not found.by_head:
            return pattern
        bb = b if found.by_batch else 0
        if not found.by_head:
            return pattern.at(bb, 0, batch, heads)
        if h is not None:
            return pattern.at(bb, h, batch, heads)
        return PerHead([pattern.at(bb, i, batch, heads) for i in range(heads)])
    if isinstance(pattern, (Union, Intersection)):
        op = operator.or_ if isinstance(pattern, Union) else operator.and_
        return functools.reduce(op, [_bind(p, scans, b, h, batch, heads) for p in pattern.parts])
    if isinstance(pattern, PerHead):
        return PerHead([_bind(p, scans, b, i, batch, heads) for i, p in enumerate(pattern.patterns)])
    return pattern


def bind(pattern: Pattern | None, batch: int, heads: int, nq: int, nk: int,
         device: torch.device | str) -> tuple[Pattern | None, list[Pattern] | None]:
    """Scan the ``MaskMod`` nodes of ``pattern`` for a ``(batch, heads, nq, nk)`` problem and return
    ``(pattern, None)`` to run it in one call (head dependence becomes a ``PerHead``), or ``(None, per-item
    patterns)`` when a mask varies over the batch.

    Args:
        pattern: The call's pattern.
        batch: Batch size.
        heads: Query heads.
        nq: Queries.
        nk: Keys.
        device: The call's device.

    Returns:
        ``(pattern for every item, None)`` or ``(None, [pattern of item 0, ...])``.
    """
    nodes = mask_mods(pattern)
    if not nodes:
        return pattern, None
    assert pattern is not None
    scans = {m: m.scan(batch, heads, nq, nk, device) for m in nodes}
    if not any(s.by_batch or s.by_head for s in scans.values()):
        return pattern, None
    if not any(s.by_batch for s in scans.values()):
        return _bind(pattern, scans, 0, None, batch, heads), None
    return None, [_bind(pattern, scans, i, None, batch, heads) for i in range(batch)]
