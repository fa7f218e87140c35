"""Point-to-point halo exchange with its reverse in the backward pass.

Forward: each rank sends the listed local token ranges of ``x (B, H, n, c)`` to each peer (one packed buffer per
peer) and receives the peers' buffers. Backward: the gradient of each received buffer goes back to the rank that
owns those tokens, which adds it into the gradient of its own ``x`` (a reverse halo exchange). Every rank computes
the same message list from global metadata, so sizes agree without any size exchange. The same exchange brings a
neighborhood's boundary keys, and sends the partial outputs of global queries to their owners.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from . import comm
from .layout import Ranges

Sends = tuple[tuple[int, Ranges], ...]
Recvs = tuple[tuple[int, int], ...]


def _take(x: torch.Tensor, ranges: Ranges) -> torch.Tensor:
    return torch.cat([x[:, :, lo:hi] for lo, hi in ranges], 2).contiguous()


class Exchange(torch.autograd.Function):
    """``Exchange.apply(x, sends, recvs, group, what, after)``: see ``exchange``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sends: Sends, recvs: Recvs, group: dist.ProcessGroup | None, what: str,
                after: torch.Tensor | None, pending: Pending | None = None) -> torch.Tensor:
        ctx.sends, ctx.recvs, ctx.group, ctx.what = sends, recvs, group, what
        ctx.shape, ctx.has_after = x.shape, after is not None
        if pending is None:
            pending = Pending(x, sends, recvs, group, what)
        return pending.wait()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        b, h, n, c = ctx.shape
        grad = grad.contiguous()
        back, pos = [], 0
        for peer, length in ctx.recvs:
            back.append((peer, grad[:, :, pos:pos + length].contiguous()))
            pos += length
        bufs = [grad.new_empty(b, h, sum(hi - lo for lo, hi in rs), c) for _, rs in ctx.sends]
        comm.p2p(back, [(p, t) for (p, _), t in zip(ctx.sends, bufs)], ctx.group, f"{ctx.what}.bwd")
        gx = grad.new_zeros(b, h, n, c)
        for (_, rs), t in zip(ctx.sends, bufs):
            pos = 0
            for lo, hi in rs:
                gx[:, :, lo:hi] += t[:, :, pos:pos + hi - lo]
                pos += hi - lo
        return gx, None, None, None, None, None, None


class Pending:
    """A forward halo exchange posted but not yet waited for (``start``): compute can run meanwhile."""

    def __init__(self, x: torch.Tensor, sends: Sends, recvs: Recvs, group: dist.ProcessGroup | None,
                 what: str) -> None:
        b, h, _, c = x.shape
        self.x, self.sends, self.recvs, self.group, self.what = x, sends, recvs, group, what
        with torch.no_grad():
            self.bufs = [x.new_empty(b, h, length, c) for _, length in recvs]
            self.done = comm.p2p_start([(p, _take(x, rs)) for p, rs in sends],
                                       [(p, t) for (p, _), t in zip(recvs, self.bufs)], group, f"{what}.fwd")

    def wait(self) -> torch.Tensor:
        """The received buffers, concatenated in ``recvs`` order (waits for the messages)."""
        self.done()
        b, h, _, c = self.x.shape
        return torch.cat(self.bufs, 2) if self.bufs else self.x.new_empty(b, h, 0, c)

    def finish(self, after: torch.Tensor | None = None) -> torch.Tensor:
        """Wait, and return what ``exchange`` returns (differentiable: the backward pass is the reverse
        exchange)."""
        return Exchange.apply(self.x, self.sends, self.recvs, self.group, self.what, after, self)


def start(x: torch.Tensor, sends: Sends, recvs: Recvs, group: dist.ProcessGroup | None,
          what: str = "halo") -> Pending:
    """``exchange`` split in two: post the messages now, ``.finish()`` later (the same result and backward).

    Args:
        x: As in ``exchange``.
        sends: As in ``exchange``.
        recvs: As in ``exchange``.
        group: As in ``exchange``.
        what: As in ``exchange``.

    Returns:
        The pending exchange.
    """
    return Pending(x, sends, recvs, group, what)


def exchange(x: torch.Tensor, sends: Sends, recvs: Recvs, group: dist.ProcessGroup | None, what: str = "halo",
             after: torch.Tensor | None = None) -> torch.Tensor:
    """Send local token ranges of ``x`` to peers and receive theirs; differentiable.

    Args:
        x: ``(B, H, n, c)``, this rank's tokens on dim 2.
        sends: ``((peer, local ranges), ...)``: what to send to whom (group ranks).
        recvs: ``((peer, tokens), ...)``: what arrives from whom, in the order the output concatenates them.
        group: The process group (None: the world).
        what: The operation's name for counting and errors.
        after: A tensor whose producer's backward must run after this exchange's backward (on every rank):
            this call takes it as a dummy input, which fixes the order of the backward collectives.

    Returns:
        ``(B, H, sum of received tokens, c)``, the received buffers concatenated in ``recvs`` order.
    """
    return Exchange.apply(x, sends, recvs, group, what, after)
