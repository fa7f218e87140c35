"""``nn.Module`` mechanisms built on ``nearfar.attend``, and their registry (``nearfar.mechanisms()``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .neighborhood import NeighborhoodAttention


@dataclass(frozen=True)
class Mechanism:
    name: str
    paper: str
    repo: str
    family: str
    dims: tuple[str, ...]
    causal: bool
    cross: bool
    make: Callable[..., object]


_REGISTRY: dict[str, Mechanism] = {}


def register(mechanism: Mechanism) -> Mechanism:
    if mechanism.name in _REGISTRY:
        raise ValueError(f"mechanism {mechanism.name!r} is registered already")
    _REGISTRY[mechanism.name] = mechanism
    return mechanism


def mechanisms() -> list[Mechanism]:
    """Every registered mechanism: name, paper, official repo, family, dims, causal/cross support, constructor."""
    return list(_REGISTRY.values())


register(Mechanism(
    name="neighborhood", paper="Neighborhood Attention Transformer (CVPR 2023); Dilated NAT (2022)",
    repo="SHI-Labs/NATTEN", family="local window", dims=("1d", "2d", "3d"), causal=True, cross=False,
    make=NeighborhoodAttention))

__all__ = ["Mechanism", "NeighborhoodAttention", "mechanisms", "register"]
