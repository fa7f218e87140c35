"""Context variables that ``torch.compile`` traces without a graph break while none of them is set.

``nearfar``'s ``with`` blocks (``engine_override``, ``observe_calls``, ``intercept_calls``, the sharding hooks ...)
keep their state in ``contextvars``, so that threads and asyncio tasks each see their own. Dynamo cannot trace
``ContextVar.get`` (PyTorch 2.13: "Avoid calling ContextVar.get in your code"), and every ``attend`` call reads
several of them: a compiled model split into one graph per attention layer and more. ``Context.get`` first reads a
process-wide count of the contexts set now, a plain module global: while it is 0 (the usual case) the default is
the value, and Dynamo only guards on the count. Setting any context raises the count, which fails that guard: the
code is traced again, now reading the variable itself (a graph break where a context is active, as before). The
count only says whether to look: a thread that set nothing, while another did, reads its own (default) value.
"""

from __future__ import annotations

import contextvars
import threading
from typing import Generic, TypeVar

T = TypeVar("T")

#: contexts set now, process-wide (not per thread: a shortcut for "none set anywhere", nothing more)
_active = 0
_lock = threading.Lock()


def _count(step: int) -> None:
    global _active
    with _lock:
        _active += step


class Context(Generic[T]):
    """A ``contextvars.ContextVar`` with its default (``get``, ``set``, ``reset`` as there) whose ``get`` is traced
    by ``torch.compile`` as a constant while no ``Context`` is set.

    Args:
        name: The variable's name.
        default: Its value where it is not set.
    """

    def __init__(self, name: str, default: T):
        self._var: contextvars.ContextVar[T] = contextvars.ContextVar(name, default=default)
        self._default = default

    def get(self) -> T:
        """The value of this thread/task (the default while no context is set anywhere)."""
        if _active == 0:
            return self._default
        return self._var.get()

    def set(self, value: T) -> contextvars.Token[T]:
        """Set the value; pair with ``reset(token)``."""
        token = self._var.set(value)
        _count(1)
        return token

    def reset(self, token: contextvars.Token[T]) -> None:
        """Restore the value before the ``set`` that returned ``token``."""
        self._var.reset(token)
        _count(-1)
