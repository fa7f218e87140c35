"""Whole-sequence layers inside ``sharded``: the token inputs all-gathered, the layer run on every token, this rank's
part of the output kept.

A layer declared ``@whole_sequence`` (``nearfar.layers.sharding``) mixes tokens outside ``attend`` (pooling,
convolutions along the sequence or map, routing over the content of all tokens, scans). Inside ``sharded`` its call
comes here: ``gather_tokens`` all-gathers its input (and the arguments split like it, e.g. a key padding mask) in
the layout's global order, the real tokens ``[0, n_real)`` only; the layer runs once per rank on the whole sequence
with its ``attend`` calls local and its positions not overridden (``sharded`` suspends itself meanwhile); the output
is cut back to this rank's tokens in local order (padding tokens get 0). The backward pass is the adjoint: each rank
back-propagates its own output rows through the whole layer, and the gradients of the gathered input are summed over
the ranks and cut to the rank's tokens (an all-reduce: gloo has no reduce-scatter; the bytes are counted as one).

Cost, per layer and rank: the all-gather of the input (``(P-1)/P`` of the whole input received), the layer's whole
compute on every rank (``P`` times the one-process work in all, the price of exactness without per-layer
distributed code), and in the backward pass the all-reduce of the input's gradient. Parameter gradients are each
rank's share (its output rows), summed over the ranks as for any replicated parameter.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..layers.sharding import WholeSpec, layer_hook
from . import comm
from .layout import Layout


def _place(bufs: list[torch.Tensor], layout: Layout, n: int) -> torch.Tensor:
    """The global ``(B, n, ...)`` tensor from every rank's padded ``(B, most, ...)`` buffer, by the layout's ranges."""
    parts = []
    pieces = sorted((lo, hi, r, base) for r in range(layout.world)
                    for (lo, hi), base in zip(layout.ranges[r], _bases(layout.ranges[r])) if hi > lo)
    for lo, hi, r, base in pieces:
        parts.append(bufs[r][:, base:base + hi - lo])
    out = torch.cat(parts, 1) if parts else bufs[0][:, :0]
    return out[:, :n]


def _bases(ranges: tuple[tuple[int, int], ...]) -> list[int]:
    out, base = [], 0
    for lo, hi in ranges:
        out.append(base)
        base += hi - lo
    return out


def _mine(full: torch.Tensor, layout: Layout, rank: int) -> torch.Tensor:
    """This rank's tokens (dim 1) of the global ``full`` (``layout.n`` long), in local order."""
    parts = [full[:, lo:hi] for lo, hi in layout.ranges[rank]]
    return torch.cat(parts, 1) if parts else full[:, :0].clone()


def _all_gather(x: torch.Tensor, layout: Layout, group: dist.ProcessGroup | None, what: str) -> torch.Tensor:
    most = max(layout.sizes())
    pad = x.new_zeros((x.shape[0], most - x.shape[1], *x.shape[2:]))
    buf = torch.cat([x, pad], 1).contiguous()
    bufs = [torch.empty_like(buf) for _ in range(layout.world)]
    comm.all_gather(bufs, buf, group, what)
    return _place(bufs, layout, layout.n)


