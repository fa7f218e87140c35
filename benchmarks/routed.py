"""Routed far attention (issue 18): run-time key blocks through ``attend(..., blocks=SelectedBlocks(...))``.

    python benchmarks/routed.py                    # R1, R2, R3 and the selection overhead, markdown to stdout
    python benchmarks/routed.py --cases R1 --rounds 5 --peers   # with compiled Flex and fla's naive NSA selection

fp32, B=1, 2 threads (``torch.set_num_threads``), medians of interleaved rounds, ratios per round.

- R1: causal, N = 32,768, Hq = 8, Hkv = 2, d = 64, blocks of 64: each query block keeps the 16 past key blocks
  whose mean-pooled keys score highest against its mean-pooled queries (MoBA's scores, one selection per KV head:
  the group's mean), united with ``SlidingWindow(left=511) & Causal()``. The 16 are chosen among the blocks the
  window does not reach (the ideal speed-up, 16,384 / (16 * 64 + 512) ≈ 10.7x, counts them apart from the
  window). The layer's attention forward **includes** pooling, scoring and top-k. Against dense causal SDPA
  (GQA), its own forward+backward, and (``--peers``) compiled FlexAttention given the same block lists (forward,
  warm; ``BlockMask.from_kv_blocks``) and fla's ``naive_nsa_selection`` on the same indices (the selection
  branch alone, against ours alone).
- R2: the same at N = 131,072 over N = 32,768 (linear growth: <= 4.5x).
- R3: one decoding step over a cache of L tokens: scores of the query against the cached block means, top-16,
  attention over the selected blocks and the window; L = 131,072 over L = 8,192 (dense SDPA over the cache
  grows ~16x).
- Selection overhead: pooling + scores + top-k as a share of the R1 forward.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nearfar as nf  # noqa: E402
from nearfar.bench.timing import interleave, load, median_ratio  # noqa: E402
from nearfar.functional import block_scores, pool_blocks, topk_blocks  # noqa: E402

HQ, HKV, D, BLOCK, TOP, WINDOW = 8, 2, 64, 64, 16, 511
PATTERN = nf.SlidingWindow(left=WINDOW) & nf.Causal()


def inputs(n: int, grad: bool = False, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, HQ, n, D, generator=g)
    k, v = torch.randn(1, HKV, n, D, generator=g), torch.randn(1, HKV, n, D, generator=g)
    return tuple(x.requires_grad_(grad) for x in (q, k, v))


#: key blocks the window reaches from a query block (any of its queries): they are not selected again
NEAR = (WINDOW + BLOCK - 1) // BLOCK + 1


def select(q: torch.Tensor, k: torch.Tensor) -> nf.SelectedBlocks:
    """MoBA's scores (mean-pooled keys against the mean-pooled query block), the top 16 of the past blocks the
    window does not reach: far blocks, as the 16 + window keys of the ideal speed-up count them."""
    with torch.no_grad():
        s = block_scores(pool_blocks(q, BLOCK), pool_blocks(k, BLOCK), k_block_size=BLOCK, q_block_size=BLOCK,
                         include_current=False, group_reduce="mean")
        rows, cols = torch.arange(s.shape[-2])[:, None], torch.arange(s.shape[-1])
        s.masked_fill_(cols > rows - NEAR, float("-inf"))
        num, idx = topk_blocks(s, TOP, q_block_size=BLOCK, k_block_size=BLOCK)
    return nf.SelectedBlocks(num, idx, q_block=BLOCK)


def layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return nf.attend(q, k, v, PATTERN, blocks=select(q, k), engine="blocksparse")


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def r1(rounds: int, peers: bool, out) -> float:
    n = 32768
    q, k, v = inputs(n)
    sel = select(q, k)
    work = nf.backends.selected.selection_work(PATTERN, sel, 1, HQ, HKV, n, n)
    out(f"\n### R1: N={n}, Hq={HQ}, Hkv={HKV}, d={D}, blocks of {BLOCK}, top-{TOP} ∪ SlidingWindow(left={WINDOW}) "
        f"& Causal() ({load()})\n")
    out(f"streams (key blocks per query block): {', '.join(f'{k_}={v_:g}' for k_, v_ in work.items())}")
    from nearfar.backends.native_selected import selected_lists
    from nearfar.backends.selected import _Problem  # the engine's indices -> work step, timed on its own

    def plan():  # the kernel's per-call lists, or the PyTorch path's streams where the kernel is not built
        if nf.native.available():
            return selected_lists(PATTERN, sel, n, n)
        return _Problem(q, k, v, PATTERN, sel, D ** -0.5, None, None)

    def torch_path():
        with nf.native.disabled():
            return layer(q, k, v)

    with torch.no_grad():
        jobs = {"dense": lambda: dense(q, k, v), "layer": lambda: layer(q, k, v), "select": lambda: select(q, k),
                "plan": plan}
        if nf.native.available():
            jobs["torch"] = torch_path
        times = interleave(jobs, rounds=rounds)
    qg, kg, vg = inputs(n, grad=True)

    def train():
        layer(qg, kg, vg).sum().backward()

    tt = interleave({"fwd": lambda: layer(q, k, v), "fwd+bwd": train}, rounds=rounds)
    med = {name: statistics.median(t) for name, t in times.items()}
    speed = median_ratio(times, "dense", "layer")
    out("\n| what | median s | ratio |\n|---|---|---|")
    out(f"| dense causal SDPA | {med['dense']:.3f} | |")
    out(f"| layer forward (selection included) | {med['layer']:.3f} | **{speed:.2f}x** faster than dense "
        f"(target >= 6x, ideal ≈ 10.7x) |")
    out(f"| selection (pool + scores + top-k) | {med['select']:.3f} | {median_ratio(times, 'select', 'layer'):.1%} "
        f"of the layer forward (target <= 20%) |")
    out(f"| indices -> work (the engine's plan of the call: kernel lists and masks, or streams) | {med['plan']:.3f} | "
        f"{median_ratio(times, 'plan', 'layer'):.1%} of the layer forward |")
    if "torch" in med:
        out(f"| layer forward without the compiled kernel (PyTorch streams) | {med['torch']:.3f} | "
            f"{median_ratio(times, 'dense', 'torch'):.2f}x faster than dense; the kernel "
            f"{median_ratio(times, 'torch', 'layer'):.2f}x faster |")
    out(f"| layer forward + backward | {statistics.median(tt['fwd+bwd']):.3f} | "
        f"{median_ratio(tt, 'fwd+bwd', 'fwd'):.2f}x its forward (target <= 3.5x) |")
    if peers:
        _peers(q, k, v, sel, rounds, out)
    return speed


def _peers(q, k, v, sel, rounds, out) -> None:
    with torch.no_grad():
        t0 = time.perf_counter()
        nf.attend(q, k, v, PATTERN, blocks=sel, engine="flex")  # compiles
        first = time.perf_counter() - t0
        times = interleave({"layer": lambda: nf.attend(q, k, v, PATTERN, blocks=sel, engine="blocksparse"),
                            "flex": lambda: nf.attend(q, k, v, PATTERN, blocks=sel, engine="flex")},
                           rounds=rounds)
    out(f"| compiled FlexAttention, same block lists (warm; first call {first:.1f} s) | "
        f"{statistics.median(times['flex']):.3f} | {median_ratio(times, 'flex', 'layer'):.2f}x our attend |")
    try:
        from fla.ops.nsa.naive import naive_nsa_selection
    except Exception as err:  # noqa: BLE001 - an optional peer
        out(f"| fla naive_nsa_selection | not run: {type(err).__name__}: {err} | |")
        return
    # the selection branch alone: every token reads its query block's selected blocks (token-causal), per KV head
    n = q.shape[2]
    # fla masks a negative block (-1: none) as it masks a future key; only the TOP selected columns are passed
    idx = sel.kv_indices.long()[..., :TOP]  # (1, Hkv, QB, TOP)
    tok = idx.repeat_interleave(BLOCK, 2)[:, :, :n].permute(0, 2, 1, 3).contiguous()  # (1, T, Hkv, TOP)
    ours_sel = nf.SelectedBlocks(sel.kv_num_blocks, sel.kv_indices, q_block=BLOCK, within=nf.Causal())
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    with torch.no_grad():
        t0 = time.perf_counter()
        naive_nsa_selection(qt, kt, vt, tok, block_size=BLOCK)
        fla_s = time.perf_counter() - t0
        ours = statistics.median(interleave({"x": lambda: nf.attend(q, k, v, blocks=ours_sel)}, rounds=rounds)["x"])
    out(f"| fla `naive_nsa_selection`, same indices, selection branch only (one call) | {fla_s:.3f} | "
        f"{fla_s / ours:.1f}x our attend of the same pairs ({ours:.3f} s) |")


def r2(rounds: int, out) -> float:
    out(f"\n### R2: growth from N=32,768 to N=131,072 ({load()})\n")
    res = {}
    for n in (32768, 131072):
        q, k, v = inputs(n)
        with torch.no_grad():
            res[n] = statistics.median(interleave({"layer": lambda q=q, k=k, v=v: layer(q, k, v)},
                                                  rounds=max(2, rounds // 2))["layer"])
    ratio = res[131072] / res[32768]
    out(f"| N | layer forward s |\n|---|---|\n| 32,768 | {res[32768]:.3f} |\n| 131,072 | {res[131072]:.3f} |")
    out(f"\ngrowth {ratio:.2f}x for 4x the tokens (target <= 4.5x)")
    return ratio


def decode_step(q1: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kbar: torch.Tensor) -> torch.Tensor:
    """One decoding step: the query's scores against the cached complete-block means, top-16, attention."""
    n = k.shape[2]
    s = block_scores(q1, kbar, k_block_size=BLOCK, q_block_size=1, q_start=n - 1, include_current=False,
                     group_reduce="mean")
    num, idx = topk_blocks(s, TOP, q_block_size=1, k_block_size=BLOCK, q_start=n - 1)
    sel = nf.SelectedBlocks(num, idx, q_block=1, kv_block=BLOCK)
    return nf.attend(q1, k, v, PATTERN, blocks=sel, engine="blocksparse")


