"""Partition engine: patterns whose tiles attend only to themselves (Swin/MaxViT windows, grids, cyclic shifts).

This is the "window partition + batched attention" of the official codes, for any such pattern: gather the
tokens into tile order, run one SDPA call over ``(B, Hq * tiles, T, d)``, gather back. The pattern's mask inside
a tile (Swin's region mask, empty slots of edge tiles), a bias (dense or a relative-position table, gathered per
tile, so it gets its gradient through autograd) and a key padding mask become one additive ``(…, T, T)`` mask.
Plain differentiable torch ops: autograd, ``torch.compile`` and every device work unchanged.
"""

from __future__ import annotations

import torch

from ..bias import DenseBias
from ..plan import Plan
from .dense import sdpa


@torch.compiler.disable
def _layout(plan: Plan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gather index (tile-major slots; empty slots read token 0), inverse index, and the tiles' pattern mask."""
    return plan.q_idx.clamp(min=0).reshape(-1), plan.q_inv, plan.tile_mask


@torch.compiler.disable
def _memo(plan: Plan) -> dict:
    return plan.engine_cache.setdefault("partition", {})


def partition_attention(q, k, v, plan: Plan, scale: float, kpm=None, bias=None, return_lse: bool = False):
    """Attention of a partition plan. ``kpm``: additive (B, Nk) float mask; ``bias``: a bias source."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    n_tiles, t = plan.q_idx.shape
    src, inv, tile_mask = _layout(plan)
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)

    def tiles(x):  # (B, H, N, e) -> (B, H * nT, T, e)
        return x.index_select(2, src).view(x.shape[0], x.shape[1] * n_tiles, t, x.shape[-1])

    qt, kt, vt = tiles(q), tiles(k), tiles(v)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask = None if tile_mask is None else tile_mask.to(acc)[None, None]  # (1, 1, nT, T, T)
    if kpm is not None:
        kp = kpm.index_select(1, src).view(b, 1, n_tiles, 1, t).to(acc)
        mask = kp if mask is None else mask + kp
    if bias is not None:
        bt = bias.tile(plan.q_idx, plan.q_idx[None], _memo(plan)).to(acc)  # (B', H', nT, T, T)
        mask = bt if mask is None else mask + bt
    empty = None
    if mask is not None:
        mask = mask.expand(mask.shape[0], hq, n_tiles, t, t).reshape(mask.shape[0], hq * n_tiles, t, t)
        # inside a partition every query may attend itself: only a padding mask or a dense bias (with -inf)
        # can leave a query without keys
        if kpm is not None or isinstance(bias, DenseBias):
            rows = torch.isinf(mask).all(-1, keepdim=True)  # a query with no key: harmless row, zero output
            if bool(rows.any()):
                empty = rows
                mask = mask.masked_fill(rows, 0.0)
    lse = None
    if return_lse:
        s = torch.matmul(qt.to(acc), kt.to(acc).transpose(-1, -2)) * scale
        lse = torch.logsumexp(s if mask is None else s + mask, -1)
        if empty is not None:
            lse = lse.masked_fill(empty[..., 0].expand_as(lse), float("-inf"))
        lse = lse.reshape(b, hq, n_tiles * t).index_select(2, inv)
    out = sdpa(qt, kt, vt, attn_mask=None if mask is None else mask.to(q.dtype), scale=scale)
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    out = out.reshape(b, hq, n_tiles * t, -1).index_select(2, inv)
    return out, lse
