"""Additive score biases seen tile by tile: a dense bias, or NAT's relative-position-bias table.

The block-sparse engine never forms an N×N bias: it asks a bias source for the values of one chunk of
tiles (``tile``) and, in the backward pass, hands back the score gradients of that chunk (``accumulate``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TablePattern(Protocol):
    """A pattern that indexes a relative-position-bias table: the spatial patterns, and views of them (the offset
    view of ``nearfar.distributed``, which maps local indices to global ones first)."""

    def rpb_size(self) -> tuple[int, ...] | None: ...

    def rpb_shape(self, heads: int) -> tuple[int, ...]: ...

    def rpb_index(self, q: torch.Tensor, k: torch.Tensor, n: int) -> torch.Tensor: ...

    def check_rpb(self) -> None: ...


class BiasSource:
    """A user's bias tensor and the float32-or-wider gradient the backward pass accumulates for it."""

    def __init__(self, tensor: torch.Tensor, grad_shape: tuple[int, ...]):
        self.tensor = tensor
        self.grad_shape = grad_shape
        self.grad: torch.Tensor | None = None

    @property
    def requires_grad(self) -> bool:
        return self.tensor.requires_grad

    def tile(self, q_idx: torch.Tensor, k_idx: torch.Tensor, memo: dict | None = None) -> torch.Tensor:
        raise NotImplementedError

    def accumulate(self, q_idx: torch.Tensor, k_idx: torch.Tensor, ds: torch.Tensor, memo: dict | None = None) -> None:
        raise NotImplementedError

    def zero_grad(self) -> None:
        self.grad = torch.zeros(self.grad_shape, dtype=torch.promote_types(self.tensor.dtype, torch.float32),
                                device=self.tensor.device)


class DenseBias(BiasSource):
    """A bias broadcastable to ``(B, Hq, Nq, Nk)``, stored as given (4D, broadcast dims of size 1)."""

    def __init__(self, bias: torch.Tensor):
        self.b4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
        super().__init__(bias, tuple(self.b4.shape))

    def _index(self, q_idx: torch.Tensor,
               k_idx: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        _, hb, nqb, nkb = self.b4.shape
        q = q_idx.clamp(min=0) * (nqb > 1)  # (c, T)
        k = k_idx.clamp(min=0) * (nkb > 1)  # (Hp, c, W)
        if k.shape[0] == 1:
            return None, q[:, :, None], k[0][:, None, :]
        h = torch.arange(k.shape[0], device=q.device) * (hb > 1)
        return h[:, None, None, None], q[None, :, :, None], k[:, :, None, :]

    def tile(self, q_idx: torch.Tensor, k_idx: torch.Tensor, memo: dict | None = None) -> torch.Tensor:
        """Values for query tiles ``q_idx (c, T)`` and their key lists ``k_idx (Hp, c, W)``."""
        h, q, k = self._index(q_idx, k_idx)
        if h is None:
            return self.b4[:, :, q, k]  # (B', H', c, T, W)
        return self.b4[:, h, q, k]  # (B', Hp, c, T, W)

    def accumulate(self, q_idx: torch.Tensor, k_idx: torch.Tensor, ds: torch.Tensor, memo: dict | None = None) -> None:
        """ds: (B, Hq, c, T, W) score gradients (zero where masked)."""
        bb, hb = self.b4.shape[:2]
        if bb == 1:
            ds = ds.sum(0, keepdim=True)
        h, q, k = self._index(q_idx, k_idx)
        if h is None:
            if hb == 1:
                ds = ds.sum(1, keepdim=True)
            h = torch.arange(ds.shape[1], device=ds.device)[:, None, None, None]
            q, k = q[None], k[None]
        bidx = torch.arange(ds.shape[0], device=ds.device)[:, None, None, None, None]
        assert self.grad is not None  # zero_grad() runs before the backward pass accumulates
        self.grad.index_put_((bidx, h[None], q[None], k[None]), ds.to(self.grad.dtype), accumulate=True)


class RelativePositionBias(BiasSource):
    """A relative-position-bias table ``(Hq, 2m-1[, 2m-1[, 2m-1]])`` indexed by the pattern's ``rpb_index``
    (NAT/DiNAT: ``(j-i)/dilation + k-1``; windows: the key-minus-query offset inside the window)."""

    def __init__(self, table: torch.Tensor, pattern: TablePattern, n: int):
        super().__init__(table, tuple(table.shape))
        self.pattern = pattern
        self.n = n

    def _index(self, q_idx: torch.Tensor, k_idx: torch.Tensor, memo: dict | None) -> torch.Tensor:
        """(c, T, W) table index; ``memo`` (a per-chunk dict the engine keeps with its plan) caches it, since it
        depends only on the pattern and the tiles."""
        if memo is not None and "rpb_index" in memo:
            return memo["rpb_index"]
        q = q_idx.clamp(min=0)[:, :, None]
        k = k_idx[0].clamp(min=0)[:, None, :]
        idx = self.pattern.rpb_index(q, k, self.n)
        if memo is not None:
            memo["rpb_index"] = idx
        return idx

    def tile(self, q_idx: torch.Tensor, k_idx: torch.Tensor, memo: dict | None = None) -> torch.Tensor:
        idx = self._index(q_idx, k_idx, memo)
        table = self.tensor.reshape(self.tensor.shape[0], -1)
        return table[:, idx][None]  # (1, Hq, c, T, W)

    def accumulate(self, q_idx: torch.Tensor, k_idx: torch.Tensor, ds: torch.Tensor, memo: dict | None = None) -> None:
        idx = self._index(q_idx, k_idx, memo).reshape(-1)
        assert self.grad is not None  # zero_grad() runs before the backward pass accumulates
        g = ds.sum(0).reshape(ds.shape[1], -1).to(self.grad.dtype)
        self.grad.view(self.grad.shape[0], -1).index_add_(1, idx, g)
