"""Block pooling and block scores of content-routed attention: the scoring half of ``nearfar.ops.routing``.

- ``pool_blocks``: one summary vector per block of tokens (mean: MoBA, NSA's fla variant; max/min/mean
  concatenated: SeerAttention's ``Kmaxminavg`` gate input).
- ``block_scores``: scores of query blocks (or single queries) against pooled key blocks, with the block-causal
  mask and a GQA group reduction.
- ``block_attention_stat``: the block max-pool (or block mass) of the exact softmax map, chunk by chunk:
  SeerAttention's distillation target.

Papers and official code: MoBA (Lu et al., 2025) -- MoonshotAI/MoBA ``moba/moba_naive.py``
(``moba_attn_varlen_naive``); NSA (Yuan et al., 2025) -- fla-org/flash-linear-attention ``fla/ops/nsa/naive.py``
(``naive_nsa_topk``); SeerAttention (Gao et al., 2024) -- microsoft/SeerAttention
``seer_attn/prefill_sparse/attn_gate.py`` (the AttnGate pooling) and ``seer_attn/modules/attention_distill.py``
(``attention_distill_forward``: the pooled attention map).

**Rows and their current block.** Row ``m`` of a score map stands for the query tokens ``[m*q_block_size,
(m+1)*q_block_size)`` shifted by ``q_start`` (the position of the first query, e.g. the cache length when
decoding). Its *current* key block is the one holding its last query token, ``(q_start + (m+1)*q_block_size - 1)
// k_block_size``; with ``causal`` a key block after the current one is masked. Single queries are rows with
``q_block_size=1``. The selection ops (``nearfar.ops.block_selection``) place rows the same way.
"""

from __future__ import annotations

import math

import torch

from ..checks import (
    check_bool,
    check_choice,
    check_nonneg_int,
    check_positive_int,
    check_scale,
    check_tensor,
)

__all__ = ["block_attention_stat", "block_scores", "pool_blocks"]


def _group(q: torch.Tensor, k: torch.Tensor, k_name: str, q_len: str, k_len: str) -> int:
    """Query heads per key head of a 4-D ``q`` and keys ``k`` (named ``k_name``; ``q_len``/``k_len`` name their
    lengths in the message), after checking they share dtype, batch and head dim and the heads divide."""
    if q.dtype != k.dtype:
        raise TypeError(f"q and {k_name} must share one dtype, got {q.dtype}, {k.dtype}")
    (b, hq, _, d), (bk, hkv, _, dk) = q.shape, k.shape
    if bk != b or dk != d or hkv < 1 or hq % hkv:
        raise ValueError(f"q (B, Hq, {q_len}, d) and {k_name} (B, Hkv, {k_len}, d) need the same B and d and "
                         f"Hq % Hkv == 0, got {tuple(q.shape)} and {tuple(k.shape)}")
    return hq // hkv


def num_blocks(n: int, block_size: int) -> int:
    """The number of blocks of ``block_size`` that cover ``n`` tokens (the last one may be partial)."""
    return (n + block_size - 1) // block_size


def current_block(rows: int, q_block_size: int, k_block_size: int, q_start: int,
                  device: torch.device) -> torch.Tensor:
    """The key block holding the last query token of each row, ``(rows,)`` int64 (see the module docstring)."""
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
    nb = num_blocks(n, bs)
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
    g = _group(q, k_blocks, "k_blocks", "QB", "KB")
    b, hq, qb, d = q.shape
    hkv, kb = k_blocks.shape[1:3]
    s = scale if scale is not None else 1.0 / math.sqrt(d) if d else 1.0
    if group_reduce == "mean" and not softmax:  # the mean of the group's scores is the score of its mean query
        q, g, hq, group_reduce = q.reshape(b, hkv, g, qb, d).mean(dim=2), 1, hkv, None
    # the scale goes on the (few) query rows, the mask in place: each pass over a long map's scores costs
    scores = torch.matmul(q.reshape(b, hkv, g, qb, d) * s, k_blocks.unsqueeze(2).transpose(-1, -2))
    if causal:
        cur = current_block(qb, qbs, kbs, start, q.device)
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
    g = _group(q, k, "k", "Nq", "Nk")
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1:3]
    if tuple(lse.shape) != (b, hq, nq):
        raise ValueError(f"lse must be (B, Hq, Nq) = {(b, hq, nq)}, got {tuple(lse.shape)}")
    s = scale if scale is not None else 1.0 / math.sqrt(d) if d else 1.0
    qblocks, kblocks = num_blocks(nq, bq), num_blocks(nk, bk)
    kpad = kblocks * bk - nk
    step = num_blocks(chunk, bq) * bq
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
        rpad = num_blocks(rows, bq) * bq - rows
        p = torch.nn.functional.pad(p, (0, kpad, 0, rpad))  # P >= 0: zero padding changes no max nor sum
        tiles = p.reshape(b, hq, num_blocks(rows, bq), bq, kblocks, bk)
        out.append(tiles.amax(dim=(3, 5)) if how == "max" else tiles.sum(dim=(3, 5)))
    gt = torch.cat(out, dim=2) if out else q.new_zeros(b, hq, qblocks, kblocks)
    if normalize:
        total = gt.sum(dim=-1, keepdim=True)
        gt = gt / torch.where(total > 0, total, torch.ones_like(total))
    return gt

