"""The query tile shape the compiled kernel runs a 2D/3D pattern with, chosen by counting its work.

The kernel scores, per 64-key sub-block of a tile's key list (ascending keys: a box is read row by row), every query
of the tile from the first row that sees one of the sub-block's keys to the last, rounded to the vector width. A
neighbourhood's key box is wider than each query's window by the tile's width less one, so for a square 8x8 tile a
13x13 window leaves 7 of every 20 key columns masked for each query; a tall, narrow 16x4 tile leaves 3 of 16. On NA
2D 13x13 at 128x128 that is 1.77x -> 1.50x the allowed pairs, and the forward ran 11-15% faster (NA 3D 7x7x7 with
8x4x2 tiles: 1.79x -> 1.58x, ~5%; with 16x2x2 tiles on a 16-deep grid, whose key box then spans the whole depth:
1.39x, forward 8% and forward+backward 7% faster again). A pattern that attends along one axis (rows of an axial
pattern) wants the other shape, so the tile is not fixed: each candidate's work is counted on a few query tiles
spread over the grid, and a candidate replaces the plan's default only when it scores clearly fewer pairs. A
candidate longer than the grid along an axis is skipped: the plan would cut it to fewer than 64 queries, and the
kernel's per-tile costs (Q loads, K/V rows read per query) then outweigh the pairs saved (16x2x2 cut to 8x2x2 on an
8-deep grid counted 12% fewer pairs and ran 9% slower).

The PyTorch block-sparse path computes each tile's whole key box, for which the square default is best; it keeps
it (``nearfar.dispatch`` asks for this tile only where the kernel runs).
"""

from __future__ import annotations

import torch

from ..cache import CACHE
from ..patterns.base import Pattern
from ..plan import DEFAULT_TILE, allowed_heads, fitted_tile, key_lists, layouts, token_tiles
from .native import KB, live_rows

#: candidate tile extents per spatial rank, the plan's default first (ties keep it)
CANDIDATES = {2: (DEFAULT_TILE[2], (16, 4), (4, 16)), 3: (DEFAULT_TILE[3], (8, 4, 2), (2, 4, 8), (16, 2, 2))}
#: a candidate must score at most this share of the default's pairs (the counts are a sample; narrower tiles read
#: a little more K/V per query)
_MARGIN = 0.97
_SAMPLES = 24


def sampled_work(pattern: Pattern, nq: int, nk: int, tile: tuple[int, ...], samples: int = _SAMPLES) -> float:
    """Scores the kernel computes per allowed pair on ``samples`` query tiles spread evenly over the tiles."""
    qt, kt = token_tiles(pattern, nq, nk, tile, "cpu")
    n = qt.idx.shape[0]
    pick = torch.linspace(0, n - 1, min(samples, n)).round().long().unique()
    q = qt.idx[pick]
    k = key_lists(pattern, q, kt, nq, nk)
    k = k.gather(-1, torch.argsort(torch.where(k < 0, nk, k), dim=-1, stable=True))
    mask = allowed_heads(pattern, q, k, nq, nk)  # (Hp, c, T, W)
    hp, c, _, w = mask.shape
    _, r0, r1 = live_rows(mask)  # 0, 0 for a sub-block no row sees
    vs = 16 if str(torch.backends.cpu.get_cpu_capability()) == "AVX512" else 8  # the kernel's vector width
    rows = -(-r1 // vs) * vs - r0 // vs * vs
    keys = torch.nn.functional.pad(k >= 0, (0, r0.shape[-1] * KB - w)).view(hp, c, -1, KB).sum(-1)
    return float((rows * keys).sum()) / max(1, int(mask.sum()))


def native_tile(pattern: Pattern, nq: int, nk: int) -> tuple[int, ...] | None:
    """The tile the kernel runs ``pattern`` with at this size: None (the plan's default) unless the pattern is laid
    out on a 2D/3D grid without a tile of its own and another candidate scores clearly fewer pairs. Cached."""
    key = ("native-tile", pattern, nq, nk)
    got = CACHE.get(key)
    if got is None:
        got = CACHE.put(key, _choose(pattern, nq, nk) or (), 64)
    return got or None


def _choose(pattern: Pattern, nq: int, nk: int) -> tuple[int, ...] | None:
    q_lay, k_lay = layouts(pattern, nq, nk)
    choice = None
    if q_lay is not None and k_lay is not None and q_lay.tile is None and len(q_lay.grid) in CANDIDATES:
        default, *others = CANDIDATES[len(q_lay.grid)]
        best = sampled_work(pattern, nq, nk, default) * _MARGIN
        for tile in others:
            if fitted_tile(tile, q_lay) != tile:
                continue  # cut by the plan to fewer queries per tile
            work = sampled_work(pattern, nq, nk, tile)
            if work < best:
                choice, best = tile, work
    return choice
