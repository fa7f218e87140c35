"""HiP's hierarchical top-k key-block search, batched over batch, heads, query blocks and tree nodes
(``nearfar.functional.hip_topk_blocks``).

Paper: Lee et al., "A Training-Free Sub-quadratic Cost Transformer Model Serving Framework With Hierarchically
Pruned Attention" (HiP; ICLR 2025; first version "HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical
Attention Pruning", arXiv 2406.09827). Official code: DeepAuto-AI/hip-attention, the tree search of
``src/hip_attn/v1_1/attention2_draft_causal_batch.py`` (``masking_iteration_draft_numba_kernel``) and the defaults
of ``src/hip_attn/v1_0/attention1_block_gpu.py`` (``hip_attention``).

**The search, per (batch item, query head, query block).** The block's context is every key up to its last query
minus the ``window`` most recent ones (the sliding window attends those anyway): ``T`` keys, ``S = ceil(T /
kv_block)`` key blocks. With ``T <= mask_k`` every block is kept. Otherwise ``K = ceil(mask_k / kv_block)`` nodes
(start block, number of blocks) partition ``[0, S)`` evenly, and each iteration splits every node in two halves
(the first ``floor(size / 2)`` blocks, then the rest), scores each child by its *representative*, its first key
block, as ``max`` over (the sampled queries of the query block, the representative's keys) of ``q . k``, and keeps
the ``K`` best children (an empty child scores ``-inf``) until every node is one block (``ceil(log2(S / K))``
iterations). The kept blocks, ascending, are the result.

Choices, where the paper and the code part: the representative is the child's first key block, as the official
reference (the paper takes the child's centre token); it is also the parent's representative, so each
iteration scores only the second halves. The sampled queries are every ``query_stride``-th query counted back from
the block's last one (the official ``q[1::2]`` of a full block for the default 2; a block of one query, as in
decoding, uses it). Representative keys after the block's last query are not scored (the official slices the keys
there too). Ties between children go to the earlier one (the official ``argsort`` leaves them unspecified), so the
result is deterministic.

This differs from the official reference in the even partition: it sizes node ``j`` as ``floor(S (j+1) / K) -
floor(S j / K)`` (the official code uses ``floor(S / K)`` for every node, which leaves the last ``S mod K``
blocks out of the search), and in the scores' scale, which is irrelevant to the ranking.
"""

from __future__ import annotations

import math

import torch

from ..checks import check_nonneg_int, check_positive_int, check_same_dtype_device, check_tensor

__all__ = ["hip_topk_blocks"]

#: gathered representative keys per chunk of query blocks (elements): bounds the search's temporary memory
_GATHER_BUDGET = 1 << 25


def _iterations(num_blocks: int, nodes: int) -> int:
    """Halvings until ``nodes`` nodes over ``num_blocks`` blocks are single blocks: least ``n`` with
    ``nodes * 2**n >= num_blocks``."""
    n = 0
    while nodes << n < num_blocks:
        n += 1
    return n


