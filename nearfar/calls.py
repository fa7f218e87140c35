"""Per-thread hooks around ``attend``: engine overrides, call observers and call interceptors.

``engine_override`` forces an engine on every ``attend(..., engine="auto")`` call of a block (how ``nearfar bench``
gates a module's fast path against the dense engine); ``observe_calls`` lists the calls (pattern and shapes);
``intercept_calls`` hands each call to a function that may change it before running it (how ``nearfar.steer`` edits
attention). Kernels that do not go through ``attend`` (the window kernel, ``attend_rows``, fused SDPA calls in
layers) ask ``forced_engine`` / ``intercepted`` and call ``attend`` instead when either is active, and list
themselves with ``record_call``. Context variables: one thread's (or asyncio task's) hooks never reach another's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .backends import ENGINES
from .contexts import Context
from .patterns import Pattern
from .selection import SelectedBlocks

# per thread (and per asyncio task): one thread's override or observer never reaches another's calls
_ENGINE_OVERRIDE: Context[tuple[str, ...]] = Context("nearfar_engine_override", ())
_OBSERVERS: Context[tuple[list, ...]] = Context("nearfar_observers", ())


@contextlib.contextmanager
def engine_override(engine: str) -> Iterator[None]:
    """Inside the block, every ``attend(..., engine="auto")`` call (so every module built on ``attend``) uses
    ``engine`` instead: e.g. ``"dense"`` runs a whole module on the materialised-mask reference engine, which is how
    ``nearfar bench`` gates each mechanism's fast path before timing it. Windows attended as a batch
    (``WindowBatch``, ``window_attention``) run as the ``attend`` call with their pattern on the whole map instead of
    the window kernel. Per thread: other threads are unaffected.

    Args:
        engine: One of ``nearfar.engines()``: ``"dense"``, ``"blocksparse"`` or ``"flex"``. Overrides nest; the
            innermost wins.

    Yields:
        None.

    Raises:
        ValueError: If ``engine`` is not a known engine name.

    Examples:
        >>> import torch, nearfar as nf
        >>> layer = nf.mechanisms("window")[0].make(32, 2)
        >>> x = torch.randn(1, 14, 14, 32)
        >>> with nf.engine_override("dense"):
        ...     ref = layer(x)
        >>> torch.allclose(layer(x), ref, atol=1e-5)
        True
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {tuple(ENGINES)}, got {engine!r}")
    token = _ENGINE_OVERRIDE.set(_ENGINE_OVERRIDE.get() + (engine,))
    try:
        yield
    finally:
        _ENGINE_OVERRIDE.reset(token)


@contextlib.contextmanager
def observe_calls() -> Iterator[list[tuple]]:
    """Inside the block, every ``attend`` call of this thread (any engine, from any module) is listed as
    ``(pattern, q.shape, k.shape, v.shape)``: how ``nearfar bench``'s gate sees whether a module's attention has a
    pattern at all, and counts its work. Windows attended as a batch (``WindowBatch``, ``window_attention``) are
    listed as the ``attend`` call they stand for: their pattern on the whole map.

    Yields:
        The list the calls are appended to, as ``(pattern, q_shape, k_shape, v_shape)`` tuples.

    Examples:
        >>> import torch, nearfar as nf
        >>> from nearfar.functional import observe_calls
        >>> q = torch.randn(1, 2, 8, 4)
        >>> with observe_calls() as calls:
        ...     _ = nf.attend(q, q, q, nf.Causal())
        >>> calls[0][0], calls[0][1]
        (Causal(), (1, 2, 8, 4))
    """
    calls: list[tuple] = []
    token = _OBSERVERS.set(_OBSERVERS.get() + (calls,))
    try:
        yield calls
    finally:
        _OBSERVERS.reset(token)


