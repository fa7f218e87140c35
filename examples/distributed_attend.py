"""Context-parallel neighborhood attention over torch.distributed (CPU, gloo).

    torchrun --nproc_per_node=4 examples/distributed_attend.py

Every rank holds a quarter of the sequence, computes the attention of its own tokens (fetching only the 2 x 64
boundary keys its windows reach from its neighbours) and runs the backward pass; rank 0 checks the gathered result
against single-process ``nearfar.attend`` and prints the bytes each step sent.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

import nearfar as nf
import nearfar.distributed as nd


def run(rank: int, world: int, n: int = 4096) -> float:
    """Distributed NA(129) over ``n`` tokens on ``world`` ranks; returns the largest difference to one process."""
    torch.manual_seed(0)  # the same global tensors on every rank (a demo: real data would be sharded at load time)
    b, hq, hkv, d = 1, 8, 2, 64
    q, k, v = torch.randn(b, hq, n, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    layout = nd.Layout.contiguous(n, world)  # rank r holds tokens layout.ranges[r]
    pattern = nf.Neighborhood(129)  # 64 keys on each side

    ql, kl, vl = (nd.shard(x, layout, rank).requires_grad_() for x in (q, k, v))
    with nd.count_bytes() as stats:
        out = nd.attend(ql, kl, vl, pattern, layout=layout)
        (out.square().sum() / n).backward()  # every rank runs the backward pass through its output

    full = nd.unshard(out, layout)  # (B, Hq, n, d) on every rank
    diff = (full - nf.attend(q, k, v, pattern)).abs().max().item()
    if rank == 0:
        print(f"{world} ranks, {n} tokens: max |distributed - single process| = {diff:.2e}")
        print(f"rank 0 received {dict(stats.recv)} bytes (K/V halo forward, their gradients backward)")
    return diff


if __name__ == "__main__":
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # torchrun sets rank and world size
    try:
        run(dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()
