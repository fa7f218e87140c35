"""Bytes each rank receives per ``nearfar.distributed.attend`` call, counted on real gloo processes, against the
closed form and what a ring over all K/V would move.

    python benchmarks/distributed_bytes.py                # 4 processes, 8192 tokens (a 128 x 64 map in 2D), fp32

Every rank runs forward and backward under ``count_bytes()``; the table gives a middle rank's (rank 1) K/V bytes
received in the forward pass (the backward pass sends the same amounts back as gradients), the plan's prediction
(``make_plan(...).traffic``), the closed form, and a ring's ``(P - 1) * n_rank * beta``, with ``beta = 2 * Hkv * d *
4`` bytes per token (B = 1, Hkv = 2, d = 64, fp32).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nearfar as nf  # noqa: E402
import nearfar.distributed as nd  # noqa: E402

N, W, HKV, D = 8192, 64, 2, 64
BETA = 2 * HKV * D * 4


def problems(world: int) -> list[tuple[str, object, object, str, int]]:
    """(name, pattern, layout, closed form, closed-form tokens received by rank 1)."""
    c, s = nd.Layout.contiguous(N, world), nd.Layout.slabs((N // W, W), world)
    return [
        ("Neighborhood(129)", nf.Neighborhood(129), c, "(k-1)·β", 128),
        ("Neighborhood(33, dilation=4)", nf.Neighborhood(33, dilation=4), c, "(k-1)·δ·β", 128),
        ("SlidingWindow(255) & Causal()", nf.SlidingWindow(255) & nf.Causal(), c, "l·β", 255),
        ("(SlidingWindow(255) | Sinks(4)) & Causal()", (nf.SlidingWindow(255) | nf.Sinks(4)) & nf.Causal(), c,
         "(l+m)·β", 259),
        ("Neighborhood(13) on 128×64, slabs", nf.Neighborhood(13, grid=(N // W, W)), s, "(k0-1)·w·β", 12 * W),
        ("Blocks(8×8, shift 4) on 128×64, slabs", nf.Blocks(8, grid=(N // W, W), shift=4), s,
         "M·w·β (M/2 rows per side)", 8 * W),
        ("SlidingWindow(64) | GlobalTokens(16)", nf.SlidingWindow(64, 64) | nf.GlobalTokens(16), c, "(l+r+m)·β",
         144),
    ]


def _worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        rows = []
        for name, pattern, lay, form, tokens in problems(world):
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, HKV, N, D, generator=g) for _ in range(3))
            ql, kl, vl = (nd.shard(x, lay, rank).requires_grad_() for x in (q, k, v))
            with nd.count_bytes() as stats:
                nd.attend(ql, kl, vl, pattern, layout=lay).sum().backward()
            t = nd.make_plan(pattern, lay).traffic(rank)
            counted = stats.recv.get("kv.halo.fwd", 0) + stats.recv.get("kv.bcast.fwd", 0)
            rows.append({"name": name, "counted": counted,
                         "plan": (t["p2p"][1] + t["bcast"][1]) * BETA, "form": form, "form_bytes": tokens * BETA,
                         "back": stats.sent.get("kv.halo.bwd", 0) + stats.sent.get("kv.bcast.bwd", 0),
                         "ring": (world - 1) * lay.size(rank) * BETA})
        with open(os.path.join(out, f"{rank}.json"), "w") as f:
            json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def main() -> None:
    world = 4
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, os.path.join(tmp, "store"), tmp), nprocs=world, start_method="spawn")
        rows = json.load(open(os.path.join(tmp, "1.json")))
    print(f"{world} gloo ranks, {N} tokens, rank 1, fp32, Hkv = {HKV}, d = {D} (β = {BETA} B/token)\n")
    print("| pattern | counted fwd | plan | closed form | backward sent | ring over all K/V | ring ÷ counted |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        name = r["name"].replace("|", "\\|")  # a union's bar inside a Markdown table cell
        print(f"| `{name}` | {r['counted']:,} | {r['plan']:,} | {r['form']} = {r['form_bytes']:,} | "
              f"{r['back']:,} | {r['ring']:,} | {r['ring'] / max(r['counted'], 1):,.0f} |")


if __name__ == "__main__":
    main()
