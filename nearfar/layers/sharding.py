"""How a layer runs inside ``nearfar.distributed.sharded``: every registered layer class declares it.

Inside ``sharded(layout)`` each rank holds only its own tokens, and every ``attend`` call becomes the distributed
``attend``. That is the whole story for a layer whose only work across tokens is ``attend`` (projections, norms and
MLPs are per token): such a class is declared with ``@shards_natively``. A layer that also mixes tokens outside
``attend`` (pooling to summary, landmark, agent or proxy tokens; convolutions along the sequence or the map; routing
over the content of all tokens; scans and cumulative sums) would give each rank a result from its own tokens only, a
silently wrong one; such a class is declared with ``@whole_sequence``, which wraps its ``forward``: inside
``sharded`` the call goes to the hook that ``sharded`` installs (``layer_hook``), which all-gathers the token
inputs, runs the layer on the whole sequence (its ``attend`` calls local, positions not overridden) and keeps this
rank's part of the output; outside ``sharded`` the wrapper only checks a context variable. ``register`` refuses a
layer class without either declaration, so a new mechanism cannot be silently local.

Our choice: the declaration is per class and explicit (not inferred), and ``whole_sequence`` names the arguments that
are split like the input (``tokens``) and those that every rank passes whole (``replicated``); any other argument
given inside ``sharded`` is a clear error (a decoding ``cache`` above all: decoding is not sharded).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from ..contexts import Context

NATIVE = "native"
WHOLE = "whole"
REFUSED = "refused"


@dataclass(frozen=True)
class WholeSpec:
    """What ``whole_sequence`` recorded: ``tokens`` maps argument names to how they are split (like ``x``: the token
    axes follow the batch axis); ``replicated`` names the arguments passed unchanged; ``channels`` says whether the
    input's last axis is channels (``(B, *tokens, C)``) or not (token ids ``(B, N)``)."""

    tokens: tuple[str, ...] = ()
    replicated: tuple[str, ...] = ()
    channels: bool = True
    method: str = "forward"


#: ``(module, the unwrapped method, spec, args, kwargs) -> output``: set by ``sharded`` (None outside it, and while a
#: whole-sequence layer runs, so nested layers run plainly)
Hook = Callable[[nn.Module, Callable[..., Any], WholeSpec, tuple, dict], Any]
_HOOK: Context[Hook | None] = Context("nearfar_layer_hook", None)
#: a rank's map extents -> the whole map's (set by ``sharded`` on maps split into slabs)
_EXTENT: Context[Callable[[tuple[int, ...]], tuple[int, ...]] | None] = Context("nearfar_whole_extent", None)

M = TypeVar("M", bound=type)


def shards_natively(cls: M) -> M:
    """Declare that ``cls`` mixes tokens only through ``attend`` (so inside ``sharded`` it runs on this rank's tokens
    with the distributed ``attend``, no gather).

    Args:
        cls: An ``nn.Module`` subclass.

    Returns:
        ``cls``, with ``sharding = "native"``.
    """
    cls.sharding = NATIVE  # type: ignore[attr-defined]
    return cls


def whole_sequence(tokens: tuple[str, ...] = ("key_padding_mask",), replicated: tuple[str, ...] = (),
                   channels: bool = True, method: str = "forward") -> Callable[[M], M]:
    """Declare that ``cls`` mixes tokens outside ``attend``: inside ``sharded`` its ``method`` runs on the whole
    sequence (all-gathered), and returns this rank's part of the output.

    Args:
        tokens: Arguments (other than the first, the input) split across the ranks like the input: the axes after
            the batch axis are the tokens (a ``key_padding_mask`` ``(B, N)``).
        replicated: Arguments every rank passes whole and unchanged (a shift, a generator).
        channels: Whether the input is ``(B, *tokens, C)`` (True) or token ids ``(B, N)`` (False).
        method: The method to wrap (``"forward"``; a model without one names its own).

    Returns:
        The class decorator.
    """
    def deco(cls: M) -> M:
        original = getattr(cls, method)
        spec = WholeSpec(tuple(tokens), tuple(replicated), channels, method)

        @functools.wraps(original)
        def wrapped(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            hook = _HOOK.get()
            if hook is None:
                return original(self, *args, **kwargs)
            return hook(self, original, spec, args, kwargs)

        wrapped.whole_spec = spec  # type: ignore[attr-defined]
        setattr(cls, method, wrapped)
        cls.sharding = WHOLE  # type: ignore[attr-defined]
        cls.whole_spec = spec  # type: ignore[attr-defined]
        return cls

    return deco


def not_sharded(reason: str, methods: tuple[str, ...] = ("forward",)) -> Callable[[M], M]:
    """Declare that ``cls`` cannot run inside ``sharded``: its ``methods`` raise ``ValueError`` with ``reason``
    there (on every rank, before any message).

    Args:
        reason: Why (the error's message says it).
        methods: The methods to guard (a model's ``logits`` and ``loss`` besides ``forward``).

    Returns:
        The class decorator.
    """
    def guard(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def wrapped(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if _HOOK.get() is not None:
                raise ValueError(f"{type(self).__name__} does not run inside nearfar.distributed.sharded: {reason}")
            return original(self, *args, **kwargs)

        wrapped.refused = reason  # type: ignore[attr-defined]
        return wrapped

    def deco(cls: M) -> M:
        for method in methods:
            setattr(cls, method, guard(getattr(cls, method)))
        cls.sharding = REFUSED  # type: ignore[attr-defined]
        return cls

    return deco


def sharding_of(cls: type) -> str | None:
    """``"native"``, ``"whole"``, ``"refused"`` or None (undeclared); a subclass of a whole-sequence class that
    overrides the wrapped method without declaring itself again counts as undeclared (its new method would run
    locally)."""
    kind = getattr(cls, "sharding", None)
    if kind == WHOLE:
        spec = getattr(cls, "whole_spec", None)
        if spec is None or getattr(getattr(cls, spec.method), "whole_spec", None) is not spec:
            return None
    if kind == REFUSED and getattr(getattr(cls, "forward", None), "refused", None) is None:
        return None
    return kind if kind in (NATIVE, WHOLE, REFUSED) else None


def whole_extent(spatial: tuple[int, ...]) -> tuple[int, ...]:
    """The extents of the whole map whose part (a rank's slab inside ``sharded``) has extents ``spatial``;
    ``spatial`` itself elsewhere. A native layer whose window or shift depends on the map's size (Swin clips its
    window to the extent and drops the shift) asks this, so a thin slab does not change its windows.

    Args:
        spatial: The spatial shape of the layer's input.

    Returns:
        The spatial shape of the whole map.
    """
    fn = _EXTENT.get()
    return tuple(spatial) if fn is None else fn(tuple(spatial))


@contextlib.contextmanager
def layer_hook(hook: Hook | None,
               extent: Callable[[tuple[int, ...]], tuple[int, ...]] | None = None) -> Iterator[None]:
    """Inside the block, calls of ``whole_sequence`` layers of this thread go to ``hook`` (None: they run plainly),
    and ``whole_extent`` answers with ``extent``.

    Args:
        hook: ``(module, method, spec, args, kwargs) -> output``, or None.
        extent: A rank's map extents -> the whole map's, or None (the extents themselves).

    Yields:
        None.
    """
    token, token_e = _HOOK.set(hook), _EXTENT.set(extent)
    try:
        yield
    finally:
        _EXTENT.reset(token_e)
        _HOOK.reset(token)