def r3(rounds: int, out) -> float:
    out(f"\n### R3: one decoding step over a cache of L tokens ({load()})\n")
    res, dense_t = {}, {}
    out("| L | routed step ms | dense step ms |\n|---|---|---|")
    for n in (8192, 131072):
        q, k, v = inputs(n)
        q1 = q[:, :, -1:].contiguous()
        kbar = pool_blocks(k[:, :, :n // BLOCK * BLOCK], BLOCK)  # kept up to date by a cache, one mean per block
        with torch.no_grad():
            t = interleave({"routed": lambda q1=q1, k=k, v=v, kbar=kbar: decode_step(q1, k, v, kbar),
                            "dense": lambda q1=q1, k=k, v=v: F.scaled_dot_product_attention(q1, k, v,
                                                                                             enable_gqa=True)},
                           rounds=max(15, rounds), warmup=3)
        res[n], dense_t[n] = statistics.median(t["routed"]), statistics.median(t["dense"])
        out(f"| {n:,} | {res[n] * 1e3:.2f} | {dense_t[n] * 1e3:.2f} |")
    ratio = res[131072] / res[8192]
    out(f"\nrouted step growth {ratio:.2f}x (target <= 2x); dense {dense_t[131072] / dense_t[8192]:.1f}x")
    return ratio


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=["R1", "R2", "R3"], choices=["R1", "R2", "R3"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peers", action="store_true", help="also compiled Flex and fla's naive NSA selection")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# routed far attention: fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if "R1" in args.cases:
        r1(args.rounds, args.peers, print)
    if "R2" in args.cases:
        r2(args.rounds, print)
    if "R3" in args.cases:
        r3(args.rounds, print)


if __name__ == "__main__":
    main()
