"""Scaling of ``nearfar.distributed`` on paper, from measurements: predicted time per attention layer at 1-64 ranks.

    python benchmarks/distributed_scaling.py                # model tables + the 2- and 4-process gloo check
    python benchmarks/distributed_scaling.py --quick        # smaller fits and check (a minute)
    python benchmarks/distributed_scaling.py --json out.json

Model (per rank r, no overlap of communication and compute assumed): ``T(P) = max_r [C_r + E_r]`` with
- compute ``C_r = c0 + c1 * W_r``: ``W_r`` the allowed (query, key) pairs of rank r's queries, ``c0, c1`` fitted by
  least squares to single-process ``nearfar.attend`` timings of the same pattern at three sizes on this machine
  (forward, and forward+backward);
- communication ``E_r = m_r * alpha + bytes_r / bandwidth``: ``bytes_r`` what rank r receives per call, from the
  plan (``make_plan(...).traffic``; the tests check it equals the bytes actually sent), ``m_r`` its messages, over a
  stated link (25 and 100 GB/s, alpha = 10 us); the backward pass receives the same again (gradients).
A ring over all K/V (Ring Attention, Liu et al., arXiv 2310.01889; PyTorch's ``context_parallel``) would move
``(P - 1) * n * beta`` per rank and pass: its time ``(P - 1) * (alpha + n * beta / bandwidth)`` is printed beside.

The check runs the real thing on 2 and 4 gloo processes of this machine (loopback; alpha and bandwidth measured by a
ping-pong in the same run) and compares the measured time per layer with the model's prediction from the same fit.
With more processes than cores the ranks share cores, which the prediction accounts for by scaling the compute of
each rank by ``max(1, P / cores)``.
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
from nearfar.distributed.view import global_view  # noqa: E402

ALPHA = 10e-6
LINKS = (25e9, 100e9)
HEADS, DIM, BYTES = 8, 64, 2  # Hq = Hkv = 8, d = 64, bfloat16 on the wire: beta = 2 KiB per token
RANKS = (1, 2, 4, 8, 16, 32, 64)


def _median_time(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fit_compute(kind: str, sizes: list[int], heads: int, d: int, rounds: int) -> dict[str, tuple[float, float]]:
    """``{"fwd": (c0, c1), "fwd+bwd": (c0, c1)}``: seconds = c0 + c1 * pairs, fp32, from single-process timings."""
    pts: dict[str, list[tuple[float, float]]] = {"fwd": [], "fwd+bwd": []}
    for s in sizes:
        pattern, n, pairs = _problem(kind, s)
        q, k, v = (torch.randn(1, heads, n, d, requires_grad=True) for _ in range(3))
        def fwd(q=q, k=k, v=v, pattern=pattern):
            with torch.no_grad():
                nf.attend(q, k, v, pattern)

        def step(q=q, k=k, v=v, pattern=pattern):
            nf.attend(q, k, v, pattern).sum().backward()

        pts["fwd"].append((pairs * heads, _median_time(fwd, rounds)))
        pts["fwd+bwd"].append((pairs * heads, _median_time(step, rounds)))
    out = {}
    for key, xy in pts.items():
        xs, ys = [x for x, _ in xy], [y for _, y in xy]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        c1 = sum((x - mx) * (y - my) for x, y in xy) / sum((x - mx) ** 2 for x in xs)
        c0 = my - c1 * mx
        if c0 < 0:  # a noisy fit: no negative per-call overhead, least squares through the origin
            c0, c1 = 0.0, sum(x * y for x, y in xy) / sum(x * x for x in xs)
        out[key] = (c0, c1)
    return out


def _problem(kind: str, size: int) -> tuple[nf.Pattern, int, int]:
    """Pattern, tokens and allowed pairs (per head) of a case at ``size`` (tokens in 1D, side in 2D)."""
    if kind == "na1d":
        return nf.Neighborhood(513), size, 513 * size  # non-causal NA: exactly k keys per query
    return nf.Neighborhood(13, grid=(size, size)), size * size, 169 * size * size


def _layout(kind: str, size: int, world: int) -> nd.Layout:
    return nd.Layout.contiguous(size, world) if kind == "na1d" else nd.Layout.slabs((size, size), world)


def _traffic(kind: str, size: int, world: int) -> tuple[int, int, int]:
    """(tokens received, messages received, tokens held) of the busiest rank, from the plan."""
    if world == 1:
        return 0, 0, _problem(kind, size)[1]
    lay = _layout(kind, size, world)
    plan = nd.make_plan(_problem(kind, size)[0], lay)
    best = (0, 0, 0)
    for r in range(world):
        t = plan.traffic(r)
        got = t["p2p"][1] + t["bcast"][1]
        msgs = sum(1 for m in plan.messages if m.dst == r) + sum(1 for b in plan.bcasts if b.src != r)
        best = max(best, (got, msgs, lay.size(r)))
    return best


def model_rows(kind: str, sizes: list[int], fit: dict[str, tuple[float, float]]) -> list[dict]:
    beta = 2 * HEADS * DIM * BYTES
    rows = []
    for size in sizes:
        _, n_total, pairs_total = _problem(kind, size)
        t1 = fit["fwd+bwd"][0] + fit["fwd+bwd"][1] * pairs_total * HEADS
        for world in RANKS:
            got, msgs, held = _traffic(kind, size, world)
            c = fit["fwd+bwd"][0] + fit["fwd+bwd"][1] * pairs_total * HEADS * held / n_total
            row = {"case": kind, "size": size, "ranks": world, "tokens/rank": held, "compute_s": c,
                   "halo_MiB": 2 * got * beta / 2**20, "ring_MiB": 2 * (n_total - held) * beta / 2**20}
            for link in LINKS:
                comm = 2 * (msgs * ALPHA + got * beta / link)  # forward + backward
                ring = 2 * (world - 1) * (ALPHA + held * beta / link)
                g = int(link / 1e9)
                row[f"halo_s@{g}"] = comm
                row[f"ring_s@{g}"] = ring
                row[f"eff@{g}"] = t1 / (world * (c + comm))
            rows.append(row)
    return rows


def _pingpong(rank: int, nbytes: int, rounds: int) -> float:
    import torch.distributed as dist

    buf = torch.zeros(nbytes // 4)
    times = []
    for _ in range(rounds):
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        elif rank == 1:
            dist.recv(buf, 0)
            dist.send(buf, 0)
        times.append((time.perf_counter() - t0) / 2)
    return statistics.median(times)


def _check_worker(rank: int, world: int, store: str, kind: str, size: int, rounds: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        small, big = _pingpong(rank, 64, rounds), _pingpong(rank, 16 << 20, rounds)
        pattern, n, _ = _problem(kind, size)
        lay = _layout(kind, size, world)
        g = torch.Generator().manual_seed(0)
        full = [torch.randn(1, HEADS, n, DIM, generator=g) for _ in range(3)]
        q, k, v = (nd.shard(x, lay, rank).requires_grad_() for x in full)
        # the same rank's compute alone: its queries against the keys the plan gives it, no communication
        rp = nd.make_plan(pattern, lay).ranks[rank]
        idx = torch.cat([torch.arange(a, b) for a, b in rp.keys])
        view = global_view(pattern, rp.queries, rp.keys, lay.n_real)
        ka, va = (x.index_select(2, idx).requires_grad_() for x in full[1:])
        qa = q.detach().requires_grad_()
        times: dict[str, list[float]] = {"layer": [], "compute": []}
        for i in range(rounds + 1):
            for name, fn in (("layer", lambda: nd.attend(q, k, v, pattern, layout=lay)),
                             ("compute", lambda: nf.attend(qa, ka, va, view))):
                dist.barrier()
                t0 = time.perf_counter()
                fn().sum().backward()
                elapsed = torch.tensor([time.perf_counter() - t0])
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the layer's time
                if i:
                    times[name].append(float(elapsed))
        if rank == 0:
            bw = (16 << 20) / max(big - small, 1e-9)
            with open(out, "w") as f:
                json.dump({"alpha": small, "bandwidth": bw, "layer_s": statistics.median(times["layer"]),
                           "compute_s": statistics.median(times["compute"])}, f)
    finally:
        dist.destroy_process_group()


def gloo_check(kind: str, size: int, fit: dict[str, tuple[float, float]], rounds: int) -> list[dict]:
    rows = []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _, n_total, pairs_total = _problem(kind, size)
    beta32 = 2 * HEADS * DIM * 4  # fp32 K/V on the wire here
    for world in (2, 4):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out.json")
            mp.start_processes(_check_worker, args=(world, os.path.join(tmp, "store"), kind, size, rounds, out),
                               nprocs=world, start_method="spawn")
            with open(out) as f:
                meas = json.load(f)
        got, msgs, held = _traffic(kind, size, world)
        share = max(1.0, world / cores)
        c = (fit["fwd+bwd"][0] + fit["fwd+bwd"][1] * pairs_total * HEADS * held / n_total) * share
        comm = 2 * (msgs * meas["alpha"] + got * beta32 / meas["bandwidth"])
        rows.append({"case": kind, "size": size, "ranks": world, "layer_s": meas["layer_s"],
                     "compute_alone_s": meas["compute_s"], "overhead_s": meas["layer_s"] - meas["compute_s"],
                     "predicted_comm_s": comm, "fit_compute_s": c, "alpha_us": meas["alpha"] * 1e6,
                     "bandwidth_GBps": meas["bandwidth"] / 1e9, "cores": cores})
    return rows


def _load() -> str:
    try:
        return "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    except OSError:
        return "load average n/a"


def _table(rows: list[dict], cols: list[str]) -> str:
    def fmt(x: object) -> str:
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    fits = {"na1d": fit_compute("na1d", [2048, 4096, 8192] if args.quick else [4096, 8192, 16384], HEADS, DIM,
                                args.rounds),
            "na2d": fit_compute("na2d", [32, 48, 64] if args.quick else [48, 64, 96], HEADS, DIM, args.rounds)}
    rows = model_rows("na1d", [1 << 20, 1 << 22, 1 << 24], fits["na1d"]) + \
        model_rows("na2d", [1024, 2048, 4096], fits["na2d"])
    check = gloo_check("na1d", 8192 if args.quick else 32768, fits["na1d"], args.rounds) + \
        gloo_check("na2d", 48 if args.quick else 96, fits["na2d"], args.rounds)
    print(f"# nearfar.distributed scaling model ({nf.__name__}; torch {torch.__version__}; 1 thread per rank)\n")
    print("Fits (fp32, seconds = c0 + c1 * pairs * heads):", {k: {p: (f"{a:.3g}", f"{b:.3g}") for p, (a, b) in
                                                             v.items()} for k, v in fits.items()}, "\n")
    cols = ["case", "size", "ranks", "tokens/rank", "compute_s", "halo_MiB", "halo_s@25", "halo_s@100", "ring_MiB",
            "ring_s@25", "ring_s@100", "eff@25", "eff@100"]
    print("## Predicted forward+backward per layer (Hq = Hkv = 8, d = 64, bf16 on the wire)\n")
    print(_table(rows, cols), "\n")
    print("## Check against real gloo runs on this machine (fp32)\n")
    print("layer_s: distributed forward+backward (slowest rank); compute_alone_s: the same rank's local attend on "
          "the keys the plan gives it, no messages; overhead_s = layer_s - compute_alone_s, to compare with "
          "predicted_comm_s (plan bytes and messages at the measured alpha and bandwidth); fit_compute_s: the fit's "
          f"compute with ranks sharing {check[0]['cores']} cores ({_load()}).\n")
    print(_table(check, ["case", "size", "ranks", "layer_s", "compute_alone_s", "overhead_s", "predicted_comm_s",
                         "fit_compute_s", "alpha_us", "bandwidth_GBps"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"fits": fits, "model": rows, "check": check}, f, indent=1)


if __name__ == "__main__":
    main()
