"""The public functional layer: everything a layer or model needs from nearfar besides patterns and checks.

``attend`` (the one entry point of every engine), head split/merge, window partition and merge for modules that
cut their *input* into windows (as the official window codes do), the lightning/linear attention kernels, and the
routing ops of content-routed block-sparse attention (block pooling, block scores, block selection, HiP's
hierarchical block search, k-means routing), and attention rollout (which tokens a class token draws on, to
select queries by).
Layers and models are built only on this module, ``nearfar.patterns`` and ``nearfar.checks``; the engines behind
``attend`` are free to change."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .backends import engines
from .backends.window_batch import WindowBatch
from .calls import (
    AttendCall,
    engine_override,
    intercept_calls,
    intercepted,
    observe_calls,
    positions_override,
    token_positions,
)
from .dispatch import attend
from .ops.hip import hip_topk_blocks
from .ops.lightning import (
    alibi_slopes,
    compute_dtype,
    lightning_attention,
    lightning_blocked,
    lightning_decode_step,
    linear_attention_reference,
    tnl_slopes,
)
from .ops.pointwise import pointwise_linear
from .ops.rollout import attention_rollout
from .ops.routing import (
    block_attention_stat,
    block_scores,
    ema_update_centroids,
    kmeans_route,
    kv_blocks_from_mask,
    nz_ratio_blocks,
    pool_blocks,
    threshold_blocks,
    topk_blocks,
)
from .ops.selective_scan import selective_scan
from .patterns import Pattern
from .rows import attend_rows
from .selection import SelectedBlocks

__all__ = [
    "AttendCall",
    "SelectedBlocks",
    "WindowBatch",
    "alibi_slopes",
    "attend",
    "attend_rows",
    "attention_rollout",
    "block_attention_stat",
    "block_scores",
    "compute_dtype",
    "ema_update_centroids",
    "engine_override",
    "engines",
    "fused_linear",
    "hip_topk_blocks",
    "intercept_calls",
    "intercepted",
    "kmeans_route",
    "kv_blocks_from_mask",
    "lightning_attention",
    "lightning_blocked",
    "lightning_decode_step",
    "linear_attention_reference",
    "merge_heads",
    "nz_ratio_blocks",
    "observe_calls",
    "pointwise_linear",
    "pool_blocks",
    "positions_override",
    "selective_scan",
    "split_heads",
    "split_qkv",
    "threshold_blocks",
    "tnl_slopes",
    "token_positions",
    "topk_blocks",
    "window_attention",
]


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(B, *spatial, heads*d)`` (or ``(B, N, heads*d)``) -> ``(B, heads, N, d)``, channels head-major.

    Args:
        t: A channel-last tensor ``(B, *spatial, heads*d)``.
        num_heads: Number of heads; must divide the channels.

    Returns:
        A view or copy ``(B, heads, N, d)`` with ``N = prod(spatial)``.

    Examples:
        >>> import torch
        >>> from nearfar.functional import split_heads
        >>> split_heads(torch.randn(2, 4, 4, 12), 3).shape
        torch.Size([2, 3, 16, 4])
    """
    b, c = t.shape[0], t.shape[-1]
    return t.reshape(b, -1, num_heads, c // num_heads).transpose(1, 2)



def merge_heads(o: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """``(B, heads, N, d)`` -> ``(B, *spatial, heads*d)``.

    Args:
        o: Per-head output ``(B, heads, N, d)``.
        spatial: The spatial shape to restore, ``prod(spatial) == N``.

    Returns:
        A channel-last tensor ``(B, *spatial, heads*d)``.

    Examples:
        >>> import torch
        >>> from nearfar.functional import merge_heads
        >>> merge_heads(torch.randn(2, 3, 16, 4), (4, 4)).shape
        torch.Size([2, 4, 4, 12])
    """
    b, h, _, d = o.shape
    return o.transpose(1, 2).reshape(b, *spatial, h * d)



def fused_linear(x: torch.Tensor, layers: Sequence[torch.nn.Linear]) -> torch.Tensor:
    """``torch.cat([layer(x) for layer in layers], -1)`` as one GEMM over the concatenated weights.

    For separate q/k/v projections of one input (diffusers' ``to_q``/``to_k``/``to_v``): one pass over ``x`` with
    ``N = sum(out_features)`` instead of one per layer, and backward one GEMM for the input gradient instead of
    one per layer plus their sum (measured 2026-12-06, 1 thread, 25088 x 96 -> 3 x 96: 1.2x faster forward and
    forward+backward). The parameters stay the layers' own (gradients flow to them through the concatenation).

    Args:
        x: Input ``(..., in_features)``.
        layers: ``nn.Linear`` layers with the same ``in_features`` (biases may be absent on some).

    Returns:
        ``(..., sum of out_features)``, the layers' outputs side by side in order.

    Raises:
        ValueError: ``layers`` is empty or their ``in_features`` differ.

    Examples:
        >>> import torch
        >>> from nearfar.functional import fused_linear
        >>> q, k = torch.nn.Linear(8, 4), torch.nn.Linear(8, 6, bias=False)
        >>> x = torch.randn(2, 8)
        >>> torch.allclose(fused_linear(x, [q, k]), torch.cat([q(x), k(x)], -1), atol=1e-6)
        True
    """
    if not layers or len({layer.in_features for layer in layers}) != 1:
        raise ValueError(f"layers must be a non-empty sequence of nn.Linear with equal in_features, got "
                         f"{[getattr(layer, 'in_features', None) for layer in layers]}")
    weight = torch.cat([layer.weight for layer in layers])
    bias = None
    if any(layer.bias is not None for layer in layers):
        bias = torch.cat([layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_features)
                          for layer in layers])
    return torch.nn.functional.linear(x, weight, bias)


def split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output of a fused ``Linear(C, 3C)`` ``(B, *spatial, 3C)``, split ``[3, heads, d]`` -> three ``(B, h, N, d)``.

    Args:
        qkv: Output of a fused projection ``(B, *spatial, 3C)``, channels ordered ``[3, heads, d]``.
        num_heads: Number of heads.

    Returns:
        ``(q, k, v)``, each ``(B, heads, N, C // heads)``.

    Examples:
        >>> import torch
        >>> from nearfar.functional import split_qkv
        >>> q, k, v = split_qkv(torch.randn(2, 4, 4, 36), 3)
        >>> q.shape
        torch.Size([2, 3, 16, 4])
    """
    b, c3 = qkv.shape[0], qkv.shape[-1]
    q, k, v = qkv.reshape(b, -1, 3, num_heads, c3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v  # unbind: one backward (a stack), where three slices would each zero-fill a 3C gradient



def window_attention(x: torch.Tensor, pattern: Pattern, qkv: Callable, num_heads: int, scale: float,
                     table: torch.Tensor | None = None, qkv_order: str = "3hd") -> torch.Tensor:
    """Self-attention of ``x (B, *spatial, C)`` inside the windows of ``pattern`` (``Blocks``/``Grid``), before the
    output projection: ``(B, *spatial, C')``. ``qkv`` maps ``(..., C)`` to the fused ``(..., 3C')`` (split
    ``[3, heads, d]``, or ``[heads, 3, d]`` with ``qkv_order="h3d"``) or to a tuple ``(q, k, v)`` of ``(..., C')``;
    ``table`` is a relative-position table as ``attend`` takes it with the pattern.

    When the windows are whole (divisible extents; shifted windows are rolled first), the input itself is cut
    into windows before ``qkv`` (one copy of C channels instead of three reorders of q, k, v inside ``attend``), as
    the official window codes do, and the windows attend as a batch (``WindowBatch.attend``: every head read in
    place from the projection output); otherwise ``attend`` runs the pattern on the whole map.

    Args:
        x: Channel-last input ``(B, *spatial, C)``.
        pattern: A window pattern, ``Blocks`` or ``Grid`` (possibly intersected with others).
        qkv: Maps ``(..., C)`` to the fused ``(..., 3C')`` or to ``(q, k, v)``, each ``(..., C')``.
        num_heads: Number of heads.
        scale: Score scale.
        table: Optional relative-position table ``(heads, 2m-1, ...)``, key-minus-query, as ``attend``'s ``rpb``.
        qkv_order: Channel order of a fused ``qkv`` output: ``"3hd"`` (default, timm/Swin) or ``"h3d"``.

    Returns:
        The attention output before the output projection, ``(B, *spatial, C')``.

    Raises:
        ValueError: ``qkv_order`` is not ``"3hd"`` or ``"h3d"``.

    Examples:
        >>> import torch, nearfar as nf
        >>> from nearfar.functional import window_attention
        >>> proj = torch.nn.Linear(32, 96)
        >>> x = torch.randn(2, 14, 14, 32)
        >>> window_attention(x, nf.Blocks(7, grid=(14, 14)), proj, num_heads=2, scale=16 ** -0.5).shape
        torch.Size([2, 14, 14, 32])
    """
    if qkv_order not in ("3hd", "h3d"):
        raise ValueError(f"qkv_order must be '3hd' or 'h3d', got {qkv_order!r}")
    spatial = tuple(x.shape[1:-1])
    wb = WindowBatch.of(pattern, spatial, x.device)
    if wb is not None:
        return wb.attend(qkv(wb.split(x)), num_heads, scale, table, qkv_order, merge=True)
    p = qkv(x)
    if isinstance(p, torch.Tensor):
        c = p.shape[-1] // 3
        if qkv_order == "h3d":  # [heads, 3, d] -> [3, heads, d]
            p = p.unflatten(-1, (num_heads, 3, c // num_heads)).transpose(-3, -2).flatten(-3)
        q, k, v = split_qkv(p, num_heads)
    else:
        q, k, v = (split_heads(t, num_heads) for t in p)
    return merge_heads(attend(q, k, v, pattern, scale=scale, rpb=table), spatial)
