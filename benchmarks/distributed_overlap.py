"""Overlap of the halo exchange with local compute in ``nearfar.distributed.attend`` (``overlap=True``), measured.

    python benchmarks/distributed_overlap.py            # 2 gloo processes, NA(129) over 16384 tokens, fp32
    python benchmarks/distributed_overlap.py --n 4096 --rounds 5

Each rank runs the forward pass with and without ``overlap`` (alternating, ``--rounds`` times each) and reports
the median time per call, the median time it spent blocked waiting for the halo (``count_bytes().waited``), and the
largest difference between the two outputs. With ``overlap`` the halo messages are posted, the queries that read
only the rank's keys run, and the wait comes after them: the wait shrinks by up to that compute. On gloo over CPU
the transfer is a copy through loopback that competes for the same cores, so the gain is bounded by what the
machine can do in parallel; on GPUs with NCCL the copy engine and the SMs overlap.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nearfar as nf  # noqa: E402
import nearfar.distributed as nd  # noqa: E402


def _worker(rank: int, world: int, store: str, n: int, kernel: int, rounds: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 8, n, 64, generator=g) for _ in range(3))
        lay = nd.Layout.contiguous(n, world)
        ql, kl, vl = (nd.shard(x, lay, rank) for x in (q, k, v))
        pattern = nf.Neighborhood(kernel)
        times: dict[bool, list[float]] = {False: [], True: []}
        waits: dict[bool, list[float]] = {False: [], True: []}
        outs = {}
        for i in range(2 * rounds + 2):
            ov = bool(i % 2)
            dist.barrier()
            with nd.count_bytes() as stats, torch.no_grad():
                t0 = time.perf_counter()
                outs[ov] = nd.attend(ql, kl, vl, pattern, layout=lay, overlap=ov)
                dt = time.perf_counter() - t0
            if i >= 2:  # the first pair warms up
                times[ov].append(dt)
                waits[ov].append(stats.waited.get("kv.halo.fwd", 0.0))
        res = {"rank": rank, "diff": (outs[True] - outs[False]).abs().max().item(),
               "interior": nd.make_plan(pattern, lay).ranks[rank].interior}
        for ov in (False, True):
            res[f"time_{'on' if ov else 'off'}_ms"] = 1e3 * statistics.median(times[ov])
            res[f"wait_{'on' if ov else 'off'}_ms"] = 1e3 * statistics.median(waits[ov])
        with open(os.path.join(out, f"{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--kernel", type=int, default=129)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(args.world, os.path.join(tmp, "store"), args.n, args.kernel, args.rounds,
                                          tmp), nprocs=args.world, start_method="spawn")
        rows = [json.load(open(os.path.join(tmp, f"{r}.json"))) for r in range(args.world)]
    print(f"NA({args.kernel}) over {args.n} tokens, {args.world} gloo ranks, fp32, B=1, H=8, d=64 (forward)")
    print("rank | time off / on (ms) | halo wait off / on (ms) | max |out_on - out_off|")
    for r in rows:
        print(f"{r['rank']} | {r['time_off_ms']:.1f} / {r['time_on_ms']:.1f} | {r['wait_off_ms']:.2f} / "
              f"{r['wait_on_ms']:.2f} | {r['diff']:.1e}")


if __name__ == "__main__":
    main()