def _tree_rows(q: torch.Tensor, k: torch.Tensor, kpm: torch.Tensor | None, rows: range, ctx: list[int], nodes: int,
               q_block: int, kv_block: int, stride: int) -> torch.Tensor:
    """The tree search of the query blocks ``rows`` (with ``ctx[r] > nodes`` key blocks of context each): the kept
    start blocks ``(B, Hq, len(rows), nodes)`` int64 in ascending order, -1 for a node left empty."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    dev = q.device
    r = torch.arange(rows.start, rows.stop, device=dev)
    nr = len(rows)
    length = torch.clamp(nq - r * q_block, max=q_block)  # queries in the block
    end = (nk - nq) + r * q_block + length  # the block's causal context: keys [0, end)
    nblocks = torch.tensor(ctx[rows.start:rows.stop], device=dev, dtype=torch.long)
    # sampled queries: the last one of the block and every stride-th before it
    ns = -(-q_block // stride)
    off = torch.arange(ns, device=dev) * stride
    q_pos = (r * q_block + length - 1)[:, None] - off[None, :]
    q_valid = (off[None, :] < length[:, None]).view(1, 1, nr, ns, 1)
    if kpm is not None:  # a padded query does not score either
        q_valid = q_valid & kpm[:, nk - nq + q_pos.clamp(min=0)].view(b, 1, nr, ns, 1)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qs = q.index_select(2, q_pos.clamp(min=0).flatten()).view(b, hq, nr, ns, d).to(cdt)
    tok_off = torch.arange(kv_block, device=dev)

    def score(starts: torch.Tensor) -> torch.Tensor:  # (B, Hq, R, K) -> rep-block scores (B, Hq, R, K)
        kk = starts.shape[-1]
        tok = starts[..., None] * kv_block + tok_off  # (B, Hq, R, K, kv_block)
        k_valid = tok < end[:, None, None]
        tok = tok.clamp(max=nk - 1).reshape(b, hq, -1)
        if kpm is not None:
            k_valid = k_valid & kpm[:, None, :].expand(b, hq, nk).gather(2, tok).view(k_valid.shape)
        idx = tok.reshape(b, hkv, -1, 1).expand(-1, -1, -1, d)  # a GQA group's query heads read one KV head
        keys = k.gather(2, idx).view(b, hq, nr, kk * kv_block, d).to(cdt)
        s = qs @ keys.transpose(-1, -2)  # (B, Hq, R, ns, K * kv_block)
        ok = q_valid & k_valid.view(b, hq, nr, 1, kk * kv_block)
        s = torch.where(ok, s, -math.inf)
        return s.amax(-2).view(b, hq, nr, kk, kv_block).amax(-1)

    j = torch.arange(nodes, device=dev)
    start = torch.div(nblocks[:, None] * j, nodes, rounding_mode="floor")
    size = torch.div(nblocks[:, None] * (j + 1), nodes, rounding_mode="floor") - start
    start, size = start.expand(b, hq, nr, nodes).contiguous(), size.expand(b, hq, nr, nodes).contiguous()
    best = score(start)
    iters = [_iterations(c, nodes) for c in ctx[rows.start:rows.stop]]
    row_iters = torch.tensor(iters, device=dev)[:, None]
    for it in range(max(iters, default=0)):
        half = torch.div(size, 2, rounding_mode="floor")
        second = start + half
        s0 = torch.where(half >= 1, best, -math.inf)  # the first half keeps its parent's representative
        s1 = torch.where(size - half >= 1, score(second), -math.inf)
        # children in start order (nodes stay in start order), so a stable sort breaks ties by position
        c_start = torch.stack([start, second], -1).flatten(-2)
        c_size = torch.stack([half, size - half], -1).flatten(-2)
        c_score = torch.stack([s0, s1], -1).flatten(-2)
        keep = c_score.sort(dim=-1, descending=True, stable=True).indices[..., :nodes].sort(-1).values
        # a row that has reached single blocks stays (one more split could trade a child whose keys are all padded,
        # scored -inf, for an empty one)
        done = row_iters <= it
        start = torch.where(done, start, c_start.gather(-1, keep))
        size = torch.where(done, size, c_size.gather(-1, keep))
        best = torch.where(done, best, c_score.gather(-1, keep))
    return torch.where(size >= 1, start, -1)


def hip_topk_blocks(q: torch.Tensor, k: torch.Tensor, mask_k: int, *, q_block: int = 32, kv_block: int = 2,
                    window: int = 128, query_stride: int = 2,
                    key_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """HiP's hierarchical top-k search of key blocks per query block (see the module docstring), in the block-list
    format of ``nearfar.SelectedBlocks``.

    Query ``i`` sits at position ``Nk - Nq + i`` (the queries are the last ``Nq`` tokens, as in decoding over a
    cache); query block ``r`` holds queries ``[r*q_block, (r+1)*q_block)`` and its context is the keys up to its last
    query. Each query head searches on its own (GQA: over its KV head's keys). Not differentiable (indices); the
    scores are computed in float32 (float64 for float64 inputs). Python loops run over the ``ceil(log2(S / K))``
    iterations and, when the gathered representative keys would exceed ~32M elements, over chunks of query blocks.

    Args:
        q: Queries ``(B, Hq, Nq, d)``, floating (rotated as the attention uses them).
        k: Keys ``(B, Hkv, Nk, d)``, ``Hq % Hkv == 0``, ``Nk >= Nq``, same dtype and device.
        mask_k: Keys each query block keeps besides its window (>= 1): ``ceil(mask_k / kv_block)`` blocks.
        q_block: Queries per block (>= 1); 1 searches for every query on its own (decoding).
        kv_block: Keys per block (>= 1).
        window: The most recent keys of a block's context left out of the search (>= 0).
        query_stride: Every ``query_stride``-th query of a block, back from its last, scores the children (>= 1).
        key_padding_mask: Optional bool ``(B, Nk)``, True = a real token; padded keys are not scored and padded
            queries (query ``i`` is token ``Nk - Nq + i``) do not score.

    Returns:
        ``(kv_num_blocks (B, Hq, QB), kv_indices (B, Hq, QB, KB))`` int32, ``QB = ceil(Nq / q_block)``, ``KB =
        min(ceil(mask_k / kv_block), S)`` (at least 1) with ``S`` the largest context's block count: each row's
        blocks ascending, -1 after them.

    Raises:
        TypeError: ``q``/``k`` not floating tensors of one dtype, ``key_padding_mask`` not bool, or an integer
            argument not an int.
        ValueError: Shapes that do not fit (named), or an integer argument out of range.

    Examples:
        >>> import torch
        >>> from nearfar.functional import hip_topk_blocks
        >>> k = torch.arange(16.0).view(1, 1, 16, 1)      # q . k grows with the key's position
        >>> num, idx = hip_topk_blocks(torch.ones(1, 1, 16, 1), k, 4, q_block=16, kv_block=2, window=4)
        >>> num.tolist(), idx.tolist()                     # 12 keys searched, the last 4 of them kept
        ([[[2]]], [[[[4, 5]]]])
    """
    check_tensor(q, "q", 4)
    check_tensor(k, "k", 4)
    check_same_dtype_device(q=q, k=k)
    mk = check_positive_int(mask_k, "mask_k")
    bq, bk = check_positive_int(q_block, "q_block"), check_positive_int(kv_block, "kv_block")
    w, stride = check_nonneg_int(window, "window"), check_positive_int(query_stride, "query_stride")
    b, hq, nq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or k.shape[1] == 0 or hq % k.shape[1] or k.shape[2] < nq:
        raise ValueError(f"k must be (B, Hkv, Nk, d) with q's B={b} and d={d}, Hkv dividing Hq={hq} and Nk >= "
                         f"Nq={nq}, got {tuple(k.shape)}")
    nk = k.shape[2]
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor, got "
                            f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
        if tuple(key_padding_mask.shape) != (b, nk):
            raise ValueError(f"key_padding_mask must be (B, Nk) = ({b}, {nk}), got {tuple(key_padding_mask.shape)}")
    nodes = -(-mk // bk)
    qb = -(-nq // bq)
    # context blocks per row, in Python: rows with at most `nodes` blocks keep them all, the rest (a suffix) search
    ctx = [max(0, -(-(nk - nq + min((r + 1) * bq, nq) - w) // bk)) for r in range(qb)]
    width = max(1, min(nodes, max(ctx, default=0)))
    dev = q.device
    col = torch.arange(width, device=dev)
    all_rows = torch.tensor(ctx, device=dev, dtype=torch.long)
    idx = torch.where(col < all_rows[:, None], col, -1).expand(b, hq, qb, width)
    first_tree = next((r for r, c in enumerate(ctx) if c > nodes), qb)
    if first_tree < qb:
        with torch.no_grad():
            qd, kd = q.detach(), k.detach()
            chunk = max(1, _GATHER_BUDGET // max(1, b * hq * nodes * bk * d))
            found = [_tree_rows(qd, kd, key_padding_mask, range(s, min(s + chunk, qb)), ctx, nodes, bq, bk, stride)
                     for s in range(first_tree, qb, chunk)]
            tree = torch.cat(found, 2)
            tree = torch.where(tree < 0, tree.new_tensor(1 << 62), tree).sort(-1).values  # valid ones first
            tree = torch.where(tree == 1 << 62, -1, tree)
            idx = torch.cat([idx[:, :, :first_tree], tree], 2)
    idx = idx.to(torch.int32).contiguous()
    return (idx >= 0).sum(-1, dtype=torch.int32), idx
