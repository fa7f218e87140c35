"""The mechanism registry behind ``nearfar.mechanisms()``: one entry per mechanism, registered by its own file."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Mechanism:
    """One registered mechanism.

    ``make(dim, num_heads, **overrides)`` builds the module with the official defaults (what the benchmark
    times); ``cls`` is the ``nn.Module`` class itself. ``dims`` lists the supported spatial ranks ("1d", "2d",
    "3d"); ``causal``/``cross`` say whether the mechanism supports causal masking and cross-attention.
    ``notes`` says what a user should know when picking it (e.g. provisional designs, size constraints).
    """

    name: str
    paper: str
    repo: str
    family: str
    dims: tuple[str, ...]
    causal: bool
    cross: bool
    make: Callable[..., object]
    cls: type | None = None
    notes: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)


#: what a mechanism's attention sees: a fixed neighbourhood, non-overlapping windows, a sparse sub-lattice
#: spanning the input, a local path plus a global one, global context through a few summary tokens, or all tokens
FAMILIES = ("local", "window", "dilated", "local+global", "summary tokens", "dense")
_DIMS = ("1d", "2d", "3d")

_REGISTRY: dict[str, Mechanism] = {}


def register(mechanism: Mechanism) -> Mechanism:
    if mechanism.family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {mechanism.family!r}")
    if not mechanism.dims or any(d not in _DIMS for d in mechanism.dims):
        raise ValueError(f"dims must be a non-empty subset of {_DIMS}, got {mechanism.dims!r}")
    if mechanism.name in _REGISTRY:
        raise ValueError(f"mechanism {mechanism.name!r} is registered already")
    _REGISTRY[mechanism.name] = mechanism
    return mechanism


def mechanisms(family: str | None = None) -> list[Mechanism]:
    """Every registered mechanism (or those of one ``family``): name, paper, official repo, family, dims,
    causal/cross support, constructor."""
    return [m for m in _REGISTRY.values() if family is None or m.family == family]
