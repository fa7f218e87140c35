"""FlexAttention engine: PyTorch's ``flex_attention`` with a BlockMask built analytically from the pattern.

The block mask comes from the pattern's ``block_allowed`` on the same compact token tiles the block-sparse
engine uses (so 2D/3D neighbourhoods keep their sparsity), never from evaluating all N² pairs; the exact
``allowed`` predicate is the ``mask_mod`` inside the kept blocks. Tokens are permuted into tile order
before the call and back after it.

Limits inherited from FlexAttention: on CPU it is forward-only (no autograd) and the compiled kernel is
specialised per shape (the first call of a shape compiles for several seconds). ``NEARFAR_FLEX_COMPILE=0``
runs it eagerly (slow, for testing).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from ..bias import BiasSource, DenseBias, RelativePositionBias
from ..cache import CACHE
from ..mods import call_score_mod
from ..patterns import Dense, Pattern, Tiles
from ..plan import inverse_order, token_tiles
from ..selection import SelectedBlocks

FLEX_TILE = {1: (128,), 2: (8, 16), 3: (4, 4, 8)}
#: kv_num, kv_idx, q_map, k_map, q_inv, query tile size, key tile size
_BlockPlan = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]


def available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    if os.environ.get("NEARFAR_FLEX_COMPILE", "1") == "0":
        return flex_attention
    return torch.compile(flex_attention, dynamic=False)


def _lse_request() -> dict:
    """``return_aux=AuxRequest(lse=True)``: PyTorch deprecated ``return_lse=True`` in favour of it (2.9); older
    versions only have the flag."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        return {"return_lse": True}
    return {"return_aux": AuxRequest(lse=True)}


def _block_plan(pattern: Pattern, nq: int, nk: int, device: str) -> _BlockPlan:
    """The BlockMask's block lists and token maps, kept in the byte-bounded ``nearfar.cache.CACHE``."""
    key = ("flex_plan", pattern, nq, nk, device)
    hit = CACHE.get(key)
    return hit if hit is not None else CACHE.put(key, _make_block_plan(pattern, nq, nk, device))


def _make_block_plan(pattern: Pattern, nq: int, nk: int, device: str) -> _BlockPlan:
    lay = pattern.layout(nq, nk) if nq == nk else None
    tile = FLEX_TILE[len(lay.grid)] if lay is not None else FLEX_TILE[1][0]
    qt, kt = token_tiles(pattern, nq, nk, tile, torch.device(device))
    if qt.idx.shape[1] != kt.idx.shape[1] or qt.idx.shape[1] % 16:
        # flex wants one block size on both sides: fall back to plain 128-token chunks
        qt, kt = token_tiles(Dense(), nq, nk, 128, torch.device(device))
        qt = Tiles(torch.nn.functional.pad(qt.idx, (0, 128 - qt.idx.shape[1]), value=-1))
    blocks = pattern.block_allowed(qt, kt, nq, nk)
    blocks = blocks if pattern.heads is not None else blocks[None]
    kv_num = blocks.sum(-1).to(torch.int32)[None]  # (1, Hp, nTq)
    kv_idx = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)[None]
    q_map, k_map = qt.idx.reshape(-1), kt.idx.reshape(-1)
    return kv_num, kv_idx, q_map, k_map, inverse_order(qt.idx, nq), qt.idx.shape[1], kt.idx.shape[1]


