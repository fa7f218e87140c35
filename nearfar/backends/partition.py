"""Partition engine: patterns whose tiles attend only to themselves (Swin/MaxViT windows, grids, cyclic shifts).

This is the "window partition + batched attention" of the official codes, for any such pattern: bring the tokens
into window order, run one SDPA call over ``(B, Hq * windows, T, d)``, and bring them back. Where the windows are
a regular partition of the grid (block or grid style, optionally of the rolled grid, as in Swin, MaxViT, CRAFT and
HiDiffusion) the reordering is a reshape/permute copy (plus ``torch.roll``), as in those codes; otherwise it is a
gather with the plan's tile index. The pattern's mask inside a window (Swin's region mask, empty slots of edge
tiles), a bias (dense or a relative-position table, looked up per window, so it gets its gradient through
autograd) and a key padding mask become one additive ``(…, T, T)`` mask. Plain differentiable torch ops: autograd,
``torch.compile`` and every device work unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..bias import BiasSource, DenseBias
from ..cache import nbytes_of
from ..guard import zero_rows
from ..plan import Plan, allowed_heads, inverse_order, to_additive
from .dense import empty_rows, harmless_rows, scored_softmax, sdpa

#: a regular partition's reordering: (grid, shifts, view shape, permutation)
Recipe = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]


@dataclass
class Windows:
    """How a partition plan's tokens map to windows, computed once per plan."""

    order: torch.Tensor  # (nT, T) token of each window slot, -1 = empty
    mask: torch.Tensor | None  # (nT, T, T) additive mask inside each window, None if all zero
    src: torch.Tensor  # (nT*T,) gather index (empty slots read token 0)
    inv: torch.Tensor  # (N,) position of each token in ``src``
    # regular partitions: (grid, shifts, view shape, permutation) to reorder by reshape/permute instead
    recipe: Recipe | None = None
    memo: dict = field(default_factory=dict)  # data-independent values of bias sources
    slot_empty: torch.Tensor | None = None  # (nT, T) window slots past the last token, None if there are none


