"""Argument checks shared by every pattern, layer and model: one function per kind of argument.

Each raises before any work, naming the parameter and the allowed range."""

from __future__ import annotations

import math

import torch


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


def check_bool(value: object, name: str) -> bool:
    """``value`` must be a bool (not an int standing for one)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value
