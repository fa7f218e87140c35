"""Statistics of the attention probabilities from what fused kernels return: the per-row log-sum-exp (LSE).

Fused attention kernels never write the probability matrix ``P = softmax(S)``, ``S = scale * Q K^T + bias`` (masked
pairs ``-inf``), to memory; they keep, for their backward pass, the row log-sum-exp ``lse_i = log sum_j exp(S_ij)``
(Dao et al., "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness", NeurIPS 2022,
arXiv 2205.14135; Dao-AILab/flash-attention ``flash_attn/flash_attn_interface.py``, ``flash_attn_func(...,
return_attn_probs=True)`` returns it as ``softmax_lse``). Every nearfar engine returns the same quantity,
``nearfar.attend(..., return_lse=True)``. From ``(q, k, lse)`` three statistics of ``P`` are exact rewrites, not
approximations, and none materialises the ``(Nq, Nk)`` matrix:

1. Rows (``prob_rows``): ``P[i, :] = exp(S[i, :] - lse_i)``. Any set of ``R`` rows costs ``O(R Nk d)`` time and
   ``O(R Nk)`` memory, with no second reduction over the row; in decoding, ``k`` is the KV cache, so keeping ``q``
   and ``lse`` of a step is enough to rebuild its row later. Differentiable in ``q``, ``k`` and ``bias``, with the
   exact softmax gradient (the row is whole, so ``dS = P * (dP - sum(P * dP))``); ``lse`` is a constant.
2. Group mass (``group_mass``): ``sum_{j in G} P_ij = exp(lse^G_i - lse_i)``, where ``lse^G`` is the LSE of an
   attention pass restricted to the keys of ``G`` (here: the key padding mask AND the group's membership, run by
   ``attend`` on any engine, so a sparse pattern costs what its pairs cost). One fused pass per group, ``O(Nq)``
   memory besides it. This is what VAR (Kang et al., "See What You Are Told: Visual Attention Sink in Large
   Multimodal Models", ICLR 2025, arXiv 2503.03321) needs for a head's mass on image tokens and its sink share.
3. Attention received (``received``): ``P^T r``, the column aggregate of ``P`` weighted by a row vector (or ``m``
   of them). With ``r = x`` it is one step of attention rollout's row propagation ``x^T P`` (Abnar & Zuidema,
   "Quantifying Attention Flow in Transformers", ACL 2020, arXiv 2005.00928; samiraabnar/attention_flow
   ``compute_joint_attention``), as DCAL (arXiv 2205.02151) propagates its class-token row; with ``r = 1`` it is
   how much attention each key receives (sink detection). Computed here chunk by chunk of query rows from
   ``(q, k, lse)``: ``O(Nq S d)`` time where ``S <= Nk`` is the span of keys each chunk's pattern reaches (the
   whole row for dense attention, about the window for windows), ``O(Nk d + chunk)`` memory. It also equals the
   value gradient ``dV = P^T dO`` of attention (with ``dO = r``), but that route costs more: a forward pass and a
   backward pass that recomputes ``P`` and, in fused kernels, computes ``dQ`` and ``dK`` beside ``dV``; with GQA,
   ``dV`` sums over each group's query heads, so ``k`` would have to be copied per query head; and it would use
   the engine's own probabilities in the input's precision, not the given LSE in float32. The chunked route does
   one score GEMM (the LSE subtracted in it), a masked exp and one ``P^T r`` product per chunk. Measured on CPU
   (1 thread, 8 heads, 4,096 tokens, d = 64, the backward route on nearfar's compiled kernel): causal 0.82 s
   against 0.96 s, dense 1.7 s against 2.7 s; a 256-token causal window, where the chunks still evaluate the
   pattern on every key, 0.21 s against 0.16 s.

What differs from the kernels that define the LSE: nothing in the math; all three ops compute in float32 (float64
inputs stay float64) and return that dtype, whichever dtype ``q`` and ``k`` have, so bf16/fp16 results match the
engines' to their precision. The mask is the one ``attend`` applies, mirrored exactly: ``pattern`` (evaluated on
the asked rows only, ``Nq != Nk`` aligned as ``attend`` aligns it), ``key_padding_mask`` and an additive ``bias``;
GQA reads KV head ``h // (Hq // Hkv)`` for query head ``h`` (``repeat_kv``). ``prob_rows`` and ``score_rows`` also
take the call's run-time ``blocks`` (``SelectedBlocks``: the pairs are the pattern's OR the selected ones, as
``attend`` joins them) and its ``score_mod`` (applied to ``scale q.k`` with the tokens' own indices, before the mask
and bias, as ``attend`` does). A relative-position table (``rpb``) is not mirrored: pass a table's values as
``bias``; ``group_mass`` and ``received`` take neither blocks nor a score_mod. A row whose LSE is ``-inf`` (no allowed
key) gives zeros, never NaN. ``group_mass`` and ``received`` are not differentiable (no gradient flows through an
LSE).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, overload

import torch

from ..backends.kernels import acc_dtype
from ..checks import check_bool, check_positive_int, check_same_dtype_device, check_scale
from ..dispatch import attend, check_attention_inputs
from ..mods import call_score_mod, check_mod
from ..patterns import Dense, Pattern, PerHead
from ..selection import SelectedBlocks

__all__ = ["group_mass", "prob_rows", "received", "score_rows"]

#: ``received``'s default chunk: about this many scores at once (8 MiB in float32; 8 heads x 4,096 tokens, 1 thread:
#: 64-row chunks ran causal attention's ``P^T r`` 1.5x faster than 512-row ones)
_CHUNK_ELEMENTS = 1 << 21
_INT = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _check(q: object, k: object, lse: object, pattern: object, scale: object, kpm: object,
           bias: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """``attend``'s checks of q, k, scale and the key padding mask, then lse, pattern and bias; returns the bias as
    a 4D view and the scale."""
    if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor):
        check_same_dtype_device(q=q, k=k)
    check_attention_inputs(q, k, k, scale, kpm, pattern, bias)
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    if not isinstance(lse, torch.Tensor) or not lse.is_floating_point():
        got = lse.dtype if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise TypeError(f"lse must be a floating tensor (B, Hq, Nq), as attend(..., return_lse=True) returns it, "
                        f"got {got}")
    if tuple(lse.shape) != (b, hq, nq) or lse.device != q.device:
        raise ValueError(f"lse must be (B, Hq, Nq) = {(b, hq, nq)} on {q.device}, got {tuple(lse.shape)} on "
                         f"{lse.device}")
    b4 = None
    if bias is not None:
        assert isinstance(bias, torch.Tensor)  # attend's checks: a floating tensor on q's device
        target = (b, hq, nq, nk)
        if bias.dim() > 4 or any(s not in (1, t) for s, t in zip(reversed(bias.shape), reversed(target))):
            raise ValueError(f"bias of shape {tuple(bias.shape)} must be broadcastable to (B, Hq, Nq, Nk) = {target}")
        b4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    given = check_scale(scale, "scale")
    return q, k, lse, b4, given if given is not None else 1.0 / math.sqrt(d)


def _check_extras(blocks: object, score_mod: object, q: torch.Tensor, k: torch.Tensor) -> None:
    """``attend``'s checks of run-time ``blocks`` and a ``score_mod``."""
    if blocks is not None:
        if not isinstance(blocks, SelectedBlocks):
            raise TypeError(f"blocks must be a nearfar.SelectedBlocks or None, got {type(blocks).__name__}")
        blocks.check(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.device)
    if score_mod is not None:
        check_mod(score_mod, "score_mod", "score_mod")