class _Gather(torch.autograd.Function):
    """All-gather along dim 1 (global order); backward: the gradient summed over the ranks, this rank's part."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layout: Layout, group: dist.ProcessGroup | None, rank: int) -> torch.Tensor:
        ctx.layout, ctx.group, ctx.rank = layout, group, rank
        return _all_gather(x, layout, group, "whole.gather.fwd")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        g = grad.contiguous().clone()
        comm.all_reduce(g, ctx.group, "whole.gather.bwd")
        return _mine(g, ctx.layout, ctx.rank), None, None, None


def gather_tokens(x: torch.Tensor, layout: Layout, group: dist.ProcessGroup | None, rank: int) -> torch.Tensor:
    """The global ``(B, layout.n, ...)`` tensor from this rank's ``(B, layout.size(rank), ...)``; differentiable for
    floating tensors (gradients summed back onto the owners); bool tensors travel as bytes."""
    if x.dtype == torch.bool:
        return _all_gather(x.to(torch.uint8), layout, group, "whole.gather.fwd").bool()
    if not x.is_floating_point() and not x.is_complex():
        return _all_gather(x, layout, group, "whole.gather.fwd")
    return _Gather.apply(x, layout, group, rank)


def _whole_rows(layout: Layout, row: int, name: str, shape: tuple[int, ...]) -> None:
    bounds = [b for rs in layout.ranges for r in rs for b in r] + [layout.n_real]
    if any(b % row for b in bounds):
        raise ValueError(f"nearfar.distributed.sharded: {name} is a map {shape} with rows of {row} tokens, but the "
                         "layout does not split the map into whole rows (use Layout.slabs(grid, world))")


def make_extent(layout: Layout, rank: int) -> Callable[[tuple[int, ...]], tuple[int, ...]]:
    """``whole_extent`` inside ``sharded``: a map of this rank's tokens (whole rows) -> the map of all real tokens."""
    mine = layout.size(rank)

    def extent(spatial: tuple[int, ...]) -> tuple[int, ...]:
        row = math.prod(spatial[1:])
        if len(spatial) < 2 or math.prod(spatial) != mine or row == 0 or layout.n_real % row:
            return spatial  # not this rank's slab (another map, or a 1D sequence): as given
        return (layout.n_real // row, *spatial[1:])

    return extent


def make_hook(layout: Layout, group: dist.ProcessGroup | None, rank: int,
              suspend: Callable[[], AbstractContextManager[None]]) -> Callable[..., Any]:
    """The ``layer_hook`` of ``sharded``: runs a ``whole_sequence`` layer on the gathered sequence; ``suspend()``
    makes ``sharded`` step aside (attend calls local, positions plain, full grids) while the layer runs."""
    mine = layout.size(rank)

    def hook(module: nn.Module, method: Callable[..., Any], spec: WholeSpec, args: tuple, kwargs: dict) -> Any:
        name = f"{type(module).__name__}.{spec.method}"
        sig = inspect.signature(method)
        bound = sig.bind(module, *args, **kwargs)
        arg_names = list(sig.parameters)
        xname = arg_names[1]
        x = bound.arguments.get(xname)
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"nearfar.distributed.sharded: {name} needs its input {xname} as a tensor")
        k = x.dim() - (2 if spec.channels else 1)
        if k < 1:
            raise ValueError(f"nearfar.distributed.sharded: {name}'s {xname} must be (B, *tokens"
                             f"{', C' if spec.channels else ''}), got {tuple(x.shape)}")
        local = tuple(x.shape[1:1 + k])
        if math.prod(local) != mine:
            raise ValueError(f"nearfar.distributed.sharded: {name}'s {xname} {tuple(x.shape)} holds "
                             f"{math.prod(local)} tokens; each rank passes its own {mine} tokens of the layout")
        row = math.prod(local[1:])
        if k > 1:
            _whole_rows(layout, row, name, local)
        whole = (layout.n_real // row, *local[1:])

        def gather(t: torch.Tensor) -> torch.Tensor:
            flat = t.reshape(t.shape[0], mine, *t.shape[1 + k:])
            full = gather_tokens(flat, layout, group, rank)[:, :layout.n_real]
            return full.reshape(t.shape[0], *whole, *t.shape[1 + k:])

        for pname, value in list(bound.arguments.items())[1:]:
            param = sig.parameters[pname]
            if pname == xname:
                bound.arguments[pname] = gather(x)
            elif pname in spec.tokens and isinstance(value, torch.Tensor):
                if tuple(value.shape[1:1 + k]) != local:
                    raise ValueError(f"nearfar.distributed.sharded: {name}'s {pname} {tuple(value.shape)} must be "
                                     f"split like {xname} (tokens {local} after the batch axis)")
                bound.arguments[pname] = gather(value)
            elif pname in spec.replicated or value is None or value is param.default:
                continue
            elif pname == "cache":
                raise ValueError(f"nearfar.distributed.sharded: {name} got a cache: decoding with caches is not "
                                 "sharded (run decoding on one process)")
            else:
                raise ValueError(f"nearfar.distributed.sharded: {name} runs on the whole sequence inside sharded and "
                                 f"takes no {pname} there (only {xname}"
                                 f"{', ' + ', '.join(spec.tokens) if spec.tokens else ''} split like it"
                                 f"{', ' + ', '.join(spec.replicated) if spec.replicated else ''})")
        with layer_hook(None), suspend():
            out = method(*bound.args, **bound.kwargs)
        batch = x.shape[0]

        def per_token(t: object) -> bool:
            return isinstance(t, torch.Tensor) and t.dim() >= 1 + k and t.shape[0] == batch \
                and tuple(t.shape[1:1 + k]) == whole

        def cut(t: torch.Tensor) -> torch.Tensor:
            flat = t.reshape(batch, layout.n_real, *t.shape[1 + k:])
            pad = flat.new_zeros((batch, layout.n - layout.n_real, *flat.shape[2:]))
            return _mine(torch.cat([flat, pad], 1), layout, rank).reshape(batch, *local, *t.shape[1 + k:])

        first = out[0] if isinstance(out, (tuple, list)) and out else out
        if not per_token(first):
            raise ValueError(f"nearfar.distributed.sharded: {name} returned "
                             f"{tuple(getattr(first, 'shape', ()))}, not one output per input token {whole}: it "
                             "cannot be cut to this rank's tokens")
        if isinstance(out, (tuple, list)):  # per-token parts cut; the rest (global tokens) the same on every rank
            return type(out)(cut(t) if per_token(t) else t for t in out)
        return cut(out)

    return hook
