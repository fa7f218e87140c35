"""Block selection of content-routed attention: which key blocks each query row keeps (the selection half of
``nearfar.ops.routing``).

- ``topk_blocks``: the forced blocks and the best others, up to ``k`` per row (MoBA, NSA).
- ``threshold_blocks``, ``nz_ratio_blocks``: SeerAttention's threshold and kept-fraction selections.
- ``kv_blocks_from_mask``: a boolean block mask in the block-list format.

Rows are placed as in ``nearfar.ops.block_scoring`` (row ``m``'s *current* key block holds its last query token;
pass the same ``q_block_size``, ``k_block_size`` and ``q_start`` as to ``block_scores``).

Papers and official code: MoBA (Lu et al., 2025) -- MoonshotAI/MoBA ``moba/moba_naive.py``
(``moba_attn_varlen_naive``); NSA (Yuan et al., 2025) -- fla-org/flash-linear-attention ``fla/ops/nsa/naive.py``
(``naive_nsa_topk``); SeerAttention (Gao et al., 2024) -- microsoft/SeerAttention ``seer_attn/modules/common.py``
(``get_sparse_attn_mask_from_threshold``, ``get_sparse_attn_mask_from_nz_ratio``).

**Block-list format.** A selection is ``(kv_num_blocks, kv_indices)``: ``kv_num_blocks (B, H, QB)`` int32 is the
number of key blocks kept by each query block (row), ``kv_indices (B, H, QB, KB)`` int32 holds them in ascending
order in its first ``kv_num_blocks`` entries, and **-1** in the rest. ``KB`` is the number of key blocks, so the
pair goes straight into ``torch.nn.attention.flex_attention.BlockMask.from_kv_blocks`` (which ignores entries past
``kv_num_blocks``); clamp the -1 before using the indices in a gather.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, TypedDict

import torch

if TYPE_CHECKING:  # annotations only (postponed): typing.Unpack is Python 3.11+, typing_extensions has it
    from typing_extensions import Unpack

from ..checks import (
    check_bool,
    check_nonneg_int,
    check_positive_int,
    check_real_range,
    check_tensor,
)
from .block_scoring import current_block

__all__ = ["BlockSelection", "kv_blocks_from_mask", "nz_ratio_blocks", "threshold_blocks", "topk_blocks"]


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
    cur = current_block(qb, q_block_size, k_block_size, q_start, device).clamp(max=kb - 1)[:, None]
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
        cur = current_block(scores.shape[-2], q_block_size, k_block_size, q_start, scores.device)
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
    positions follow ``nearfar.ops.block_scoring``: the defaults (block sizes 1, ``q_start=0``) make row ``m``'s current
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
        cur = current_block(rows, q_block_size, k_block_size, start, dev)
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


