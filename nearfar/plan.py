"""Block-sparse plans: token tiles, the exact key list of each query tile, and its mask.

A plan is built once per (pattern, Nq, Nk, tile, device) and cached. It never evaluates all N² pairs:
query tiles are matched against key tiles with the pattern's conservative tile-level test
(``block_allowed``), the candidates are narrowed key by key with the same test, and the exact ``allowed``
mask is evaluated only on what is left, when an engine first asks for it: the PyTorch chunk paths read it on
every call and keep it (``Plan.cache_masks``); the compiled kernel packs its own bit masks once and never holds
it (a 1M-token plan's float mask alone would be ~370 MB). Tiles with key lists of similar length form a group, padded
(with -1) to the group's longest list ``W``, so a few wide tiles (global tokens, the end of a causal
sequence) do not widen every tile. 1D lists that are runs of consecutive keys are extended to exactly
``W`` keys so the engine can read them as strided views.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .cache import CACHE, ByteLRU, cache_budget, nbytes_of
from .patterns.base import Pattern, PerHead, Tiles, unravel
from .patterns.spatial import Layout

#: default tile extents per spatial rank (tokens per tile = product)
DEFAULT_TILE = {1: (128,), 2: (8, 8), 3: (4, 4, 4)}
#: cache the additive float mask up to this many bytes, a bool mask up to ``_BOOL_BUDGET``; else recompute
_FLOAT_BUDGET = 256 << 20
_BOOL_BUDGET = 256 << 20
_CHUNK_ELEMS = 1 << 23


def _segments(layout: Layout, tile: tuple[int, ...],
              device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token order for a layout: returns (segment id, rank) per original token; sort by both to get tiles."""
    grid = layout.grid
    seg_ids, ranks, nseg = [], [], []
    for a, n in enumerate(grid):
        i = torch.arange(n, device=device)
        d, t, o = layout.dilation[a], tile[a], layout.offset[a]
        g, ip = i % d, i // d
        if layout.wrap[a]:  # cyclic windows (dilation 1): a window across the border is one segment
            local = torch.remainder(ip - o, n) // t
        else:
            local = torch.div(ip - o, t, rounding_mode="floor") + 1  # >= 0 since 0 <= o < t
        per_group = (n + d - 1) // d // t + 2
        seg_ids.append(g * per_group + local)
        ranks.append(g * n + ip)
        nseg.append(d * per_group)
    seg = torch.zeros((), dtype=torch.long, device=device)
    rank = torch.zeros((), dtype=torch.long, device=device)
    for a, n in enumerate(grid):
        seg = seg[..., None] * nseg[a] + seg_ids[a]
        rank = rank[..., None] * (n * layout.dilation[a]) + ranks[a]
    return seg.reshape(-1), rank.reshape(-1)


