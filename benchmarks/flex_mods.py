"""FlexAttention's functions on nearfar: ``attend`` with a ``MaskMod`` (and a ``score_mod``) against the same
pattern built from nearfar's classes and against eager FlexAttention, forward and forward+backward.

    python benchmarks/flex_mods.py                      # N=8192, d=64, H=4, B=1, markdown to stdout
    python benchmarks/flex_mods.py --n 1024 --rounds 2  # a quick run

Cases (fp32, one batch item, a causal window of ``--window`` keys):

- ``swa``: the window as ``MaskMod`` vs ``SlidingWindow(left=W-1) & Causal()``;
- ``swa+doc``: the window inside documents packed into the sequence (fixed random lengths), as ``MaskMod`` vs
  ``PackedCausal(lengths) & SlidingWindow(left=W-1) & Causal()``, the ``Pattern`` with a tile-level test of the
  "Coming from FlexAttention" docs page;
- ``swa+doc+softcap``: the same with Gemma 2's ``score_mod`` (``50 * tanh(score / 50)``) on both.

Each nearfar method runs with ``engine="auto"`` (the block-sparse engine here; its compiled CPU kernel where it is
built, except with a ``score_mod``, which takes the PyTorch tile path). Eager Flex is ``flex_attention`` with
``create_block_mask`` (128-token blocks) without ``torch.compile``: on CPU that materialises the whole score matrix
and is forward-only, so its forward+backward is ``math_attention``, the eager math ``flex_attention`` runs,
differentiated by autograd (about ten ``N x N`` float32 buffers per head: ~10 GiB at N=8192, H=4; ``--no-flex-grad``
skips it). Reported: medians (ms) over interleaved rounds, the median per-round ratio of each method to the
``MaskMod`` call, and the one-off costs: the first ``MaskMod`` call of a shape (the scan of the function and the
plan), and ``create_block_mask``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nearfar as nf  # noqa: E402
from nearfar import native  # noqa: E402
from nearfar.bench.timing import attention_call, interleave, load, median_ratio  # noqa: E402


class PackedCausal(nf.Pattern):
    """Causal attention inside each document of a packed sequence (the documents' lengths, in order): the
    docs page's example of a ``Pattern`` with a tile-level test."""

    def __init__(self, lengths: list[int]) -> None:
        self.lengths = tuple(int(n) for n in lengths)
        self.doc = torch.repeat_interleave(torch.arange(len(self.lengths)), torch.tensor(self.lengths))

    def allowed(self, q: torch.Tensor, k: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        doc = self.doc.to(q.device)
        return (doc[q] == doc[k]) & (k <= q)

    def block_allowed(self, qt: nf.patterns.Tiles, kt: nf.patterns.Tiles, nq: int, nk: int) -> torch.Tensor:
        doc = self.doc.to(qt.idx.device)
        _, q_hi = qt.bounds(qt.idx)
        k_lo, _ = kt.bounds(kt.idx)
        dq_lo, dq_hi = qt.bounds(doc[qt.idx.clamp(min=0)])
        dk_lo, dk_hi = kt.bounds(doc[kt.idx.clamp(min=0)])
        return (k_lo <= q_hi[:, None]) & (dk_lo <= dq_hi[:, None]) & (dq_lo[:, None] <= dk_hi)

    def _key(self) -> tuple:
        return ("PackedCausal", self.lengths)


def lengths_for(n: int, seed: int = 0) -> list[int]:
    """Document lengths summing to ``n``: 5 documents of random sizes."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randperm(n - 1, generator=g)[:4] + 1).values.tolist()
    edges = [0, *cuts, n]
    return [b - a for a, b in zip(edges, edges[1:])]


def softcap(score, b, h, q_idx, kv_idx):
    return 50.0 * torch.tanh(score / 50.0)


def cases(n: int, w: int) -> dict[str, tuple]:
    """name: (mask_mod, the same pattern from nearfar's classes, score_mod)."""
    docs = PackedCausal(lengths_for(n))
    doc = docs.doc

    def swa(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < w)

    def swa_doc(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx) & (q_idx - kv_idx < w)

    window = nf.SlidingWindow(left=w - 1) & nf.Causal()
    return {"swa": (swa, window, None), "swa+doc": (swa_doc, docs & window, None),
            "swa+doc+softcap": (swa_doc, docs & window, softcap)}


def run_case(name: str, n: int, w: int, h: int, d: int, rounds: int, flex_grad: bool) -> list[tuple]:
    from torch._higher_order_ops.flex_attention import math_attention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask_mod, built, score_mod = cases(n, w)[name]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, d, generator=g) for _ in range(3))
    go = torch.randn(1, h, n, d, generator=g)
    scale = d ** -0.5
    pattern = nf.MaskMod(mask_mod)
    nf.clear_caches()
    t0 = time.perf_counter()
    with torch.no_grad():
        nf.attend(q, k, v, pattern, score_mod=score_mod)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    block_mask = create_block_mask(mask_mod, None, None, n, n, device="cpu")
    build = time.perf_counter() - t0
    identity = score_mod or (lambda s, *_: s)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        leaves = [t.clone().requires_grad_(mode == "fwd+bwd") for t in (q, k, v)]

        def call(fn, leaves=leaves, mode=mode):
            return attention_call(fn, leaves, mode, go)

        fns = {"MaskMod": call(lambda a, b, c: nf.attend(a, b, c, pattern, score_mod=score_mod)),
               "built-in": call(lambda a, b, c: nf.attend(a, b, c, built, score_mod=score_mod))}
        if mode == "fwd":
            fns["Flex eager"] = call(lambda a, b, c: flex_attention(a, b, c, score_mod=score_mod,
                                                                    block_mask=block_mask, scale=scale))
        elif flex_grad:
            fns["Flex eager"] = call(lambda a, b, c: math_attention(a, b, c, identity, block_mask.as_tuple(), scale,
                                                                    {})[0])
        times = interleave(fns, rounds=rounds)
        for m in fns:
            rows.append((name, mode, m, statistics.median(times[m]) * 1e3, median_ratio(times, m, "MaskMod")))
    rows.append((name, "first MaskMod call", "scan + plan", first * 1e3, float("nan")))
    rows.append((name, "create_block_mask", "Flex", build * 1e3, float("nan")))
    return rows


def check(n: int, w: int, h: int, d: int) -> None:
    """The methods agree before anything is timed (forward, fp32)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, n, d, generator=g) for _ in range(3))
    with torch.no_grad():
        for name, (mask_mod, built, score_mod) in cases(n, w).items():
            ref = flex_attention(q, k, v, score_mod=score_mod,
                                 block_mask=create_block_mask(mask_mod, None, None, n, n, device="cpu"))
            for p in (nf.MaskMod(mask_mod), built):
                err = float((nf.attend(q, k, v, p, score_mod=score_mod) - ref).abs().max())
                assert err < 1e-4, f"{name}: {p!r} differs from Flex by {err}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cases", nargs="*", default=list(cases(64, 8)), choices=list(cases(64, 8)))
    parser.add_argument("--no-flex-grad", action="store_true", help="skip eager Flex's forward+backward")
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    check(min(args.n, 1024), min(args.window, 256), args.heads, args.dim)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native kernel: {native.available()}, "
          f"N={args.n}, window={args.window}, H={args.heads}, d={args.dim}, {load()}\n")
    print("| case | mode | method | ms | time / MaskMod |")
    print("|---|---|---|---|---|")
    for name in args.cases:
        for case, mode, method, ms, ratio in run_case(name, args.n, args.window, args.heads, args.dim, args.rounds,
                                                      not args.no_flex_grad):
            print(f"| {case} | {mode} | {method} | {ms:.1f} | {'' if ratio != ratio else f'{ratio:.2f}'} |",
                  flush=True)
    print(f"\n{load()}")


if __name__ == "__main__":
    main()
