"""FlexAttention-style callables: a ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor`` and a
``score_mod(score, b, h, q_idx, kv_idx) -> score``, with the checks that name them.

FlexAttention (``torch.nn.attention.flex_attention``) calls these functions on scalars under ``vmap``; nearfar calls
them once per tile (or per chunk of tiles, or on the whole matrix in the dense engine) on *broadcastable int64 index
tensors*, so a function written with tensor operations (comparisons, arithmetic, indexing a captured tensor by an
index tensor, ``torch.where``) works in both. Python control flow on the values (``if q_idx > kv_idx:``) works in
neither. The indices are those of the ``q`` and ``k`` tensors (query ``i`` is ``q[:, :, i]``), as in Flex.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

#: what each callable takes, for error messages
SIGNATURES = {"mask_mod": "(b, h, q_idx, kv_idx)", "score_mod": "(score, b, h, q_idx, kv_idx)"}


def check_mod(fn: object, name: str, kind: str) -> Callable:
    """Raise a TypeError naming ``name`` unless ``fn`` is a callable taking the arguments of ``kind``
    (``"mask_mod"``: four, ``"score_mod"``: five).

    Args:
        fn: The callable.
        name: The parameter's name, for the message.
        kind: ``"mask_mod"`` or ``"score_mod"``.

    Returns:
        ``fn``.

    Raises:
        TypeError: If ``fn`` is not callable or cannot take the arguments of ``kind``.
    """
    sig = SIGNATURES[kind]
    if not callable(fn) or isinstance(fn, torch.Tensor):
        raise TypeError(f"{name} must be a callable fn{sig}, got {type(fn).__name__}")
    try:
        params = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: the first call tells
        return fn
    try:
        params.bind(*range(sig.count(",") + 1))
    except TypeError:
        raise TypeError(f"{name} must take {sig.count(',') + 1} positional arguments {sig}, but its signature is "
                        f"{params}") from None
    return fn


def index_grid(b: int, h: int, nq: int, nk: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, ...]:
    """``(b, h, q_idx, kv_idx)`` as int64 tensors of shapes ``(B,1,1,1)``, ``(1,H,1,1)``, ``(1,1,Nq,1)``,
    ``(1,1,1,Nk)``: the arguments of a mask_mod or score_mod over a whole ``(B, H, Nq, Nk)`` problem."""
    return tuple(torch.arange(n, device=device).view([-1 if i == j else 1 for j in range(4)])
                 for i, n in enumerate((b, h, nq, nk)))


def _shape_error(name: str, got: tuple[int, ...], want: tuple[int, ...], what: str) -> ValueError:
    return ValueError(f"{name} returned a tensor of shape {got}, which does not broadcast to the shape of its "
                      f"{what} {want}: it must be elementwise in its arguments (no reductions, no extra dims)")


def call_mask_mod(fn: Callable, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                  name: str = "mask_mod") -> torch.Tensor:
    """``fn(b, h, q, k)`` checked: a bool tensor that broadcasts to the broadcast shape of the indices (returned as
    given, possibly with fewer dims).

    Raises:
        TypeError: If the result is not a bool tensor.
        ValueError: If its shape does not broadcast to the indices' shape.
    """
    out = fn(b, h, q, k)
    if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
        got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"{name} must return a bool tensor (True = may attend), got {got}")
    want = torch.broadcast_shapes(b.shape, h.shape, q.shape, k.shape)
    try:
        ok = torch.broadcast_shapes(out.shape, want) == want
    except RuntimeError:
        ok = False
    if not ok:
        raise _shape_error(name, tuple(out.shape), tuple(want), "index arguments")
    return out


def call_score_mod(fn: Callable, score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor,
                   k: torch.Tensor, name: str = "score_mod") -> torch.Tensor:
    """``fn(score, b, h, q, k)`` checked: a floating tensor that broadcasts to ``score``'s shape; returned with
    ``score``'s shape and dtype (differentiable).

    Raises:
        TypeError: If the result is not a floating tensor.
        ValueError: If its shape does not broadcast to ``score``'s.
    """
    out = fn(score, b, h, q, k)
    if not isinstance(out, torch.Tensor) or not out.dtype.is_floating_point:
        got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"{name} must return a floating tensor (the new scores), got {got}")
    try:
        ok = torch.broadcast_shapes(out.shape, score.shape) == score.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise _shape_error(name, tuple(out.shape), tuple(score.shape), "score argument")
    return out.to(score.dtype).expand(score.shape)


def at_batch(score_mod: Callable, offset: int) -> Callable:
    """``score_mod`` seen from a call over batch items ``offset, offset + 1, ...`` (a slice of the batch)."""
    if offset == 0:
        return score_mod
    return lambda s, b, h, q, k: score_mod(s, b + offset, h, q, k)


def at_heads(score_mod: Callable, heads: torch.Tensor) -> Callable:
    """``score_mod`` seen from a call over the query heads ``heads`` (a gather of the heads)."""
    return lambda s, b, h, q, k: score_mod(s, b, heads[h], q, k)
