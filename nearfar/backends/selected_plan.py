"""What the engine of run-time key blocks reads for each query block, split into streams of disjoint pairs.

The union of a static pattern's pairs and a selection's pairs is cut into at most four streams whose (query, key)
pairs are disjoint, so their attention results merge exactly by log-sum-exp:

- ``run``: the pattern's key blocks, when each query block's are one run of keys that moves by a fixed step from
  one query block to the next (windows) or stays put (sinks): strided views of the keys, no gather; with a token
  mask shared by the interior query blocks when the run holds partial blocks (a window's edge, the causal
  diagonal). Otherwise a run of its full blocks, and a gathered ``static_full`` stream when not even they run.
- ``static_part``: the pattern's partial blocks outside a run, with their token mask, all of it cached per shape
  (the pattern does not change between calls).
- ``sel_full``: selected blocks whose pairs ``within`` allows entirely and the pattern allows none: gathered, a
  block-level mask broadcast over the query rows.
- ``sel_part``: the other selected blocks, with the token mask ``within & ~pattern`` (a selected block the pattern
  reads partly adds only the pairs the pattern does not have; one it reads fully is dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import CACHE
from ..patterns import Pattern, Tiles
from ..selection import SelectedBlocks

#: elements per piece of the static analysis (bounded memory for long sequences)
_CHUNK = 1 << 23


@dataclass
class Run:
    """Static full blocks as runs: query block ``r`` reads keys ``first + r * step + [0, width)`` of the keys padded
    with ``front`` zeros before and ``back`` after; ``mask (QB, 1, 1, width)`` is 0 where it may attend them."""

    first: int
    step: int
    width: int
    front: int
    back: int
    ok: torch.Tensor  # (QB, width) bool
    mask: torch.Tensor  # (QB, 1, 1, width) additive float32
    all_ok: torch.Tensor  # (QB,) bool
    #: when the run also holds partial blocks: the token mask (QB, T, width); the rows whose mask is the shared one,
    #: and that mask as the kernel takes it, ``(1, 1, g*T, width)``, with its rows that have a key
    tok: torch.Tensor | None = None
    uniform: torch.Tensor | None = None
    shared: torch.Tensor | None = None
    shared_live: torch.Tensor | None = None

    def keys(self, r0: int, r1: int) -> torch.Tensor:
        """Key positions (c, width) of query blocks ``r0:r1``, -1 where masked."""
        dev = self.ok.device
        pos = self.first + torch.arange(r0, r1, device=dev)[:, None] * self.step + torch.arange(self.width, device=dev)
        return torch.where(self.ok[r0:r1], pos, -1)


@dataclass
class Stream:
    """Gathered key blocks per query block: ``blk (QB, B|1, H|1, S)`` block indices with ``valid``; ``heads`` is
    ``Hkv`` for the pattern's streams and the selection's list heads otherwise. ``token`` is ``None`` (block-level
    mask), ``"static"`` (the cached ``mask``) or ``"sel"`` (``within & ~(overlap & pattern)``)."""

    name: str
    blk: torch.Tensor
    valid: torch.Tensor
    heads: int
    token: str | None = None
    mask: torch.Tensor | None = None  # "static": (QB, 1, g*T, W) additive
    live: torch.Tensor | None = None  # "static": (QB, 1, g*T) rows with a key
    overlap: torch.Tensor | None = None

    @property
    def blocks(self) -> int:
        return self.blk.shape[-1]


@dataclass
class Static:
    """The pattern's part of the plan, per (pattern, sizes, blocks): cached."""

    sorted_blocks: torch.Tensor  # (QB, Ws) ascending, padded with a large value
    kind: torch.Tensor  # (QB, Ws) int8: 1 partial, 2 full, 0 padding
    run: Run | None
    full: Stream | None  # the full blocks when they are not a run
    part: Stream | None


@dataclass
class Streams:
    run: Run | None
    gathered: list[Stream]
    hx: int  # the selection's list heads: Hq for a per-query-head selection under GQA, else Hkv


def _as_run(blocks: torch.Tensor, full: torch.Tensor, t: int, kb: int, nk: int) -> Run | None:
    """The full blocks as evenly moving runs of keys, or None when they are not (or would read > 25% more)."""
    count = full.sum(-1)
    rows = torch.nonzero(count > 0)[:, 0]
    if rows.numel() == 0:
        return None
    big = 1 << 40
    lo = torch.where(full, blocks, big).amin(-1)
    hi = torch.where(full, blocks, -big).amax(-1)
    if bool(((hi - lo + 1)[rows] != count[rows]).any()):  # not one contiguous run of blocks
        return None
    r = torch.arange(blocks.shape[0], device=blocks.device)
    for step in (t, 0):  # runs that move with the query block (windows), or the same keys for all (sinks)
        first = int((lo[rows] * kb - r[rows] * step).min())
        width = int(((hi[rows] + 1) * kb - r[rows] * step - first).max())
        if blocks.shape[0] * width <= int(count.sum()) * kb * 5 // 4 + blocks.shape[0] * kb:
            break
    else:  # mostly masked either way (e.g. Causal: a run that grows with the query block)
        return None
    keys = first + r[:, None] * step + torch.arange(width, device=blocks.device)
    kblk = torch.div(keys, kb, rounding_mode="floor")
    ok = (keys >= 0) & (keys < nk) & (kblk >= lo[:, None]) & (kblk <= hi[:, None]) & (count > 0)[:, None]
    mask = torch.where(ok, 0.0, float("-inf"))[:, None, None, :]
    return Run(first, step, width, max(0, -first), max(0, int(keys[-1, -1]) + 1 - nk), ok, mask, ok.all(-1))


