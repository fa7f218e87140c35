"""Packed variable-length sequences (flash-attn's ``cu_seqlens``) for the functional forms of the layers: a pack of
``S`` sequences ``(1, T, H, d)`` becomes a right-padded batch ``(S, Lmax, H, d)`` and back, which is exact for causal
attention (the padding comes after every real token of its sequence)."""

from __future__ import annotations

import torch

from ..checks import check_tensor


def check_cu_seqlens(cu_seqlens: object, total: int, batch: int) -> torch.Tensor:
    """``cu_seqlens`` as int64 after checking it: an integer tensor ``(S + 1,)`` rising strictly from 0 to ``total``
    (no empty sequence), with a batch of 1.

    Args:
        cu_seqlens: The sequence starts and the total length.
        total: The packed length ``T``.
        batch: The batch size of the packed tensors (must be 1).

    Returns:
        The int64 tensor.

    Raises:
        TypeError: Not an integer tensor.
        ValueError: Another rank, a batch other than 1, or offsets that do not rise strictly from 0 to ``total``.
    """
    cu = check_tensor(cu_seqlens, "cu_seqlens", 1, floating=False)
    if cu.dtype == torch.bool or cu.is_floating_point() or cu.is_complex():
        raise TypeError(f"cu_seqlens must be an integer tensor, got {cu.dtype}")
    if batch != 1:
        raise ValueError(f"cu_seqlens needs batch 1 (packed sequences), got batch {batch}")
    cu = cu.long()
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must rise strictly from 0 to T={total} (no empty sequence), got {cu.tolist()}")
    return cu


def to_batch(x: torch.Tensor, cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed ``x (1, T, ...)`` -> right-padded ``(S, Lmax, ...)`` (padding repeats the first token) and its
    ``valid (S, Lmax)`` bool mask; ``from_batch(y, valid)`` undoes it.

    Args:
        x: Packed tensor ``(1, T, ...)``.
        cu: Checked offsets ``(S + 1,)`` int64.

    Returns:
        ``(batch, valid)``.
    """
    lens = cu[1:] - cu[:-1]
    pos = torch.arange(int(lens.max()), device=x.device)
    valid = pos < lens[:, None].to(x.device)
    rows = torch.where(valid, cu[:-1, None].to(x.device) + pos, 0)
    return x[0][rows], valid


def from_batch(y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Right-padded ``(S, Lmax, ...)`` -> packed ``(1, T, ...)`` (the rows where ``valid``)."""
    return y[valid].unsqueeze(0)