def rows_index(rows: object, b: int, hq: int, nq: int, device: torch.device, name: str = "rows",
                n: str = "Nq") -> torch.Tensor:
    """``rows`` as int64 indices ``(B|1, Hq|1, R)`` into ``nq`` (named ``n``), negatives wrapped, after checking
    them (``name``: the parameter in messages)."""
    what = (f"{name} must be an int, a slice, a sequence of ints, an int tensor (R,) or (B|1, Hq|1, R), or a bool "
            f"tensor ({n},)")
    if isinstance(rows, slice):
        return torch.arange(nq, device=device)[rows].view(1, 1, -1)
    if isinstance(rows, int) and not isinstance(rows, bool):
        rows = [rows]
    if isinstance(rows, Sequence) and not isinstance(rows, str):
        if not all(isinstance(r, int) and not isinstance(r, bool) for r in rows):
            raise TypeError(f"{what}; got a sequence holding {sorted({type(r).__name__ for r in rows})}")
        idx = torch.tensor(list(rows), dtype=torch.int64, device=device).view(1, 1, -1)
    elif isinstance(rows, torch.Tensor):
        if rows.device != device:
            raise ValueError(f"{name} is on {rows.device}, q on {device}")
        if rows.dtype == torch.bool:
            if tuple(rows.shape) != (nq,):
                raise ValueError(f"a bool {name} must have shape ({n},) = ({nq},), got {tuple(rows.shape)}")
            return rows.nonzero()[:, 0].view(1, 1, -1)
        if rows.dtype not in _INT:
            raise TypeError(f"{what}; got a tensor of dtype {rows.dtype}")
        if rows.dim() == 1:
            rows = rows.reshape(1, 1, -1)
        if rows.dim() != 3 or rows.shape[0] not in (1, b) or rows.shape[1] not in (1, hq):
            raise ValueError(f"an int {name} tensor must be (R,) or (B|1, Hq|1, R) with B={b}, Hq={hq}, got "
                             f"{tuple(rows.shape)}")
        idx = rows.long()
    else:
        raise TypeError(f"{what}; got {type(rows).__name__}")
    if idx.numel() and (int(idx.min()) < -nq or int(idx.max()) >= nq):
        raise ValueError(f"{name} must lie in [-{n}, {n} - 1] = [{-nq}, {nq - 1}], got values from {int(idx.min())} to "
                         f"{int(idx.max())}")
    return torch.where(idx < 0, idx + nq, idx)


