"""``sharded(layout)``: run unmodified layers and models on this rank's part of a split sequence.

Inside the block, every ``nearfar.attend`` call of this thread (so every layer built on it) becomes
``nearfar.distributed.attend`` over the group, and ``nearfar.functional.token_positions`` (the positions RoPE reads
in the sequence layers, ``rotary_qkv``) returns the global positions of this rank's tokens. Per-token work
(projections, norms, MLPs, the output head) needs nothing else. What a layer does across tokens other than
``attend`` (pooling, convolutions along the sequence, content routing over all tokens) is not distributed: such
layers are not correct inside the block. The sequence layers of ``PatternAttention`` (``dense``,
``streaming_llm``, ``longformer``, ...) and ``TinyLM`` on them are tested; decoding with caches is not sharded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

from ..functional import AttendCall, intercept_calls, positions_override
from .attention import attend
from .layout import Layout


@contextlib.contextmanager
def sharded(layout: Layout, group: dist.ProcessGroup | None = None, method: str = "auto") -> Iterator[None]:
    """Inside the block, layers built on ``nearfar.attend`` compute this rank's tokens of the split sequence.

    Args:
        layout: How the sequence is split (the same on every rank); the layers' inputs are this rank's tokens,
            ``layout.size(rank)`` of them, in the layout's order.
        group: The process group (None: the default group).
        method: As in ``nearfar.distributed.attend``.

    Yields:
        None.

    Raises:
        ValueError: (from the calls inside) an ``attend`` call with a ``score_mod``, a bias not over the global
            keys, or a sequence length other than this rank's share; a layer asking for positions of a decoding
            step.
    """
    rank = dist.get_rank(group) if layout.world > 1 else 0
    mine = layout.size(rank)

    def positions(start: int, n: int, device: torch.device) -> torch.Tensor:
        if start != 0 or n != mine:
            raise ValueError(f"inside nearfar.distributed.sharded a layer must see this rank's {mine} tokens of the "
                             f"whole sequence (start 0), got {n} tokens from position {start}: decoding with caches "
                             "is not sharded")
        return layout.positions(rank, device)

    def run(call: AttendCall) -> object:
        if call.q.shape[2] != mine or call.k.shape[2] != mine:
            raise ValueError(f"nearfar.distributed.sharded: attend got Nq={call.q.shape[2]}, Nk={call.k.shape[2]}; "
                             f"each must be this rank's {mine} tokens")
        if call.score_mod is not None:
            raise ValueError("nearfar.distributed.sharded runs attend calls without score_mod; this layer passes one")
        return attend(call.q, call.k, call.v, call.pattern, layout=layout, group=group, scale=call.scale,
                      bias=call.bias, rpb=call.rpb, key_padding_mask=call.key_padding_mask, engine=call.engine,
                      return_lse=call.return_lse, method=method, blocks=call.blocks)

    with positions_override(positions), intercept_calls(run):
        yield
