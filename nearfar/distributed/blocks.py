"""The local call of a distributed ``attend`` with run-time selected key blocks.

The block lists index global query blocks and global key blocks; a rank holds some queries and has fetched some
keys, neither aligned to blocks. It widens both to whole global blocks (zero query rows, masked keys), so a local
block is a global block: the lists' rows of its query blocks are kept and their key blocks renumbered (-1 for a block
it does not hold, which none of its queries selects). ``within`` and the static pattern go through the offset view.
The extra rows are dropped from the output; their gradients are zero (zero output gradient), and the extra keys are
masked, so the result and every gradient equal the single-process call restricted to this rank. A bias (this
rank's rows over the global keys) is widened the same way: zero rows for the extra queries, the columns of the
widened keys (a masked extra key reads any column); a ``score_mod`` sees the global indices of the widened tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..patterns import Pattern
from ..selection import SelectedBlocks
from .layout import Ranges
from .plan import rs_size, rs_union
from .view import global_mod, global_view, local_attend


def _index(ranges: Ranges, device: torch.device) -> torch.Tensor:
    parts = [torch.arange(lo, hi, device=device) for lo, hi in ranges]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def _whole(ranges: Ranges, size: int, n: int) -> Ranges:
    """``ranges`` widened to whole blocks of ``size`` (the last one may pass ``n``)."""
    return rs_union(tuple((lo // size * size, -(-hi // size) * size) for lo, hi in ranges))


def _positions(inner: Ranges, outer: Ranges, device: torch.device) -> torch.Tensor:
    """Positions of the (global) indices of ``inner`` in the concatenation of ``outer`` (which covers them)."""
    g = _index(inner, device)
    starts = torch.tensor([lo for lo, _ in outer], device=device)
    base = torch.tensor([0] + [hi - lo for lo, hi in outer[:-1]], device=device).cumsum(0)
    seg = torch.searchsorted(starts, g, right=True) - 1
    return base[seg] + g - starts[seg]


def blocked_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: torch.Tensor | None,
                   pattern: Pattern | None, blocks: SelectedBlocks, queries: Ranges, keys: Ranges, n: int, scale: float,
                   engine: str, return_lse: bool, bias: torch.Tensor | None = None,
                   score_mod: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The local call with run-time blocks: queries and keys widened to whole global blocks (zero rows, masked
    keys), so the global block lists index local blocks; ``(out, lse)`` of the real queries. ``bias``: 4D, the
    rows of ``q`` (or 1) over the global keys (or 1)."""
    qb, kb = blocks.q_block, blocks.k_block
    qw, kw = _whole(queries, qb, n), _whole(keys, kb, n)
    dev, (b, hq, _, d), hkv = q.device, q.shape, k.shape[1]
    qpos, kpos = _positions(queries, qw, dev), _positions(keys, kw, dev)
    nqw, nkw = rs_size(qw), rs_size(kw)
    qx = q.new_zeros(b, hq, nqw, d).index_copy(2, qpos, q)
    kx = k.new_zeros(b, hkv, nkw, d).index_copy(2, kpos, k)
    vx = v.new_zeros(b, hkv, nkw, v.shape[-1]).index_copy(2, kpos, v)
    real = kpm if kpm is not None else torch.ones(b, kpos.numel(), dtype=torch.bool, device=dev)
    mask = torch.zeros(b, nkw, dtype=torch.bool, device=dev).index_copy(1, kpos, real)
    # local block lists: the rows of the local query blocks, global key blocks renumbered (-1 if not here)
    nkb = -(-n // kb)
    local_kb = torch.full((nkb + 1,), -1, dtype=torch.long, device=dev)
    kblocks = _index(tuple((lo // kb, hi // kb) for lo, hi in kw), dev)
    local_kb[kblocks.clamp(max=nkb)] = torch.arange(kblocks.numel(), device=dev)
    local_kb[nkb] = -1
    rows = _index(tuple((lo // qb, hi // qb) for lo, hi in qw), blocks.kv_num_blocks.device)
    num = blocks.kv_num_blocks.index_select(2, rows)
    idx = blocks.kv_indices.index_select(2, rows).long()
    idx = local_kb[torch.where((idx >= 0) & (idx < nkb), idx, nkb)].to(blocks.kv_indices.dtype)
    within = global_view(blocks.within, qw, kw, n) if blocks.within is not None else None
    sel = SelectedBlocks(num, idx, q_block=qb, kv_block=kb, within=within)
    view = global_view(pattern, qw, kw, n) if pattern is not None else None
    if bias is not None:
        if bias.shape[3] > 1:  # past the end: a masked key, any column
            bias = bias.index_select(3, _index(kw, dev).clamp(max=n - 1))
        if bias.shape[2] > 1:
            bias = bias.new_zeros(*bias.shape[:2], nqw, bias.shape[3]).index_copy(2, qpos, bias)
    mod = global_mod(score_mod, qw, kw, n) if score_mod is not None else None
    o, lse = local_attend(qx, kx, vx, view, scale, mask, engine, return_lse, bias, sel, None, mod)
    return o.index_select(2, qpos), (lse.index_select(2, qpos) if lse is not None else None)
