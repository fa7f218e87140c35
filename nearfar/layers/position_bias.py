"""Relative-position bias tables as the official vision codes keep them, and their initialisation."""

from __future__ import annotations

import torch
from torch import nn


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


