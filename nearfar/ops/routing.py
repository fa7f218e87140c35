"""Routing ops of content-routed block-sparse attention, in plain torch (``nearfar.functional`` exports them).

The pieces that NSA, MoBA, SeerAttention and the Routing Transformer share, batched over batch, heads and blocks:

- ``pool_blocks``: one summary vector per block of tokens (mean: MoBA, NSA's fla variant; max/min/mean
  concatenated: SeerAttention's ``Kmaxminavg`` gate input).
- ``block_scores``: scores of query blocks (or single queries) against pooled key blocks, with the block-causal
  mask and a GQA group reduction.
- ``topk_blocks``, ``threshold_blocks``, ``nz_ratio_blocks``: which key blocks each query block keeps, with forced
  blocks, in FlexAttention's block-list format (``kv_blocks_from_mask`` converts a boolean block mask).
- ``block_attention_stat``: the block max-pool (or block mass) of the exact softmax map, chunk by chunk:
  SeerAttention's distillation target.
- ``kmeans_route`` and ``ema_update_centroids``: the Routing Transformer's balanced top-w cluster assignment and
  its EMA k-means centroid update.

Papers and official code: MoBA (Lu et al., 2025) -- MoonshotAI/MoBA ``moba/moba_naive.py``
(``moba_attn_varlen_naive``); NSA (Yuan et al., 2025) -- fla-org/flash-linear-attention ``fla/ops/nsa/naive.py``
(``naive_nsa_topk``); SeerAttention (Gao et al., 2024) -- microsoft/SeerAttention
``seer_attn/prefill_sparse/attn_gate.py`` (the AttnGate pooling), ``seer_attn/modules/common.py``
(``get_sparse_attn_mask_from_threshold``, ``get_sparse_attn_mask_from_nz_ratio``) and
``seer_attn/modules/attention_distill.py`` (``attention_distill_forward``: the pooled attention map); Routing
Transformer (Roy et al., 2021) -- lucidrains/routing-transformer ``routing_transformer/routing_transformer.py``
(``Kmeans``, ``kmeans_iter``, ``distribution``, ``ema_inplace``).

**Block-list format.** A selection is ``(kv_num_blocks, kv_indices)``: ``kv_num_blocks (B, H, QB)`` int32 is the
number of key blocks kept by each query block (row), ``kv_indices (B, H, QB, KB)`` int32 holds them in ascending
order in its first ``kv_num_blocks`` entries, and **-1** in the rest. ``KB`` is the number of key blocks, so the
pair goes straight into ``torch.nn.attention.flex_attention.BlockMask.from_kv_blocks`` (which ignores entries past
``kv_num_blocks``); clamp the -1 before using the indices in a gather.

**Rows and their current block.** Row ``m`` of a score map stands for the query tokens ``[m*q_block_size,
(m+1)*q_block_size)`` shifted by ``q_start`` (the position of the first query, e.g. the cache length when
decoding). Its *current* key block is the one holding its last query token, ``(q_start + (m+1)*q_block_size - 1)
// k_block_size``; with ``causal`` a key block after the current one is masked. Single queries are rows with
``q_block_size=1``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, TypedDict

import torch

if TYPE_CHECKING:  # annotations only (postponed): typing.Unpack is Python 3.11+, typing_extensions has it
    from typing_extensions import Unpack

from ..checks import (
    check_bool,
    check_choice,
    check_nonneg_int,
    check_positive_int,
    check_real_range,
    check_scale,
    check_tensor,
)

__all__ = [
    "block_attention_stat",
    "block_scores",
    "ema_update_centroids",
    "kmeans_route",
    "kv_blocks_from_mask",
    "nz_ratio_blocks",
    "pool_blocks",
    "threshold_blocks",
    "topk_blocks",
]


def _num_blocks(n: int, block_size: int) -> int:
    return (n + block_size - 1) // block_size


def _current_block(rows: int, q_block_size: int, k_block_size: int, q_start: int,
                   device: torch.device) -> torch.Tensor:
    """The key block holding the last query token of each row, ``(rows,)`` int64."""
    last = q_start + (torch.arange(rows, device=device) + 1) * q_block_size - 1
    return torch.div(last, k_block_size, rounding_mode="floor")


def pool_blocks(x: torch.Tensor, block_size: int, how: str = "mean") -> torch.Tensor:
    """Pool ``x (B, H, N, d)`` along the tokens in blocks of ``block_size``: ``(B, H, ceil(N / block_size), d)``.

    Block ``j`` covers tokens ``[j*block_size, (j+1)*block_size)``; a last partial block pools its real tokens
    only (MoBA's and fla's mean pooling). ``how="maxminavg"`` concatenates the max, min and mean pools on the
    channel axis, ``(B, H, ceil(N / block_size), 3d)``, as SeerAttention's ``Kmaxminavg`` gate input. Differentiable
    (the gradient of a max/min is shared among tied tokens, as ``torch.amax`` does).

    Args:
        x: Tokens ``(B, H, N, d)``, a floating dtype, any layout; ``N`` may be 0.
        block_size: Tokens per block (>= 1).
        how: ``"mean"``, ``"max"``, ``"min"`` or ``"maxminavg"``.

    Returns:
        The pooled blocks ``(B, H, ceil(N / block_size), d)`` (``3d`` for ``"maxminavg"``), ``x``'s dtype.

    Raises:
        TypeError: If ``x`` is not a floating tensor, or an argument has the wrong type.
        ValueError: If ``x`` is not 4-D, ``block_size < 1`` or ``how`` is unknown.

    Examples:
        >>> import torch
        >>> from nearfar.functional import pool_blocks
        >>> x = torch.arange(5.0).reshape(1, 1, 5, 1)
        >>> pool_blocks(x, 2).flatten().tolist()
        [0.5, 2.5, 4.0]
        >>> pool_blocks(x, 2, "maxminavg")[0, 0].tolist()
        [[1.0, 0.0, 0.5], [3.0, 2.0, 2.5], [4.0, 4.0, 4.0]]
    """
    check_tensor(x, "x", 4)
    bs = check_positive_int(block_size, "block_size")
    check_choice(how, "how", ("mean", "max", "min", "maxminavg"))
    b, h, n, d = x.shape
    nb = _num_blocks(n, bs)
    pad = nb * bs - n

    def blocks(fill: float) -> torch.Tensor:
        padded = torch.nn.functional.pad(x, (0, 0, 0, pad), value=fill) if pad else x
        return padded.reshape(b, h, nb, bs, d)

    def mean() -> torch.Tensor:
        counts = torch.full((nb,), bs, dtype=x.dtype, device=x.device)
        if pad:
            counts[-1] = bs - pad
        return blocks(0.0).sum(dim=3) / counts[:, None]

    if how == "mean":
        return mean()
    if how == "max":
        return blocks(-math.inf).amax(dim=3)
    if how == "min":
        return blocks(math.inf).amin(dim=3)
    return torch.cat([blocks(-math.inf).amax(dim=3), blocks(math.inf).amin(dim=3), mean()], dim=-1)


def block_scores(
    q: torch.Tensor,
    k_blocks: torch.Tensor,
    *,
    k_block_size: int,
    q_block_size: int = 1,
    q_start: int = 0,
    causal: bool = True,
    include_current: bool = True,
    scale: float | None = None,
    softmax: bool = False,
    group_reduce: str | None = None,
) -> torch.Tensor:
    """Scores ``scale * q . k_block`` of each query row against each pooled key block, block-causally masked.

    A row of ``q`` is a pooled query block of ``q_block_size`` tokens, or a single query (``q_block_size=1``); see
    the module docstring for the rows' positions and current blocks. With ``causal``, a key block after the row's
    current block scores ``-inf``, and with ``include_current=False`` the current block does too, so only
    complete past blocks compete (MoBA: the current block is then added by ``topk_blocks(force_current=True)``;
    fla's NSA counts a block complete once its last token is <= t: token queries with ``q_start + 1`` and
    ``include_current=False``).
    GQA: query head ``h`` scores the key blocks of KV head ``h // G``; ``group_reduce`` takes the max or the mean
    over the ``G`` query heads of a group (one selection per KV head, as NSA shares it), ``None`` keeps every
    query head. ``softmax`` turns each query head's row into probabilities over its visible blocks first (NSA's
    importance scores: fla ``naive_nsa_topk`` averages the per-head probabilities over the group; SeerAttention
    thresholds the gate's probabilities); masked entries stay ``-inf`` so that the selection ops still see them as
    masked. A fully masked row stays ``-inf`` after the reduction. Differentiable in ``q`` and ``k_blocks``. MoBA
    ranks unscaled scores: any ``scale`` gives the same ranking.

    Args:
        q: Query rows ``(B, Hq, QB, d)``, floating.
        k_blocks: Pooled keys ``(B, Hkv, KB, d)`` with ``Hq % Hkv == 0``, same dtype and device as ``q``.
        k_block_size: Tokens per key block (>= 1).
        q_block_size: Tokens per query row (>= 1); 1 for single queries.
        q_start: Position of the first query token (>= 0), e.g. the number of cached tokens when decoding.
        causal: Mask the key blocks after each row's current block.
        include_current: With ``causal``, let the current block compete (False masks it too).
        scale: Score scale; default ``1 / sqrt(d)``.
        softmax: Return per-head probabilities over the visible blocks (``-inf`` kept where masked).
        group_reduce: ``None``, ``"max"`` or ``"mean"`` over the query heads of each GQA group.

    Returns:
        Scores ``(B, Hq, QB, KB)`` (``(B, Hkv, QB, KB)`` with ``group_reduce``), ``q``'s dtype, ``-inf`` where masked.

    Raises:
        TypeError: If a tensor is not floating, the dtypes differ, or an argument has the wrong type.
        ValueError: If the ranks, batch, head or channel sizes do not fit, or an argument is out of range.

    Examples:
        >>> import torch
        >>> from nearfar.functional import block_scores, pool_blocks
        >>> q, k = torch.ones(1, 2, 6, 4), torch.ones(1, 1, 6, 4)
        >>> s = block_scores(pool_blocks(q, 2), pool_blocks(k, 2), k_block_size=2, q_block_size=2,
        ...                  scale=1.0, group_reduce="max")
        >>> s.shape, s[0, 0].tolist()
        (torch.Size([1, 1, 3, 3]), [[4.0, -inf, -inf], [4.0, 4.0, -inf], [4.0, 4.0, 4.0]])
    """
    check_tensor(q, "q", 4)
    check_tensor(k_blocks, "k_blocks", 4)
    kbs = check_positive_int(k_block_size, "k_block_size")
    qbs = check_positive_int(q_block_size, "q_block_size")
    start = check_nonneg_int(q_start, "q_start")
    check_bool(causal, "causal")
    check_bool(include_current, "include_current")
    check_bool(softmax, "softmax")
    scale = check_scale(scale, "scale")
    if group_reduce is not None:
        check_choice(group_reduce, "group_reduce", ("max", "mean"))
    if q.dtype != k_blocks.dtype:
        raise TypeError(f"q and k_blocks must share one dtype, got {q.dtype}, {k_blocks.dtype}")
    b, hq, qb, d = q.shape
    bk, hkv, kb, dk = k_blocks.shape
    if bk != b or dk != d or hkv < 1 or hq % hkv:
        raise ValueError(f"q (B, Hq, QB, d) and k_blocks (B, Hkv, KB, d) need the same B and d and Hq % Hkv == 0, "
                         f"got {tuple(q.shape)} and {tuple(k_blocks.shape)}")
    g = hq // hkv
    s = scale if scale is not None else 1.0 / math.sqrt(d) if d else 1.0
    if group_reduce == "mean" and not softmax:  # the mean of the group's scores is the score of its mean query
        q, g, hq, group_reduce = q.reshape(b, hkv, g, qb, d).mean(dim=2), 1, hkv, None
    # the scale goes on the (few) query rows, the mask in place: each pass over a long map's scores costs
    scores = torch.matmul(q.reshape(b, hkv, g, qb, d) * s, k_blocks.unsqueeze(2).transpose(-1, -2))
    if causal:
        cur = _current_block(qb, qbs, kbs, start, q.device)
        keys = torch.arange(kb, device=q.device)
        masked = keys[None, :] > cur[:, None] if include_current else keys[None, :] >= cur[:, None]
        scores = scores.masked_fill_(masked, -math.inf)  # the product's backward does not need its output
    if softmax:
        dead = scores == -math.inf
        probs = torch.softmax(scores.masked_fill(dead.all(dim=-1, keepdim=True), 0.0), dim=-1)
        scores = probs.masked_fill(dead, -math.inf)
    if group_reduce == "max":
        return scores.amax(dim=2)
    if group_reduce == "mean":
        return scores.mean(dim=2)  # a -inf entry of one head is -inf for all (the mask is shared)
    return scores.reshape(b, hq, qb, kb)


def kv_blocks_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A boolean block mask ``(B, H, QB, KB)`` in the block-list format: ``(kv_num_blocks, kv_indices)``.

    Args:
        mask: Bool ``(B, H, QB, KB)``, True = the query block keeps the key block.

    Returns:
        ``kv_num_blocks (B, H, QB)`` int32 and ``kv_indices (B, H, QB, KB)`` int32, ascending, -1 padded.

    Raises:
        TypeError: If ``mask`` is not a bool tensor.
        ValueError: If ``mask`` is not 4-D.

    Examples:
        >>> import torch
        >>> from nearfar.functional import kv_blocks_from_mask
        >>> num, idx = kv_blocks_from_mask(torch.tensor([[[[False, True, False, True]]]]))
        >>> num.tolist(), idx.tolist()
        ([[[2]]], [[[[1, 3, -1, -1]]]])
    """
    check_tensor(mask, "mask", 4, floating=False)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    kb = mask.shape[-1]
    keys = torch.arange(kb, device=mask.device, dtype=torch.int32).expand(mask.shape)
    # each kept block goes to its rank among the kept ones (a cumulative sum, no sort); the others to a spare column
    pos = torch.where(mask, torch.cumsum(mask, dim=-1) - 1, kb)
    out = torch.full((*mask.shape[:-1], kb + 1), -1, dtype=torch.int32, device=mask.device)
    out.scatter_(-1, pos, keys)
    return mask.sum(dim=-1, dtype=torch.int32), out[..., :kb]