def _split(grid, size, kind):
    """View shape and permutation that put window coordinates first and slot coordinates last."""
    shape, win, slot = [], [], []
    for a, (n, m) in enumerate(zip(grid, size)):
        outer, inner = (n // m, m) if kind == "block" else (m, n // m)  # grid: token = slot * stride + window
        shape += [outer, inner]
        win.append(2 * a if kind == "block" else 2 * a + 1)
        slot.append(2 * a + 1 if kind == "block" else 2 * a)
    return tuple(shape), tuple(win + slot)


def reorder(x: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """(B, H, N, e) -> (B, H * nT, T, e) by roll + reshape/permute."""
    grid, shifts, shape, perm = recipe
    b, h, _, e = x.shape
    nd = len(grid)
    x = x.view(b, h, *grid, e)
    if any(shifts):
        x = torch.roll(x, shifts=tuple(-s for s in shifts), dims=tuple(range(2, 2 + nd)))
    x = x.reshape(b, h, *shape, e).permute(0, 1, *(2 + p for p in perm), 2 + 2 * nd)
    n_t = math.prod(shape[p] for p in perm[:nd])
    return x.reshape(b, h * n_t, -1, e)


def restore(x: torch.Tensor, recipe: Recipe, b: int, h: int) -> torch.Tensor:
    """Inverse of ``reorder``: (B, H * nT, T, e) -> (B, H, N, e)."""
    grid, shifts, shape, perm = recipe
    nd, e = len(grid), x.shape[-1]
    x = x.view(b, h, *(shape[p] for p in perm), e)
    back = [0] * (2 * nd)
    for i, p in enumerate(perm):
        back[p] = i
    x = x.permute(0, 1, *(2 + i for i in back), 2 + 2 * nd).reshape(b, h, *grid, e)
    if any(shifts):
        x = torch.roll(x, shifts=tuple(shifts), dims=tuple(range(2, 2 + nd)))
    return x.reshape(b, h, -1, e)


def _recipe(plan: Plan) -> tuple[Recipe, torch.Tensor] | None:
    """A roll + reshape/permute that produces exactly the plan's windows (as sets), or None."""
    pattern = plan.pattern
    layout = pattern.layout(plan.nq, plan.nk)
    if layout is None or layout.tile is None or len(layout.tile) != len(layout.grid):
        return None
    grid, size = layout.grid, layout.tile
    if any(n % m for n, m in zip(grid, size)):
        return None
    # the layout's cyclic axes are rolled by their offset (Swin/cyclic shifts); an offset on a non-cyclic axis
    # means partial edge windows, which no reshape produces
    if any(o and not w for o, w in zip(layout.offset, layout.wrap)):
        return None
    shifts = tuple(o if w else 0 for o, w in zip(layout.offset, layout.wrap))
    kind = "grid" if any(d > 1 for d in layout.dilation) else "block"
    shape, perm = _split(grid, size, kind)
    recipe: Recipe = (grid, shifts, shape, perm)
    order = reorder(torch.arange(plan.nq, device=plan.q_idx.device).view(1, 1, -1, 1), recipe)[0, :, :, 0]
    if order.shape != plan.q_idx.shape:
        return None
    # windows are sets: the plan's tiles must be full and each must lie in one recipe window
    win_of = torch.empty(plan.nq, dtype=torch.long, device=order.device)
    win_of[order.reshape(-1)] = torch.arange(order.shape[0], device=order.device).repeat_interleave(order.shape[1])
    members = win_of[plan.q_idx.clamp(min=0)]
    same = bool((plan.q_idx >= 0).all()) and bool((members == members[:, :1]).all())
    return (recipe, order) if same else None


@torch.compiler.disable
def windows(plan: Plan) -> Windows:
    w = plan.engine_cache.get("windows")
    if w is None:
        found = _recipe(plan)
        recipe, order = found if found is not None else (None, plan.q_idx)
        ok = allowed_heads(plan.pattern, order, order[None], plan.nq, plan.nk)[0]
        # empty slots: a harmless row of one key and a zero query (their outputs are dropped; see ``harmless_rows``)
        slot_empty = order < 0
        ok |= slot_empty[:, :, None] & (torch.arange(order.shape[1], device=order.device) == 0)
        mask = None if bool(ok.all()) else to_additive(ok)
        w = Windows(order, mask, order.clamp(min=0).reshape(-1), inverse_order(order, plan.nq), recipe,
                    slot_empty=slot_empty if bool(slot_empty.any()) else None)
        # charged with the rpb index a bias source may memoise (nT*T*T int64)
        plan.engine_cache.put("windows", w, nbytes_of(w) + order.numel() * order.shape[1] * 8)
    return w


def partition_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, scale: float,
                        kpm: torch.Tensor | None = None, bias: BiasSource | None = None,
                        return_lse: bool = False,
                        score_mod: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of a partition plan. ``kpm``: additive (B, Nk) float mask; ``bias``: a bias source; ``score_mod``:
    applied to each window's materialised ``(T, T)`` scores with the tokens' own indices."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    win = windows(plan)
    n_tiles, t = win.order.shape
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)

    def tiles(x):  # (B, H, N, e) -> (B, H * nT, T, e)
        if win.recipe is not None:
            return reorder(x, win.recipe)
        return x.index_select(2, win.src).view(x.shape[0], x.shape[1] * n_tiles, t, x.shape[-1])

    def untiles(x):  # (B, H * nT, T, e) -> (B, H, N, e)
        if win.recipe is not None:
            return restore(x, win.recipe, b, hq)
        return x.reshape(b, hq, n_tiles * t, -1).index_select(2, win.inv)

    qt, kt, vt = tiles(q), tiles(k), tiles(v)
    if win.slot_empty is not None:  # slots past the last token read token 0: a zero query there (see ``windows``)
        qt = zero_rows(qt, win.slot_empty.repeat(hq, 1)[None, :, :, None])
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask = None if win.mask is None else win.mask.to(acc)[None, None]  # (1, 1, nT, T, T)
    if kpm is not None:
        kp = kpm.index_select(1, win.src).view(b, 1, n_tiles, 1, t).to(acc)
        mask = kp if mask is None else mask + kp
    if bias is not None:
        bt = bias.tile(win.order, win.order[None], win.memo).to(acc)  # (B', H', nT, T, T)
        mask = bt if mask is None else mask + bt
    empty = None
    if mask is not None:
        mask = mask.expand(mask.shape[0], hq, n_tiles, t, t).reshape(mask.shape[0], hq * n_tiles, t, t)
    if score_mod is not None:  # each window's scores through the score_mod, with the tokens' (b, h, q, k)
        order = win.order.clamp(min=0).repeat(hq, 1)  # (Hq * nT, T): head-major, as ``tiles``
        heads = torch.arange(hq, device=q.device).repeat_interleave(n_tiles).view(1, -1, 1, 1)
        index = (torch.arange(b, device=q.device).view(-1, 1, 1, 1), heads, order[None, :, :, None],
                 order[None, :, None, :])
        out, lse = scored_softmax(qt, kt, vt, mask, scale, score_mod, return_lse, index)
        return untiles(out), (untiles(lse[..., None])[..., 0] if lse is not None else None)
    if mask is not None:
        # inside a partition every query may attend itself: only a padding mask or a dense bias (with -inf)
        # can leave a query without keys
        if kpm is not None or isinstance(bias, DenseBias):
            empty = empty_rows(mask)  # a query with no key: harmless row, zero output
            if empty is not None:
                qt, mask = harmless_rows(qt, mask, empty)
    lse = None
    if return_lse:
        s = torch.matmul(qt.to(acc), kt.to(acc).transpose(-1, -2)) * scale
        lse = torch.logsumexp(s if mask is None else s + mask, -1)
        if empty is not None:
            lse = lse.masked_fill(empty[..., 0].expand_as(lse), float("-inf"))
        lse = untiles(lse[..., None])[..., 0]
    out = sdpa(qt, kt, vt, attn_mask=None if mask is None else mask.to(q.dtype), scale=scale)
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    return untiles(out), lse
