"""The mechanism registry behind ``nearfar.mechanisms()``: one entry per mechanism, registered by its own file.

Every entry says which of CAB's four attention patterns it supports (Zhang et al., "CAB: Comprehensive Attention
Benchmarking on Long Sequence Modeling", ICML 2023), and why not the others:

- ``NS`` non-causal self (encoders), ``CS`` causal self (decoders, LMs);
- ``NC`` non-causal cross: queries from ``x``, keys and values from a ``context`` sequence, all of it visible;
- ``CC`` causal cross: the same inside an autoregressive decoder: the query side arrives one token at a time, so
  output ``i`` may depend on ``x[:i+1]`` and the whole context only (CAB's code: Performer supports NS/NC/CC but
  not CS, i.e. CC does not restrict the source; its cache holds what the context gives, computed once).

A cross layer is called as ``layer(x, context=c)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypedDict

from torch import nn

from .sharding import sharding_of

#: CAB's four attention patterns
CAB_PATTERNS = {"NS": "non-causal self", "CS": "causal self", "NC": "non-causal cross", "CC": "causal cross"}
#: what a mechanism's attention sees: a fixed neighbourhood, non-overlapping windows, a sparse sub-lattice
#: spanning the input, a local path plus a global one, global context through a few summary tokens, keys (blocks,
#: clusters) or heads picked from the content at run time, or all tokens
FAMILIES = ("local", "window", "dilated", "local+global", "summary tokens", "routed", "dense")
KINDS = ("layer", "model")
_DIMS = ("1d", "2d", "3d")

#: the usual reasons, shared by many entries
IMAGE_NOT_CAUSAL = "an image/video layer: the official module has no causal order over its tokens"
ONE_MAP_ONLY = ("queries, keys and values are cut from one feature map (windows/neighbourhoods/pooling of the same "
                "grid); the paper defines no second source")
POSITIONS_SHARED = ("the pattern is defined on positions shared by queries and keys; a source of another length has "
                    "no aligned window (CAB's local attention has no cross pattern either)")
#: sequence layers whose paper pairs them with a dense encoder-decoder cross-attention
ENCODER_DECODER_DENSE = {k: POSITIONS_SHARED + "; the paper's encoder-decoder cross-attends densely ('dense')"
                         for k in ("NC", "CC")}
DECODER_ONLY = "a decoder-only language model: there is no source sequence to cross-attend"


@dataclass(frozen=True)
class Mechanism:
    """One registered mechanism.

    ``make(dim, num_heads, **overrides)`` builds the module with the official defaults; ``build(dim, num_heads,
    pattern)`` builds it for one CAB pattern (``patterns[pattern]`` are the constructor arguments that select it).
    ``why_not`` gives, for each CAB pattern it does not support, the reason. ``dims`` lists the spatial ranks ("1d",
    "2d", "3d"); ``kind`` is "layer" (an attention layer ``x -> x``) or "model" (a whole LM, ``make`` takes
    ``vocab_size``). ``notes`` says what a user should know when picking it.

    Examples:
        >>> import torch, nearfar as nf
        >>> swin = {m.name: m for m in nf.mechanisms()}["swin"]
        >>> swin.family, swin.dims, sorted(swin.patterns)
        ('window', ('2d', '3d'), ['NS'])
        >>> swin.make(96, 3)(torch.randn(1, 14, 14, 96)).shape
        torch.Size([1, 14, 14, 96])
    """

    name: str
    paper: str
    repo: str
    family: str
    dims: tuple[str, ...]
    make: Callable[..., nn.Module]
    patterns: Mapping[str, Mapping[str, object]]
    why_not: Mapping[str, str]
    cls: type | None = None
    notes: str = ""
    kind: str = "layer"
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def causal(self) -> bool:
        """Whether it can run causally (as a decoder): CS or CC."""
        return "CS" in self.patterns or "CC" in self.patterns

    @property
    def cross(self) -> bool:
        """Whether it can cross-attend a ``context``: NC or CC."""
        return "NC" in self.patterns or "CC" in self.patterns

    def build(self, dim: int, num_heads: int, pattern: str, **overrides: object) -> nn.Module:
        """The module for CAB ``pattern`` ("NS", "CS", "NC", "CC"); a clear error if it is not supported.

        Args:
            dim: Model width.
            num_heads: Number of heads.
            pattern: One of ``"NS"``, ``"CS"``, ``"NC"``, ``"CC"``.
            **overrides: Constructor arguments that replace the defaults.

        Returns:
            The module.

        Raises:
            ValueError: If ``pattern`` is unknown or not supported (the message gives ``why_not[pattern]``).

        Examples:
            >>> import torch, nearfar as nf
            >>> dense = {m.name: m for m in nf.mechanisms()}["dense"]
            >>> layer = dense.build(64, 4, "CC")   # causal cross-attention
            >>> layer(torch.randn(2, 5, 64), context=torch.randn(2, 7, 64)).shape
            torch.Size([2, 5, 64])
        """
        if pattern not in CAB_PATTERNS:
            raise ValueError(f"pattern must be one of {tuple(CAB_PATTERNS)}, got {pattern!r}")
        if pattern not in self.patterns:
            raise ValueError(f"{self.name} does not support {pattern} ({CAB_PATTERNS[pattern]}): "
                             f"{self.why_not[pattern]}")
        return self.make(dim, num_heads, **{**self.patterns[pattern], **overrides})


_REGISTRY: dict[str, Mechanism] = {}


def register(mechanism: Mechanism) -> Mechanism:
    """Add ``mechanism`` to the registry behind ``nearfar.mechanisms()``; each layer file registers its own entries.

    Args:
        mechanism: The entry. ``family``, ``kind`` and ``dims`` must be allowed values, and ``patterns`` and
            ``why_not`` must split CAB's four patterns between them (at least one supported, a reason for each other).

    Returns:
        ``mechanism``.

    Raises:
        ValueError: An unknown ``family`` or ``kind``; empty or unknown ``dims``; ``patterns`` and ``why_not`` that
            overlap, miss a pattern or support none; an empty reason; a name registered already; a ``cls`` that does
            not declare how it runs inside ``nearfar.distributed.sharded`` (``nearfar.layers.sharding``).

    Examples:
        >>> import nearfar as nf
        >>> from nearfar.layers.registry import Mechanism, register
        >>> entry = Mechanism(name="dense", paper="", repo="", family="dense", dims=("1d",),
        ...                   make=nf.DenseAttention, patterns={"NS": {"causal": False}},
        ...                   why_not={"CS": "x", "NC": "x", "CC": "x"})
        >>> register(entry)
        Traceback (most recent call last):
            ...
        ValueError: mechanism 'dense' is registered already
    """
    if mechanism.family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {mechanism.family!r}")
    if mechanism.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {mechanism.kind!r}")
    if not mechanism.dims or any(d not in _DIMS for d in mechanism.dims):
        raise ValueError(f"dims must be a non-empty subset of {_DIMS}, got {mechanism.dims!r}")
    supported, missing = set(mechanism.patterns), set(mechanism.why_not)
    if supported & missing or supported | missing != set(CAB_PATTERNS) or not supported:
        raise ValueError(f"patterns and why_not must split {tuple(CAB_PATTERNS)} between them (at least one "
                         f"supported), got {sorted(supported)} and {sorted(missing)}")
    if not all(isinstance(w, str) and w for w in mechanism.why_not.values()):
        raise ValueError("why_not must give a reason for every unsupported pattern")
    if mechanism.name in _REGISTRY:
        raise ValueError(f"mechanism {mechanism.name!r} is registered already")
    if mechanism.cls is not None and sharding_of(mechanism.cls) is None:
        # a layer that mixes tokens outside attend would be silently wrong inside nearfar.distributed.sharded
        raise ValueError(f"{mechanism.cls.__name__} must declare how it runs inside nearfar.distributed.sharded: "
                         "@shards_natively (tokens mix only through attend), @whole_sequence (it mixes them "
                         "otherwise too) or @not_sharded(reason), from nearfar.layers.sharding")
    _REGISTRY[mechanism.name] = mechanism
    return mechanism


class CabSplit(TypedDict):
    """The ``patterns`` and ``why_not`` fields of a ``Mechanism``, as ``image_layer`` returns them."""

    patterns: Mapping[str, Mapping[str, object]]
    why_not: Mapping[str, str]


def image_layer(causal: Mapping[str, object] | str = IMAGE_NOT_CAUSAL,
                cross: str = ONE_MAP_ONLY) -> CabSplit:
    """``patterns`` / ``why_not`` of a non-causal image layer: NS; CS if ``causal`` gives its constructor arguments
    (else ``causal`` is the reason); never cross (``cross`` is the reason).

    Args:
        causal: The constructor arguments that make the layer causal (then CS is supported), or the reason why it
            cannot be (default: ``IMAGE_NOT_CAUSAL``).
        cross: The reason for NC and CC (default: ``ONE_MAP_ONLY``).

    Returns:
        ``{"patterns": ..., "why_not": ...}``, to unpack into ``Mechanism(...)``.

    Examples:
        >>> from nearfar.layers.registry import image_layer
        >>> entry = image_layer(causal={"is_causal": True})
        >>> entry["patterns"], sorted(entry["why_not"])
        ({'NS': {}, 'CS': {'is_causal': True}}, ['CC', 'NC'])
    """
    patterns: dict[str, Mapping[str, object]] = {"NS": {}}
    why_not = {"NC": cross, "CC": cross}
    if isinstance(causal, str):
        why_not["CS"] = causal
    else:
        patterns["CS"] = causal
    return {"patterns": patterns, "why_not": why_not}


def mechanisms(family: str | None = None, kind: str | None = None, pattern: str | None = None) -> list[Mechanism]:
    """Every registered mechanism, or those of one ``family``, ``kind`` ("layer"/"model") or supporting one CAB
    ``pattern``: name, paper, official repo, family, dims, CAB patterns (and why not the others), constructors.

    Args:
        family: One of ``"local"``, ``"window"``, ``"dilated"``, ``"local+global"``, ``"summary tokens"``,
            ``"routed"``, ``"dense"``, or None for all.
        kind: ``"layer"`` or ``"model"``, or None for both.
        pattern: A CAB pattern (``"NS"``, ``"CS"``, ``"NC"``, ``"CC"``) the mechanism must support, or None.

    Returns:
        The matching ``Mechanism`` entries, in registration order.

    Raises:
        ValueError: If a filter is not one of its allowed values.

    Examples:
        >>> import nearfar as nf
        >>> [m.name for m in nf.mechanisms(pattern="CC")]
        ['dense', 'kdgqa', 'linear_attention', 'moh']
    """
    # a misspelt filter would otherwise match nothing and look like "no such mechanism"
    for name, value, allowed in (("family", family, FAMILIES), ("kind", kind, KINDS),
                                 ("pattern", pattern, tuple(CAB_PATTERNS))):
        if value is not None and value not in allowed:
            raise ValueError(f"{name} must be None or one of {allowed}, got {value!r}")
    return [m for m in _REGISTRY.values() if (family is None or m.family == family)
            and (kind is None or m.kind == kind) and (pattern is None or pattern in m.patterns)]