def take_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx (B'', H'', R)`` of ``t (b', h', N, X)`` along dim 2: ``(max(b', B''), max(h', H''), R, X)``; with
    ``N = 1`` (one row, or a bias broadcast over the rows) the row repeated, ``(b', h', R, X)``."""
    if t.shape[2] == 1:
        return t.expand(t.shape[0], t.shape[1], idx.shape[2], t.shape[3])
    bi = torch.arange(t.shape[0], device=t.device).view(-1, 1, 1)
    hi = torch.arange(t.shape[1], device=t.device).view(1, -1, 1)
    return t[bi, hi, idx]


def _allowed(pattern: Pattern | None, idx: torch.Tensor, keys: torch.Tensor, nq: int, nk: int) -> torch.Tensor | None:
    """The pattern's answer for query rows ``idx (B'', H'', R)`` and key indices ``keys (S,)``: bool
    ``(B'', H''|Hq, R, S)``, or None when every pair is allowed."""
    if pattern is None or isinstance(pattern, Dense):
        return None
    qi = idx[..., None]
    shape = (idx.shape[0], idx.shape[1], idx.shape[2], keys.shape[0])
    if isinstance(pattern, PerHead):
        per = [torch.broadcast_to(p.allowed(qi[:, min(h, idx.shape[1] - 1)], keys, nq, nk), (shape[0], *shape[2:]))
               for h, p in enumerate(pattern.patterns)]
        return torch.stack(per, 1)
    return torch.broadcast_to(pattern.allowed(qi, keys, nq, nk), shape)


def _logits(q: torch.Tensor, k: torch.Tensor, idx: torch.Tensor, pattern: Pattern | None, kpm: torch.Tensor | None,
            b4: torch.Tensor | None, scale: float, nq: int, blocks: SelectedBlocks | None = None,
            score_mod: Any = None) -> torch.Tensor:
    """Masked scaled biased scores of query rows ``idx`` against every key, in ``k``'s dtype (the caller's
    float32/64 copy): ``(B, Hq, R, Nk)``, ``-inf`` at every pair ``attend`` would mask."""
    nk = k.shape[2]
    qr = take_rows(q, idx).to(k.dtype)  # (B, Hq, R, d)
    b, hq, r, d = qr.shape
    hkv = k.shape[1]
    qr = qr.reshape(b, hkv, (hq // hkv) * r, d)  # query head h = kv * G + g reads KV head kv
    s = torch.matmul(qr, k.transpose(-1, -2)).reshape(b, hq, r, nk) * scale
    keys = torch.arange(nk, device=q.device)
    if score_mod is not None:  # on scale q.k, with the tokens' own indices, before mask and bias (as attend)
        dev = q.device
        s = call_score_mod(score_mod, s, torch.arange(b, device=dev).view(-1, 1, 1, 1),
                           torch.arange(hq, device=dev).view(1, -1, 1, 1), idx[..., None], keys.view(1, 1, 1, -1))
    if b4 is not None:
        s = s + take_rows(b4, idx).to(s.dtype)
    allowed = _allowed(pattern, idx, keys, nq, nk)
    if blocks is not None:  # the pattern's pairs OR the selected ones (no pattern: the selected ones only)
        sel = blocks.pair_mask(nq, nk, hq, hkv, rows=idx)
        if pattern is None:
            allowed = sel
        elif allowed is not None:
            allowed = allowed | sel
    if kpm is not None:
        pad = kpm[:, None, None, :]
        allowed = pad if allowed is None else allowed & pad
    if allowed is not None:
        s = torch.where(allowed, s, torch.tensor(float("-inf"), dtype=s.dtype, device=s.device))
    return s


def _probs(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``exp(s - lse)``, 0 on rows whose LSE is ``-inf``."""
    dead = torch.isneginf(lse)
    p = torch.exp(s - torch.where(dead, torch.zeros((), dtype=lse.dtype, device=lse.device), lse))
    return torch.where(dead, torch.zeros((), dtype=p.dtype, device=p.device), p)


