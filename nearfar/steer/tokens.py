"""Token selections (a group of keys, a set of query rows) as boolean masks, shared by the metrics, the
aggregations and the mask makers of ``nearfar.steer``, with the argument helpers they share (``floating_tensor``,
``upcast``).

A selection is given the way users hold it: a ``slice`` (``slice(1, 577)``: LLaVA's image tokens), a sequence or
1D integer tensor of indices, or a boolean tensor whose last axis is the token axis (one mask for all, or one per
batch item, e.g. ``(B, N)`` for groups that differ between items). ``token_mask`` turns any of them into a
boolean tensor ``(N,)`` or ``(..., N)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..checks import check_int_range, check_positive_int

__all__ = ["TokenSelection", "floating_tensor", "token_mask", "upcast"]

TokenSelection = slice | Sequence[int] | torch.Tensor
"""A slice, a sequence / 1D integer tensor of indices, or a boolean tensor ``(..., N)``."""


def floating_tensor(x: object, name: str, min_dim: int = 1) -> torch.Tensor:
    """``x`` if it is a non-empty floating tensor of at least ``min_dim`` dimensions, else a TypeError/ValueError
    naming ``name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.dim() < min_dim or 0 in x.shape:
        raise ValueError(f"{name} must be non-empty with at least {min_dim} dimensions, got {tuple(x.shape)}")
    return x


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype the statistics are computed in: float16/bfloat16 as float32, others as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def token_mask(selection: TokenSelection, n: int, *, name: str = "selection",
               device: torch.device | str | None = None) -> torch.Tensor:
    """A token selection over ``n`` tokens as a boolean mask.

    Args:
        selection: a ``slice``; a sequence or 1D integer tensor of indices in ``[0, n)`` (repeats allowed); or a
            boolean tensor ``(..., n)`` (returned as is, on ``device`` when given).
        n: the number of tokens (the length of the axis the selection is over), >= 1.
        name: the parameter's name, used in error messages.
        device: where the mask goes (default: the selection's device, or the CPU).

    Returns:
        A boolean tensor ``(n,)`` (slice, indices) or ``(..., n)`` (a boolean selection).

    Raises:
        TypeError: ``selection`` is of another type (a float tensor, a str, a bare int, ...).
        ValueError: an index outside ``[0, n)``, an integer tensor that is not 1D, or a boolean tensor whose last
            axis is not ``n``.

    Examples:
        >>> from nearfar.steer import token_mask
        >>> token_mask(slice(1, 3), 5).tolist()
        [False, True, True, False, False]
        >>> token_mask([4, 0], 5).tolist()
        [True, False, False, False, True]
        >>> token_mask([5], 5, name="group")
        Traceback (most recent call last):
            ...
        ValueError: group[0] must be in [0, 4], got 5
    """
    n = check_positive_int(n, "n")
    if isinstance(selection, slice):
        mask = torch.zeros(n, dtype=torch.bool, device=device)
        mask[selection] = True
        return mask
    if isinstance(selection, torch.Tensor):
        if selection.dtype == torch.bool:
            if selection.dim() == 0 or selection.shape[-1] != n:
                raise ValueError(f"{name} as a boolean mask must have {n} entries on its last axis, "
                                 f"got shape {tuple(selection.shape)}")
            return selection if device is None else selection.to(device)
        if selection.is_floating_point() or selection.is_complex():
            raise TypeError(f"{name} must be a slice, indices or a boolean mask, got a {selection.dtype} tensor")
        if selection.dim() != 1:
            raise ValueError(f"{name} as an index tensor must be 1D, got shape {tuple(selection.shape)}")
        if selection.numel() and (int(selection.min()) < 0 or int(selection.max()) >= n):
            bad = int(selection.min()) if int(selection.min()) < 0 else int(selection.max())
            raise ValueError(f"{name} indices must be in [0, {n - 1}], got {bad}")
        mask = torch.zeros(n, dtype=torch.bool, device=selection.device if device is None else device)
        mask[selection.to(mask.device)] = True
        return mask
    if isinstance(selection, Sequence) and not isinstance(selection, (str, bytes)):
        idx = [check_int_range(i, f"{name}[{j}]", 0, n - 1) for j, i in enumerate(selection)]
        mask = torch.zeros(n, dtype=torch.bool, device=device)
        if idx:
            mask[torch.tensor(idx, device=mask.device)] = True
        return mask
    raise TypeError(f"{name} must be a slice, a sequence of indices, an integer tensor or a boolean mask, "
                    f"got {type(selection).__name__}")
