"""fla's conventions for the functional forms of the layers (``moba``, ``nsa``...): ``(B, T, H, D)`` tensors, NSA's
``block_indices (B, T, Hkv, S)`` (-1 padded), and packed variable-length sequences (flash-attn's ``cu_seqlens``): a
pack of ``S`` sequences ``(1, T, H, d)`` becomes a right-padded batch ``(S, Lmax, H, d)`` and back, which is exact for
causal attention (the padding comes after every real token of its sequence)."""

from __future__ import annotations

import torch

from ..checks import check_int_range, check_positive_int, check_scale, check_tensor


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


def heads_first(x: torch.Tensor) -> torch.Tensor:
    """fla's ``(B, T, H, D)`` <-> our ``(B, H, T, D)`` (a view)."""
    return x.transpose(1, 2)


def check_fla_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, block_size: int,
                  scale: float | None) -> tuple[int, float | None]:
    """Check fla-layout ``q (B, T, Hq, d)``, ``k (B, Tk, Hkv, d)``, ``v (B, Tk, Hkv, dv)`` or None (``k``/``v`` may
    be compressed: any length), ``Hq % Hkv == 0``, a block size >= 1 and a scale; returns ``(block_size, scale)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t is not None:
            check_tensor(t, name, 4)
    bs, scale = check_positive_int(block_size, "block_size"), check_scale(scale, "scale")
    hq, hkv = q.shape[2], k.shape[2]
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or hkv < 1 or hq % hkv or (
            v is not None and v.shape[:3] != k.shape[:3]):
        raise ValueError(f"q (B, T, Hq, d), k (B, Tk, Hkv, d), v (B, Tk, Hkv, dv) with Hq % Hkv == 0 expected, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {None if v is None else tuple(v.shape)}")
    return bs, scale


def check_block_counts(block_counts: object) -> int:
    """NSA's ``block_counts``: an int >= 3 (the initial and the two local blocks are forced among them)."""
    if isinstance(block_counts, torch.Tensor):
        raise TypeError("block_counts must be an int >= 3 (per-token count tensors are not supported)")
    return check_int_range(block_counts, "block_counts", 3, 2 ** 31 - 1)


def compressed_offsets(cu: torch.Tensor, block_size: int) -> torch.Tensor:
    """Offsets of the packed compressed blocks: ``ceil(len / block_size)`` per sequence."""
    lens = ((cu[1:] - cu[:-1]) + block_size - 1) // block_size
    return torch.cat([cu.new_zeros(1), lens.cumsum(0)])


def to_fla_indices(num: torch.Tensor, idx: torch.Tensor, s: int) -> torch.Tensor:
    """Block lists ``(B, H, T, KB)`` -> fla's ``block_indices (B, T, H, S)`` int64, -1 padded."""
    used = torch.arange(idx.shape[-1], device=idx.device) < num[..., None].long()
    idx = torch.where(used, idx.long(), -1)
    idx = torch.nn.functional.pad(idx, (0, max(0, s - idx.shape[-1])), value=-1)[..., :s]
    return idx.permute(0, 2, 1, 3)


def from_fla_indices(block_indices: torch.Tensor, nk: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fla's ``block_indices (B, T, H, S)`` -> ``(kv_num_blocks, kv_indices)``; ids outside ``[0, ceil(nk / BS))``
    become -1 (fla drops their keys as future or padding)."""
    check_tensor(block_indices, "block_indices", 4, floating=False)
    idx = block_indices.permute(0, 2, 1, 3).long()
    idx = torch.where((idx >= 0) & (idx < (nk + block_size - 1) // block_size), idx, -1)
    return torch.full(idx.shape[:3], idx.shape[-1], dtype=torch.int32, device=idx.device), idx
