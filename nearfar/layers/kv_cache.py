"""Decoding state of the sequence layers: the layer interface they share, ``DecodeState`` and the KV cache.

A sequence mechanism is an ``nn.Module`` on ``x (B, N, dim)`` with

- ``forward(x, cache=None, key_padding_mask=None) -> (B, N, dim)``: with ``cache=None`` a whole sequence
  (teacher forcing / prefill from nothing); with a cache from ``new_cache``, ``x`` holds the next tokens of each
  sequence, the layer reads and updates the cache, and the outputs equal those rows of the teacher-forced forward
  over the whole sequence (what ``tests`` check for every mechanism);
- ``new_cache(batch, device=None, dtype=None) -> state``: an empty decoding state whose memory is bounded by what
  the mechanism needs (a window of keys, a d x d matrix, ...), never by the sequence length unless it must be; a
  ``DecodeState`` that every call checks against ``x`` (batch, device, dtype) before any work;
- ``causal`` (attribute): whether token ``i`` only sees tokens ``<= i``.

Positions for rotary embeddings count from 0 at the first token of a sequence; a cache knows its position.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from ..checks import check_positive_int


def _same_device(expected: torch.device, got: torch.device) -> bool:
    # a device given without an index ("cuda") means whichever one of that type the first call uses
    return expected.type == got.type and (expected.index is None or expected.index == got.index)


#: ``keep(positions, next_position) -> bool mask`` of the keys a ``KVCache`` keeps
KeepFn = Callable[[torch.Tensor, int], torch.Tensor]

_State = TypeVar("_State", bound="DecodeState")  # typing.Self is 3.11+, the package supports 3.10


class DecodeState:
    """What every decoding cache shares: the batch it was made for and its device and dtype (those given to
    ``new_cache``, else fixed by the first call), checked by ``checked`` before a layer does any work.

    A cache holds per-sequence tensors: a call with another batch would otherwise fail deep inside (a raw
    "expanded size" error several calls later) or broadcast silently, and another device or dtype would fail in
    some matmul without saying that the cache is the cause."""

    def __init__(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        self.batch = check_positive_int(batch, "batch")
        if device is not None:
            try:
                device = torch.device(device)
            except (TypeError, RuntimeError):
                raise ValueError(f"device must be a torch.device, a device string or None, got {device!r}") from None
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch.dtype or None, got {dtype!r}")
        self.device, self.dtype = device, dtype

    @classmethod
    def checked(cls: type[_State], cache: object, x: torch.Tensor, name: str = "x",
                dtype: bool = True) -> _State | None:
        """``cache`` (None passes through) after checking that it is a ``cls`` made for ``x``'s batch, device and
        (``dtype=True``; not for token ids) dtype; the first call fixes the device and dtype not given."""
        if cache is None:
            return None
        if not isinstance(cache, cls):
            raise TypeError(f"cache must come from new_cache (a {cls.__name__}), got {type(cache).__name__}")
        b = cache.batch
        if x.shape[0] != b:
            raise ValueError(f"cache was made for batch {b} (new_cache({b})), got {name} with batch {x.shape[0]}")
        if cache.device is not None and not _same_device(cache.device, x.device):
            raise ValueError(f"cache is on device {cache.device} (new_cache(device=...) or its first call), got "
                             f"{name} on device {x.device}")
        if dtype and cache.dtype is not None and x.dtype != cache.dtype:
            raise ValueError(f"cache holds dtype {cache.dtype} (new_cache(dtype=...) or its first call), got {name} "
                             f"with dtype {x.dtype}")
        cache.device = x.device
        if dtype:
            cache.dtype = x.dtype
        return cache


class KVCache(DecodeState):
    """Keys and values a softmax layer keeps for decoding, with the absolute position of each kept key.

    ``keep(positions, next_position) -> bool mask`` decides which keys stay after every step (None: all), so
    a sliding window with sinks keeps ``sinks + window`` keys however long the sequence gets. Storage grows by
    doubling, so appending a token costs O(new tokens), not a copy of the whole cache."""

    def __init__(self, batch: int, keep: KeepFn | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__(batch, device, dtype)
        self.keep = keep
        self.length = 0  # tokens seen so far (the next token's position)
        self.size = 0  # keys kept
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None

    @property
    def k(self) -> torch.Tensor | None:  # (B, Hkv, L, d), rotated
        return None if self._k is None else self._k[:, :, :self.size]

    @property
    def v(self) -> torch.Tensor | None:  # (B, Hkv, L, dv)
        return None if self._v is None else self._v[:, :, :self.size]

    @property
    def positions(self) -> torch.Tensor | None:  # (L,) absolute positions, increasing
        return None if self._pos is None else self._pos[:self.size]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[2]
        need = self.size + n
        if self._k is None or need > self._k.shape[2]:
            cap = max(need, 2 * (0 if self._k is None else self._k.shape[2]), 16)
            k_buf, v_buf = k.new_empty(*k.shape[:2], cap, k.shape[3]), v.new_empty(*v.shape[:2], cap, v.shape[3])
            pos_buf = torch.empty(cap, dtype=torch.long, device=k.device)
            if self._k is not None:
                assert self._v is not None and self._pos is not None  # allocated together with self._k
                k_buf[:, :, :self.size], v_buf[:, :, :self.size] = self._k[:, :, :self.size], self._v[:, :, :self.size]
                pos_buf[:self.size] = self._pos[:self.size]
            self._k, self._v, self._pos = k_buf, v_buf, pos_buf
        else:
            assert self._k is not None and self._v is not None and self._pos is not None  # allocated together
            k_buf, v_buf, pos_buf = self._k, self._v, self._pos
        k_buf[:, :, self.size:need] = k
        v_buf[:, :, self.size:need] = v
        pos_buf[self.size:need] = torch.arange(self.length, self.length + n, device=k.device)
        self.size, self.length = need, self.length + n

    def evict(self) -> None:
        if self.keep is None or self.size == 0:
            return
        k_buf, v_buf, pos_buf = self._k, self._v, self._pos
        assert k_buf is not None and v_buf is not None and pos_buf is not None  # size > 0: appended before
        kept = self.keep(pos_buf[:self.size], self.length)
        if not bool(kept.all()):
            idx = torch.nonzero(kept)[:, 0]
            m = idx.numel()
            k_buf[:, :, :m] = k_buf[:, :, idx]
            v_buf[:, :, :m] = v_buf[:, :, idx]
            pos_buf[:m] = pos_buf[idx]
            self.size = m
            if k_buf.shape[2] > 4 * max(m, 16):  # a long prefill grew the buffers: give the memory back
                self._k, self._v = k_buf[:, :, :2 * m].clone(), v_buf[:, :, :2 * m].clone()
                self._pos = pos_buf[:2 * m].clone()

    def nbytes(self) -> int:
        return 0 if self._k is None or self._v is None else (self._k.nbytes + self._v.nbytes)


