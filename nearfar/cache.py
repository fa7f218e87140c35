"""One byte-bounded LRU cache for everything nearfar keeps between calls (plans, dense masks, Flex block plans).

Plans and masks depend only on patterns and shapes, so they are worth keeping; but a long-running process that
sees many shapes (variable sequence lengths, many batch sizes) must not grow without bound. Every entry is
charged its tensors' bytes, and the least recently used entries are dropped once the total passes the budget:
``NEARFAR_CACHE_BYTES`` (bytes, read at import; default 1 GiB; ``0`` keeps nothing between calls), or
``nearfar.set_cache_budget`` at run time. An entry larger than the whole budget is used by the call that made it
and not kept. A plan's per-call-shape engine data (``Plan.engine_cache``) is charged to the plan's entry as it
grows, and is itself an LRU of at most a quarter of the budget, so one hot plan called with many shapes cannot
hold the rest out.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import fields, is_dataclass
from typing import Any

import torch

from .checks import check_nonneg_int

_DEFAULT_BUDGET = 1 << 30


def _budget_from_env() -> int:
    raw = os.environ.get("NEARFAR_CACHE_BYTES")
    if raw is None or raw.strip() == "":
        return _DEFAULT_BUDGET
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"NEARFAR_CACHE_BYTES must be a non-negative integer (bytes), got {raw!r}") from None
    if value < 0:
        raise ValueError(f"NEARFAR_CACHE_BYTES must be a non-negative integer (bytes), got {value}")
    return value


def nbytes_of(obj: Any, _seen: set | None = None) -> int:
    """Bytes of the tensors reachable from ``obj`` (tensors, containers, dataclasses, ``ByteLRU``), each storage
    counted once."""
    seen = set() if _seen is None else _seen
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "meta":
            return 0
        key = (obj.untyped_storage().data_ptr(), obj.device)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, ByteLRU):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(nbytes_of(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes_of(v, seen) for v in obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return sum(nbytes_of(getattr(obj, f.name), seen) for f in fields(obj))
    return 0


class ByteLRU:
    """A least-recently-used mapping bounded by the bytes of its values. ``budget`` is an int or a callable
    returning one (so a nested cache follows the global budget); ``on_change(delta)`` is told of every change in
    the total (a nested cache charges its owner's entry)."""

    def __init__(self, budget: int | Callable[[], int], on_change: Callable[[int], None] | None = None):
        self._budget = budget
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.nbytes = 0
        self.on_change = on_change
        self._lock = threading.RLock()  # threads share the cache (their overrides and observers are their own)

    @property
    def budget(self) -> int:
        return self._budget() if callable(self._budget) else self._budget

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                return default
            self._entries.move_to_end(key)
            return hit[0]

    def put(self, key: Hashable, value: Any, nbytes: int | None = None) -> Any:
        """Store ``value`` (charged ``nbytes``, by default its tensors' bytes) and return it."""
        size = nbytes_of(value) if nbytes is None else int(nbytes)
        with self._lock:
            self._drop(key)
            if size <= self.budget:
                self._entries[key] = (value, size)
                self._changed(size)
                self._evict()
        return value

    def resize(self, key: Hashable, delta: int) -> None:
        """An entry's value grew (or shrank) by ``delta`` bytes in place."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                return
            self._entries[key] = (hit[0], hit[1] + delta)
            self._changed(delta)
            self._evict(keep=key)

    def clear(self) -> None:
        with self._lock:
            self._changed(-self.nbytes)
            self._entries.clear()

    def keys(self) -> list:
        with self._lock:
            return list(self._entries)

    def _drop(self, key: Hashable) -> None:
        hit = self._entries.pop(key, None)
        if hit is not None:
            self._changed(-hit[1])

    def _changed(self, delta: int) -> None:
        self.nbytes += delta
        if delta and self.on_change is not None:
            self.on_change(delta)

    def _evict(self, keep: Hashable | None = None) -> None:
        budget = self.budget
        while self.nbytes > budget and self._entries:
            oldest = next(iter(self._entries))
            if oldest == keep and len(self._entries) == 1:
                self._drop(oldest)  # the entry alone is over budget: it is not kept
                break
            if oldest == keep:
                self._entries.move_to_end(oldest)
                continue
            self._drop(oldest)


_budget = _budget_from_env()


def cache_budget() -> int:
    """The byte budget of nearfar's caches (``NEARFAR_CACHE_BYTES``, default 1 GiB).

    Returns:
        The budget in bytes.

    Examples:
        >>> import nearfar as nf
        >>> nf.cache_budget() >= 0
        True
    """
    return _budget


def set_cache_budget(nbytes: int) -> None:
    """Change the byte budget at run time (entries over it are dropped at once).

    Args:
        nbytes: The new budget in bytes (>= 0; 0 caches nothing).

    Raises:
        ValueError: If ``nbytes`` is not a non-negative int.

    Examples:
        >>> import nearfar as nf
        >>> old = nf.cache_budget()
        >>> nf.set_cache_budget(256 << 20)   # 256 MiB
        >>> nf.set_cache_budget(old)
    """
    global _budget
    check_nonneg_int(nbytes, "nbytes")
    _budget = nbytes
    with CACHE._lock:
        CACHE._evict()


#: the process-wide cache; keys start with the kind of entry ("plan", "dense_mask", "flex_plan")
CACHE = ByteLRU(cache_budget)


def cache_bytes() -> int:
    """Bytes held by nearfar's caches now (never more than ``cache_budget()``; read under the cache's lock, as a
    thread's insertion is over budget for an instant before it evicts).

    Returns:
        The number of bytes held.

    Examples:
        >>> import nearfar as nf
        >>> nf.cache_bytes() <= nf.cache_budget()
        True
    """
    with CACHE._lock:
        return CACHE.nbytes


def clear_caches() -> None:
    """Drop every cached plan and mask.

    Examples:
        >>> import nearfar as nf
        >>> nf.clear_caches()
        >>> nf.cache_bytes()
        0
    """
    CACHE.clear()