def _forced_mask(shape: tuple[int, ...], force_first: bool, force_current: bool, force_last: int, causal: bool,
                 q_block_size: int, k_block_size: int, q_start: int, device: torch.device) -> torch.Tensor:
    """Bool ``(QB, KB)`` of the forced blocks (existing ones only); with ``causal``, never after the current one."""
    qb, kb = shape[-2], shape[-1]
    cur = _current_block(qb, q_block_size, k_block_size, q_start, device).clamp(max=kb - 1)[:, None]
    keys = torch.arange(kb, device=device)[None, :]
    local = max(force_last, 1 if force_current else 0)
    forced = (keys <= cur) & (keys > cur - local)
    if force_first:
        forced = forced | (keys == 0)
    if causal:
        forced = forced & (keys <= cur)
    return forced


def _check_selection_args(scores: torch.Tensor, name: str, force_first: bool, force_current: bool,
                          force_last: int, causal: bool, q_block_size: int, k_block_size: int,
                          q_start: int) -> None:
    check_tensor(scores, name, 4)
    check_bool(force_first, "force_first")
    check_bool(force_current, "force_current")
    check_nonneg_int(force_last, "force_last")
    check_bool(causal, "causal")
    check_positive_int(q_block_size, "q_block_size")
    check_positive_int(k_block_size, "k_block_size")
    check_nonneg_int(q_start, "q_start")