def flex_attention_engine(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern | None, scale: float,
                          kpm: torch.Tensor | None = None, bias: BiasSource | None = None,
                          return_lse: bool = False,
                          user_mod: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pattern through ``flex_attention``; ``user_mod`` is a caller's ``score_mod``, handed the original token
    indices (the engine runs on tokens in tile order) and applied before the bias and the key padding."""
    from torch.nn.attention.flex_attention import BlockMask

    if q.device.type == "cpu" and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise ValueError("engine='flex' is forward-only on CPU (a FlexAttention limitation); "
                         "use engine='blocksparse' to train, or call under torch.no_grad()")
    if bias is not None and bias.requires_grad and torch.is_grad_enabled():
        raise ValueError("engine='flex' takes no gradient for bias here; use engine='blocksparse'")
    pattern = pattern if pattern is not None else Dense()
    nq, nk = q.shape[2], k.shape[2]
    kv_num, kv_idx, q_map, k_map, q_inv, tq, tk = _block_plan(pattern, nq, nk, str(q.device))
    qm, km = q_map.clamp(min=0), k_map.clamp(min=0)
    per_head = pattern.heads is not None

    def mask_mod(b, h, qi, ki):
        oq, ok = q_map[qi], k_map[ki]
        allowed = pattern.allowed(oq.clamp(min=0), ok.clamp(min=0), nq, nk)
        if per_head:
            allowed = allowed[h]
        return allowed & (oq >= 0) & (ok >= 0)

    block_mask = BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=(tq, tk), mask_mod=mask_mod,
                                          seq_lengths=(q_map.numel(), k_map.numel()))
    score_mod = None
    if kpm is not None or bias is not None or user_mod is not None:
        kp = kpm.to(q.dtype) if kpm is not None else None
        db = bias.b4 if isinstance(bias, DenseBias) else None
        table = bias.tensor.reshape(bias.tensor.shape[0], -1) if bias is not None and db is None else None
        rpb_pattern = bias.pattern if isinstance(bias, RelativePositionBias) else None

        def score_mod(score, b, h, qi, ki):
            oq, ok = qm[qi], km[ki]
            if user_mod is not None:
                score = call_score_mod(user_mod, score, b, h, oq, ok)
            if kp is not None:
                score = score + kp[b, ok]
            if db is not None:
                score = score + db[b * (db.shape[0] > 1), h * (db.shape[1] > 1), oq * (db.shape[2] > 1),
                                   ok * (db.shape[3] > 1)]
            if table is not None and rpb_pattern is not None:  # table is set for a RelativePositionBias only
                score = score + table[h, rpb_pattern.rpb_index(oq, ok, nq)]
            return score

    qp, kp_, vp = q.index_select(2, qm), k.index_select(2, km), v.index_select(2, km)
    aux = _lse_request() if return_lse else None
    res = _compiled()(qp, kp_, vp, score_mod=score_mod, block_mask=block_mask, scale=scale,
                      enable_gqa=q.shape[1] != k.shape[1], **aux or {})
    out, lse = (res[0], getattr(res[1], "lse", res[1])) if return_lse else (res, None)
    out = out.index_select(2, q_inv)
    if lse is not None:
        lse = lse.index_select(2, q_inv)
        # a row without keys: -inf eagerly, about the dtype's lowest value from some compiled kernels
        lse = torch.where(torch.isfinite(lse) & (lse > torch.finfo(lse.dtype).min / 2), lse, float("-inf"))
    return out, lse


def flex_selected(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern | None,
                  blocks: SelectedBlocks, scale: float, kpm: torch.Tensor | None = None,
                  bias: BiasSource | None = None, return_lse: bool = False,
                  user_mod: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run-time key blocks through ``BlockMask.from_kv_blocks``: the block lists are the union of the selection's
    and the pattern's blocks (``block_allowed`` on the selection's blocks), and the ``mask_mod`` is the exact pair
    set, ``pattern(q, k) | (selected(q, k) & within(q, k))``, so Flex runs what the other engines run."""
    from torch.nn.attention.flex_attention import BlockMask

    if q.device.type == "cpu" and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise ValueError("engine='flex' is forward-only on CPU (a FlexAttention limitation); "
                         "use engine='blocksparse' to train, or call under torch.no_grad()")
    if bias is not None and bias.requires_grad and torch.is_grad_enabled():
        raise ValueError("engine='flex' takes no gradient for bias here; use engine='blocksparse'")
    b, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    table = blocks.block_table(nk)  # (B', Hs, QB, KB)
    if table.shape[1] not in (1, hq):
        table = table.repeat_interleave(hq // hkv, dim=1)
    union = table
    if pattern is not None:
        qt, kt = blocks.tiles(nq, nk)
        static = pattern.block_allowed(qt, kt, nq, nk)
        union = table | (static if pattern.heads is not None else static[None])[None]
    kv_num = union.sum(-1).to(torch.int32)
    kv_idx = torch.argsort((~union).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    tq, tk, within = blocks.q_block, blocks.k_block, blocks.within
    bsel, hsel = table.shape[0] > 1, table.shape[1] > 1

    def mask_mod(bi, h, qi, ki):
        ok = table[bi * bsel, h * hsel, qi // tq, ki // tk]
        if within is not None:
            ok = ok & within.allowed(qi, ki, nq, nk)
        if pattern is not None:
            static_ok = pattern.allowed(qi, ki, nq, nk)
            ok = ok | (static_ok[h] if pattern.heads is not None else static_ok)
        return ok & (qi < nq) & (ki < nk)

    block_mask = BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=(tq, tk), mask_mod=mask_mod,
                                          seq_lengths=(nq, nk))
    score_mod = None
    if kpm is not None or bias is not None or user_mod is not None:
        kp = kpm.to(q.dtype) if kpm is not None else None
        db = bias.b4 if isinstance(bias, DenseBias) else None

        def score_mod(score, bi, h, qi, ki):
            if user_mod is not None:
                score = call_score_mod(user_mod, score, bi, h, qi, ki)
            if kp is not None:
                score = score + kp[bi, ki]
            if db is not None:
                score = score + db[bi * (db.shape[0] > 1), h * (db.shape[1] > 1), qi * (db.shape[2] > 1),
                                   ki * (db.shape[3] > 1)]
            return score

    aux = _lse_request() if return_lse else None
    res = _compiled()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=hq != hkv,
                      **aux or {})
    out, lse = (res[0], getattr(res[1], "lse", res[1])) if return_lse else (res, None)
    if lse is not None:
        lse = torch.where(torch.isfinite(lse) & (lse > torch.finfo(lse.dtype).min / 2), lse, float("-inf"))
    return out, lse