class _RowSoftmax(torch.autograd.Function):
    """``exp(s - lse)`` for whole rows, with the softmax gradient (``lse`` is the row's own log-sum-exp)."""

    @staticmethod
    def forward(ctx: Any, s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        p = _probs(s, lse)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (p,) = ctx.saved_tensors
        pg = p * grad
        return pg - p * pg.sum(-1, keepdim=True), None


def prob_rows(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, rows: int | slice | Sequence[int] | torch.Tensor,
              pattern: Pattern | None = None, *, scale: float | None = None,
              key_padding_mask: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              blocks: SelectedBlocks | None = None, score_mod: Any = None) -> torch.Tensor:
    """Exact rows of the attention probabilities, ``P[i, :] = exp(scale q_i K^T + bias_i + mask_i - lse_i)``.

    Costs ``O(R Nk d)`` for ``R`` rows; nothing of size ``(Nq, Nk)`` is formed. Differentiable in ``q``, ``k`` and
    ``bias`` with the exact softmax gradient (``lse`` is held constant).

    Args:
        q: Queries ``(B, Hq, Nq, d)``, float16/bfloat16/float32/float64, any layout.
        k: Keys ``(B, Hkv, Nk, d)``, ``Hq % Hkv == 0`` (GQA: query head ``h`` reads KV head ``h // (Hq // Hkv)``).
        lse: ``(B, Hq, Nq)``, the LSE ``nearfar.attend(q, k, v, pattern, ..., return_lse=True)`` returned for the
            same mask, scale and bias.
        rows: The query rows: an int, a slice, a sequence of ints, an int tensor ``(R,)``, a bool tensor ``(Nq,)``
            (the same rows for every batch item and head), or an int tensor ``(B|1, Hq|1, R)`` (its own rows per
            batch item and/or head). Negative indices count from the end.
        pattern: The pattern of the ``attend`` call (None: dense).
        scale: Score scale; default ``1 / sqrt(d)``.
        key_padding_mask: Bool ``(B, Nk)``, True = keep, as given to ``attend``.
        bias: Additive score bias broadcastable to ``(B, Hq, Nq, Nk)``, as given to ``attend``.
        blocks: Run-time selected key blocks (``SelectedBlocks``), as given to ``attend``.
        score_mod: The ``score_mod(score, b, h, q_idx, kv_idx)`` given to ``attend``.

    Returns:
        ``(B, Hq, R, Nk)`` in float32 (float64 for float64 inputs); a row with ``lse = -inf`` is all zeros.

    Raises:
        TypeError: If a tensor has the wrong type or dtype (the parameter is named).
        ValueError: If shapes, devices, the pattern's sizes or the row indices are out of range, before any work.

    Examples:
        >>> import torch, nearfar as nf
        >>> from nearfar.steer import prob_rows
        >>> q, k, v = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
        >>> _, lse = nf.attend(q, k, v, nf.Causal(), return_lse=True)
        >>> p = prob_rows(q, k, lse, [0, -1], nf.Causal())
        >>> p.shape, bool(torch.allclose(p.sum(-1), torch.ones(1, 4, 2))), float(p[0, 0, 0, 1:].abs().max())
        (torch.Size([1, 4, 2, 64]), True, 0.0)
    """
    q, k, lse, b4, s = _check(q, k, lse, pattern, scale, key_padding_mask, bias)
    b, hq, nq, _ = q.shape
    _check_extras(blocks, score_mod, q, k)
    idx = rows_index(rows, b, hq, nq, q.device)
    acc = acc_dtype(q.dtype)
    kf = k.to(acc)
    logits = _logits(q, kf, idx, pattern, key_padding_mask, b4, s, nq, blocks, score_mod)
    return _RowSoftmax.apply(logits, take_rows(lse[..., None], idx).to(acc))


def score_rows(q: torch.Tensor, k: torch.Tensor, rows: int | slice | Sequence[int] | torch.Tensor,
               pattern: Pattern | None = None, *, scale: float | None = None,
               key_padding_mask: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               blocks: SelectedBlocks | None = None, score_mod: Any = None) -> torch.Tensor:
    """The scores of query rows as ``attend`` forms them, ``scale q_i K^T + bias_i``, with ``-inf`` at every pair
    the pattern or the key padding masks: the logits ``prob_rows`` exponentiates. ``O(R Nk d)``.

    Args:
        q: Queries ``(B, Hq, Nq, d)``.
        k: Keys ``(B, Hkv, Nk, d)``, ``Hq % Hkv == 0``.
        rows: The query rows, as in ``prob_rows``.
        pattern: The pattern of the ``attend`` call (None: dense).
        scale: Score scale; default ``1 / sqrt(d)``.
        key_padding_mask: Bool ``(B, Nk)``, True = keep.
        bias: Additive score bias broadcastable to ``(B, Hq, Nq, Nk)``.
        blocks: Run-time selected key blocks (``SelectedBlocks``), as given to ``attend``.
        score_mod: The ``score_mod(score, b, h, q_idx, kv_idx)`` given to ``attend``.

    Returns:
        ``(B, Hq, R, Nk)`` in float32 (float64 for float64 inputs).

    Raises:
        TypeError: If a tensor has the wrong type or dtype.
        ValueError: If shapes, devices or the row indices are out of range.
    """
    lse = torch.zeros(q.shape[:3], device=q.device) if isinstance(q, torch.Tensor) and q.dim() == 4 else None
    q, k, _, b4, s = _check(q, k, lse, pattern, scale, key_padding_mask, bias)
    b, hq, nq, _ = q.shape
    _check_extras(blocks, score_mod, q, k)
    idx = rows_index(rows, b, hq, nq, q.device)
    return _logits(q, k.to(acc_dtype(q.dtype)), idx, pattern, key_padding_mask, b4, s, nq, blocks, score_mod)


def _groups(groups: object, b: int, nk: int, device: torch.device) -> torch.Tensor:
    """``groups`` as a bool membership ``(B|1, G, Nk)``, after checking it."""
    if isinstance(groups, torch.Tensor):
        if groups.dtype != torch.bool:
            raise TypeError(f"groups must be a bool tensor (G, Nk) or (B, G, Nk), or a dict, got dtype {groups.dtype}")
        if groups.device != device:
            raise ValueError(f"groups is on {groups.device}, q on {device}")
        if groups.dim() == 2:
            groups = groups[None]
        if groups.dim() != 3 or groups.shape[0] not in (1, b) or groups.shape[2] != nk or groups.shape[1] == 0:
            raise ValueError(f"groups must be (G, Nk) or (B, G, Nk) with G >= 1, B={b}, Nk={nk}, got "
                             f"{tuple(groups.shape)}")
        return groups
    if not isinstance(groups, Mapping) or not groups:
        raise TypeError(f"groups must be a bool tensor (G, Nk) or (B, G, Nk), or a non-empty dict name -> keys, got "
                        f"{type(groups).__name__}{' (empty)' if isinstance(groups, Mapping) else ''}")
    masks = []
    for name, keys in groups.items():
        where = f"groups[{name!r}]"
        if isinstance(keys, torch.Tensor) and keys.dtype == torch.bool:
            if keys.device != device:
                raise ValueError(f"{where} is on {keys.device}, q on {device}")
            if tuple(keys.shape) not in ((nk,), (b, nk)):
                raise ValueError(f"{where} as a bool mask must be (Nk,) or (B, Nk) = ({nk},) or {(b, nk)}, got "
                                 f"{tuple(keys.shape)}")
            masks.append(keys.expand(b, nk))
            continue
        if isinstance(keys, torch.Tensor) and keys.dim() != 1:
            raise ValueError(f"{where} as an index tensor must be 1D (R,), got {tuple(keys.shape)}")
        idx = rows_index(keys, 1, 1, nk, device, where, "Nk")
        m = torch.zeros(nk, dtype=torch.bool, device=device)
        m[idx.view(-1)] = True
        masks.append(m.expand(b, nk))
    return torch.stack(masks, 1)


Groups = torch.Tensor | Mapping[str, int | slice | Sequence[int] | torch.Tensor]


@overload
def group_mass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, lse: torch.Tensor, groups: Groups,
               pattern: Pattern | None = None, *, scale: float | None = None,
               key_padding_mask: torch.Tensor | None = None, bias: torch.Tensor | None = None, engine: str = "auto",
               return_outputs: Literal[False] = False) -> torch.Tensor: ...
