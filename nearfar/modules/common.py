"""Small pieces every vision module shares: input checks, head split/merge, parameter init."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..attend import attend
from ..backends.partition import WindowBatch


def check_dim_heads(dim: object, num_heads: object) -> int:
    """Validate ``dim``/``num_heads`` and return the head dim."""
    if (not isinstance(dim, int) or not isinstance(num_heads, int) or isinstance(dim, bool)
            or isinstance(num_heads, bool) or num_heads <= 0 or dim <= 0 or dim % num_heads):
        raise ValueError(f"dim ({dim!r}) must be a positive multiple of num_heads ({num_heads!r})")
    return dim // num_heads


def check_channels_last(x: object, ndim: int, dim: int, name: str = "x") -> tuple[int, tuple[int, ...], int]:
    """``x`` must be ``(B, *spatial, dim)`` with ``ndim`` spatial axes; returns ``(B, spatial, N)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim + 2 or x.shape[-1] != dim:
        axes = ", ".join(("T", "H", "W")[3 - ndim:] if ndim <= 3 else (f"S{i}" for i in range(ndim)))
        raise ValueError(f"{name} must be (B, {axes}, {dim}) channel-last, got {tuple(x.shape)}")
    if 0 in x.shape:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    spatial = tuple(x.shape[1:-1])
    return x.shape[0], spatial, math.prod(spatial)


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(B, *spatial, heads*d)`` (or ``(B, N, heads*d)``) -> ``(B, heads, N, d)``, channels head-major."""
    b, c = t.shape[0], t.shape[-1]
    return t.reshape(b, -1, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(o: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """``(B, heads, N, d)`` -> ``(B, *spatial, heads*d)``."""
    b, h, _, d = o.shape
    return o.transpose(1, 2).reshape(b, *spatial, h * d)


def split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output of a fused ``Linear(C, 3C)`` ``(B, *spatial, 3C)``, split ``[3, heads, d]`` -> three ``(B, h, N, d)``."""
    b, c3 = qkv.shape[0], qkv.shape[-1]
    t = qkv.reshape(b, -1, 3, num_heads, c3 // (3 * num_heads)).permute(2, 0, 3, 1, 4)
    return t[0], t[1], t[2]


def trunc_normal_(p: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """timm's default for position-bias tables: truncated normal, mean 0, clipped at +-2 (absolute)."""
    return nn.init.trunc_normal_(p, std=std, mean=0.0, a=-2.0, b=2.0)


def swin_table_as_offsets(table: torch.Tensor, window: tuple[int, ...]) -> torch.Tensor:
    """A Swin/timm ``RelPosBias`` table ``(prod(2M-1), heads)``, indexed query-minus-key and flattened row-major
    (Swin's ``relative_position_index``), as the ``(heads, 2M-1, ...)`` key-minus-query table ``nearfar.attend``
    takes with window patterns. Differentiable (a view and a flip), so the table trains as usual."""
    return table.t().reshape(table.shape[1], *(2 * m - 1 for m in window)).flip(tuple(range(1, len(window) + 1)))


def crop_offsets(table: torch.Tensor, full: tuple[int, ...], window: tuple[int, ...]) -> torch.Tensor:
    """The ``(heads, 2m-1, ...)`` centre of a ``(heads, 2M-1, ...)`` offset table, for a window ``m <= M`` clipped
    to a small input (offsets within ``m`` mean the same entries)."""
    if tuple(window) == tuple(full):
        return table
    index = (slice(None),) + tuple(slice(f - m, f + m - 1) for f, m in zip(full, window))
    return table[index]


def window_attention(x: torch.Tensor, pattern, qkv: Callable, num_heads: int, scale: float,
                     table: torch.Tensor | None = None) -> torch.Tensor:
    """Self-attention of ``x (B, *spatial, C)`` inside the windows of ``pattern`` (``Blocks``/``Grid``), before the
    output projection: ``(B, *spatial, C')``. ``qkv`` maps ``(..., C)`` to the fused ``(..., 3C')`` (split
    ``[3, heads, d]``) or to a tuple ``(q, k, v)`` of ``(..., C')``; ``table`` is a relative-position table as
    ``attend`` takes it with the pattern.

    When the windows are whole (divisible extents; shifted windows are rolled first), the input itself is cut
    into windows before ``qkv`` (one copy of C channels instead of three reorders of q, k, v inside ``attend``), as
    the official window codes do; otherwise ``attend`` runs the pattern on the whole map.
    """
    spatial = tuple(x.shape[1:-1])
    wb = WindowBatch.of(pattern, spatial, x.device)
    src = x if wb is None else wb.split(x)
    p = qkv(src)
    q, k, v = split_qkv(p, num_heads) if isinstance(p, torch.Tensor) else (split_heads(t, num_heads) for t in p)
    if wb is None:
        return merge_heads(attend(q, k, v, pattern, scale=scale, rpb=table), spatial)
    out = attend(q, k, v, scale=scale, bias=wb.bias(table, x.shape[0]))
    return wb.merge(merge_heads(out, (wb.t,)), x.shape[0])
