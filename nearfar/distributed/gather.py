"""Keys every rank reads (sinks, global tokens) and the global queries: broadcast from their owners, gradients
summed back onto the owners by a reduce in the backward pass.

Every query of ``Sinks(m)`` and ``GlobalTokens(m)`` reads keys ``[0, m)``: their owners broadcast them once
(``m`` tokens received per rank) rather than each rank asking for them. The backward pass is the adjoint: the
gradients of the broadcast buffers are summed onto the owner (``dist.reduce``; on gloo a reduce-scatter is an
all-reduce followed by a chunk, twice the bytes, so the reverse of a broadcast is a reduce).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from . import comm

Pieces = tuple[tuple[int, int, int], ...]


class Broadcast(torch.autograd.Function):
    """``Broadcast.apply(x, after, pieces, group, what)``: see ``broadcast_tokens``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, after: torch.Tensor | None, pieces: Pieces,
                group: dist.ProcessGroup | None, what: str) -> torch.Tensor:
        ctx.pieces, ctx.group, ctx.what, ctx.shape = pieces, group, what, x.shape
        me = dist.get_rank(group)
        b, h, _, c = x.shape
        bufs = []
        for src, start, length in pieces:
            t = x[:, :, start:start + length].contiguous() if src == me else x.new_empty(b, h, length, c)
            comm.broadcast(t, src, group, f"{what}.fwd")
            bufs.append(t)
        return torch.cat(bufs, 2) if bufs else x.new_empty(b, h, 0, c)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        me = dist.get_rank(ctx.group)
        gx = grad.new_zeros(ctx.shape)
        pos = 0
        for src, start, length in ctx.pieces:
            t = grad[:, :, pos:pos + length].contiguous()
            pos += length
            comm.reduce(t, src, ctx.group, f"{ctx.what}.bwd")
            if src == me:
                gx[:, :, start:start + length] += t
        return gx, None, None, None, None


def broadcast_tokens(x: torch.Tensor, pieces: Pieces, group: dist.ProcessGroup | None, what: str = "bcast",
                     after: torch.Tensor | None = None) -> torch.Tensor:
    """Broadcast token runs of ``x`` from their owners to every rank; differentiable (gradients reduced back).

    Args:
        x: ``(B, H, n, c)``, this rank's tokens on dim 2 (same ``B, H, c`` on every rank).
        pieces: ``((source rank, start in the source's x, tokens), ...)`` in a fixed order (the start is read on
            the source only).
        group: The process group (None: the world).
        what: The operation's name for counting and errors.
        after: As in ``halo.exchange``: a dummy input that orders the backward collectives.

    Returns:
        ``(B, H, total tokens of pieces, c)`` on every rank, the pieces in order.
    """
    return Broadcast.apply(x, after, pieces, group, what)