@overload
def group_mass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, lse: torch.Tensor, groups: Groups,
               pattern: Pattern | None = None, *, scale: float | None = None,
               key_padding_mask: torch.Tensor | None = None, bias: torch.Tensor | None = None, engine: str = "auto",
               return_outputs: Literal[True]) -> tuple[torch.Tensor, torch.Tensor]: ...
def group_mass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, lse: torch.Tensor, groups: Groups,
               pattern: Pattern | None = None, *, scale: float | None = None,
               key_padding_mask: torch.Tensor | None = None, bias: torch.Tensor | None = None, engine: str = "auto",
               return_outputs: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention mass of each key group, ``sum_{j in G} P_ij = exp(lse^G_i - lse_i)``, one fused pass per group.

    ``lse^G`` is the LSE of ``attend(q, k, v, pattern, key_padding_mask=key_padding_mask & member_G, ...)``: the
    same mask restricted to the group's keys, on ``engine``. Costs ``G`` attention passes (each what the pattern
    costs on that engine) and no ``(Nq, Nk)`` tensor. Groups may overlap and need not cover the keys. Not
    differentiable.

    Args:
        q: Queries ``(B, Hq, Nq, d)``, float16/bfloat16/float32/float64, any layout.
        k: Keys ``(B, Hkv, Nk, d)``, ``Hq % Hkv == 0`` (GQA).
        v: Values ``(B, Hkv, Nk, dv)`` for ``return_outputs``; None runs the passes on a one-channel zero value
            (the mass needs only their LSE).
        lse: ``(B, Hq, Nq)``, the LSE ``attend`` returned for the same mask, scale and bias.
        groups: A bool tensor ``(G, Nk)`` or ``(B, G, Nk)`` (True = the key is in the group), or a dict
            ``name -> keys`` (``keys``: an int, a slice, a sequence of ints, an int tensor ``(R,)``, or a bool
            tensor ``(Nk,)`` or ``(B, Nk)``); a dict's groups come out in its order (``list(groups)`` names them).
        pattern: The pattern of the ``attend`` call (None: dense).
        scale: Score scale; default ``1 / sqrt(d)``.
        key_padding_mask: Bool ``(B, Nk)``, True = keep.
        bias: Additive score bias broadcastable to ``(B, Hq, Nq, Nk)``.
        engine: The engine of the group passes (``attend``'s ``engine``).
        return_outputs: Also return each group's attention output (the attention restricted to the group's keys,
            renormalised over them; 0 where the group gets no key); needs ``v``.

    Returns:
        ``(B, Hq, Nq, G)`` in float32 (float64 for float64 inputs), 0 where ``lse`` or ``lse^G`` is ``-inf``; with
        ``return_outputs``, a tuple with the outputs ``(B, Hq, Nq, G, dv)`` in ``q``'s dtype (so that
        ``sum_G mass[..., G, None] * outputs[..., G, :]`` is the full output when the groups split the keys).

    Raises:
        TypeError: If a tensor has the wrong type or dtype, or ``groups`` is not one of the forms above.
        ValueError: If shapes, devices, the pattern's sizes, key indices or ``engine`` are out of range, or
            ``return_outputs`` without ``v``, before any work.

    Examples:
        >>> import torch, nearfar as nf
        >>> from nearfar.steer import group_mass
        >>> q, k, v = torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
        >>> _, lse = nf.attend(q, k, v, nf.Causal(), return_lse=True)
        >>> mass = group_mass(q, k, None, lse, {"sink": 0, "rest": slice(1, None)}, nf.Causal())
        >>> mass.shape, bool(torch.allclose(mass.sum(-1), torch.ones(2, 2, 10))), float(mass[0, 0, 0, 0])
        (torch.Size([2, 2, 10, 2]), True, 1.0)
    """
    q, k, lse, _, _ = _check(q, k, lse, pattern, scale, key_padding_mask, bias)
    check_bool(return_outputs, "return_outputs")
    if v is None:
        if return_outputs:
            raise ValueError("return_outputs=True needs the values v (B, Hkv, Nk, dv), got v=None")
        v = q.new_zeros(k.shape[0], k.shape[1], k.shape[2], 1)
    else:
        check_attention_inputs(q, k, v, scale, key_padding_mask)
    b, hq, nq, _ = q.shape
    member = _groups(groups, b, k.shape[2], q.device)
    acc = acc_dtype(q.dtype)
    masses, outs = [], []
    with torch.no_grad():
        for g in range(member.shape[1]):
            keep = member[:, g].expand(b, -1)
            keep = keep if key_padding_mask is None else keep & key_padding_mask
            out, lse_g = attend(q, k, v, pattern, scale=scale, bias=bias, key_padding_mask=keep, engine=engine,
                                return_lse=True)
            masses.append(_probs(lse_g.to(acc), lse.to(acc)))
            outs.append(out)
    mass = torch.stack(masses, -1)
    return (mass, torch.stack(outs, 3)) if return_outputs else mass


def received(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, r: torch.Tensor, pattern: Pattern | None = None,
             *, scale: float | None = None, key_padding_mask: torch.Tensor | None = None,
             bias: torch.Tensor | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """Attention each key receives, weighted by the query rows: ``P^T r`` (column aggregates of ``P``).

    ``out[b, h, j] = sum_i P[b, h, i, j] r[b, h, i]``. With ``r = 1``: the total attention key ``j`` receives; with
    ``r = x``, a row distribution, ``received(..., x)`` is ``x^T P``, one step of attention rollout (mix in the
    residual and average heads outside: ``0.5 * x + 0.5 * received(...).mean(1)`` per layer). Computed from
    ``(q, k, lse)`` chunk by chunk of query rows, each chunk against the span of keys its rows may attend (by the
    pattern); no gradient.

    Args:
        q: Queries ``(B, Hq, Nq, d)``, float16/bfloat16/float32/float64, any layout.
        k: Keys ``(B, Hkv, Nk, d)``, ``Hq % Hkv == 0`` (GQA).
        lse: ``(B, Hq, Nq)``, the LSE ``attend`` returned for the same mask, scale and bias.
        r: Row weights ``(B, Hq, Nq)`` or ``m`` of them ``(B, Hq, Nq, m)``, floating.
        pattern: The pattern of the ``attend`` call (None: dense).
        scale: Score scale; default ``1 / sqrt(d)``.
        key_padding_mask: Bool ``(B, Nk)``, True = keep.
        bias: Additive score bias broadcastable to ``(B, Hq, Nq, Nk)``.
        chunk_size: Query rows per chunk; default: as many as keep one chunk's scores near ``2**21`` elements.

    Returns:
        ``(B, Hq, Nk)`` (or ``(B, Hq, Nk, m)``) in float32 (float64 for float64 inputs).

    Raises:
        TypeError: If a tensor has the wrong type or dtype, or ``chunk_size`` is not an int.
        ValueError: If shapes, devices or the pattern's sizes are out of range, or ``chunk_size < 1``, before any
            work.

    Examples:
        >>> import torch, nearfar as nf
        >>> from nearfar.steer import received
        >>> q, k, v = torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
        >>> _, lse = nf.attend(q, k, v, nf.Causal(), return_lse=True)
        >>> got = received(q, k, lse, torch.ones(1, 2, 12), nf.Causal())
        >>> got.shape, round(float(got.sum()), 4), float(got[0, 0, 0]) >= 1.0   # 24 rows; key 0 has row 0's 1
        (torch.Size([1, 2, 12]), 24.0, True)
    """
    q, k, lse, b4, s = _check(q, k, lse, pattern, scale, key_padding_mask, bias)
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    if not isinstance(r, torch.Tensor) or not r.is_floating_point():
        raise TypeError(f"r must be a floating tensor (B, Hq, Nq) or (B, Hq, Nq, m), got "
                        f"{r.dtype if isinstance(r, torch.Tensor) else type(r).__name__}")
    if r.dim() not in (3, 4) or tuple(r.shape[:3]) != (b, hq, nq) or r.device != q.device or 0 in r.shape:
        raise ValueError(f"r must be (B, Hq, Nq) = {(b, hq, nq)} or (B, Hq, Nq, m >= 1) on {q.device}, got "
                         f"{tuple(r.shape)} on {r.device}")
    if chunk_size is not None:
        check_positive_int(chunk_size, "chunk_size")
    step = chunk_size or max(1, _CHUNK_ELEMENTS // (max(b * hq, 4) * nk))  # the chunk's mask: ~4 scores' bytes
    acc = acc_dtype(q.dtype)
    hkv, m = k.shape[1], r.shape[3] if r.dim() == 4 else 1
    g = hq // hkv
    out = torch.zeros(b, hq, nk, m, dtype=acc, device=q.device)
    with torch.no_grad():
        kt = k.to(acc).transpose(-1, -2)  # (B, Hkv, d, Nk)
        keys = torch.arange(nk, device=q.device)
        for i0 in range(0, nq, step):
            i1 = min(nq, i0 + step)
            c, idx = i1 - i0, torch.arange(i0, i1, device=q.device).view(1, 1, -1)
            allowed = _allowed(pattern, idx, keys, nq, nk)
            lo, hi = 0, nk
            if allowed is not None:
                cols = allowed.reshape(-1, nk).any(0).nonzero()
                if not cols.numel():
                    continue
                lo, hi = int(cols[0]), int(cols[-1]) + 1
                allowed = allowed[..., lo:hi]
            if key_padding_mask is not None:
                pad = key_padding_mask[:, None, None, lo:hi]
                allowed = pad if allowed is None else allowed & pad
            lc = lse[:, :, i0:i1].to(acc)
            dead = torch.isneginf(lc)  # rows without keys: P = 0 (their r is zeroed too, against NaN)
            lc = torch.where(dead, torch.zeros((), dtype=acc, device=q.device), lc)
            qc = (q[:, :, i0:i1].to(acc) * s).reshape(b * hkv, g * c, q.shape[3])
            # the scores minus the LSE in one GEMM (its beta term adds -lse), then mask, exp and P^T r in place
            p = torch.baddbmm(-lc.reshape(b * hkv, g * c, 1), qc, kt[..., lo:hi].reshape(b * hkv, -1, hi - lo))
            p = p.view(b, hq, c, hi - lo)
            if b4 is not None:
                p += take_rows(b4[..., lo:hi] if b4.shape[-1] > 1 else b4, idx).to(acc)
            if allowed is not None:
                p.masked_fill_(~allowed, float("-inf"))
            rc = r[:, :, i0:i1].to(acc).reshape(b, hq, c, m).masked_fill(dead[..., None], 0.0)
            out[:, :, lo:hi] += torch.matmul(p.exp_().transpose(-1, -2), rc)
    return out if r.dim() == 4 else out[..., 0]