def _token_run(pattern: Pattern, qt: Tiles, blocks: torch.Tensor, live: torch.Tensor, t: int, kb: int, nq: int,
               nk: int, group: int) -> Run | None:
    """All the pattern's blocks (full and partial) as one run with a token mask (windows: the edge and the diagonal
    with the blocks between), or None. Most query blocks of a window share one mask, kept once as the kernel takes
    it; the others (the start, a short last block) get theirs from the cached token mask."""
    run = _as_run(blocks, live, t, kb, nk)
    if run is None:
        return None
    keys = run.first + torch.arange(blocks.shape[0], device=blocks.device)[:, None] * run.step + torch.arange(
        run.width, device=blocks.device)
    tok = pattern.allowed(qt.idx.clamp(min=0)[:, :, None], keys[:, None, :], nq, nk)
    tok = tok & run.ok[:, None, :] & (qt.idx >= 0)[:, :, None]  # (QB, T, W)
    ref = tok[tok.shape[0] // 2]
    uniform = (tok == ref).flatten(1).all(-1)
    shared_tok = ref.repeat(group, 1)  # (g*T, W)
    run.tok, run.uniform = tok, uniform
    run.shared = torch.where(shared_tok, 0.0, float("-inf"))[None, None]
    run.shared_live = shared_tok.any(-1)[None, None]
    return run


def _compact(keep: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kept slots of each row first, trimmed to the widest row: ``(keep, *xs)`` gathered."""
    if keep.shape[-1] == 0:
        keep, xs = torch.nn.functional.pad(keep, (0, 1)), tuple(torch.nn.functional.pad(x, (0, 1)) for x in xs)
    width = max(1, int(keep.sum(-1).max()))
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :width]
    return tuple(x.gather(-1, order) for x in (keep, *xs))


@dataclass
class Kinds:
    """The pattern's key blocks per query block: ``blocks (QB, Ws)`` (ascending among the live ones), ``live`` and
    ``full`` flags, and ``sorted_blocks``/``kind`` (1 partial, 2 full, 0 padding) for lookups by block index."""

    qt: Tiles
    blocks: torch.Tensor
    live: torch.Tensor
    full: torch.Tensor
    sorted_blocks: torch.Tensor
    kind: torch.Tensor


def pattern_kinds(pattern: Pattern, sel: SelectedBlocks, nq: int, nk: int) -> Kinds:
    """Which key blocks the pattern reads per query block, fully or partly: cached per shape."""
    t, kb = sel.q_block, sel.k_block
    key = ("selected_kinds", pattern, nq, nk, t, kb, str(sel.kv_indices.device))
    hit = CACHE.get(key)
    if hit is not None:
        return hit
    qt, kt = sel.tiles(nq, nk)
    qb, nkb = qt.idx.shape[0], kt.idx.shape[0]
    rows = max(1, _CHUNK // max(1, nkb))
    ok = torch.cat([pattern.block_allowed(Tiles(qt.idx[r0:r0 + rows]), kt, nq, nk) for r0 in range(0, qb, rows)])
    live, blocks = _compact(ok, torch.arange(nkb, device=ok.device).expand(qb, -1))
    full = live & pattern.block_full(qt, Tiles(kt.idx[blocks]), nq, nk) & ((blocks + 1) * kb <= nk)
    kind = torch.where(full, 2, torch.where(live & ~full, 1, 0)).to(torch.int8)
    return CACHE.put(key, Kinds(qt, blocks, live, full, torch.where(live, blocks, 1 << 40), kind))


def static_plan(pattern: Pattern, sel: SelectedBlocks, nq: int, nk: int, hkv: int, group: int) -> Static:
    """The pattern's blocks per query block, full or partial, as runs or streams: cached per shape (the partial
    blocks' token mask already repeated over the ``group`` query heads that share a key list)."""
    t, kb = sel.q_block, sel.k_block
    key = ("selected_static", pattern, nq, nk, t, kb, hkv, group, str(sel.kv_indices.device))
    hit = CACHE.get(key)
    if hit is not None:
        return hit
    kinds = pattern_kinds(pattern, sel, nq, nk)
    qt, blocks, live, full = kinds.qt, kinds.blocks, kinds.live, kinds.full
    part = live & ~full
    sorted_blocks, kind = kinds.sorted_blocks, kinds.kind
    run = _token_run(pattern, qt, blocks, live, t, kb, nq, nk, group)
    if run is not None:  # every block of the pattern in one strided run: no static gathers at all
        return CACHE.put(key, Static(sorted_blocks, kind, run, None, None))
    run = _as_run(blocks, full, t, kb, nk)
    full_stream = None
    if run is None and bool(full.any()):
        v, b = _compact(full, blocks)
        full_stream = Stream("static_full", b[:, None, None], v[:, None, None], hkv)
    part_stream = None
    if bool(part.any()):
        v, b = _compact(part, blocks)
        kpos = (b[:, :, None] * kb + torch.arange(kb, device=b.device)).flatten(1)  # (QB, W)
        qpos = qt.idx.clamp(min=0)[:, :, None]  # (QB, T, 1)
        tok = pattern.allowed(qpos, kpos[:, None, :], nq, nk) & (kpos < nk)[:, None] & (qt.idx >= 0)[:, :, None]
        tok = (tok & v.repeat_interleave(kb, -1)[:, None]).repeat(1, group, 1)  # (QB, g*T, W)
        mask = torch.where(tok, 0.0, float("-inf"))[:, None]  # (QB, 1, g*T, W)
        part_stream = Stream("static_part", b[:, None, None], v[:, None, None], hkv, token="static", mask=mask,
                             live=tok.any(-1)[:, None])
    return CACHE.put(key, Static(sorted_blocks, kind, run, full_stream, part_stream))


@dataclass
class Selection:
    """A call's selected blocks ``idx (B', H', QB, S)`` (ascending, each once) classified against the pattern and
    ``within``: ``valid`` (read by this selection: the pattern does not already read the whole block), ``full``
    (every pair allowed, none the pattern's: no token mask) and ``overlap`` (the pattern reads part of the block:
    its pairs are taken out)."""

    idx: torch.Tensor
    valid: torch.Tensor
    full: torch.Tensor
    overlap: torch.Tensor


def classify(pattern: Pattern | None, sel: SelectedBlocks, nq: int, nk: int) -> Selection:
    """The selection of one call against the static pattern (see ``Selection``)."""
    kb = sel.k_block
    idx, valid = sel.normalized(nk)  # (B', Hs, QB, S), ascending, each block once
    w_full = torch.ones_like(valid)
    if sel.within is not None and idx.numel():  # key tiles of the selected blocks only: decoding stays O(S)
        blocks = idx.permute(2, 0, 1, 3).reshape(idx.shape[2], -1)  # (QB, B'*Hs*S)
        keys = blocks[..., None] * kb + torch.arange(kb, device=idx.device)
        pos = torch.arange(idx.shape[2] * sel.q_block, device=idx.device).view(-1, sel.q_block)
        qt = Tiles(torch.where(pos < nq, pos, -1))
        w_full = sel.within.block_full(qt, Tiles(torch.where(keys < nk, keys, -1)), nq, nk)
        w_full = w_full.reshape(idx.shape[2], *idx.shape[:2], -1).permute(1, 2, 0, 3)
    overlap = torch.zeros_like(valid)
    if pattern is not None:
        kinds = pattern_kinds(pattern, sel, nq, nk)
        seq = kinds.sorted_blocks.expand(*idx.shape[:2], -1, -1).contiguous()
        pos = torch.searchsorted(seq, idx.contiguous()).clamp(max=seq.shape[-1] - 1)
        found = seq.gather(-1, pos) == idx
        kind = kinds.kind.expand(*idx.shape[:2], -1, -1).gather(-1, pos)
        valid = valid & ~(found & (kind == 2))  # the pattern reads the whole block already
        overlap = found & (kind == 1)
    full = valid & ~overlap & w_full & ((idx + 1) * kb <= nk)
    return Selection(idx, valid, full, overlap)


def plan_streams(pattern: Pattern | None, sel: SelectedBlocks, b: int, hq: int, hkv: int, nq: int,
                 nk: int) -> Streams:
    """The streams of one call (see the module docstring)."""
    cls = classify(pattern, sel, nq, nk)
    hs = cls.idx.shape[1]
    hx = hq if hs == hq and hq != hkv else hkv
    idx, valid, full, overlap = cls.idx, cls.valid, cls.full, cls.overlap
    if hs != hx:  # one selection for every head: one list per KV head
        idx, valid, full, overlap = (x.expand(-1, hx, -1, -1) for x in (idx, valid, full, overlap))
    run, gathered = None, []
    if pattern is not None:
        static = static_plan(pattern, sel, nq, nk, hkv, hq // hkv)
        run = static.run
        gathered += [s for s in (static.full, static.part) if s is not None]
    part = valid & ~full
    # (B', Hx, QB, S) -> (QB, B', Hx, S): the chunk layout of the kernels
    for name, keep, token in (("sel_full", full, None), ("sel_part", part, "sel")):
        if not bool(keep.any()):
            continue
        v, blk, ov = (x.permute(2, 0, 1, 3) for x in _compact(keep, idx, overlap))
        gathered.append(Stream(name, blk, v, hx, token=token, overlap=(ov & v) if token else None))
    return Streams(run, gathered, hx)