def _tiles_from_segments(seg: torch.Tensor, rank: torch.Tensor, size: int) -> torch.Tensor:
    """(nT, size) original indices, one tile per non-empty segment (split if larger than ``size``)."""
    n = seg.numel()
    order = torch.argsort(seg * (rank.max() + 1) + rank)
    s = seg[order]
    _, counts = torch.unique_consecutive(s, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(n, device=seg.device) - torch.repeat_interleave(starts, counts)
    seg_no = torch.repeat_interleave(torch.arange(counts.numel(), device=seg.device), counts)
    # segments larger than a tile (possible for odd layouts) spill into extra tiles
    per_seg = (counts + size - 1) // size
    first_tile = torch.cumsum(per_seg, 0) - per_seg
    tile_no = first_tile[seg_no] + pos // size
    idx = torch.full((int(per_seg.sum()), size), -1, dtype=torch.long, device=seg.device)
    idx[tile_no, pos % size] = order
    return idx


def _chunks(n: int, size: int) -> torch.Tensor:
    idx = torch.arange(((n + size - 1) // size) * size)
    return torch.where(idx < n, idx, -1).view(-1, size)


def layouts(pattern: Pattern, nq: int, nk: int) -> tuple[Layout | None, Layout | None]:
    """The token layouts of the queries and of the keys: ``pattern.layout`` for both when ``nq == nk``; a pattern
    whose queries and keys are different parts of one grid (a rank's slab and its halo rows, ``nearfar.distributed``)
    gives both with ``layouts(nq, nk)``."""
    both = getattr(pattern, "layouts", None)
    pair = both(nq, nk) if both is not None else None
    if pair is not None:
        return pair
    lay = pattern.layout(nq, nk) if nq == nk else None
    return lay, lay


def fitted_tile(ext: tuple[int, ...], layout: Layout) -> tuple[int, ...]:
    """The tile extents ``ext`` as a plan uses them on ``layout``: cut to each axis' extent per dilation group."""
    return tuple(max(1, min(t, -(-n // d))) for t, n, d in zip(ext, layout.grid, layout.dilation))


def token_tiles(pattern: Pattern, nq: int, nk: int, tile: int | tuple[int, ...] | None,
                device: torch.device | str | None) -> tuple[Tiles, Tiles]:
    """Query tiles and key tiles. Spatial patterns order tokens in compact boxes (dilation groups first)."""
    q_lay, k_lay = layouts(pattern, nq, nk)
    if q_lay is not None and k_lay is not None:
        ext = (tile,) * len(q_lay.grid) if isinstance(tile, int) else tile
        ext = ext or q_lay.tile or DEFAULT_TILE[len(q_lay.grid)]
        ext = fitted_tile(ext, q_lay)
        size = 1
        for t in ext:
            size *= t
        idx = _tiles_from_segments(*_segments(q_lay, ext, device), size)
        kidx = idx if k_lay is q_lay else _tiles_from_segments(*_segments(k_lay, ext, device), size)
        return Tiles(idx), Tiles(kidx)
    size = tile if isinstance(tile, int) else DEFAULT_TILE[1][0]
    return Tiles(_chunks(nq, min(size, nq)).to(device)), Tiles(_chunks(nk, size).to(device))


@dataclass
class TileGroup:
    """Query tiles with key lists of similar length, padded to one width ``W``."""

    tiles: torch.Tensor  # (c,) tile ids
    q_idx: torch.Tensor  # (c, T) original query index, -1 = empty slot
    k_idx: torch.Tensor  # (Hp, c, W) original key index, -1 = padding
    mask_f: torch.Tensor | None = None  # (Hp, c, T, W) float32 additive (0 / -inf), if cached
    mask_b: torch.Tensor | None = None  # (Hp, c, T, W) bool, if cached instead
    run_start: torch.Tensor | None = None  # (c,) s when the tile's list is keys s..s+W-1 (of the stage), else -1
    stage: torch.Tensor | None = None  # (L,) keys in "stage order", when run_start counts in it

    @property
    def width(self) -> int:
        return self.k_idx.shape[2]

    @functools.cached_property
    def contiguous(self) -> bool:
        """The tiles are tiles[0], tiles[0]+1, ...: chunks of them are slices, not gathers."""
        return bool(len(self.tiles) == 1 or torch.all(self.tiles[1:] - self.tiles[:-1] == 1))

    def __len__(self) -> int:
        return self.tiles.shape[0]


@dataclass
class Plan:
    nq: int
    nk: int
    q_idx: torch.Tensor  # (nTq, T) original query index, -1 = empty slot
    groups: list[TileGroup]
    pattern: Pattern
    heads: int  # Hp: 1, or Hq for per-head patterns
    #: every query tile's key list is exactly its own tokens (windows): see ``backends.partition``
    partition: bool = False
    #: per-call-shape caches of the engine (chunking depends on batch, heads and head dims), charged to the plan's
    #: entry in ``nearfar.cache.CACHE`` and bounded by a quarter of its budget
    engine_cache: ByteLRU = field(default_factory=lambda: ByteLRU(lambda: cache_budget() // 4), repr=False)
    #: told of the bytes the plan gains in place (its masks, once cached), to charge them to its cache entry
    on_resize: Callable[[int], None] | None = field(default=None, repr=False, compare=False)
    masks_cached: bool = field(default=False, repr=False, compare=False)

    @functools.cached_property
    def q_in_order(self) -> bool:
        """Queries are already in tile order (1D layouts): tiles are reshapes, not gathers."""
        flat = self.q_idx.reshape(-1)[:self.nq]
        return bool(torch.equal(flat, torch.arange(self.nq, device=flat.device)))

    @property
    def tile(self) -> int:
        return self.q_idx.shape[1]

    @property
    def num_tiles(self) -> int:
        return self.q_idx.shape[0]

    @property
    def width(self) -> int:
        return max(g.width for g in self.groups)

    @functools.cached_property
    def q_inv(self) -> torch.Tensor:
        """Position of each original query in the flattened tile layout ``(nTq * T,)``."""
        return inverse_order(self.q_idx, self.nq)

    def cache_masks(self) -> None:
        """Keep every group's exact mask for the engines that read it per call: float32 additive masks while they
        fit ``_FLOAT_BUDGET``, then bool masks within ``_BOOL_BUDGET``; the rest are recomputed per chunk. Not inside
        a compiled graph, where it would be traced (``nearfar.dispatch`` calls it eagerly before)."""
        if self.masks_cached or torch.compiler.is_compiling():
            return
        self.masks_cached = True
        cached = 0
        for g in self.groups:
            ok = allowed_heads(self.pattern, g.q_idx, g.k_idx, self.nq, self.nk)
            if cached + ok.numel() * 4 <= _FLOAT_BUDGET:
                g.mask_f = to_additive(ok)
                cached += ok.numel() * 4
            elif cached + ok.numel() <= _BOOL_BUDGET:
                g.mask_b = ok
                cached += ok.numel()
        if self.on_resize is not None and cached:
            self.on_resize(cached)

    def allowed(self, g: TileGroup, t0: int, t1: int, keep: bool = True) -> torch.Tensor:
        """(Hp, c, T, W) bool mask of tiles ``t0:t1`` of group ``g``; ``keep``: cache every group's mask first."""
        if keep:
            self.cache_masks()
        if g.mask_b is not None:
            return g.mask_b[:, t0:t1]
        if g.mask_f is not None:
            return g.mask_f[:, t0:t1] == 0
        return allowed_heads(self.pattern, g.q_idx[t0:t1], g.k_idx[:, t0:t1], self.nq, self.nk)

    def additive_mask(self, g: TileGroup, t0: int, t1: int) -> torch.Tensor:
        """(Hp, c, T, W) float32 mask: 0 where allowed, -inf elsewhere."""
        self.cache_masks()
        if g.mask_f is not None:
            return g.mask_f[:, t0:t1]
        return to_additive(self.allowed(g, t0, t1))

    def density(self) -> float:
        """Fraction of the dense Nq×Nk work the block-sparse engine performs."""
        work = sum(len(g) * self.tile * g.width for g in self.groups)
        return work / max(1, self.nq * self.nk)


def inverse_order(tiles: torch.Tensor, n: int) -> torch.Tensor:
    """For tiles ``(nT, T)`` of original indices (-1 = empty): each index's position in ``tiles.reshape(-1)``."""
    flat = tiles.reshape(-1)
    inv = torch.empty(n, dtype=torch.long, device=flat.device)
    used = flat >= 0
    inv[flat[used]] = torch.nonzero(used)[:, 0]
    return inv


def to_additive(mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, 0.0, float("-inf"))


def allowed_heads(pattern: Pattern, q: torch.Tensor, k: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
    """Exact mask ``(Hp, c, T, W)`` for query tiles ``q (c, T)`` and key lists ``k (Hp, c, W)``; -1 never attends."""
    qq, kk = q.clamp(min=0)[:, :, None], k.clamp(min=0)[:, :, None, :]
    shape = (q.shape[0], q.shape[1], k.shape[2])
    if pattern.heads is None:
        ok = pattern.allowed(qq, kk[0], nq, nk).expand(shape)[None]
    else:
        assert isinstance(pattern, PerHead)  # the only pattern with heads
        ok = torch.stack([p.allowed(qq, kk[h], nq, nk).expand(shape) for h, p in enumerate(pattern.patterns)])
    ok = ok & (k >= 0)[:, :, None, :]
    if bool((q < 0).any()):
        ok &= (q >= 0)[None, :, :, None]
    return ok


def _paired(pattern: Pattern, q: torch.Tensor, keys: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
    """Tile-level test of query tiles ``q (c, T)`` against their own key tiles ``keys (Hp, c, M, t)`` -> (Hp, c, M)."""
    qt = Tiles(q)
    if pattern.heads is None:
        return pattern.block_allowed(qt, Tiles(keys[0]), nq, nk)[None]
    assert isinstance(pattern, PerHead)  # the only pattern with heads
    return torch.stack([p.block_allowed(qt, Tiles(keys[h]), nq, nk) for h, p in enumerate(pattern.patterns)])


def _block_lists(pattern: Pattern, q: torch.Tensor, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
    blocks = pattern.block_allowed(Tiles(q), kt, nq, nk)
    return blocks if pattern.heads is not None else blocks[None]  # (Hp, c, nTk)


def key_lists(pattern: Pattern, q: torch.Tensor, kt: Tiles, nq: int, nk: int) -> torch.Tensor:
    """Key lists ``(Hp, c, w)`` of query tiles ``q (c, T)``: the keys their tile-level test keeps, compacted.

    The test is conservative, so a list may hold keys no query of the tile attends; the exact mask drops them."""
    blocks = _block_lists(pattern, q, kt, nq, nk)
    count = blocks.sum(-1)
    m = max(1, int(count.max()))
    sel = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True)[..., :m]
    cand = kt.idx[sel]  # (Hp, c, m, tk)
    live = torch.arange(m, device=q.device) < count[..., None]
    cand = torch.where(live[..., None], cand, -1).flatten(-2)  # (Hp, c, m*tk)
    used = _paired(pattern, q, cand[..., None], nq, nk)  # key by key, still tile-level: cheap
    w = max(1, int(used.sum(-1).max()))
    keep = torch.argsort((~used).to(torch.int8), dim=-1, stable=True)[..., :w]
    return torch.where(used.gather(-1, keep), cand.gather(-1, keep), -1)


def _as_runs(k_idx: torch.Tensor, width: int, nk: int) -> torch.Tensor:
    """Start of a run of ``width`` consecutive keys covering each tile's keys (-1 where none does).

    A tile whose keys form such a run can read K/V through a strided view instead of a gather."""
    valid = k_idx >= 0
    lo = torch.where(valid, k_idx, nk).amin(-1)
    hi = torch.where(valid, k_idx, -1).amax(-1)
    fits = (hi - lo < width) & valid.any(-1)
    return torch.where(fits, torch.clamp(lo, max=nk - width), -1)


def _uniform_runs(starts: list[int]) -> list[slice]:
    """Split a sequence into maximal pieces of evenly spaced values."""
    pieces, first = [], 0
    for i in range(2, len(starts) + 1):
        if i == len(starts) or starts[i] - starts[i - 1] != starts[first + 1] - starts[first]:
            pieces.append(slice(first, i))
            first = i
    if first < len(starts):
        pieces.append(slice(first, len(starts)))
    return pieces


def _staged(g: TileGroup, layout: Layout, nk: int) -> list[TileGroup] | None:
    """Re-express a group of 2D/3D tiles as runs of a per-band "stage" order, or None if that does not fit.

    A band is the tiles whose keys span the same rows (all axes but the last). Ordering the band's keys by
    last-axis coordinate first (column-major) turns each tile's box of keys into one run of consecutive
    stage positions, and neighbouring tiles into evenly spaced runs, so the engine gathers each band's keys
    once and reads every tile as a strided view of them (instead of one gather per tile)."""
    grid = layout.grid
    k = g.k_idx[0]
    valid = k >= 0
    width = k.shape[1]
    coords = unravel(k.clamp(min=0), grid)
    coords[-1] = coords[-1] % layout.dilation[-1]  # a band holds one dilation group of the last axis
    bounds = []
    for c in coords:
        bounds += [torch.where(valid, c, nk).amin(-1), torch.where(valid, c, -1).amax(-1)]
    _, band = torch.unique(torch.stack(bounds, -1), dim=0, return_inverse=True)
    last = grid[-1]
    out = []
    for b in range(int(band.max()) + 1):
        sel = torch.nonzero(band == b)[:, 0]
        keys, kv = k[sel], valid[sel]
        stage = torch.unique(keys[kv])
        if stage.numel() == 0:  # tiles without any key: a run of width 0 would reach the kernel (SIGFPE in it)
            return None
        order = (stage % last) * nk + stage
        order, perm = torch.sort(order)
        stage = stage[perm]
        kc = keys.clamp(min=0)
        pos = torch.searchsorted(order, (kc % last) * nk + kc)
        lo = torch.where(kv, pos, stage.numel()).amin(-1)
        hi = torch.where(kv, pos, -1).amax(-1)
        w = int((hi - lo + 1).max())
        if w > width * 5 // 4:
            return None
        start = torch.clamp(lo, max=stage.numel() - w)
        runs = stage[start[:, None] + torch.arange(w, device=k.device)]
        pieces = _uniform_runs(start.tolist())
        if len(sel) < 4 * len(pieces):  # short pieces: many small kernel calls cost more than the gathers saved
            return None
        for piece in pieces:
            out.append(TileGroup(g.tiles[sel[piece]], g.q_idx[sel[piece]], runs[piece][None],
                                 run_start=start[piece], stage=stage))
    return out


def _groups_by_width(counts: torch.Tensor, tk: int, tq: int, budget: int) -> list[torch.Tensor]:
    """Split tiles into runs of similar candidate-key counts (within 25%), each at most ``budget`` mask entries."""
    order = torch.argsort(counts, stable=True)
    c = counts[order].tolist()
    groups, start = [], 0
    for i in range(1, len(c) + 1):
        if i == len(c) or c[i] > max(1, c[start]) * 1.25 or (i - start + 1) * tq * c[i] * tk > budget:
            groups.append(order[start:i].sort().values)  # natural order inside a group keeps runs evenly spaced
            start = i
    return groups


def build_plan(pattern: Pattern, nq: int, nk: int, tile: int | tuple[int, ...] | None = None,
               device: torch.device | str | None = "cpu") -> Plan:
    qt, kt = token_tiles(pattern, nq, nk, tile, device)
    n_q_tiles, tq = qt.idx.shape
    hp = pattern.heads or 1
    # candidate key blocks per query tile (cheap, tile-level), to group tiles of similar width
    step = max(1, _CHUNK_ELEMS // (hp * kt.idx.shape[0]))
    counts = torch.cat([_block_lists(pattern, qt.idx[t0:t0 + step], kt, nq, nk).sum(-1).amax(0)
                        for t0 in range(0, n_q_tiles, step)])
    layout = layouts(pattern, nq, nk)[1]  # the keys' (staged runs are in key coordinates)
    groups = []
    partition = hp == 1
    for tiles in _groups_by_width(counts, kt.idx.shape[1], tq, _CHUNK_ELEMS // hp):
        q = qt.idx[tiles]
        k_idx = key_lists(pattern, q, kt, nq, nk)
        width = k_idx.shape[-1]
        partition = partition and width <= tq and torch.equal(
            q.sort(-1).values, torch.nn.functional.pad(k_idx[0], (0, tq - width), value=-1).sort(-1).values)
        g = TileGroup(tiles, q, k_idx)
        if hp == 1 and width < nk:
            runs = _as_runs(k_idx[0], width, nk)
            if bool((runs >= 0).float().mean() > 0.5):
                g.k_idx = torch.where((runs >= 0)[:, None], runs[:, None] + torch.arange(width, device=device),
                                      k_idx[0])[None]
                g.run_start = runs
            elif layout is not None and len(layout.grid) > 1:
                groups += _staged(g, layout, nk) or [g]
                continue
        groups.append(g)
    # PyTorch's CPU flash kernel divides by the key count: a width-0 group would kill the process (SIGFPE)
    assert all(g.width >= 1 for g in groups), "internal: a tile group without key slots"
    return Plan(nq, nk, qt.idx, groups, pattern, hp, partition=partition)


def get_plan(pattern: Pattern, nq: int, nk: int, tile: int | tuple[int, ...] | None = None,
             device: torch.device | str = "cpu") -> Plan:
    """Cached ``build_plan``: plans depend only on the pattern and the shapes, not on the data. Kept in the
    byte-bounded ``nearfar.cache.CACHE`` (``NEARFAR_CACHE_BYTES``)."""
    key = ("plan", pattern, nq, nk, tile, str(device))
    plan = CACHE.get(key)
    if plan is None:
        plan = build_plan(pattern, nq, nk, tile, torch.device(device))
        plan.engine_cache.on_change = plan.on_resize = lambda delta: CACHE.resize(key, delta)
        CACHE.put(key, plan, nbytes_of(plan) + plan.q_idx.numel() * 8)  # + q_inv, made on first use
    return plan
