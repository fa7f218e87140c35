"""Context parallelism for near/far attention over ``torch.distributed``: a sequence (or a map, along its first
axis) split across the ranks of a process group, with communication proportional to what the pattern reads.

- ``attend(q, k, v, pattern, layout=..., group=...)``: each rank passes its own tokens and gets their output;
- ``Layout``: which global tokens each rank holds (``contiguous``, ``slabs``, ``head_tail``), ``shard``/``unshard``;
- ``make_plan``: the messages a pattern needs (halo, broadcasts), from global metadata only;
- ``count_bytes``: the traffic of the calls inside a ``with`` block, per operation and pass;
- ``sharded(layout)``: inside the block, unmodified layers built on ``nearfar.attend`` run on this rank's tokens.
"""

from .attention import attend
from .comm import CommStats, DistributedAttentionError, count_bytes
from .layout import Layout, shard, unshard
from .plan import CommPlan, make_plan, reach
from .ring import ring_attention
from .wrapper import sharded

__all__ = ["attend", "Layout", "shard", "unshard", "make_plan", "CommPlan", "reach", "count_bytes", "CommStats",
           "DistributedAttentionError", "ring_attention", "sharded"]
