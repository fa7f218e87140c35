"""Attention rollout: how much each token's representation after ``L`` attention layers draws on each input token.

Abnar & Zuidema, "Quantifying Attention Flow in Transformers" (ACL 2020, arXiv 2005.00928; code:
samiraabnar/attention_flow, ``compute_joint_attention``), as used by Zhu et al., "Dual Cross-Attention Learning
for Fine-Grained Visual Categorization and Object Re-Identification" (DCAL, CVPR 2022, arXiv 2205.02151) to pick
the local queries of global-local cross-attention (``nearfar.layers.glca``).

Per layer ``l`` the attention map is averaged over heads, ``S_l = mean_h A_l``, the residual connection is
accounted for by mixing in the identity, ``S'_l = (1 - residual) S_l + residual I`` (both papers:
``residual = 0.5``), and the rows are normalised to sum to 1 (a no-op on a softmax map; it keeps the product
row-stochastic for maps whose rows do not sum to 1, e.g. after attention dropout or with pruned heads). The
rollout is the product ``R = S'_L ... S'_2 S'_1`` (the last layer on the left): row ``i`` of ``R`` is the share of
every input token in output token ``i``. Only one row (the class token's, in DCAL) is usually needed: with ``row``
it is propagated as a row vector, ``e_i^T S'_L ... S'_1``, in ``O(L N^2)`` instead of the ``O(L N^3)`` of the full
product.

Differences from the two official codes: Abnar & Zuidema's ``compute_joint_attention`` adds ``I`` with weight 1
before normalising (the same map as ``0.5 S + 0.5 I`` once the rows are normalised); DCAL has no official code
(the paper's formula, ``S' = 0.5 S + 0.5 E``, is what is implemented). No head fusion other than the mean, and no
discarding of low attentions (as in some re-implementations) is offered.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..checks import check_int_range, check_real_range, check_same_dtype_device

__all__ = ["attention_rollout"]


def stack_layer_maps(maps: object) -> torch.Tensor:
    """``maps`` as one ``(L, B, heads, N, N)`` tensor (a view when it is one already), after checking them.

    Args:
        maps: a sequence of ``(B, heads, N, N)`` tensors (one per layer) or one ``(L, B, heads, N, N)`` tensor.

    Returns:
        The ``(L, B, heads, N, N)`` tensor.

    Raises:
        TypeError: not a tensor or a sequence of tensors, or not of a floating dtype.
        ValueError: another rank, unequal shapes, non-square or empty maps, or several devices.
    """
    if isinstance(maps, torch.Tensor):
        if maps.dim() != 5:
            raise ValueError(f"maps must be a (L, B, heads, N, N) tensor or a sequence of (B, heads, N, N) tensors, "
                             f"got a tensor of shape {tuple(maps.shape)}")
        stacked = maps
    elif isinstance(maps, Sequence) and not isinstance(maps, str):
        if not maps:
            raise ValueError("maps must hold at least one layer's attention map, got an empty sequence")
        for i, m in enumerate(maps):
            if not isinstance(m, torch.Tensor):
                raise TypeError(f"maps[{i}] must be a torch.Tensor (B, heads, N, N), got {type(m).__name__}")
            if m.shape != maps[0].shape or m.dim() != 4:
                raise ValueError(f"maps[{i}] must be (B, heads, N, N) like maps[0] {tuple(maps[0].shape)}, "
                                 f"got {tuple(m.shape)}")
        check_same_dtype_device(**{f"maps[{i}]": m for i, m in enumerate(maps)})
        stacked = torch.stack(list(maps))
    else:
        raise TypeError(f"maps must be a torch.Tensor (L, B, heads, N, N) or a sequence of (B, heads, N, N) tensors, "
                        f"got {type(maps).__name__}")
    if not stacked.is_floating_point():
        raise TypeError(f"maps must have a floating dtype, got {stacked.dtype}")
    if stacked.shape[-1] != stacked.shape[-2] or 0 in stacked.shape:
        raise ValueError(f"maps must be square, non-empty attention maps (..., N, N), got {tuple(stacked.shape)}")
    return stacked


def attention_rollout(maps: torch.Tensor | Sequence[torch.Tensor], *, residual: float = 0.5,
                      row: int | Sequence[int] | None = None) -> torch.Tensor:
    """Attention rollout of per-layer attention maps (first layer first): head mean, ``(1 - residual) S +
    residual I``, rows normalised, multiplied through the layers (the last layer on the left).

    Args:
        maps: The attention probabilities of layers ``1..L``: a sequence of ``(B, heads, N, N)`` tensors or one
            ``(L, B, heads, N, N)`` tensor (query rows, key columns); a floating dtype, any layout. Every row of
            ``(1 - residual) S + residual I`` must have a positive sum (a softmax map's has).
        residual: Weight of the identity (the residual connection), in ``[0, 1]``; 0.5 (default) as in Abnar &
            Zuidema and DCAL.
        row: None for the whole ``(B, N, N)`` rollout; a token index in ``[0, N)`` for that row alone ``(B, N)``
            (e.g. 0, the class token's: DCAL's selection scores), computed as a row vector in ``O(L N^2)``; a
            sequence of ``R`` token indices for those rows ``(B, R, N)``, in ``O(L R N^2)``.

    Returns:
        ``(B, N, N)`` (or ``(B, N)`` with an int ``row``, ``(B, R, N)`` with a sequence), each row summing to 1,
        in the maps' dtype (float16 and bfloat16 maps are multiplied in float32). Differentiable with respect to
        the maps.

    Raises:
        TypeError: ``maps`` is not a tensor or a sequence of tensors, or not floating; ``residual`` or ``row`` of
            the wrong type.
        ValueError: ``maps`` of the wrong rank, unequal shapes, non-square or empty maps, or on several devices;
            ``residual`` outside ``[0, 1]``; ``row`` outside ``[0, N)``.

    Examples:
        >>> import torch
        >>> from nearfar.functional import attention_rollout
        >>> maps = torch.randn(12, 2, 3, 197, 197).softmax(-1)    # 12 layers, 3 heads, class token + 14 x 14
        >>> cls = attention_rollout(maps, row=0)                  # (B, N): the class token's rollout row
        >>> cls.shape, bool(torch.allclose(cls.sum(-1), torch.ones(2)))
        (torch.Size([2, 197]), True)
        >>> bool(torch.allclose(cls, attention_rollout(maps)[:, 0], atol=1e-6))
        True
    """
    stacked = stack_layer_maps(maps)
    residual = check_real_range(residual, "residual", 0.0, 1.0)
    n = stacked.shape[-1]
    rows: list[int] | None = None
    if isinstance(row, Sequence) and not isinstance(row, str):
        if not row:
            raise ValueError("row must be None, an int or a non-empty sequence of ints in [0, N), got []")
        rows = [check_int_range(r, f"row[{i}]", 0, n - 1) for i, r in enumerate(row)]
    elif row is not None:
        rows = [check_int_range(row, "row", 0, n - 1)]
    out_dtype = stacked.dtype
    if out_dtype in (torch.float16, torch.bfloat16):
        stacked = stacked.float()
    mixed = stacked.mean(2) * (1.0 - residual)  # (L, B, N, N)
    mixed = mixed + residual * torch.eye(n, dtype=mixed.dtype, device=mixed.device)
    mixed = mixed / mixed.sum(-1, keepdim=True)
    if rows is None:
        out = mixed[0]
        for layer in mixed[1:]:
            out = layer @ out
    else:
        out = mixed[-1][:, rows]  # (B, R, N): e_r^T S'_L for every asked row r
        for layer in range(mixed.shape[0] - 2, -1, -1):
            out = out @ mixed[layer]
        if not isinstance(row, Sequence):
            out = out.squeeze(1)
    return out.to(out_dtype)