def _visible(scores: torch.Tensor, causal: bool, q_block_size: int, k_block_size: int,
             q_start: int) -> torch.Tensor:
    """Bool: the score is a number (not -inf, not NaN) and, with ``causal``, the block is not after the current."""
    ok = ~(torch.isnan(scores) | (scores == -math.inf))
    if causal:
        cur = _current_block(scores.shape[-2], q_block_size, k_block_size, q_start, scores.device)
        ok = ok & (torch.arange(scores.shape[-1], device=scores.device)[None, :] <= cur[:, None])
    return ok


class BlockSelection(TypedDict, total=False):
    """The keyword options of ``topk_blocks`` that ``threshold_blocks`` and ``nz_ratio_blocks`` take too (see
    ``topk_blocks`` for each; ``causal`` defaults to True, the others to no forced block, sizes 1 and start 0)."""

    force_first: bool
    force_current: bool
    force_last: int
    causal: bool
    q_block_size: int
    k_block_size: int
    q_start: int


def _selection_options(selection: BlockSelection, fn: str) -> tuple[bool, bool, int, bool, int, int, int]:
    """``selection`` with the defaults filled in: ``(force_first, force_current, force_last, causal, q_block_size,
    k_block_size, q_start)``; an option that is not one of ``BlockSelection``'s raises TypeError naming it."""
    unknown = sorted(set(selection) - BlockSelection.__optional_keys__)
    if unknown:
        raise TypeError(f"{fn} got unexpected keyword arguments {unknown}; the options are topk_blocks': "
                        f"{sorted(BlockSelection.__optional_keys__)}")
    return (selection.get("force_first", False), selection.get("force_current", False),
            selection.get("force_last", 0), selection.get("causal", True), selection.get("q_block_size", 1),
            selection.get("k_block_size", 1), selection.get("q_start", 0))


