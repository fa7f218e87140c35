"""NSA in fla's layout and argument order: ``(B, T, H, d)`` tensors, optional ``cu_seqlens`` packing, and fla's
``block_indices (B, T, Hkv, S)``; each function runs the heads-first branches of ``nsa_branches.py``.

fla-org/flash-linear-attention ``fla/ops/nsa/naive.py`` (``naive_nsa``, ``naive_nsa_compression``,
``naive_nsa_topk``, ``naive_nsa_selection``) and ``parallel_nsa``, for Yuan et al., "Native Sparse Attention:
Hardware-Aligned and Natively Trainable Sparse Attention" (arXiv 2502.11089, 2025). Our differences from fla's code
(any GQA group size, ``block_counts >= 3`` an int, a repeated block id counting once, 0 for a query with no valid
key, ``scale`` in the window branch too) are stated in ``nearfar.layers.nsa``.
"""

from __future__ import annotations

import torch

from ..checks import check_nonneg_int, check_tensor
from ..functional import SelectedBlocks, attend, pool_blocks
from ..patterns import Causal
from .fla_layout import (
    check_block_counts,
    check_cu_seqlens,
    check_fla_qkv,
    compressed_offsets,
    from_batch,
    from_fla_indices,
    heads_first,
    to_batch,
    to_fla_indices,
)
from .nsa_branches import nsa_compressed_heads, nsa_heads, nsa_select_heads

__all__ = ["nsa", "nsa_compression", "nsa_selection", "nsa_topk"]