def record_tensors(pattern: Pattern | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """``record_call`` with the tensors' shapes."""
    record_call(pattern, tuple(q.shape), tuple(k.shape), tuple(v.shape))


def record_call(pattern: Pattern | None, q_shape: tuple[int, ...], k_shape: tuple[int, ...],
                v_shape: tuple[int, ...]) -> None:
    """List one attention call with this thread's ``observe_calls`` blocks, as ``attend`` lists its own: for a
    kernel that computes what ``attend(q, k, v, pattern)`` of these shapes would, without calling it
    (``WindowBatch``'s window kernel), so that the bench still counts its work.

    Args:
        pattern: The pattern of the equivalent ``attend`` call (None: dense).
        q_shape: ``(B, Hq, Nq, d)`` of that call.
        k_shape: ``(B, Hkv, Nk, d)``.
        v_shape: ``(B, Hkv, Nk, dv)``.
    """
    for calls in _OBSERVERS.get():
        calls.append((pattern, tuple(q_shape), tuple(k_shape), tuple(v_shape)))


@contextlib.contextmanager
def unobserved() -> Iterator[None]:
    """Inside the block, ``attend`` calls of this thread are not listed by the enclosing ``observe_calls`` blocks:
    for a kernel that has listed its work as one call (``record_call``) and runs it, or part of it, through
    ``attend`` in other pieces.

    Yields:
        None.
    """
    if not _OBSERVERS.get():  # nothing to hide from: no context to set (none inside a compiled graph)
        yield
        return
    token = _OBSERVERS.set(())
    try:
        yield
    finally:
        _OBSERVERS.reset(token)


def forced_engine() -> str | None:
    """The engine the innermost ``engine_override`` of this thread forces, or None outside one: a kernel that
    ``attend`` would not reach (``WindowBatch``'s window kernel) asks it, and runs the equivalent ``attend`` call
    (which takes that engine) instead of itself when one is forced."""
    stack = _ENGINE_OVERRIDE.get()
    return stack[-1] if stack else None


_INTERCEPTORS: Context[tuple[Callable[[AttendCall], object], ...]] = Context("nearfar_interceptors", ())


@dataclass
class AttendCall:
    """One ``attend`` call as an interceptor sees it (``intercept_calls``): its arguments, which the interceptor may
    replace before ``run()`` runs the call (without this thread's interceptors, so no recursion)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pattern: Pattern | None
    scale: float | None
    bias: torch.Tensor | None
    rpb: torch.Tensor | None
    key_padding_mask: torch.Tensor | None
    engine: str
    return_lse: bool
    blocks: SelectedBlocks | None
    score_mod: Callable | None = None

    def run(self, return_lse: bool | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``attend`` with the current arguments (``return_lse`` overrides the call's own)."""
        from .dispatch import attend  # the dispatcher imports this module

        token = _INTERCEPTORS.set(())
        try:
            return attend(self.q, self.k, self.v, self.pattern, scale=self.scale, bias=self.bias, rpb=self.rpb,
                          key_padding_mask=self.key_padding_mask, engine=self.engine,
                          return_lse=self.return_lse if return_lse is None else return_lse, blocks=self.blocks,
                          score_mod=self.score_mod)
        finally:
            _INTERCEPTORS.reset(token)


@contextlib.contextmanager
def intercept_calls(fn: Callable[[AttendCall], object]) -> Iterator[None]:
    """Inside the block, every ``attend`` call of this thread (after its arguments are checked) goes to
    ``fn(call)``, whose return value ``attend`` returns; ``call.run()`` performs it. The innermost interceptor wins.
    ``nearfar.steer`` edits and captures attention this way, so every layer built on ``attend`` can be steered.

    Args:
        fn: Takes an ``AttendCall``; returns what ``attend`` must return (the output, or ``(out, lse)`` when
            ``call.return_lse``).

    Yields:
        None.
    """
    token = _INTERCEPTORS.set(_INTERCEPTORS.get() + (fn,))
    try:
        yield
    finally:
        _INTERCEPTORS.reset(token)


def interceptor() -> Callable[[AttendCall], object] | None:
    """The innermost interceptor of this thread, or None."""
    hooks = _INTERCEPTORS.get()
    return hooks[-1] if hooks else None


def intercepted() -> bool:
    """Whether ``attend`` calls of this thread go to an interceptor now: kernels that run without ``attend``
    (``WindowBatch``, ``attend_rows``, MoH's and the dense layer's fused calls) then call ``attend`` instead."""
    return bool(_INTERCEPTORS.get())


_POSITIONS: Context[Callable[[int, int, torch.device], torch.Tensor] | None] = Context("nearfar_positions", None)


def token_positions(start: int, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Positions ``(n,)`` of a layer's ``n`` tokens that begin at sequence position ``start``: ``start .. start+n-1``,
    unless a ``positions_override`` block of this thread says otherwise (a rank of a sequence split across processes
    holds tokens at global positions, which RoPE and absolute embeddings must use).

    Args:
        start: Position of the first token (the length of a decoding cache, 0 for whole sequences).
        n: Number of tokens.
        device: Device of the result.

    Returns:
        An int64 tensor ``(n,)``.

    Examples:
        >>> from nearfar.functional import token_positions
        >>> token_positions(3, 4).tolist()
        [3, 4, 5, 6]
    """
    fn = _POSITIONS.get()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if fn is None:
        return torch.arange(start, start + n, device=dev)
    return fn(start, n, dev)


@contextlib.contextmanager
def positions_override(fn: Callable[[int, int, torch.device], torch.Tensor]) -> Iterator[None]:
    """Inside the block, ``token_positions(start, n, device)`` of this thread returns ``fn(start, n, device)``
    (``nearfar.distributed.sharded`` gives each rank's layers the global positions of its tokens this way).

    Args:
        fn: ``(start, n, device) -> positions (n,)``.

    Yields:
        None.
    """
    token = _POSITIONS.set(fn)
    try:
        yield
    finally:
        _POSITIONS.reset(token)
