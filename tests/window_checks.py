"""Helpers of the window tests (``tests/core/test_window_kernel.py``, ``test_window_batch.py``): the window patterns
with their float64 reference masks, q/k/v of a projection as heads, and contexts that pin the window kernel's chunking
and head batching or count its calls."""

from __future__ import annotations

import reference as ref

import nearfar.backends.window_batch as window_batch
import nearfar.backends.windows as windows
from nearfar import Blocks, Grid

KINDS = ["block", "swin", "cyclic", "grid"]


def window_pattern(kind, size, grid, shift):
    """The pattern of window ``kind`` and its reference mask."""
    if kind == "grid":
        return Grid(size, grid=grid), ref.grid_mask(grid, size)
    if kind == "block":
        return Blocks(size, grid=grid), ref.cyclic_blocks_mask(grid, size)
    if kind == "cyclic":
        return Blocks(size, grid=grid, shift=shift, wrap=True), ref.cyclic_blocks_mask(grid, size, shift)
    return Blocks(size, grid=grid, shift=shift), ref.swin_mask(grid, size, shift)


def qkv_heads(p, order, heads, d):
    """(B, *spatial, channels) projections -> q, k, v (B, heads, N, d), as ``order`` lays the channels out."""
    if order == "sep":
        return [t.reshape(t.shape[0], -1, heads, d).transpose(1, 2) for t in p]
    split = (3, heads, d) if order == "3hd" else (heads, 3, d)
    t = p.reshape(p.shape[0], -1, *split)
    t = t.permute(2, 0, 3, 1, 4) if order == "3hd" else t.permute(3, 0, 2, 1, 4)
    return list(t)


class Chunk:
    """Run the window kernel in chunks of about ``n`` windows' scores per head (several chunks, a partial last one),
    whatever the thread count."""

    def __init__(self, n, t):
        self.bytes = n * t * t * 4
        self.old = (windows.CHUNK_BYTES, windows.CHUNK_BYTES_SERIAL, windows.HEADS_BATCHED_BYTES)

    def __enter__(self):
        windows.CHUNK_BYTES = windows.CHUNK_BYTES_SERIAL = windows.HEADS_BATCHED_BYTES = self.bytes

    def __exit__(self, *exc):
        windows.CHUNK_BYTES, windows.CHUNK_BYTES_SERIAL, windows.HEADS_BATCHED_BYTES = self.old


class Batched:
    """Run every head through each step of the window kernel together (one copy to a head-major layout, then one
    GEMM per step: what several threads get when every window fits one chunk), or one head at a time, whatever the
    thread count."""

    def __init__(self, on):
        self.on, self.old = on, windows.HEADS_BATCHED_THREADS

    def __enter__(self):
        windows.HEADS_BATCHED_THREADS = 1 if self.on else 10**9

    def __exit__(self, *exc):
        windows.HEADS_BATCHED_THREADS = self.old


class Spy:
    def __init__(self):
        self.calls, self.real = 0, window_batch.window_kernel

    def __enter__(self):
        def spy(*args, **kw):
            self.calls += 1
            return self.real(*args, **kw)
        window_batch.window_kernel = spy
        return self

    def __exit__(self, *exc):
        window_batch.window_kernel = self.real