def nsa_compression(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, block_size: int, scale: float | None,
                    cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NSA's compressed attention in fla's layout (fla ``naive_nsa_compression``): ``q (B, T, Hq, d)`` over
    ``k_cmp (B, TC, Hkv, d)``, ``v_cmp (B, TC, Hkv, dv)``; block ``c`` is visible from ``t = (c+1) BS - 1`` on.
    With ``cu_seqlens`` (``B = 1``) the compressed tensors pack ``ceil(len / BS)`` blocks per sequence.

    Returns:
        ``(o (B, T, Hq, dv), lse (B, T, Hq) float32)``; a query with no visible block gives 0 and ``-inf``.

    Examples:
        >>> import torch
        >>> from nearfar.layers.nsa_fla import nsa_compression
        >>> q, kc = torch.randn(1, 9, 2, 4), torch.randn(1, 3, 1, 4)
        >>> o, lse = nsa_compression(q, kc, kc, 4, None)
        >>> o.shape, lse[0, :4, 0].isinf().tolist()
        (torch.Size([1, 9, 2, 4]), [True, True, True, False])
    """
    bs, scale = check_fla_qkv(q, k_cmp, v_cmp, block_size, scale)
    if cu_seqlens is None:
        o, lse = nsa_compressed_heads(heads_first(q), heads_first(k_cmp), heads_first(v_cmp), bs, 0, scale)
        return heads_first(o), heads_first(lse[..., None])[..., 0].float()
    cu = check_cu_seqlens(cu_seqlens, q.shape[1], q.shape[0])
    cc = compressed_offsets(cu, bs)
    if k_cmp.shape[1] != int(cc[-1]):
        raise ValueError(f"k_cmp must pack ceil(len / block_size) blocks per sequence ({int(cc[-1])}), got "
                         f"{k_cmp.shape[1]}")
    (qb, valid), (kb, _), (vb, _) = to_batch(q, cu), to_batch(k_cmp, cc), to_batch(v_cmp, cc)
    o, lse = nsa_compressed_heads(heads_first(qb), heads_first(kb), heads_first(vb), bs, 0, scale)
    return from_batch(heads_first(o), valid), from_batch(heads_first(lse[..., None])[..., 0].float(), valid)


def nsa_topk(q: torch.Tensor, k_cmp: torch.Tensor, block_counts: int, block_size: int, scale: float | None,
             cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """NSA's block selection in fla's layout (fla ``naive_nsa_topk``): ``block_indices (B, T, Hkv, S)`` int64,
    ``S = block_counts``, ascending, -1 padded; blocks 0, ``blk(t)`` and ``blk(t) - 1`` forced, the rest by the
    group-mean probability of the compressed attention over the complete blocks (``k_cmp (B, TC, Hkv, d)``).

    Examples:
        >>> import torch
        >>> from nearfar.layers.nsa_fla import nsa_topk
        >>> q, kc = torch.ones(1, 40, 2, 4), torch.arange(5.0).repeat_interleave(4).view(1, 5, 1, 4)
        >>> nsa_topk(q, kc, 4, 8, None)[0, 36, 0].tolist()   # block 0, the current (4) and previous (3), the best other
        [0, 2, 3, 4]
    """
    bs, scale = check_fla_qkv(q, k_cmp, None, block_size, scale)
    s = check_block_counts(block_counts)
    if cu_seqlens is None:
        qh, kh, nk = heads_first(q), heads_first(k_cmp), q.shape[1]
        num, idx = nsa_select_heads(qh, kh[:, :, :(nk + bs - 1) // bs], s, bs, nk, scale)
        return to_fla_indices(num, idx, s)
    cu = check_cu_seqlens(cu_seqlens, q.shape[1], q.shape[0])
    (qb, valid), (kb, _) = to_batch(q, cu), to_batch(k_cmp, compressed_offsets(cu, bs))
    num, idx = nsa_select_heads(heads_first(qb), heads_first(kb), s, bs, qb.shape[1], scale)
    return from_batch(to_fla_indices(num, idx, s), valid)


def nsa_selection(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor,
                  block_size: int = 64, scale: float | None = None,
                  cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """NSA's selected attention in fla's layout (fla ``naive_nsa_selection``): query ``t`` of KV head ``h`` attends
    the keys ``u <= t`` of the blocks ``block_indices[b, t, h]`` (``(B, T, Hkv, S)``; -1 and out-of-range ids drop
    out, a repeated id counts once), one softmax; ``q (B, T, Hq, d)``, ``k (B, T, Hkv, d)``, ``v (B, T, Hkv, dv)``.

    Examples:
        >>> import torch
        >>> from nearfar.layers.nsa_fla import nsa_selection
        >>> q, k, v = torch.randn(1, 12, 2, 4), torch.randn(1, 12, 1, 4), torch.randn(1, 12, 1, 4)
        >>> nsa_selection(q, k, v, torch.tensor([0, -1]).expand(1, 12, 1, 2), block_size=4).shape
        torch.Size([1, 12, 2, 4])
    """
    bs, scale = check_fla_qkv(q, k, v, block_size, scale)
    if k.shape[1] != q.shape[1] or tuple(block_indices.shape[:3]) != (*q.shape[:2], k.shape[2]):
        raise ValueError(f"k must have T={q.shape[1]} tokens and block_indices be (B, T, Hkv, S), got "
                         f"{tuple(k.shape)} and {tuple(block_indices.shape)}")
    valid = None
    if cu_seqlens is not None:
        cu = check_cu_seqlens(cu_seqlens, q.shape[1], q.shape[0])
        (q, valid), (k, _), (v, _), (block_indices, _) = (to_batch(x, cu) for x in (q, k, v, block_indices))
    sel = SelectedBlocks(*from_fla_indices(block_indices, k.shape[1], bs), q_block=1, kv_block=bs, within=Causal())
    out = heads_first(attend(heads_first(q), heads_first(k), heads_first(v), blocks=sel, scale=scale))
    return out if valid is None else from_batch(out, valid)


def nsa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g_cmp: torch.Tensor | None = None,
        g_slc: torch.Tensor | None = None, g_swa: torch.Tensor | None = None,
        block_indices: torch.Tensor | None = None, block_counts: int = 16, block_size: int = 64,
        window_size: int = 0, scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
        return_block_indices: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """NSA in fla's layout and argument order (fla ``naive_nsa`` / ``parallel_nsa``), any GQA group size:
    ``q (B, T, Hq, d)``, ``k (B, T, Hkv, d)``, ``v (B, T, Hkv, dv)``, activated gates ``(B, T, Hq)``. Mean-pooled
    compression; ``o = g_slc o_slc + g_cmp o_cmp + g_swa o_swa``: no ``g_cmp`` drops the cmp branch (then
    ``block_indices`` are needed), no ``g_slc``/``g_swa`` weighs 1; ``window_size=0`` drops the window branch.
    Given ``block_indices (B, T, Hkv, S)`` replace the top-n selection.

    Returns:
        ``o (B, T, Hq, dv)``, and with ``return_block_indices`` the ``block_indices`` used.

    Raises:
        TypeError: A tensor or argument of the wrong type (``block_counts`` must be an int).
        ValueError: Shapes that do not fit, sizes out of range, or neither ``g_cmp`` nor ``block_indices``.

    Examples:
        >>> import torch
        >>> from nearfar.layers.nsa_fla import nsa
        >>> q, k, v = torch.randn(1, 50, 16, 8), torch.randn(1, 50, 1, 8), torch.randn(1, 50, 1, 8)
        >>> g = torch.rand(3, 1, 50, 16)
        >>> o, idx = nsa(q, k, v, g[0], g[1], g[2], block_counts=4, block_size=8, window_size=16,
        ...              return_block_indices=True)
        >>> o.shape, idx.shape
        (torch.Size([1, 50, 16, 8]), torch.Size([1, 50, 1, 4]))
    """
    bs, scale = check_fla_qkv(q, k, v, block_size, scale)
    s, w = check_block_counts(block_counts), check_nonneg_int(window_size, "window_size")
    if g_cmp is None and block_indices is None:
        raise ValueError("nsa needs g_cmp (the selection comes from the compressed scores) or block_indices")
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"k must have T={q.shape[1]} tokens, got {tuple(k.shape)}")
    for name, g in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_swa", g_swa)):
        if g is not None and (check_tensor(g, name, 3).shape != q.shape[:3]):
            raise ValueError(f"{name} must be (B, T, Hq) = {tuple(q.shape[:3])}, got {tuple(g.shape)}")
    valid = None
    xs = [q, k, v, g_cmp, g_slc, g_swa, block_indices]
    if cu_seqlens is not None:
        cu = check_cu_seqlens(cu_seqlens, q.shape[1], q.shape[0])
        valid = to_batch(q, cu)[1]
        xs = [None if x is None else to_batch(x, cu)[0] for x in xs]
    qb, kb, vb, gc, gs, gw, bi = xs
    assert qb is not None and kb is not None and vb is not None  # given
    selection = None if bi is None else from_fla_indices(bi, kb.shape[1], bs)
    kh, vh = heads_first(kb), heads_first(vb)
    gc, gs, gw = (None if g is None else heads_first(g)[..., None] for g in (gc, gs, gw))
    out, (num, idx) = nsa_heads(heads_first(qb), kh, vh, pool_blocks(kh, bs), pool_blocks(vh, bs), (gc, gs, gw), bs,
                                s, w, scale, selection)
    out = heads_first(out)
    if valid is not None:
        out = from_batch(out, valid)
    if not return_block_indices:
        return out
    if block_indices is None:
        block_indices = to_fla_indices(num, idx, s)
        block_indices = block_indices if valid is None else from_batch(block_indices, valid)
    return out, block_indices