def topk_blocks(
    scores: torch.Tensor,
    k: int,
    *,
    force_first: bool = False,
    force_current: bool = False,
    force_last: int = 0,
    causal: bool = True,
    q_block_size: int = 1,
    k_block_size: int = 1,
    q_start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep, per row of ``scores (B, H, QB, KB)``, the forced blocks and the best others up to ``k`` blocks in all.

    The row's selection is its forced blocks plus the ``k - #forced`` highest-scoring other visible blocks (all of
    them if fewer); forced blocks are always kept, even beyond ``k`` or at a ``-inf`` score. A block whose score is
    ``-inf`` or NaN, or (``causal``) after the row's current block, is never kept unless forced. Ties go to the lower
    block index, so the result is deterministic. Forced blocks (those that exist, and with ``causal`` none after the
    current): block 0 (``force_first``, NSA's initial block), the current block (``force_current``, MoBA; NSA) and
    the ``force_last`` blocks up to and including the current one (NSA's two local blocks: ``force_last=2``). Row
    positions follow the module docstring: the defaults (block sizes 1, ``q_start=0``) make row ``m``'s current
    block ``m``, as in the square map of equal query and key blocks; for token queries against blocks of ``b``
    keys pass ``k_block_size=b``, with the same ``q_block_size``, ``k_block_size`` and ``q_start`` as given to
    ``block_scores``. Not differentiable (indices).

    Args:
        scores: Block scores ``(B, H, QB, KB)``, floating, e.g. from ``block_scores``.
        k: Blocks kept per row, forced ones included (>= 0).
        force_first: Always keep key block 0.
        force_current: Always keep the row's current block.
        force_last: Always keep the last ``force_last`` blocks up to the current one (>= 0).
        causal: Never keep a block after the row's current block.
        q_block_size: Tokens per row (>= 1).
        k_block_size: Tokens per key block (>= 1).
        q_start: Position of the first query token (>= 0).

    Returns:
        ``(kv_num_blocks (B, H, QB), kv_indices (B, H, QB, KB))`` int32 in the block-list format (ascending, -1
        padded; see the module docstring).

    Raises:
        TypeError: If ``scores`` is not a floating tensor or an argument has the wrong type.
        ValueError: If ``scores`` is not 4-D or an argument is out of range.

    Examples:
        >>> import torch
        >>> from nearfar.functional import topk_blocks
        >>> s = torch.tensor([[[[0.0, 9.0, 5.0, 7.0, 1.0]]]])
        >>> num, idx = topk_blocks(s, 2, force_first=True, causal=False)
        >>> num.tolist(), idx.tolist()
        ([[[2]]], [[[[0, 1, -1, -1, -1]]]])
    """
    _check_selection_args(scores, "scores", force_first, force_current, force_last, causal, q_block_size,
                          k_block_size, q_start)
    kk = check_nonneg_int(k, "k")
    qb, kb = scores.shape[-2], scores.shape[-1]
    num = torch.zeros(scores.shape[:-1], dtype=torch.int32, device=scores.device)
    out = torch.full(scores.shape, -1, dtype=torch.int32, device=scores.device)
    if kb == 0 or not scores.numel():
        return num, out
    # rows in chunks that stay in cache: each chunk makes a few passes over its scores (the whole map at 2,048 x
    # 2,048 blocks and 2 heads is 32 MiB, and every pass over it in memory cost ~10 ms)
    rows_per = qb if torch.compiler.is_compiling() else max(1, _TOPK_CHUNK // (scores[..., 0, :].numel()))
    for r0 in range(0, qb, rows_per):
        r1 = min(qb, r0 + rows_per)
        n_r, i_r = _topk_rows(scores[..., r0:r1, :].detach(), kk, r0, force_first, force_current, force_last,
                              causal, q_block_size, k_block_size, q_start)
        num[..., r0:r1] = n_r
        out[..., r0:r1, :i_r.shape[-1]] = i_r
    return num, out


#: score elements per chunk of rows in ``topk_blocks`` (1 MiB of float32)
_TOPK_CHUNK = 1 << 18


def _topk_rows(scores: torch.Tensor, kk: int, r0: int, force_first: bool, force_current: bool, force_last: int,
               causal: bool, q_block_size: int, k_block_size: int, q_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk_blocks`` of the rows ``[r0, r0 + R)`` given as ``scores (..., R, KB)``: ``(num (..., R), kv_indices
    (..., R, W))`` with ``W <= KB`` (the columns after ``W`` are all -1)."""
    rows, kb, dev = scores.shape[-2], scores.shape[-1], scores.device
    # the rows' positions are those of rows [r0, r0 + R) of the whole map: shift the first query
    start = q_start + r0 * q_block_size
    forced2 = _forced_mask((rows, kb), force_first, force_current, force_last, causal, q_block_size, k_block_size,
                           start, dev)  # (R, KB), shared by the batch and heads
    # forced blocks score +inf, visible ones their score, the rest (NaN, -inf, after the current block) -inf; a row
    # keeps its ``keep`` best, ties to the lower index
    key = scores.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    if causal:
        cur = _current_block(rows, q_block_size, k_block_size, start, dev)
        key.masked_fill_(torch.arange(kb, device=dev)[None, :] > cur[:, None], -math.inf)  # own copy
    key.masked_fill_(forced2, math.inf)
    n_forced = forced2.sum(dim=-1, keepdim=True)
    compiling = torch.compiler.is_compiling()
    # one column past the widest possible selection, to see whether the last kept score ties with the next one
    width = kb if compiling else min(kb, max(kk, int(n_forced.max())) + 1)
    top = key.topk(width, dim=-1)
    # visible blocks (a +inf score counts as visible) among the best ``kk``: topk sorts them first
    free = (top.values[..., :kk] > -math.inf).sum(dim=-1, keepdim=True)
    keep = torch.maximum(n_forced, free)
    thr = top.values.gather(-1, (keep - 1).clamp(min=0))
    # a row is ambiguous when a block it does not keep ties with its last kept one: the (keep+1)-th best equals it
    after = top.values.gather(-1, keep.clamp(max=width - 1))
    ambiguous = (keep > 0) & (keep < width) & (after == thr)
    if compiling or bool(ambiguous.any()):
        # the lowest-index blocks at the threshold, by a cumulative count
        above = key > thr
        ties = key == thr
        need = keep - above.sum(dim=-1, keepdim=True)
        sel = (above | (ties & (torch.cumsum(ties.to(torch.int32), dim=-1) <= need))) & (keep > 0)
        return kv_blocks_from_mask(sel)
    # no such tie: the row's selection is topk's first ``keep`` indices, listed in ascending order
    rank = torch.arange(width, device=dev)
    chosen = torch.where(rank < keep, top.indices, kb).sort(dim=-1).values
    return keep.squeeze(-1).to(torch.int32), torch.where(chosen < kb, chosen, -1).to(torch.int32)


def threshold_blocks(probs: torch.Tensor, threshold: float, *, dense_last_rows: int = 0,
                     **selection: Unpack[BlockSelection]) -> tuple[torch.Tensor, torch.Tensor]:
    """SeerAttention's threshold selection: keep each block whose gate probability is ``>= threshold``.

    ``probs (B, H, QB, KB)`` is typically the softmax of the gate logits over the key blocks. Masked blocks
    (``-inf``/NaN, or with ``causal`` after the row's current block) are never kept; forced blocks (as in
    ``topk_blocks``) always are. The last ``dense_last_rows`` rows keep every visible block (SeerAttention's
    ``last_block_dense`` keeps the last 2 query-block rows dense). ``threshold=0`` keeps every visible block. The
official ``get_sparse_attn_mask_from_threshold`` compares with a strict ``>``: the two differ only for a
probability exactly equal to the threshold.

    Args:
        probs: Block probabilities (or any scores) ``(B, H, QB, KB)``, floating.
        threshold: Keep blocks with ``probs >= threshold``; a number in ``[0, inf)``.
        dense_last_rows: Number of last rows that keep every visible block (>= 0).
        **selection: ``topk_blocks``' keyword options (``BlockSelection``): ``force_first``, ``force_current``,
            ``force_last``, ``causal`` (default True), ``q_block_size``, ``k_block_size``, ``q_start``.

    Returns:
        ``(kv_num_blocks (B, H, QB), kv_indices (B, H, QB, KB))`` int32, ascending, -1 padded.

    Raises:
        TypeError: If ``probs`` is not a floating tensor, an option is not one of ``topk_blocks``' or an argument
            has the wrong type.
        ValueError: If ``probs`` is not 4-D or an argument is out of range.

    Examples:
        >>> import torch
        >>> from nearfar.functional import threshold_blocks
        >>> p = torch.tensor([[[[1.0, 0.0], [0.3, 0.7]]]])
        >>> threshold_blocks(p, 0.5)[1].tolist()
        [[[[0, -1], [1, -1]]]]
    """
    force_first, force_current, force_last, causal, q_block_size, k_block_size, q_start = _selection_options(
        selection, "threshold_blocks")
    _check_selection_args(probs, "probs", force_first, force_current, force_last, causal, q_block_size,
                          k_block_size, q_start)
    tau = check_real_range(threshold, "threshold", 0.0, math.inf)
    rows = check_nonneg_int(dense_last_rows, "dense_last_rows")
    qb, kb = probs.shape[-2], probs.shape[-1]
    visible = _visible(probs, causal, q_block_size, k_block_size, q_start)
    keep = visible & (probs >= tau)
    if rows:
        keep = keep | (visible & (torch.arange(qb, device=probs.device) >= qb - rows)[:, None])
    if kb:
        keep = keep | _forced_mask(tuple(probs.shape), force_first, force_current, force_last, causal,
                                   q_block_size, k_block_size, q_start, probs.device)
    return kv_blocks_from_mask(keep)


def nz_ratio_blocks(scores: torch.Tensor, nz_ratio: float, **selection: Unpack[BlockSelection]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """SeerAttention's ``nz_ratio`` selection: every row keeps its top ``K`` blocks, ``K`` set by a kept fraction.

    With ``causal``, ``K = max(1, int((1 - sqrt(1 - nz_ratio)) * KB))`` (SeerAttention's
    ``get_sparse_attn_mask_from_nz_ratio`` on its square block map: the kept part of the lower block triangle is
    then about ``nz_ratio``); without, ``K = max(1, int(nz_ratio * KB))``. The rows are then chosen by
    ``topk_blocks(scores, K, **selection)`` (forced blocks included in ``K``; a row with fewer visible blocks keeps
    them all, as the official top-k followed by ``tril`` does).

    Args:
        scores: Block scores or probabilities ``(B, H, QB, KB)``, floating.
        nz_ratio: The fraction to keep, in ``[0, 1]``.
        **selection: ``topk_blocks``' keyword options (``BlockSelection``), passed on: ``force_first``,
            ``force_current``, ``force_last``, ``causal`` (default True; it also picks the formula for ``K``),
            ``q_block_size``, ``k_block_size``, ``q_start``.

    Returns:
        ``(kv_num_blocks (B, H, QB), kv_indices (B, H, QB, KB))`` int32, ascending, -1 padded.

    Raises:
        TypeError: If ``scores`` is not a floating tensor, an option is not one of ``topk_blocks``' or an argument
            has the wrong type.
        ValueError: If ``scores`` is not 4-D or an argument is out of range.

    Examples:
        >>> import torch
        >>> from nearfar.functional import nz_ratio_blocks
        >>> s = torch.tensor([[[[3.0, 1.0, 2.0, 0.0]]]])
        >>> nz_ratio_blocks(s, 0.5, causal=False)[1].tolist()
        [[[[0, 2, -1, -1]]]]
    """
    rho = check_real_range(nz_ratio, "nz_ratio", 0.0, 1.0)
    check_tensor(scores, "scores", 4)
    causal = check_bool(_selection_options(selection, "nz_ratio_blocks")[3], "causal")
    kb = scores.shape[-1]
    frac = 1.0 - math.sqrt(1.0 - rho) if causal else rho
    return topk_blocks(scores, max(1, int(frac * kb)), **selection)


def block_attention_stat(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    block_size_q: int,
    block_size_k: int,
    scale: float | None = None,
    how: str = "max",
    causal: bool = True,
    *,
    normalize: bool = False,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Block max-pool (or block mass) of the exact softmax map ``P = exp(scale * q k^T - lse)``, chunk by chunk.

    ``GT[I, J] = max`` (``how="max"``) or ``sum`` (``how="sum"``) of ``P[i, j]`` over the query tokens ``i`` of
    block ``I`` and the key tokens ``j`` of block ``J`` (partial last blocks pool their real tokens):
    SeerAttention's distillation target of its AttnGate (the 2-D max-pool of the attention map; ``normalize``
    divides each row by its sum, as SeerAttention does before its KL loss; an all-zero row stays 0). ``lse`` is the
    row log-sum-exp of the same scaled scores, as ``nearfar.attend(q, k, v, Causal() or None, scale=scale,
    return_lse=True)`` returns it; a row with ``lse = -inf`` contributes 0. With ``causal`` the pair ``(i, j)`` is
    masked when ``j > i + Nk - Nq`` (the last query aligned with the last key, as ``attend``'s ``Causal``). GQA:
    query head ``h`` reads KV head ``h // G``. The map is built ``chunk_size`` query tokens at a time (rounded up
    to a multiple of ``block_size_q``), so memory is ``O(B * Hq * chunk_size * Nk)`` besides the output, never
    ``N x N`` at once. It is differentiable, but as a target it is meant to be used detached.

    Args:
        q: Queries ``(B, Hq, Nq, d)``, floating, any layout.
        k: Keys ``(B, Hkv, Nk, d)`` with ``Hq % Hkv == 0``, same dtype.
        lse: Row log-sum-exps ``(B, Hq, Nq)``, floating (natural log).
        block_size_q: Query tokens per block (>= 1).
        block_size_k: Key tokens per block (>= 1).
        scale: Score scale; default ``1 / sqrt(d)``.
        how: ``"max"`` (SeerAttention's target) or ``"sum"`` (the block mass).
        causal: Mask the keys after each query, bottom-right aligned.
        normalize: Divide each output row by its sum.
        chunk_size: Query tokens per chunk (>= 1).

    Returns:
        ``(B, Hq, ceil(Nq / block_size_q), ceil(Nk / block_size_k))`` in the dtype of ``q`` and ``k``.

    Raises:
        TypeError: If a tensor is not floating, the dtypes of ``q`` and ``k`` differ, or an argument has the wrong
            type.
        ValueError: If the shapes do not fit or an argument is out of range.

    Examples:
        >>> import torch, nearfar as nf
        >>> from nearfar.functional import block_attention_stat
        >>> q, k, v = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
        >>> _, lse = nf.attend(q, k, v, nf.Causal(), return_lse=True)
        >>> mass = block_attention_stat(q, k, lse, 4, 4, how="sum")
        >>> mass.shape, torch.allclose(mass.sum(-1), torch.tensor([[[4.0, 4.0, 2.0]] * 2]))
        (torch.Size([1, 2, 3, 3]), True)
    """
    check_tensor(q, "q", 4)
    check_tensor(k, "k", 4)
    check_tensor(lse, "lse", 3)
    bq = check_positive_int(block_size_q, "block_size_q")
    bk = check_positive_int(block_size_k, "block_size_k")
    scale = check_scale(scale, "scale")
    check_choice(how, "how", ("max", "sum"))
    check_bool(causal, "causal")
    check_bool(normalize, "normalize")
    chunk = check_positive_int(chunk_size, "chunk_size")
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must share one dtype, got {q.dtype}, {k.dtype}")
    b, hq, nq, d = q.shape
    bk_, hkv, nk, dk = k.shape
    if bk_ != b or dk != d or hkv < 1 or hq % hkv:
        raise ValueError(f"q (B, Hq, Nq, d) and k (B, Hkv, Nk, d) need the same B and d and Hq % Hkv == 0, "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}")
    if tuple(lse.shape) != (b, hq, nq):
        raise ValueError(f"lse must be (B, Hq, Nq) = {(b, hq, nq)}, got {tuple(lse.shape)}")
    g = hq // hkv
    s = scale if scale is not None else 1.0 / math.sqrt(d) if d else 1.0
    qblocks, kblocks = _num_blocks(nq, bq), _num_blocks(nk, bk)
    kpad = kblocks * bk - nk
    step = _num_blocks(chunk, bq) * bq
    kt = k.unsqueeze(2).transpose(-1, -2)  # (B, Hkv, 1, d, Nk)
    keys = torch.arange(nk, device=q.device)
    out = []
    for i0 in range(0, nq, step):
        i1 = min(nq, i0 + step)
        rows = i1 - i0
        qc = q[:, :, i0:i1].reshape(b, hkv, g, rows, d)
        logits = torch.matmul(qc, kt).reshape(b, hq, rows, nk) * s
        lc = lse[:, :, i0:i1, None].to(logits.dtype)
        dead = torch.isneginf(lc).expand(b, hq, rows, nk)
        if causal:
            qpos = torch.arange(i0, i1, device=q.device) + (nk - nq)
            dead = dead | (keys[None, :] > qpos[:, None])
        p = torch.exp(logits - lc).masked_fill(dead, 0.0)
        rpad = _num_blocks(rows, bq) * bq - rows
        p = torch.nn.functional.pad(p, (0, kpad, 0, rpad))  # P >= 0: zero padding changes no max nor sum
        tiles = p.reshape(b, hq, _num_blocks(rows, bq), bq, kblocks, bk)
        out.append(tiles.amax(dim=(3, 5)) if how == "max" else tiles.sum(dim=(3, 5)))
    gt = torch.cat(out, dim=2) if out else q.new_zeros(b, hq, qblocks, kblocks)
    if normalize:
        total = gt.sum(dim=-1, keepdim=True)
        gt = gt / torch.where(total > 0, total, torch.ones_like(total))
    return gt


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def _check_centroids(x: torch.Tensor, centroids: torch.Tensor) -> None:
    check_tensor(x, "x", 4)
    check_tensor(centroids, "centroids", 3)
    if x.dtype != centroids.dtype:
        raise TypeError(f"x and centroids must share one dtype, got {x.dtype}, {centroids.dtype}")
    h, c, d = centroids.shape
    if x.shape[1] != h or x.shape[3] != d or c < 1:
        raise ValueError(f"centroids must be (H, C, d) with C >= 1 for x (B, H, N, d) = {tuple(x.shape)}, "
                         f"got {tuple(centroids.shape)}")


def kmeans_route(x: torch.Tensor, centroids: torch.Tensor, top_w: int, *, normalize: bool = True) -> torch.Tensor:
    """The Routing Transformer's balanced assignment: each cluster takes its ``top_w`` most similar tokens.

    Similarity ``x_hat . mu`` per head (``x_hat`` the unit-norm tokens when ``normalize``, as the Routing
    Transformer normalises q and k; the centroids are used as given, unit-norm by construction). Every cluster
    gets exactly ``top_w`` tokens, so a token may be in several clusters or in none (lucidrains ``distribution``:
    ``topk`` over the tokens, indices sorted; ``KmeansAttention`` runs it on queries and keys separately). Ties go
    to the lower token index.
    Not differentiable (indices).

    Args:
        x: Tokens ``(B, H, N, d)``, floating, any layout.
        centroids: Per-head centroids ``(H, C, d)``, same dtype.
        top_w: Tokens per cluster, in ``[1, N]``.
        normalize: Normalise the tokens to unit norm first.

    Returns:
        Token indices ``(B, H, C, top_w)`` int64, ascending within each cluster.

    Raises:
        TypeError: If a tensor is not floating, the dtypes differ, or an argument has the wrong type.
        ValueError: If the shapes do not fit or ``top_w`` is outside ``[1, N]``.

    Examples:
        >>> import torch
        >>> from nearfar.functional import kmeans_route
        >>> x = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.2, 0.8]]]])
        >>> kmeans_route(x, torch.eye(2)[None], 2).tolist()
        [[[[0, 2], [1, 3]]]]
    """
    _check_centroids(x, centroids)
    n = x.shape[2]
    if not isinstance(top_w, int) or isinstance(top_w, bool):
        raise TypeError(f"top_w must be an int in [1, {n}], got {top_w!r}")
    if not 1 <= top_w <= n:
        raise ValueError(f"top_w must be in [1, {n}] (the number of tokens), got {top_w}")
    check_bool(normalize, "normalize")
    xs = _unit(x) if normalize else x
    sim = torch.matmul(centroids.unsqueeze(0), xs.detach().transpose(-1, -2))  # (B, H, C, N)
    top = sim.sort(dim=-1, descending=True, stable=True).indices[..., :top_w]
    return top.sort(dim=-1).values


def ema_update_centroids(centroids: torch.Tensor, x: torch.Tensor, decay: float = 0.999, *,
                         normalize: bool = True) -> torch.Tensor:
    """One Routing Transformer k-means step on ``x``, blended into ``centroids`` by an exponential moving average.

    Per head: every token (unit-normed when ``normalize``) goes to its most similar centroid (ties: the lower
    cluster); a cluster's new mean is the unit-normed sum of its tokens over the batch and the sequence (a cluster
    with no token keeps its centroid); then ``decay * centroids + (1 - decay) * new`` (lucidrains
    ``kmeans_iter`` and ``ema_inplace``; no renormalisation after the blend). Computed without gradient; returns a
    new tensor (the input is not modified).

    Args:
        centroids: Per-head centroids ``(H, C, d)``, floating.
        x: Tokens ``(B, H, N, d)``, same dtype.
        decay: EMA decay in ``[0, 1]``.
        normalize: Normalise the tokens to unit norm first.

    Returns:
        The updated centroids ``(H, C, d)``.

    Raises:
        TypeError: If a tensor is not floating, the dtypes differ, or an argument has the wrong type.
        ValueError: If the shapes do not fit or ``decay`` is outside ``[0, 1]``.

    Examples:
        >>> import torch
        >>> from nearfar.functional import ema_update_centroids
        >>> x = torch.tensor([[[[2.0, 0.0], [0.0, 3.0]]]])
        >>> ema_update_centroids(torch.tensor([[[1.0, 0.0], [0.6, 0.8]]]), x, decay=0.5).tolist()
        [[[1.0, 0.0], [0.30000001192092896, 0.8999999761581421]]]
    """
    _check_centroids(x, centroids)
    a = check_real_range(decay, "decay", 0.0, 1.0)
    check_bool(normalize, "normalize")
    with torch.no_grad():
        xs = _unit(x) if normalize else x
        b, h, n, d = xs.shape
        c = centroids.shape[1]
        sim = torch.matmul(xs, centroids.transpose(-1, -2))  # (B, H, N, C)
        assign = sim.argmax(dim=-1) if c > 1 else torch.zeros(b, h, n, dtype=torch.long, device=x.device)
        idx = assign.permute(1, 0, 2).reshape(h, b * n, 1).expand(h, b * n, d)
        sums = xs.new_zeros(h, c, d).scatter_add_(1, idx, xs.permute(1, 0, 2, 3).reshape(h, b * n, d))
        counts = torch.zeros(h, c, dtype=torch.long, device=x.device).scatter_add_(
            1, assign.permute(1, 0, 2).reshape(h, b * n), torch.ones(h, b * n, dtype=torch.long, device=x.device))
        new = torch.where((counts > 0)[..., None], _unit(sums), centroids)
        return centroids * a + new * (1.0 - a)
